"""Data: load WikiText (Hub or local files), clean, tokenize, cut into blocks, mask.

Pipeline: lines -> drop blank lines, `<unk>` -> `[UNK]` -> tokenize each line ([CLS] ... [SEP]) ->
concatenate a split and cut it into `block_size` blocks (the remainder is dropped). Tokenizing and
blocking are `datasets.map` calls, so they are cached on disk and a second run starts in seconds.

Masking happens per batch in `MLMCollator`, vectorised, with randomness keyed on
(seed, epoch, sample index): every sample gets new masks each epoch (dynamic masking), the same
sample gets the same mask however the batch is split across processes or accumulation steps, a
resumed run masks exactly as an uninterrupted one, and evaluation masks never change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.config import DataConfig

SPLIT_FILES = {"train": ["wiki.train"], "validation": ["wiki.valid", "wiki.validation"], "test": ["wiki.test"]}
EVAL_MASK_SEED = 1234  # fixed, independent of the train seed, so every run is scored on the same masks
EVAL_MASK_PROBABILITY = 0.15  # BERT's rate, whatever data.mlm_probability a recipe trains with


class DataError(ValueError):
    """Missing or unusable data; reported as one line telling the user what to do."""


# --------------------------------------------------------------------------- loading


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    except Exception as e:
        raise DataError(
            f"could not load tokenizer {name_or_path!r} ({type(e).__name__}); offline, pass a local directory "
            f"with tokenizer.json/vocab.txt, e.g. --data.tokenizer=../shared/data/bert-base-uncased"
        ) from e


def find_split_file(directory: Path, split: str) -> Path | None:
    for stem in SPLIT_FILES[split]:
        for suffix in (".raw", ".tokens", ".txt"):
            if (directory / (stem + suffix)).is_file():
                return directory / (stem + suffix)
    return None


def load_split_text(source: str, dataset_config: str, split: str, cache_dir: str | None):
    """One split as a `datasets.Dataset` with a "text" column, from a local directory or the Hub."""
    import datasets

    path = Path(source).expanduser()
    if path.is_dir():
        file = find_split_file(path, split)
        if file is None:
            names = " or ".join(f"{s}.raw/.tokens" for s in SPLIT_FILES[split])
            hint = " (or point --data.train_dataset at a directory that has it)" if split == "train" else ""
            raise DataError(f"no {split} split in {path}: expected {names}{hint}")
        # The "text" builder makes one row per line; blank rows are dropped by `clean_lines`.
        try:
            return datasets.load_dataset("text", data_files={split: str(file)}, split=split, cache_dir=cache_dir)
        except Exception as e:
            if isinstance(e.__cause__ or e, UnicodeDecodeError):
                try:
                    file.read_bytes().decode("utf-8")
                    where = ""
                except UnicodeDecodeError as bad:
                    where = f" (byte {bad.object[bad.start:bad.start + 1]!r} at offset {bad.start:,})"
                raise DataError(f"{file} is not UTF-8 text{where}; convert it, e.g. "
                                f"iconv -f latin1 -t utf-8 {file.name} > {file.stem}.utf8{file.suffix}") from None
            raise
    if source.startswith((".", "/", "~")) or "\\" in source:
        raise DataError(f"dataset directory not found: {source}")
    try:
        return datasets.load_dataset(source, dataset_config, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise DataError(
            f"could not load {source}/{dataset_config} split {split!r} from the Hub ({type(e).__name__}). "
            f"Offline? Put wiki.train.raw/wiki.valid.raw/wiki.test.raw in a directory and pass --data.dataset=DIR"
        ) from e


def clean_lines(dataset):
    """Drop blank/whitespace-only lines and map the tokenized variant's `<unk>` to BERT's `[UNK]`."""
    dataset = dataset.filter(lambda batch: [bool(t.strip()) for t in batch["text"]], batched=True)
    return dataset.map(lambda batch: {"text": [t.replace("<unk>", "[UNK]") for t in batch["text"]]}, batched=True)


def tokenize_and_block(dataset, tokenizer, block_size: int):
    """Tokenize every line with [CLS]/[SEP] and regroup the token stream into fixed-size blocks."""

    def tokenize(batch):
        return {"input_ids": tokenizer(batch["text"], add_special_tokens=True)["input_ids"]}

    def to_blocks(batch):
        ids = np.concatenate([np.asarray(x, dtype=np.int32) for x in batch["input_ids"]]) if batch["input_ids"] else []
        usable = len(ids) // block_size * block_size
        return {"input_ids": np.asarray(ids[:usable], dtype=np.int32).reshape(-1, block_size)}

    tokens = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenize")
    # One batch over the whole split: blocks may span lines, and only the split's last block is dropped.
    return tokens.map(to_blocks, batched=True, batch_size=None, desc="blocks")


@dataclass
class SplitBlocks:
    name: str
    blocks: torch.Tensor  # (num_blocks, block_size) int32
    lines: int  # non-blank lines kept
    raw_lines: int

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()


def load_blocks(cfg: DataConfig, tokenizer, split: str, log=print) -> SplitBlocks:
    source = cfg.train_dataset if split == "train" and cfg.train_dataset else cfg.dataset
    raw = load_split_text(source, cfg.dataset_config, split, cfg.cache_dir)
    cleaned = clean_lines(raw)
    if len(cleaned) == 0:
        raise DataError(f"{split} split of {source} is empty after removing blank lines")
    blocked = tokenize_and_block(cleaned, tokenizer, cfg.block_size)
    limit = cfg.max_train_blocks if split == "train" else cfg.max_eval_blocks
    blocks = torch.from_numpy(np.asarray(blocked.with_format("numpy")["input_ids"], dtype=np.int32).reshape(-1, cfg.block_size))
    if limit is not None:
        blocks = blocks[:limit]
    if len(blocks) == 0:
        raise DataError(f"{split} split of {source} has fewer than data.block_size={cfg.block_size} tokens")
    log(f"data {split:<10} {len(raw):>7,} lines -> {len(cleaned):>7,} non-blank -> "
        f"{len(blocks):>6,} blocks of {cfg.block_size} ({blocks.numel():,} tokens)  from {source}")
    return SplitBlocks(split, blocks, lines=len(cleaned), raw_lines=len(raw))


# --------------------------------------------------------------------------- masking


class IndexedBlocks(torch.utils.data.Dataset):
    """Rows of a block tensor, returned with their index so masks can be keyed on it."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, self.blocks[index]


class MLMCollator:
    """BERT masking (80% [MASK], 10% random token, 10% unchanged) of `probability` of non-special tokens.

    Returns `input_ids` (B, L), `mlm_positions` (M,) flat indices into B*L of the tokens to predict, and
    `mlm_labels` (M,) their original ids. The model runs its output head on those M rows only.
    `fixed_count`: exactly round(probability * L) tokens per block (BERT's original pipeline), so M is
    the same in every batch; a block with fewer maskable tokens pads with ignored rows (label -100).
    """

    def __init__(self, tokenizer, probability: float = 0.15, seed: int = 0, fixed_count: bool = False):
        self.probability, self.fixed_count = probability, fixed_count
        self.seed = seed
        self.epoch = 0
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(tokenizer.all_special_ids), dtype=torch.int32)
        self.generator = torch.Generator()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def random_numbers(self, indices: list[int], length: int) -> torch.Tensor:
        """(B, 3, L) uniforms; sample i's draws depend only on (seed, epoch, index i)."""
        out = torch.empty(len(indices), 3, length)
        for row, index in enumerate(indices):
            self.generator.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            torch.rand(3, length, generator=self.generator, out=out[row])
        return out

    def __call__(self, items: list[tuple[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
        indices = [index for index, _ in items]
        original = torch.stack([block for _, block in items]).long()
        select_u, action_u, token_u = self.random_numbers(indices, original.size(1)).unbind(1)

        maskable = ~torch.isin(original, self.special_ids)
        if self.fixed_count:  # the k maskable tokens with the smallest draws
            k = round(self.probability * original.size(1))
            chosen = select_u.masked_fill(~maskable, 2.0).topk(k, dim=1, largest=False).indices.sort(dim=1).values
            selected = torch.zeros_like(maskable).scatter_(1, chosen, True) & maskable
            positions = (chosen + torch.arange(len(items))[:, None] * original.size(1)).flatten()
        else:
            selected = (select_u < self.probability) & maskable
            positions = selected.flatten().nonzero().squeeze(1)
        to_mask = selected & (action_u < 0.8)
        to_random = selected & (action_u >= 0.8) & (action_u < 0.9)  # the last 10% keep their token
        inputs = torch.where(to_mask, self.mask_id, original)
        inputs = torch.where(to_random, (token_u * self.vocab_size).long(), inputs)
        labels = torch.where(selected.flatten()[positions], original.flatten()[positions], -100)
        return {"input_ids": inputs, "mlm_positions": positions, "mlm_labels": labels}


def eval_collator(tokenizer, probability: float = EVAL_MASK_PROBABILITY) -> MLMCollator:
    """Fixed masks: same positions at every evaluation and in every run."""
    collator = MLMCollator(tokenizer, probability, seed=EVAL_MASK_SEED)
    collator.set_epoch(-1)
    return collator


def eval_dataloader(blocks: torch.Tensor, tokenizer, batch_size: int, **kwargs) -> torch.utils.data.DataLoader:
    """Validation/test batches in order, with the fixed evaluation masks."""
    return torch.utils.data.DataLoader(IndexedBlocks(blocks), batch_size=batch_size,
                                       collate_fn=eval_collator(tokenizer), **kwargs)


def dense_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """HF-style (B, L) labels with -100 where nothing is predicted (for the plain HF loss path)."""
    labels = torch.full_like(batch["input_ids"], -100).flatten()
    labels[batch["mlm_positions"]] = batch["mlm_labels"]
    return labels.view_as(batch["input_ids"])
