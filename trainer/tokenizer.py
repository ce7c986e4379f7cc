"""`python -m trainer.tokenizer --data.dataset=DATA --output=DIR`: train a BERT WordPiece tokenizer on your
corpus (trainer/data/tokenizer.py), then train a model with `--data.tokenizer=DIR`."""

import sys

from trainer.data.tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
