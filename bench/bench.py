"""Benchmark: the plain HF training loop against this trainer's step, side by side, on the scratch model.

    make bench                      # = python bench/bench.py
    python bench/bench.py --batch 8 32 --compile --seconds 20
    python bench/bench.py --variants trainer --recipe recipes/scratch_fast.py --set train.mixed_precision=no
    TRAINER_FAST_BF16=0 make bench  # the fp32 path a CPU without avx512_bf16 takes (auto = fp32)

Each variant runs in its own process (clean peak memory, no allocator state shared):
  plain-hf        BertForMaskedLM(labels=...) in fp32: the MLM head on all 128 positions, torch AdamW
  plain-hf+malloc the same with the glibc malloc tunables trainer/run.py sets (fairer baseline)
  trainer         the loop's own train_step: head on masked rows only, fast dropout, fused AdamW,
                  the config's train.mixed_precision (auto: bf16 where the CPU/GPU runs it natively),
                  malloc tunables
  trainer+compile the whole step compiled (forward, loss, backward, clipping, optimizer; --compile),
                  with a fixed mask count so it has one shape; reports recompiles after warm-up
Reports tokens/s, speed-up over plain-hf, peak memory, achieved GFLOP/s and the fraction of a measured
matmul peak, the loss agreement of the two paths on one batch, and WikiText-2 preprocessing time
(cold and cached). Writes bench/results/bench-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SEQ = 128


def tokenizer_source() -> str:
    from trainer.hub import shared_data_dir

    local = shared_data_dir() / "bert-base-uncased"
    return str(local) if local.is_dir() else "bert-base-uncased"


def random_blocks(tokenizer, n: int):
    """Random token ids past BERT's [unused] block (the speed of a step does not depend on the text)."""
    import torch

    return torch.randint(min(1000, len(tokenizer) // 2), len(tokenizer), (n, SEQ), dtype=torch.int32)


def matmul_peak(dtype_name: str) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(2048, 2048, dtype=dtype, device=device), torch.randn(2048, 2048, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 2.0:
        a @ b
        n += 1
    sync()
    return 2 * 2048**3 * n / (time.perf_counter() - start) / 1e9


def bench_config(recipe: str | None, overrides: list[str] = (), compiled: bool = False):
    """The recipe's config (default: the scratch model with the default settings) with `--set` overrides;
    a compiled step gets a fixed mask count, so it has one shape."""
    from trainer.config import Config, ModelConfig, apply_overrides, load_recipe

    cfg = load_recipe(recipe) if recipe else Config(model=ModelConfig())
    cfg.train.compile = compiled
    return apply_overrides(cfg, [f"--{o}" for o in overrides] + (["--data.mask_count=fixed"] if compiled else []))


def run_variant(variant: str, batch: int, seconds: float, overrides: list[str] = (), min_steps: int = 5,
                recipe: str | None = None) -> dict:
    """Runs inside the child process."""
    import torch

    from trainer.data import MLMCollator, dense_labels, load_tokenizer
    from trainer.metrics import model_flops_per_token
    from trainer.model import build_model

    torch.manual_seed(0)
    compiled = variant.endswith("compile")
    cfg = bench_config(recipe, overrides, compiled)
    tokenizer = load_tokenizer(tokenizer_source())
    collator = MLMCollator(tokenizer, cfg.data.mlm_probability, seed=0, fixed_count=cfg.data.mask_count == "fixed")
    blocks = random_blocks(tokenizer, batch * 16)
    batches = [collator([(i * batch + j, blocks[i * batch + j]) for j in range(batch)]) for i in range(16)]
    hf, _ = build_model(cfg.model, len(tokenizer))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    losses = []

    if variant.startswith("plain-hf"):
        model = hf.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
        dense = [{"input_ids": b["input_ids"].to(device), "labels": dense_labels(b).to(device)} for b in batches]

        def step(i):
            loss = model(**dense[i % len(dense)]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        precision, mask_rate = "no", 1.0
    else:
        step, precision, _ = trainer_step(cfg, hf, batches)
        mask_rate = sum(len(b["mlm_labels"]) for b in batches) / (len(batches) * batch * SEQ)

    from torch._dynamo.utils import counters

    warmup = 8 if compiled else 3
    for i in range(warmup):
        step(i)
    sync()
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    start, steps = time.perf_counter(), 0
    while steps < min_steps or time.perf_counter() - start < seconds:
        losses.append(step(steps))
        steps += 1
    sync()
    elapsed = time.perf_counter() - start
    tokens_per_s = steps * batch * SEQ * (1 if variant.startswith("plain-hf") else cfg.train.grad_accum) / elapsed
    flops = model_flops_per_token(hf.config, SEQ, mask_rate) * tokens_per_s / 1e9
    peak_mem = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": variant, "batch": batch, "precision": precision, "steps": steps, "seconds": elapsed,
            "tokens_per_s": tokens_per_s, "gflops": flops, "peak_memory_mib": peak_mem,
            "peak_memory_kind": "cuda allocated" if device.type == "cuda" else "process RSS",
            "recompiles_after_warmup": counters["stats"]["unique_graphs"] - graphs_after_warmup,
            "mask_count": cfg.data.mask_count, "losses": [float(x) for x in losses]}


def trainer_step(cfg, hf, batches, schedule_steps: int | None = None):
    """The loop's own step (trainer/step.py) on the loop's model set-up; with the LR schedule over
    `schedule_steps` steps if given. Returns (step function, precision, the TrainStep)."""
    from accelerate import Accelerator

    from trainer.model import training_model
    from trainer.runtime import check_plugins_match_recipe, resolve_mixed_precision
    from trainer.step import TrainStep, build_optimizer, build_scheduler

    precision = resolve_mixed_precision(cfg.train.mixed_precision, compiled=cfg.train.compile)  # as the loop does
    accelerator = Accelerator(mixed_precision=precision)
    check_plugins_match_recipe(accelerator, cfg)
    model = training_model(hf, cfg, accelerator.device)
    optimizer = build_optimizer(model, cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    on_device = [{k: v.to(accelerator.device) for k, v in b.items()} for b in batches]
    scheduler = build_scheduler(optimizer, cfg, schedule_steps) if schedule_steps else None
    train_step = TrainStep(accelerator, model, optimizer, scheduler, cfg)

    def step(i):  # train.grad_accum micro-batches per optimizer step
        accum = cfg.train.grad_accum
        result = train_step([on_device[(i * accum + j) % len(on_device)] for j in range(accum)], i)
        return result.totals.loss_sum / result.totals.tokens

    return step, precision, train_step


def static_vs_dynamic(steps: int = 100, batch: int = 8, overrides: list[str] = (), recipe: str | None = None) -> dict:
    """The compiled static-shape step against the eager step on the same batches and initial weights
    (fixed mask count, no dropout, the learning rate changing every step): the largest loss difference
    over `steps` steps, recompiles after the first steps, whether the compiled step's gradients stayed
    in the same buffers (the CUDA-graph-safe design) and whether a non-finite update leaves its
    parameters as they were. `train.grad_accum` micro-batches per step."""
    import torch
    from torch._dynamo.utils import counters

    from trainer.config import apply_overrides
    from trainer.data import MLMCollator, load_tokenizer
    from trainer.model import build_model

    tokenizer = load_tokenizer(tokenizer_source())
    base = bench_config(recipe, [*overrides, "model.dropout=0.0", "data.mask_count=fixed"])
    collator = MLMCollator(tokenizer, base.data.mlm_probability, seed=0, fixed_count=True)
    blocks = random_blocks(tokenizer, batch * 16)
    batches = [collator([(i * batch + j, blocks[i * batch + j]) for j in range(batch)]) for i in range(16)]
    losses, timings = {}, {}
    for name in ("eager", "compiled"):
        cfg = apply_overrides(base.derive(), [f"--train.compile={name == 'compiled'}"])
        torch.manual_seed(0)
        hf, _ = build_model(cfg.model, len(tokenizer))
        step, _, train_step = trainer_step(cfg, hf, batches, schedule_steps=steps)
        start, losses[name] = time.perf_counter(), []
        for i in range(steps):
            losses[name].append(float(step(i)))
            if i == 2:
                start, graphs = time.perf_counter(), counters["stats"]["unique_graphs"]
                buffers = [p.grad for p in getattr(train_step, "params", [])]
        timings[name] = (time.perf_counter() - start) / (steps - 3)
    stable = bool(buffers) and all(grad is not None and p.grad is grad for p, grad in zip(train_step.params, buffers))
    recompiles = counters["stats"]["unique_graphs"] - graphs
    kept = nonfinite_update_keeps_parameters(train_step, batches[0])
    return {"nonfinite_update_kept_parameters": kept, "gradient_buffers_stable": stable, "steps": steps, "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"])),
            "final_loss_eager": losses["eager"][-1], "final_loss_compiled": losses["compiled"][-1],
            "step_s_eager": timings["eager"], "step_s_compiled": timings["compiled"],
            "recompiles_after_warmup": recompiles}


def nonfinite_update_keeps_parameters(train_step, batch: dict) -> bool:
    """Gradients from a real micro-batch, then the compiled update told the loss was NaN."""
    import torch

    device = train_step.accelerator.device
    batch = {k: v.to(device) for k, v in batch.items()}
    loss, _, _ = train_step.forward_loss(train_step.model, batch, (batch["mlm_labels"] >= 0).sum().float(), 1.0)
    train_step.accelerator.backward(loss)
    before = [p.detach().clone() for p in train_step.params]
    _, bad = train_step.update(torch.tensor(float("nan"), device=device))
    train_step.optimizer.zero_grad(set_to_none=False)
    return bool(bad) and all(torch.equal(a, p.detach()) for a, p in zip(before, train_step.params))


def loss_agreement(precision: str) -> dict:
    """Same batch, same weights: the dense HF loss vs the sparse-head loss (fp32 and the trainer's precision)."""
    import torch

    from trainer.config import ModelConfig
    from trainer.data import MLMCollator, dense_labels, load_tokenizer
    from trainer.model import SparseMLM, build_model

    torch.manual_seed(0)
    tokenizer = load_tokenizer(tokenizer_source())
    blocks = random_blocks(tokenizer, 8)
    batch = MLMCollator(tokenizer, 0.15)([(i, blocks[i]) for i in range(8)])
    hf, _ = build_model(ModelConfig(dropout=0.0), len(tokenizer))
    dense = hf(input_ids=batch["input_ids"], labels=dense_labels(batch)).loss.item()
    sparse = SparseMLM(hf)(**batch)[0].mean().item()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        mixed = SparseMLM(hf)(**batch)[0].mean().item()
    return {"dense_fp32": dense, "sparse_fp32": sparse, f"sparse_{precision}": mixed,
            "abs_diff_fp32": abs(dense - sparse), f"abs_diff_{precision}": abs(dense - mixed)}


def preprocessing_times() -> dict | None:
    import datasets

    from trainer.config import DataConfig
    from trainer.data import DataError, load_blocks, load_tokenizer
    from trainer.hub import local_data_overrides, shared_data_dir

    overrides = dict(o[2:].split("=", 1) for o in local_data_overrides(shared_data_dir()))
    cfg = DataConfig(dataset=overrides.get("data.dataset", "wikitext"), train_dataset=overrides.get("data.train_dataset"))
    tokenizer = load_tokenizer(overrides.get("data.tokenizer", "bert-base-uncased"))
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as cache:
        cfg.cache_dir = cache
        times = []
        for _ in range(2):
            start = time.perf_counter()
            try:
                train = load_blocks(cfg, tokenizer, "train", log=lambda *_: None)
                load_blocks(cfg, tokenizer, "validation", log=lambda *_: None)
            except DataError as e:
                print(f"preprocessing: skipped ({e})")
                return None
            times.append(time.perf_counter() - start)
    return {"cold_s": times[0], "cached_s": times[1], "train_tokens": train.num_tokens}


def child_env(variant: str) -> dict:
    from trainer.runtime import MALLOC_TUNABLES

    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if variant != "plain-hf":
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    return env


def run_child(variant: str, batch: int, args) -> dict | None:
    """One variant in its own process; None (and its stderr printed) if it failed."""
    out = subprocess.run([sys.executable, __file__, "--child", variant, str(batch), "--seconds", str(args.seconds),
                          *(f"--set={o}" for o in args.set), *(["--recipe", args.recipe] if args.recipe else [])],
                         env=child_env(variant), capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not line:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(line[0][7:])


def main() -> int:
    parser = argparse.ArgumentParser(description="plain HF loop vs this trainer")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=12.0, help="timed seconds per variant")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds over the variants, interleaved; each variant reports its fastest round "
                             "(for a machine shared with other work)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    parser.add_argument("--variants", nargs="+", default=["plain-hf", "plain-hf+malloc", "trainer"],
                        help="which steps to time (trainer+compile: also with --compile)")
    parser.add_argument("--recipe", help="the trainer's step with this recipe's settings (default: the scratch "
                                             "model with the config defaults), e.g. recipes/scratch_fast.py")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for the trainer's step, e.g. --set optim.name=muon or "
                             "--set train.mixed_precision=no (repeatable)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child[0], int(args.child[1]), args.seconds, args.set,
                                                 recipe=args.recipe)))
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 130)
    variants = args.variants + (["trainer+compile"] if args.compile else [])
    results, failed = [], []
    for batch in args.batch:
        runs = {variant: [] for variant in variants}  # rounds interleave the variants: load elsewhere hits all alike
        for round_ in range(args.repeat):
            for variant in variants:
                if f"{variant} batch {batch}" in failed:
                    continue
                console.print(f"running {variant} batch {batch}" + (f", round {round_ + 1}" if args.repeat > 1 else ""))
                result = run_child(variant, batch, args)
                if result is None:
                    console.print(f"[red]{variant} batch {batch} failed[/red]")
                    failed.append(f"{variant} batch {batch}")
                else:
                    runs[variant].append(result)
        for variant, done in runs.items():
            if done and f"{variant} batch {batch}" not in failed:  # its fastest round, with every round's figure
                best = max(done, key=lambda r: r["tokens_per_s"])
                results.append({**best, "rounds_tokens_per_s": [r["tokens_per_s"] for r in done]})

    import torch

    bf16 = any(r["precision"] == "bf16" for r in results)
    peaks = {"fp32": matmul_peak("float32"), **({"bf16": matmul_peak("bfloat16")} if bf16 else {})}
    baseline = {r["batch"]: r["tokens_per_s"] for r in results if r["variant"] == "plain-hf"}
    device = device_label()
    table = Table(title=f"training step, {args.recipe or 'scratch model (3x256)'}, seq {SEQ}  (torch {torch.__version__}, "
                        f"{device})")
    for column in ("variant", "batch", "precision", "tokens/s", "vs plain-hf", "peak MiB", "GFLOP/s", "of matmul peak",
                   "recompiles"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in results:
        peak = peaks["bf16" if r["precision"] == "bf16" else "fp32"]
        r["speedup_vs_plain"] = r["tokens_per_s"] / baseline[r["batch"]] if r["batch"] in baseline else None
        r["fraction_of_matmul_peak"] = r["gflops"] / peak
        table.add_row(r["variant"], str(r["batch"]), r["precision"], f"{r['tokens_per_s']:,.0f}",
                      f"{r['speedup_vs_plain']:.2f}x" if r["speedup_vs_plain"] else "-",
                      f"{r['peak_memory_mib']:,.0f}", f"{r['gflops']:.1f}", f"{r['fraction_of_matmul_peak']:.0%}",
                      str(r["recompiles_after_warmup"]))
    console.print(table)
    console.print("matmul peak (2048^3): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))
    static = None
    if args.compile:
        static = static_vs_dynamic(100, args.batch[0], args.set, args.recipe)
        console.print(f"compiled static step vs eager, {static['steps']} steps, batch {args.batch[0]}, no dropout: max |loss "
                      f"diff| {static['max_abs_loss_diff']:.2e}, step {static['step_s_eager'] * 1e3:.1f} ms eager vs "
                      f"{static['step_s_compiled'] * 1e3:.1f} ms compiled, recompiles after warm-up "
                      f"{static['recompiles_after_warmup']}")
    from trainer.runtime import resolve_mixed_precision

    agreement = loss_agreement(resolve_mixed_precision(bench_config(args.recipe, args.set).train.mixed_precision))
    console.print("loss on one batch: " + ", ".join(f"{k} {v:.6g}" for k, v in agreement.items()))
    preprocessing = preprocessing_times()
    if preprocessing:
        console.print(f"WikiText-2 preprocessing (train + validation): cold {preprocessing['cold_s']:.1f} s, "
                      f"cached {preprocessing['cached_s']:.2f} s ({preprocessing['train_tokens']:,} train tokens)")
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"results": results, "matmul_peak_gflops": peaks, "loss_agreement": agreement,
                                "preprocessing": preprocessing, "static_vs_dynamic": static,
                                "torch": torch.__version__, "device": device, "recipe": args.recipe,
                                "overrides": args.set, "failed": failed}, indent=1))
    console.print(f"written {path}")
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/red]")
    return 1 if failed else 0


def device_label() -> str:
    """What the figures were measured on: the GPU or CPU model, and whether bf16 counts as native there
    (trainer.runtime.fast_bf16, which TRAINER_FAST_BF16 overrides)."""
    import platform

    import torch

    from trainer.runtime import FAST_BF16_ENV, fast_bf16

    if torch.cuda.is_available():
        name, kind = torch.cuda.get_device_name(), "cuda"
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        name = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")),
                    platform.processor() or "CPU")
        name, kind = f"{name}, {os.cpu_count()} threads", "cpu"
    forced = f" ({FAST_BF16_ENV}={os.environ[FAST_BF16_ENV]})" if os.environ.get(FAST_BF16_ENV) else ""
    return f"{name}, bf16 {'native' if fast_bf16(kind) else 'not native: fp32'}{forced}"


if __name__ == "__main__":
    sys.exit(main())
