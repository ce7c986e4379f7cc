"""The fewest training tokens to val perplexity <= 657 (the seed's 3-epoch result): `scratch_fast.py` with the
settings `sweeps/fewest_tokens.yaml` found (trial 1 of 14, rounded), sized by a token budget so its warmup and
decay fit the run. The sweep ran every trial at 500k tokens; its best reached 665.4 there (the 657 target at
500k was missed); at 600k tokens this recipe passes 657 (README, Sweeps and budgets, has the figures).

    accelerate launch trainer/run.py recipes/fewest_tokens.py
    make train RECIPE=recipes/fewest_tokens.py
    python -m trainer.sweep sweeps/fewest_tokens.yaml          # the sweep that found it
"""

from recipes.scratch_fast import config as fast

config = fast.derive(
    name="fewest_tokens",
    data={"mlm_probability": 0.73},
    optim={"lr": 1.2e-3, "muon_lr": 0.015, "warmup_ratio": 0.03, "decay_ratio": 0.22},
    train={"token_budget": "600k", "eval_every": 98},
    log={"tags": ["scratch", "fast", "fewest-tokens"]},
)
