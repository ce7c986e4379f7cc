"""Pre-train the same ~10M-parameter BERT from scratch with the same data, batch and token budget
as recipes/scratch.py (3 epochs of WikiText-2, batch 8), tuned for a lower validation perplexity.

Changes from scratch.py. Each was kept because it lowered the validation loss at an equal token
budget in 1,000-step (1M-token) runs, made one after the other (the first five with BERT's 0.02 init,
where the seed's settings give 7.00; README: the full runs):
- lr 1e-3 (from 5e-4) with Adam beta2 0.98, dropout 0.0 (three epochs of 2M tokens do not overfit a
  10M-parameter model)                                                          -> 6.97
- 40% of tokens masked in training instead of 15% (Wettig et al. 2022, "Should You Mask 15% in
  Masked Language Modeling?"): more predictions per token processed             -> 6.85
  + position embeddings started as sinusoids (now in scratch.py)                -> 6.83
  + 60% masks -> 6.75; 75% masks                                                -> 6.73
  + init std 0.05 instead of 0.02 (now in scratch.py; 0.08 and 0.12 were worse:
    7.15 and 7.46 at 0.5M tokens, against 6.85)                                 -> 6.62
Evaluation still masks 15%, so validation numbers compare with every other run. Tried and not kept:
lr 2e-3 (6.83 against 6.75 at 60% masks), lr 3e-3 (7.49 at 0.5M tokens), batch 32 with lr 2e-3
(7.36), batch 4 (6.85 against 6.85: no gain for a slower step). A 75% mask rate makes the MLM head
(which runs on masked rows only) 5x larger than at 15%: ~4.1k tokens/s instead of ~7.4k.

    accelerate launch trainer/run.py recipes/scratch_tuned.py
    make scratch-tuned
"""

import dataclasses

from recipes.scratch import config as scratch

config = dataclasses.replace(
    scratch,
    name="scratch_tuned",
    model=dataclasses.replace(scratch.model, dropout=0.0),
    data=dataclasses.replace(scratch.data, mlm_probability=0.75),
    optim=dataclasses.replace(scratch.optim, lr=1e-3, beta2=0.98),
    log=dataclasses.replace(scratch.log, tags=["scratch", "tuned"]),
)
