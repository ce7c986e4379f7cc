"""Fill-mask samples: top-k predictions for probe sentences, for one model or several side by side.

    python -m trainer.fillmask runs/scratch-*/model runs/finetune-*/model [--probe "Paris is the [MASK] of France."]

Prints a rich table (one column per model) and, with `--wandb`, logs it as a W&B Table.
"""

from __future__ import annotations

import argparse
import sys
import torch

from trainer.config import LogConfig


@torch.no_grad()
def fill_mask(model, tokenizer, probes: list[str], top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Per probe: the top-k (token, probability) for its first [MASK], via transformers' pipeline."""
    from transformers import pipeline

    was_training = model.training
    model.eval()
    unmasker = pipeline("fill-mask", model=model, tokenizer=tokenizer, device=model.device, top_k=top_k,
                        tokenizer_kwargs={"truncation": True})  # a probe longer than the model's input: cut there
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


def sample_rows(probes: list[str], results: list[list[tuple[str, float]]]) -> tuple[list[str], list[list]]:
    """The fill-mask samples of one model as a table: (columns, rows)."""
    rows = [[probe, format_predictions(predictions), predictions[0][0], round(predictions[0][1], 4)]
            for probe, predictions in zip(probes, results)]
    return ["probe", "top_k", "top_1", "top_1_prob"], rows


def log_samples(cfg, model_dir, logger, step: int) -> list[list]:
    """Fill-mask predictions of the saved model, logged as a table (loading it back also proves the save)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = fill_mask(model, tokenizer, cfg.log.probes, cfg.log.fill_mask_top_k)
    columns, rows = sample_rows(cfg.log.probes, results)
    logger.log_table("samples/fill_mask", columns, rows, step)
    return rows


def main(argv: list[str] | None = None) -> int:
    from rich.markup import escape
    from rich.table import Table
    from transformers import AutoModelForMaskedLM

    from trainer.console import TrainingConsole, quiet_libraries
    from trainer.data import DataError, load_tokenizer
    from trainer.rundir import model_path

    parser = argparse.ArgumentParser(prog="python -m trainer.fillmask", description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="run directories, saved model directories or Hub ids")
    parser.add_argument("--probe", action="append", help="a sentence with [MASK] (repeatable)")
    parser.add_argument("--top-k", type=int, default=LogConfig.fill_mask_top_k)
    parser.add_argument("--wandb", action="store_true", help="also log the table to a W&B run")
    args = parser.parse_args(argv)
    quiet_libraries()
    probes = args.probe or LogConfig().probes

    console = TrainingConsole()
    labels, per_model = [], []
    for name in console.track(args.models, len(args.models), "fill-mask"):
        path = model_path(name)
        try:
            tokenizer = load_tokenizer(path)
            model = AutoModelForMaskedLM.from_pretrained(path)
        except (DataError, OSError, ValueError) as e:
            print(f"error: cannot load {name}: {str(e).splitlines()[0]}", file=sys.stderr)
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
