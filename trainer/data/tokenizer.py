"""Tokenizers: loading one (Hub id or directory), and training a BERT WordPiece tokenizer on a corpus.

    python -m trainer.tokenizer --data.dataset=notes/ --vocab-size=8000 --output=tokenizers/notes
    accelerate launch trainer/run.py recipes/scratch.py --data.dataset=notes/ --data.tokenizer=tokenizers/notes

Training reads the training split as a stream of document chunks (the held-out validation documents
excluded), so the corpus is never whole in memory: HF `tokenizers` keeps only word counts. The result is
BERT's layout (lowercasing and accent stripping as chosen, [PAD] [UNK] [CLS] [SEP] [MASK], `##` word
pieces, `[CLS] text [SEP]`), saved with `save_pretrained`: `AutoTokenizer.from_pretrained(DIR)` loads it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from trainer.data.sources import DataError, plan_splits

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    except Exception as e:
        raise DataError(
            f"could not load tokenizer {name_or_path!r} ({type(e).__name__}); offline, pass a local directory "
            f"with tokenizer.json/vocab.txt, e.g. --data.tokenizer=../shared/data/bert-base-uncased"
        ) from e
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"tokenizer {name_or_path!r} has no fast (Rust) version; save one with tokenizer.json")
    if tokenizer.mask_token is None or tokenizer.mask_token not in tokenizer.get_vocab():
        raise DataError(f"tokenizer {name_or_path!r} has no mask token, which masked-language modelling needs: "
                        f"use a BERT-style tokenizer, or train one: python -m trainer.tokenizer --data.dataset=...")
    return tokenizer


def train_tokenizer(texts, vocab_size: int, lowercase: bool = True, min_frequency: int = 2,
                    max_length: int = 512):
    """A BERT WordPiece tokenizer trained on `texts` (an iterator of lists of strings), as a
    `BertTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase or None)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=tokenizer, do_lower_case=lowercase, model_max_length=max_length,
                             **dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"),
                                        SPECIAL_TOKENS)))


def training_texts(data_cfg):
    """The training split's documents in chunks, without the held-out validation documents."""
    from trainer.data.store import heldout_mask, numbered

    plan = plan_splits(data_cfg)
    for first, docs in numbered(plan.train.chunks()):
        docs = [doc.replace("<unk>", " ") for doc in docs]  # WikiText's marker is not a word
        if plan.heldout:
            held = heldout_mask(first, len(docs), plan.heldout)
            docs = [doc for doc, out in zip(docs, held) if not out]
        yield docs


USAGE = """usage: python -m trainer.tokenizer [RECIPE.py] --data.dataset=DATA --output=DIR [--vocab-size=30522]
                                 [--lowercase=true] [--min-frequency=2] [--data.key=value ...]
Trains a BERT WordPiece tokenizer on the training split of DATA (any source --data.dataset takes) and
saves it to DIR; then train with --data.tokenizer=DIR."""


def main(argv: list[str] | None = None) -> int:
    from trainer.config import ConfigError, Config, apply_overrides, load_recipe, parse_value

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0 if argv else 2
    options = {"output": None, "vocab-size": "30522", "lowercase": "true", "min-frequency": "2"}
    recipe = argv.pop(0) if not argv[0].startswith("--") else None
    overrides = []
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if key.replace("_", "-") in options:
            options[key.replace("_", "-")] = value
        else:
            overrides.append(arg)
    try:
        cfg = apply_overrides(load_recipe(recipe) if recipe else Config(), overrides).validate()
        if not options["output"]:
            raise ConfigError("--output=DIR is needed: where to save the tokenizer")
        vocab_size = parse_value(options["vocab-size"], int)
        lowercase = parse_value(options["lowercase"], bool)
        min_frequency = parse_value(options["min-frequency"], int)
        if vocab_size < len(SPECIAL_TOKENS) + 1 or min_frequency < 1:
            raise ConfigError("--vocab-size must exceed the 5 special tokens and --min-frequency be at least 1")
        tokenizer = train_tokenizer(training_texts(cfg.data), vocab_size, lowercase, min_frequency,
                                    max_length=cfg.model.max_position_embeddings)
        tokenizer.save_pretrained(options["output"])
    except (ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer: {len(tokenizer):,} tokens (asked {vocab_size:,}), lowercase {lowercase}, trained on "
          f"{cfg.data.train_dataset or cfg.data.dataset}; saved to {Path(options['output'])}\n"
          f"use it with: --data.tokenizer={options['output']}")
    return 0
