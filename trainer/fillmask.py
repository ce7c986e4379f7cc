"""Fill-mask samples: top-k predictions for probe sentences, for one model or several side by side.

    python -m trainer.fillmask runs/scratch-*/model runs/finetune-*/model [--probe "Paris is the [MASK] of France."]

Prints a rich table (one column per model) and, with `--wandb`, logs it as a W&B Table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from trainer.config import LogConfig


@torch.no_grad()
def fill_mask(model, tokenizer, probes: list[str], top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Per probe: the top-k (token, probability) for its first [MASK], via transformers' pipeline."""
    from transformers import pipeline

    was_training = model.training
    model.eval()
    unmasker = pipeline("fill-mask", model=model, tokenizer=tokenizer, device=model.device, top_k=top_k)
    results = []
    for probe in probes:
        predictions = unmasker(probe.replace("[MASK]", tokenizer.mask_token))
        if predictions and isinstance(predictions[0], list):  # several masks: keep the first
            predictions = predictions[0]
        results.append([(p["token_str"].strip(), float(p["score"])) for p in predictions])
    model.train(was_training)
    return results


def format_predictions(predictions: list[tuple[str, float]]) -> str:
    return ", ".join(f"{token} ({score:.2f})" for token, score in predictions)


def comparison_rows(labels: list[str], probes: list[str], per_model: list[list]) -> list[list[str]]:
    """Rows of [probe, model_1 predictions, model_2 predictions, ...]."""
    return [[probe, *(format_predictions(results[i]) for results in per_model)] for i, probe in enumerate(probes)]


def model_dir(path: str) -> str:
    """A run directory means its saved model; anything else is passed to from_pretrained as is."""
    return str(Path(path) / "model") if (Path(path) / "model" / "config.json").is_file() else path


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from trainer.console import quiet_libraries
    from rich.markup import escape
    from rich.table import Table
    from transformers import AutoModelForMaskedLM

    from trainer.data import DataError, load_tokenizer

    parser = argparse.ArgumentParser(prog="python -m trainer.fillmask", description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="run directories, saved model directories or Hub ids")
    parser.add_argument("--probe", action="append", help="a sentence with [MASK] (repeatable)")
    parser.add_argument("--top-k", type=int, default=LogConfig.fill_mask_top_k)
    parser.add_argument("--wandb", action="store_true", help="also log the table to a W&B run")
    args = parser.parse_args(argv)
    quiet_libraries()
    probes = args.probe or LogConfig().probes

    console = Console()
    labels, per_model = [], []
    for name in args.models:
        path = model_dir(name)
        try:
            tokenizer = load_tokenizer(path)
            model = AutoModelForMaskedLM.from_pretrained(path)
        except (DataError, OSError, ValueError) as e:
            console.print(f"[red]error:[/red] cannot load {name}: {str(e).splitlines()[0]}")
            return 2
        labels.append(name)
        per_model.append(fill_mask(model, tokenizer, probes, args.top_k))

    rows = comparison_rows(labels, probes, per_model)
    table = Table(title=f"fill-mask top-{args.top_k}", show_lines=True)
    for column in ["probe", *labels]:
        table.add_column(escape(column), overflow="fold")
    for row in rows:
        table.add_row(*map(escape, row))  # "[MASK]" is not rich markup
    console.print(table)
    if args.wandb:
        import wandb

        from trainer.tracking import wandb_mode

        with wandb.init(project=LogConfig.project, job_type="fill-mask-comparison", mode=wandb_mode()) as run:
            run.log({"fill_mask_comparison": wandb.Table(columns=["probe", *labels], data=rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
