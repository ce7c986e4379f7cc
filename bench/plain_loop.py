"""The plain HF training loop, run for real on a recipe: the time-to-quality baseline for the trainer.

    python bench/plain_loop.py recipes/scratch.py [--max-steps 1000] [--section.key=value ...]
    python -m trainer.compare runs/plain-scratch-... runs/scratch-...   # curves and time to ppl <= 657

`make bench` times one step of this loop; this script trains with it, so the question "how long until
val perplexity X" can be answered for both. The loop is the one the HF docs teach:
`BertForMaskedLM(labels=...)` (logits at all 128 positions), fp32, `torch.optim.AdamW`, linear
warmup/decay from `get_scheduler`, clip 1.0, shuffled blocks. Only three things are the trainer's, so
that the two runs differ in speed and not in what they measure: the recipe's data and blocks, the
recipe's masks (same rate and the same 80/10/10 rule) and `evaluate_mlm` with its fixed validation
masks. Evaluation time counts in `time_s`, as in the trainer.

The run directory holds `metrics.jsonl`, `config.json` and `summary.json` like a trainer run, so
`trainer.compare` reads it. No malloc tunables unless GLIBC_TUNABLES is set: this is the plain loop.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (the schedule still spans all epochs)")
    args, overrides = parser.parse_known_args(argv)

    import torch
    from accelerate import Accelerator
    from transformers import get_scheduler

    from trainer.config import ConfigError, apply_overrides, load_recipe
    from trainer.data import IndexedBlocks, MLMCollator, dense_labels, eval_dataloader, load_blocks, load_tokenizer
    from trainer.evaluate import evaluate_mlm
    from trainer.metrics import perplexity
    from trainer.model import SparseMLM, build_model, count_parameters
    from trainer.rundir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE

    try:
        cfg = apply_overrides(load_recipe(args.recipe), overrides).validate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.log.output_root) / f"plain-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(json.dumps({**cfg.to_dict(), "loop": "plain-hf"}, indent=2))
    metrics_file = (run_dir / METRICS_FILE).open("w")
    start = time.time()

    def log(record: dict, step: int) -> None:
        record = {"step": step, "tokens": step * cfg.train.batch_size * cfg.data.block_size,
                  "time_s": round(time.time() - start, 3), **record}
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)

    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train_blocks = load_blocks(cfg.data, tokenizer, "train").blocks
    eval_loader = eval_dataloader(load_blocks(cfg.data, tokenizer, "validation").blocks, tokenizer, cfg.train.eval_batch_size)
    collator = MLMCollator(tokenizer, cfg.data.mlm_probability, seed=cfg.train.seed)
    loader = torch.utils.data.DataLoader(IndexedBlocks(train_blocks), batch_size=cfg.train.batch_size, shuffle=True,
                                         drop_last=True, collate_fn=collator)
    model, _ = build_model(cfg.model, len(tokenizer))  # a plain BertForMaskedLM: HF dropout, dense head
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    total_steps = len(loader) * cfg.train.epochs
    scheduler = get_scheduler("constant_with_warmup" if cfg.optim.schedule == "constant" else cfg.optim.schedule, optimizer, num_warmup_steps=round(cfg.optim.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    last_step = min(total_steps, args.max_steps or total_steps)
    accelerator = Accelerator(cpu=device.type == "cpu")  # only for evaluate_mlm's gather; one process, fp32
    evaluator = SparseMLM(model)  # shares the weights; gives per-token losses on the fixed eval masks

    def run_eval(step: int) -> dict:
        metrics = evaluate_mlm(evaluator, eval_loader, accelerator)
        log(metrics, step)
        return metrics

    def batches():
        for epoch in range(cfg.train.epochs):
            collator.set_epoch(epoch)
            yield from loader

    stream = batches()
    step, interval_loss, interval_steps, interval_time, train_time = 0, 0.0, 0, 0.0, 0.0
    eval_metrics: dict = {}
    while step < last_step:
        step_start = time.time()  # data loading included, evaluation excluded (as in the trainer)
        batch = next(stream)
        loss = model(input_ids=batch["input_ids"].to(device), labels=dense_labels(batch).to(device)).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        interval_loss, interval_steps = interval_loss + loss.item(), interval_steps + 1
        interval_time += time.time() - step_start
        if step % cfg.train.log_every == 0 or step == last_step:
            train_time += interval_time
            mean = interval_loss / interval_steps
            log({"train/loss": mean, "train/perplexity": perplexity(mean), "train/lr": scheduler.get_last_lr()[0],
                 "train/grad_norm": grad_norm.item(),
                 "train/tokens_per_s": interval_steps * cfg.train.batch_size * cfg.data.block_size / interval_time}, step)
            interval_loss, interval_steps, interval_time = 0.0, 0, 0.0
        if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == last_step:
            eval_metrics = run_eval(step)
    tokens = step * cfg.train.batch_size * cfg.data.block_size
    summary = {"loop": "plain-hf", "recipe": cfg.name, "parameters": count_parameters(model),
               "step": step, "tokens": tokens, "time_s": time.time() - start,
               "train/tokens_per_s": tokens / train_time,
               "eval/loss": eval_metrics.get("eval/loss"), "eval/perplexity": eval_metrics.get("eval/perplexity"),
               "eval/accuracy": eval_metrics.get("eval/accuracy")}
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    print(f"plain loop: {run_dir}  {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
