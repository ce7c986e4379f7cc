"""Evaluation: masked-token loss, perplexity and accuracy on fixed (deterministic) masks.

`evaluate_mlm` is what the training loop calls; `python -m trainer.evaluate MODEL...` runs it on saved
models (a run directory uses its own data config), with the trainer's `--section.key=value` overrides:

    python -m trainer.evaluate runs/scratch-20261124-101500 --split test
    python -m trainer.evaluate runs/x/model --data.dataset=../shared/data/wikitext-2-raw-v1 --data.max_eval_blocks=100
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from trainer.metrics import MLMTotals


METRIC = Path(__file__).resolve().parent / "masked_lm"  # the `evaluate` module: evaluate.load(str(METRIC))


@torch.no_grad()
def evaluate_mlm(model, loader, accelerator, track=None, metric=None) -> dict[str, float]:
    """Metrics over every masked token of `loader`, summed over all processes; `track` wraps the batches
    (a progress display, console.track); `metric` (the `evaluate` module) computes them from the same
    per-example sums instead of the loop's own sum.

    Per-example sums are gathered with `gather_for_metrics`, which drops the examples Accelerate
    repeats to give every rank an equal number of batches, so no token is counted twice.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss sum, tokens, top-1, top-5
    for batch in track(loader, len(loader), "eval") if track else loader:
        with accelerator.autocast():
            token_loss, rank = model(**batch)
        rows = batch["mlm_positions"] // batch["input_ids"].size(1)
        stats = torch.stack([token_loss, rank >= 0, rank == 0, (rank >= 0) & (rank < 5)], dim=1).double()
        per_example = accelerator.gather_for_metrics(
            torch.zeros(batch["input_ids"].size(0), 4, dtype=torch.float64, device=stats.device).index_add_(0, rows, stats))
        totals += per_example.sum(0)
        if metric is not None:
            loss_sum, tokens, correct, top5 = per_example.cpu().T.tolist()
            metric.add_batch(loss_sum=loss_sum, masked_tokens=[round(t) for t in tokens],
                             correct=[round(c) for c in correct], top5_correct=[round(c) for c in top5])
    model.train(was_training)
    if metric is not None:
        return {f"eval/{key}": value for key, value in metric.compute().items()}
    return MLMTotals(*totals.tolist()).compute("eval")


def evaluate_model(name: str, cfg, split: str = "validation", log=print, track=None) -> dict[str, float]:
    """Metrics of a saved model directory or Hub id on a split of `cfg.data` (its first
    `data.max_eval_blocks` blocks, if set), with the fixed evaluation masks, scored with the model's own
    tokenizer; `eval/blocks` says how many blocks were scored."""
    import evaluate
    from accelerate import Accelerator

    from trainer.config import ModelConfig
    from trainer.data import eval_dataloader, load_blocks, load_tokenizer
    from trainer.model import SparseMLM, build_model, check_block_size
    from trainer.runtime import resolve_mixed_precision

    tokenizer = load_tokenizer(name)
    blocks = load_blocks(cfg.data, tokenizer, split, log=log).blocks
    model, _ = build_model(ModelConfig(pretrained=name), len(tokenizer))
    check_block_size(model, cfg.data.block_size)
    loader = eval_dataloader(blocks, tokenizer, cfg.train.eval_batch_size)
    mixed_precision = "no" if cfg.train.mixed_precision == "auto" else resolve_mixed_precision(cfg.train.mixed_precision)
    accelerator = Accelerator(mixed_precision=mixed_precision)
    model, loader = accelerator.prepare(SparseMLM(model), loader)
    metric = evaluate.load(str(METRIC)) if accelerator.is_main_process else None
    metrics = evaluate_mlm(model, loader, accelerator, track=track, metric=metric)
    accelerator.free_memory()
    return {**metrics, "eval/blocks": len(blocks)}


def config_for(name: str, overrides: list[str]):
    """The config of the run `name` is (or whose model/ it is): its data, block size; else the defaults;
    then the overrides. A model directory's own config.json is the model's, not a run's. The run's
    `data.max_eval_blocks` limited its evaluations during training: here the whole split is scored
    unless the overrides set a limit."""
    from trainer.config import Config, apply_overrides
    from trainer.rundir import CONFIG_FILE, read_json, stored_config

    def is_run(directory: Path) -> bool:  # a run's config.json names its run; a model's is the model's
        try:
            return "run_id" in read_json(directory / CONFIG_FILE)
        except (OSError, ValueError):
            return False

    path = Path(name)
    run_dir = next((d for d in (path, path.parent) if is_run(d)), None)
    cfg = stored_config(run_dir) if run_dir else Config()
    cfg.data.max_eval_blocks = None
    return apply_overrides(cfg, overrides).validate()


USAGE = ("usage: python -m trainer.evaluate MODEL_OR_RUN... [--split validation|test] [--section.key=value ...]\n"
         "  scores the whole split; used: --data.* (dataset, block size, max_eval_blocks: score only the first N "
         "blocks), --train.eval_batch_size, --train.mixed_precision (auto = fp32 here)")


def main(argv: list[str] | None = None) -> int:
    from rich.markup import escape
    from rich.table import Table

    from trainer.config import ConfigError
    from trainer.console import TrainingConsole, quiet_libraries
    from trainer.data import DataError
    from trainer.model import ModelError
    from trainer.rundir import CheckpointError, model_path

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0 if argv else 2
    split, models, overrides = "validation", [], []
    args = iter(argv)
    for arg in args:
        if arg == "--split" or arg.startswith("--split="):
            split = arg.split("=", 1)[1] if "=" in arg else next(args, "")
        elif arg.startswith("--"):
            overrides += [arg] if "=" in arg else [arg, next(args, "")]
        else:
            models.append(arg)
    quiet_libraries()
    console = TrainingConsole()
    table = Table(title=f"MLM evaluation on {split}")
    for column in ("model", "loss", "perplexity", "accuracy", "top-5 accuracy", "masked tokens", "blocks scored"):
        table.add_column(column, justify="left" if column == "model" else "right")
    try:
        if split not in ("validation", "test"):
            raise ConfigError(f"--split {split!r}: choose validation or test")
        if not models:
            raise ConfigError("no model given: name run directories or model directories (make evaluate MODELS=...)")
        for name in models:
            cfg = config_for(name, overrides)
            metrics = evaluate_model(model_path(name), cfg, split, log=console.print, track=console.track)
            limit, blocks = cfg.data.max_eval_blocks, metrics["eval/blocks"]
            scored = f"first {blocks:,} (data.max_eval_blocks)" if limit is not None and blocks >= limit else f"all {blocks:,}"
            table.add_row(escape(name), f"{metrics['eval/loss']:.4f}", f"{metrics['eval/perplexity']:.2f}",
                          f"{metrics['eval/accuracy']:.4f}", f"{metrics['eval/top5_accuracy']:.4f}",
                          f"{metrics['eval/masked_tokens']:,}", scored)
    except (ConfigError, DataError, ModelError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
