"""Pre-train the same ~10M-parameter BERT from scratch with the same data, batch and token budget
as recipes/scratch.py (3 epochs of WikiText-2, batch 8), tuned for a lower validation perplexity.

Changes from scratch.py, each measured on 1,000-step (1M-token) runs against the seed's settings
(val loss 7.00 at 1M tokens; see the README for the full runs):
- 40% of tokens masked in training instead of 15% (Wettig et al. 2022, "Should You Mask 15% in
  Masked Language Modeling?"): more predictions per token processed. Evaluation still masks 15%,
  so validation numbers compare with every other run.             -> 6.85 at 1M tokens
- lr 1e-3 (from 5e-4) with Adam beta2 0.98 (RoBERTa's, steadier at the higher rate); lr 3e-3 and
  batch 32 / lr 2e-3 were worse at equal tokens (7.49 at 0.5M, 7.36 at 1M).
- dropout 0.0: three epochs of 2M tokens do not overfit a 10M-parameter model; dropout only slows it.

    accelerate launch trainer/run.py recipes/scratch_tuned.py
    make scratch-tuned
"""

import dataclasses

from recipes.scratch import config as scratch

config = dataclasses.replace(
    scratch,
    name="scratch_tuned",
    model=dataclasses.replace(scratch.model, dropout=0.0),
    data=dataclasses.replace(scratch.data, mlm_probability=0.4),
    optim=dataclasses.replace(scratch.optim, lr=1e-3, beta2=0.98),
    log=dataclasses.replace(scratch.log, tags=["scratch", "tuned"]),
)
