"""Pre-train the same ~10M-parameter BERT from scratch with the same data, batch and token budget
as recipes/scratch.py (3 epochs of WikiText-2, batch 8), tuned for a lower validation perplexity.

Changes from scratch.py, each kept because it lowered the validation loss at an equal token budget
in 1M-token runs (README, Results, lists what each did):
- lr 1e-3 with Adam beta2 0.98, and no dropout (three epochs of 2M tokens do not overfit 10M parameters);
- 75% of tokens masked in training instead of 15% (Wettig et al. 2022, "Should You Mask 15% in Masked
  Language Modeling?"): more predictions per token processed. The MLM head runs on masked rows only,
  so it costs 5x more per step than at 15%. Evaluation still masks 15%.

    accelerate launch trainer/run.py recipes/scratch_tuned.py
    make scratch-tuned
"""

from recipes.scratch import config as scratch

config = scratch.derive(
    name="scratch_tuned",
    model={"dropout": 0.0},
    data={"mlm_probability": 0.75},
    optim={"lr": 1e-3, "beta2": 0.98},
    log={"tags": ["scratch", "tuned"]},
)
