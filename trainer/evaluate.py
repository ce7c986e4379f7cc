"""Evaluation: masked-token loss, perplexity and accuracy on fixed (deterministic) masks.

`evaluate_mlm` is what the training loop calls; `python -m trainer.evaluate MODEL --split test` runs
it on any saved run directory or Hub id:

    python -m trainer.evaluate runs/scratch-20261124-101500/model --split test \
        --dataset ../shared/data/wikitext-2-raw-v1
"""

from __future__ import annotations

import argparse
import sys

import torch

from trainer.metrics import MLMTotals


@torch.no_grad()
def evaluate_mlm(model, loader, accelerator) -> dict[str, float]:
    """Metrics over every masked token of `loader`, summed over all processes.

    Per-sample sums are gathered with `gather_for_metrics`, which drops the samples Accelerate
    repeats to give every rank an equal number of batches, so no token is counted twice.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, tokens, correct
    for batch in loader:
        with accelerator.autocast():
            token_loss, correct = model(**batch)
        rows = batch["mlm_positions"] // batch["input_ids"].size(1)
        stats = torch.stack([token_loss.float(), torch.ones_like(token_loss), correct.float()], dim=1)
        per_sample = torch.zeros(batch["input_ids"].size(0), 3, device=stats.device).index_add_(0, rows, stats)
        totals += accelerator.gather_for_metrics(per_sample).sum(0).double()
    model.train(was_training)
    loss_sum, tokens, correct = totals.tolist()
    return MLMTotals(loss_sum, int(tokens), int(correct)).compute("eval")


def evaluate_model(name: str, data_cfg, split: str = "validation", batch_size: int = 16,
                   tokenizer_name: str | None = None, mixed_precision: str = "no", log=print) -> dict[str, float]:
    """Metrics of a saved model directory or Hub id on a split, with the fixed evaluation masks."""
    from accelerate import Accelerator

    from trainer.config import ModelConfig
    from trainer.data import eval_dataloader, load_blocks, load_tokenizer
    from trainer.model import SparseMLM, build_model, check_block_size

    tokenizer = load_tokenizer(tokenizer_name or name)
    blocks = load_blocks(data_cfg, tokenizer, split, log=log).blocks
    model, _ = build_model(ModelConfig(pretrained=name), len(tokenizer))
    check_block_size(model, data_cfg.block_size)
    loader = eval_dataloader(blocks, tokenizer, batch_size)
    accelerator = Accelerator(mixed_precision=mixed_precision)
    model, loader = accelerator.prepare(SparseMLM(model), loader)
    metrics = evaluate_mlm(model, loader, accelerator)
    accelerator.free_memory()
    return metrics


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from trainer.console import quiet_libraries
    from rich.table import Table

    from trainer.config import DataConfig
    from trainer.data import DataError
    from trainer.fillmask import model_dir
    from trainer.model import ModelError

    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="run directories, saved model directories or Hub ids")
    parser.add_argument("--split", choices=["validation", "test"], default="validation")
    parser.add_argument("--dataset", default=DataConfig.dataset, help="Hub dataset name or local directory")
    parser.add_argument("--dataset-config", default=DataConfig.dataset_config)
    parser.add_argument("--tokenizer", default=None, help="default: the model's own tokenizer")
    parser.add_argument("--block-size", type=int, default=DataConfig.block_size)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-blocks", type=int, default=None)
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    args = parser.parse_args(argv)
    quiet_libraries()

    console = Console()
    data_cfg = DataConfig(dataset=args.dataset, dataset_config=args.dataset_config, block_size=args.block_size,
                          max_eval_blocks=args.max_blocks)
    table = Table(title=f"MLM evaluation on {args.split} ({args.dataset})")
    for column in ("model", "loss", "perplexity", "accuracy", "masked tokens"):
        table.add_column(column, justify="left" if column == "model" else "right")
    try:
        for name in args.models:
            metrics = evaluate_model(model_dir(name), data_cfg, args.split, args.batch_size, args.tokenizer,
                                     args.mixed_precision, log=console.print)
            table.add_row(name, f"{metrics['eval/loss']:.4f}", f"{metrics['eval/perplexity']:.2f}",
                          f"{metrics['eval/accuracy']:.4f}", f"{metrics['eval/masked_tokens']:,}")
    except (DataError, ModelError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
