"""Masking: BERT's dynamic masks per batch, keyed on (seed, epoch, sample index).

Every sample gets new masks each epoch (dynamic masking), the same sample gets the same mask however
the batch is split across processes, accumulation steps or loader workers, a resumed run masks exactly
as an uninterrupted one, and evaluation masks never change (`eval_collator`).
"""

from __future__ import annotations

import torch

EVAL_MASK_SEED = 1234  # fixed, independent of the train seed, so every run is scored on the same masks
EVAL_MASK_PROBABILITY = 0.15  # BERT's rate, whatever data.mlm_probability a recipe trains with


class IndexedBlocks(torch.utils.data.Dataset):
    """Rows of a block tensor or a memory-mapped `Blocks`, returned with their index so masks can be keyed on it."""

    def __init__(self, blocks):
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


def eval_dataloader(blocks, tokenizer, batch_size: int, **kwargs) -> torch.utils.data.DataLoader:
    """Validation/test batches in order, with the fixed evaluation masks."""
    return torch.utils.data.DataLoader(IndexedBlocks(blocks), batch_size=batch_size,
                                       collate_fn=eval_collator(tokenizer), **kwargs)


def dense_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """HF-style (B, L) labels with -100 where nothing is predicted (for the plain HF loss path)."""
    labels = torch.full_like(batch["input_ids"], -100).flatten()
    labels[batch["mlm_positions"]] = batch["mlm_labels"]
    return labels.view_as(batch["input_ids"])
