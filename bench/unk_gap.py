"""How much of a model's raw-validation loss comes from words it never saw in training.

    python bench/unk_gap.py runs/scratch_tuned-.../model [--shared ../shared/data]

Offline, training uses the tokenized WikiText-2 train split, where every word rarer than 3
occurrences is `<unk>`; raw validation still spells those words out (as word pieces the model has
rarely or never seen as targets). This masks 15% of the raw validation tokens (all `[MASK]`, fixed
seed), and splits the masked-token loss into tokens of words that are in the training vocabulary and
tokens of words that are not. It is a diagnostic, not the trainer's metric: the trainer's eval uses
80/10/10 masks on its own blocks, so its loss is lower than the "all" line here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--shared", help="the offline data folder (default: $SHARED_DATA or ../shared/data)")
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer, BertForMaskedLM

    from trainer.hub import shared_data_dir

    shared = Path(args.shared) if args.shared else shared_data_dir()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = BertForMaskedLM.from_pretrained(args.model).eval()
    train_words = {w.lower() for line in open(shared / "wikitext-2-v1" / "wiki.train.tokens") for w in line.split()}

    ids, unseen = [], []
    for line in open(shared / "wikitext-2-raw-v1" / "wiki.valid.raw"):
        words = line.split()
        if not words:
            continue
        encoded = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
        ids += encoded["input_ids"]
        unseen += [words[w].lower() not in train_words for w in encoded.word_ids()]
    n = len(ids) // args.block_size * args.block_size
    ids = torch.tensor(ids[:n]).view(-1, args.block_size)
    unseen = torch.tensor(unseen[:n]).view(-1, args.block_size)
    masked = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.15
    inputs = ids.masked_fill(masked, tokenizer.mask_token_id)

    losses = []
    with torch.no_grad():
        for start in range(0, len(ids), 32):
            logits = model(input_ids=inputs[start:start + 32]).logits
            losses.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[start:start + 32], reduction="none"))
    loss, unseen = torch.cat(losses)[masked], unseen[masked]
    seen_mean = loss[~unseen].mean()
    print(f"masked tokens {len(loss):,}   loss {loss.mean():.3f}   perplexity {loss.mean().exp():.1f}")
    for name, rows in (("words in the training vocabulary", ~unseen), ("words that are <unk> in training", unseen)):
        print(f"  {name:34s} {rows.float().mean():6.1%} of tokens   loss {loss[rows].mean():.3f}   "
              f"{loss[rows].sum() / loss.sum():6.1%} of the total")
    gap = loss.mean() - (loss[~unseen].sum() + unseen.sum() * seen_mean) / len(loss)
    print(f"if unseen words cost what seen ones do: loss {loss.mean() - gap:.3f} (-{gap:.3f} nats, "
          f"perplexity / {gap.exp():.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
