"""Data: where text comes from (sources.py), tokenizers (tokenizer.py), the tokenized, packed and
memory-mapped corpus (store.py) and BERT's masks (masking.py).

    plan_splits(cfg)  ->  a Stream of documents per split  ->  open_store (tokenize once, cached)
    ->  Blocks (rows of block_size tokens, memory-mapped)  ->  IndexedBlocks + MLMCollator in a DataLoader
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from trainer.config import DataConfig
from trainer.data.masking import (EVAL_MASK_PROBABILITY, EVAL_MASK_SEED, IndexedBlocks, MLMCollator, dense_labels,
                                  eval_collator, eval_dataloader)
from trainer.data.sources import DataError, Stream, plan_splits
from trainer.data.store import Blocks, open_store
from trainer.data.tokenizer import load_tokenizer

__all__ = ["EVAL_MASK_PROBABILITY", "EVAL_MASK_SEED", "Blocks", "DataError", "IndexedBlocks", "MLMCollator",
           "SplitBlocks", "dense_labels", "eval_collator", "eval_dataloader", "load_blocks", "load_tokenizer"]

SMALL_CORPUS_BYTES = 8 << 20  # below this, starting worker processes costs more than it saves
MAX_DEFAULT_PROCS = 8


@dataclass
class SplitBlocks:
    name: str
    blocks: Blocks  # (num_blocks, block_size), memory-mapped
    documents: int  # non-blank documents (lines or records) in this split
    records: int  # lines or records read, blank ones included

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser() / "tokens"
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "bert_mlm_tokens"


def processes_for(stream: Stream, cfg: DataConfig) -> int:
    wanted = cfg.num_proc if cfg.num_proc is not None else min(os.cpu_count() or 1, MAX_DEFAULT_PROCS)
    return 1 if stream.size_bytes() < SMALL_CORPUS_BYTES else max(wanted, 1)


def load_blocks(cfg: DataConfig, tokenizer, split: str, log=print) -> SplitBlocks:
    """The blocks of `split` ("train", "validation" or "test"), tokenized on first use and cached."""
    plan = plan_splits(cfg)
    if split == "validation" and plan.validation is None:
        if not plan.heldout:
            raise DataError(f"{cfg.dataset} has no validation split and data.validation_split is 0: hold out a share "
                            f"(--data.validation_split=0.05) or name one (--data.validation_dataset=FILES)")
        stream, part = plan.train, "heldout"
    else:
        stream, part = getattr(plan, split), "train"
        if stream is None:
            raise DataError(f"{cfg.dataset} has no {split} split (no file or Hub split named for it)")
    heldout = plan.heldout if stream is plan.train else 0.0
    store = open_store(stream, tokenizer, heldout, cache_root(cfg), processes_for(stream, cfg), log)
    limit = cfg.max_train_blocks if split == "train" else cfg.max_eval_blocks
    blocks = store.blocks(part, cfg.block_size, limit)
    documents = store.meta["documents"][part]
    if len(blocks) == 0:
        share = (f"; data.validation_split={heldout} holds out {store.meta['documents']['heldout']:,} of "
                 f"{sum(store.meta['documents'].values()):,} documents" if heldout else "")
        raise DataError(f"the {split} split of {stream.describe()} has {store.meta['tokens'][part]:,} tokens, fewer "
                        f"than one block of data.block_size={cfg.block_size}{share}: add text or lower "
                        f"--data.block_size")
    held = f"  ({heldout:.0%} of the training documents held out: data.validation_split)" if part == "heldout" else ""
    log(f"data {split:<10} {store.meta['records']:>7,} lines -> {documents:>7,} "
        f"{'held-out' if part == 'heldout' else 'non-blank'} -> {len(blocks):>6,} blocks of {cfg.block_size} "
        f"({blocks.numel():,} tokens)  from {stream.describe()}{held}")
    return SplitBlocks(split, blocks, documents=documents, records=store.meta["records"])
