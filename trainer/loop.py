"""The training loop. Reads top to bottom: set-up, data, model, optimizer, (resume), train, finish.

Accelerate does device placement, mixed precision, gradient accumulation and the process group; the
same code runs on one CPU, one GPU, DDP, FSDP or DeepSpeed (see accelerate_configs/).

Loss normalisation (as in Accelerate's gradient_accumulation_for_autoregressive_models example):
each optimizer step divides the summed masked-token cross-entropy by the number of masked tokens in
the whole step (all micro-batches, all processes), so 2 processes x batch 4, 1 x 8 and 1 x 4 with 2
accumulation steps produce the same gradients.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from trainer.checkpoint import (
    CheckpointError,
    TrainState,
    read_state,
    resolve_resume,
    run_dir_of,
    save_checkpoint,
)
from trainer.config import Config, ConfigError
from trainer.console import TrainingConsole, quiet_libraries
from trainer.data import IndexedBlocks, MLMCollator, eval_dataloader, load_blocks, load_tokenizer
from trainer.evaluate import evaluate_mlm
from trainer.fillmask import fill_mask
from trainer.metrics import MLMTotals, perplexity
from trainer.model import SparseMLM, build_model, check_block_size, count_parameters, use_fast_dropout
from trainer.tracking import RunTracker, check_tracker_installed


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss policy); a one-line reason."""


def train(cfg: Config, resume: str | None = None, recipe: str | None = None) -> dict:
    """Train `cfg`; `resume` is "latest", a run directory or a checkpoint. Returns the run summary."""
    stop = StopRequest()
    try:
        return run_training(cfg, resume, recipe, stop)
    finally:
        stop.restore()


def run_training(cfg: Config, resume: str | None, recipe: str | None, stop: StopRequest) -> dict:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
    from transformers import get_scheduler

    t_start = time.time()
    quiet_libraries()
    check_tracker_installed(cfg.log.tracker)
    resume_from = resolve_resume(resume, Path(cfg.log.output_root), cfg.name) if resume else None

    # The run directory is chosen by the main process and shared, before the Accelerator needs it.
    if PartialState(cpu=not cuda_in_use()).is_main_process:
        try:
            shared = [prepare_run_dir(cfg, resume_from), None]
        except ConfigError as e:
            shared = [None, str(e)]
    else:
        shared = [None, None]
    run_dir, error = broadcast_object_list(shared)
    if error:
        raise ConfigError(error)
    accelerator = Accelerator(
        cpu=not cuda_in_use(),
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=None if cfg.log.tracker == "none" else cfg.log.tracker,
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step, whatever the process count
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed,
                                                  non_blocking=torch.cuda.is_available()),  # with pinned memory
    )
    is_main = accelerator.is_main_process
    console = TrainingConsole(is_main)
    console.print(f"run [bold]{run_dir.name}[/bold]  dir {run_dir}  processes {accelerator.num_processes}  "
                  f"device {accelerator.device}  precision {accelerator.mixed_precision}")
    set_seed(cfg.train.seed)  # identical initial weights on every process

    # ---------------------------------------------------------------- data
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    with accelerator.main_process_first():  # rank 0 tokenizes and caches; the others read the cache
        train_split = load_blocks(cfg.data, tokenizer, "train", log=console.print)
        eval_split = load_blocks(cfg.data, tokenizer, "validation", log=console.print)
    collator = MLMCollator(tokenizer, cfg.data.mlm_probability, seed=cfg.train.seed)
    loader_args = dict(num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available())
    train_loader = torch.utils.data.DataLoader(
        IndexedBlocks(train_split.blocks), batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
        collate_fn=collator, **loader_args,
    )
    eval_loader = eval_dataloader(eval_split.blocks, tokenizer, cfg.train.eval_batch_size, **loader_args)

    # ---------------------------------------------------------------- model and optimizer
    hf_model, report = build_model(cfg.model, len(tokenizer))
    check_block_size(hf_model, cfg.data.block_size)
    n_params = count_parameters(hf_model)
    console.print(f"model BertForMaskedLM  {n_params / 1e6:.2f}M parameters  "
                  f"{hf_model.config.num_hidden_layers} layers, hidden {hf_model.config.hidden_size}"
                  + (f"  from {cfg.model.pretrained}" if cfg.model.pretrained else "  (from scratch)"))
    if report.new_weights:
        console.print(f"newly initialised (not in the checkpoint): {', '.join(report.new_weights)}")
    if report.unused_weights:
        console.print(f"checkpoint weights not used: {', '.join(report.unused_weights)}")
    # CUDA's dropout kernels are already fused, and under torch.compile inductor generates its own.
    if cfg.model.fast_dropout and accelerator.device.type == "cpu" and not cfg.train.compile:
        use_fast_dropout(hf_model)
    model = SparseMLM(hf_model)
    if cfg.train.compile:
        model.compile_encoder()
    optimizer = build_optimizer(model, cfg, accelerator.device)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum)
    total_steps = steps_per_epoch * cfg.train.epochs
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.optim.schedule == "constant" else cfg.optim.schedule, optimizer,
        num_warmup_steps=round(cfg.optim.warmup_ratio * total_steps), num_training_steps=total_steps,
    )
    accelerator.register_for_checkpointing(scheduler)

    # ---------------------------------------------------------------- resume
    state = TrainState()
    if resume_from is not None:
        state = load_training_state(accelerator, resume_from)
        console.print(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch + 1}, "
                      f"batch {state.batches_in_epoch})")
    run_id = run_dir.name
    tracker = RunTracker(accelerator, cfg, run_dir, run_id, resume_step=state.step if resume_from else None)
    last_step = min(total_steps, cfg.train.max_steps or total_steps)
    console.print(f"train {len(train_split.blocks):,} blocks, {steps_per_epoch:,} steps/epoch x {cfg.train.epochs} "
                  f"epochs = {total_steps:,} steps (batch {cfg.train.batch_size} x {cfg.train.grad_accum} accum x "
                  f"{accelerator.num_processes} proc)" + (f", stopping at step {last_step}" if last_step < total_steps else ""))

    # ---------------------------------------------------------------- train
    tokens_per_batch = cfg.train.batch_size * cfg.data.block_size * accelerator.num_processes
    # Since the last log line. They stay on the device: the step has no host sync, the log step has one.
    interval, interval_grad_norm, interval_steps = MLMTotals(), torch.zeros((), device=accelerator.device), 0
    interval_time = interval_tokens = 0.0
    guard = NonFiniteGuard(optimizer, accelerator.device, in_a_row=state.nonfinite_skips)
    session_time = session_tokens = 0.0  # this process's lifetime (a resumed run restarts these)
    last_train_metrics: dict = {}
    eval_metrics: dict = {}
    last_eval_step = last_saved_step = -1
    interrupted = None

    def run_eval() -> None:
        nonlocal eval_metrics, last_eval_step
        eval_metrics = evaluate_mlm(model, eval_loader, accelerator)
        last_eval_step = state.step
        state.eval_loss = eval_metrics["eval/loss"]
        state.best_eval_loss = min(state.best_eval_loss, state.eval_loss)
        eval_metrics["eval/best_perplexity"] = perplexity(state.best_eval_loss)
        tracker.log({**eval_metrics, "epoch": epoch_progress()}, state.step, state.tokens_seen, elapsed())
        console.update(state.step, eval_metrics)

    def checkpoint() -> None:
        nonlocal last_saved_step
        state.elapsed_s = elapsed()
        if not parameters_finite(model):  # never replace a good checkpoint with a broken model
            console.print(f"[red]parameters are not finite at step {state.step}: checkpoint NOT written[/red]")
            return
        if save_checkpoint(accelerator, run_dir, state, cfg.train.keep_last) is not None:
            last_saved_step = state.step

    run_time_before = state.elapsed_s  # a resumed run's clock continues from its checkpoint

    def elapsed() -> float:
        return run_time_before + time.time() - t_start

    def epoch_progress() -> float:
        return state.epoch + state.batches_in_epoch / max(len(train_loader), 1)

    if cfg.train.eval_at_start and state.step == 0:
        run_eval()
    console.start(total_steps=last_step, start_step=state.step)
    model.train()
    while state.epoch < cfg.train.epochs and state.step < last_step and interrupted is None:
        train_loader.set_epoch(state.epoch)
        collator.set_epoch(state.epoch)
        # Mid-epoch resume: skip the batches already trained on without loading or computing them.
        epoch_loader = (accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
                        if state.batches_in_epoch else train_loader)
        batches = iter(epoch_loader)
        while state.step < last_step and interrupted is None:
            step_start = time.time()
            window = list(itertools.islice(batches, cfg.train.grad_accum))  # the micro-batches of one step
            if not window:
                break
            # Reseed per step: dropout draws depend only on (seed, step, rank), so a resumed run matches.
            torch.manual_seed(hash((cfg.train.seed, state.step, accelerator.process_index)) & 0x7FFF_FFFF)
            step_totals = MLMTotals()
            grad_norm = train_step(accelerator, model, optimizer, window, step_totals, cfg)
            updated = guard.step(optimizer, grad_norm)  # a no-op update if the loss or gradient norm is inf/NaN
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batches_in_epoch += len(window)
            state.tokens_seen += tokens_per_batch * len(window)
            state.eval_loss = None
            interval.merge(step_totals, keep=updated)
            interval_grad_norm = interval_grad_norm + torch.where(updated > 0, grad_norm, 0.0)
            interval_steps += 1
            log_now = state.step % cfg.train.log_every == 0 or state.step == last_step
            if log_now:  # the interval's one host sync, inside the timed region: the device catches up here
                skipped, longest_run, state.nonfinite_skips = guard.read()
            seconds = time.time() - step_start
            interval_time, session_time = interval_time + seconds, session_time + seconds
            interval_tokens += tokens_per_batch * len(window)
            session_tokens += tokens_per_batch * len(window)
            console.update(state.step)

            if log_now:
                if skipped:
                    console.print(f"[yellow]steps {state.step - interval_steps + 1}-{state.step}: {skipped} with a "
                                  f"non-finite loss or gradient norm, update skipped ({longest_run} in a row)[/yellow]")
                    if cfg.train.on_nonfinite == "stop" or longest_run >= cfg.train.max_nonfinite_skips:
                        raise TrainingStopped(
                            f"stopped at step {state.step}: non-finite loss or gradient norm "
                            f"(train.on_nonfinite={cfg.train.on_nonfinite}, {longest_run} in a row); "
                            f"the last good checkpoint is in {run_dir}/checkpoints; try a lower --optim.lr")
                if interval_steps > skipped:
                    last_train_metrics = {
                        **reduce_totals(accelerator, interval).compute("train"),
                        "train/lr": scheduler.get_last_lr()[0],
                        # mean over the interval's updated steps, before clipping
                        "train/grad_norm": float(interval_grad_norm) / (interval_steps - skipped),
                        "train/tokens_per_s": interval_tokens / max(interval_time, 1e-9),
                        "epoch": epoch_progress(),
                    }
                    tracker.log(last_train_metrics, state.step, state.tokens_seen, elapsed())
                    console.update(state.step, last_train_metrics)
                interval, interval_grad_norm = MLMTotals(), torch.zeros_like(interval_grad_norm)
                interval_steps, interval_time, interval_tokens = 0, 0.0, 0.0
            evaluated = bool(cfg.train.eval_every) and state.step % cfg.train.eval_every == 0 and last_eval_step != state.step
            if evaluated:
                run_eval()
            new_best = evaluated and state.eval_loss <= state.best_eval_loss
            if new_best or (cfg.train.save_every and state.step % cfg.train.save_every == 0 and last_saved_step != state.step):
                checkpoint()
            if stop_agreed(accelerator, stop, log_now):
                interrupted = stop.signal_name or "signal on another process"

        if state.batches_in_epoch >= len(train_loader):  # the epoch is complete
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            if last_eval_step != state.step:
                run_eval()
            checkpoint()

    # ---------------------------------------------------------------- finish
    console.close()
    if interrupted is not None:
        if last_saved_step != state.step:
            checkpoint()
        command = f"accelerate launch trainer/run.py {recipe or 'RECIPE.py'} --resume={run_dir}"
        console.print(f"[yellow]{interrupted}: stopped at step {state.step}; checkpoint saved in "
                      f"{run_dir}/checkpoints. Resume with:[/yellow] {command}")
    else:
        if last_eval_step != state.step:
            run_eval()
        if last_saved_step != state.step:
            checkpoint()
    model_dir = run_dir / "model"
    save_model(accelerator, model, tokenizer, model_dir)

    summary = {
        "run_id": run_id, "recipe": cfg.name, "status": "interrupted" if interrupted else "finished",
        "parameters": n_params, "steps": state.step, "tokens_seen": state.tokens_seen,
        "wall_time_s": elapsed(), "train_time_s": session_time,
        "train/tokens_per_s": session_tokens / session_time if session_time else None,
        "final/train_loss": last_train_metrics.get("train/loss"),
        "final/train_perplexity": last_train_metrics.get("train/perplexity"),
        "final/eval_loss": eval_metrics.get("eval/loss"),
        "final/eval_perplexity": eval_metrics.get("eval/perplexity"),
        "final/eval_accuracy": eval_metrics.get("eval/accuracy"),
        "best/eval_loss": state.best_eval_loss, "best/eval_perplexity": perplexity(state.best_eval_loss),
        "model_dir": str(model_dir),
    }
    if is_main and interrupted is None:
        log_samples(cfg, model_dir, tracker, console, state.step)
    tracker.summary(summary)
    console.table(f"{run_id} ({summary['status']})", [
        ("steps", state.step), ("tokens seen", state.tokens_seen),
        ("final train loss", summary["final/train_loss"]), ("final train perplexity", summary["final/train_perplexity"]),
        ("final val loss", summary["final/eval_loss"]), ("final val perplexity", summary["final/eval_perplexity"]),
        ("final val accuracy", summary["final/eval_accuracy"]), ("best val perplexity", summary["best/eval_perplexity"]),
        ("wall time (s)", round(summary["wall_time_s"], 1)), ("train tokens/s", summary["train/tokens_per_s"]),
        ("model", str(model_dir)),
    ])
    # torch's gloo backend can abort at exit while a DDP model or loader still holds process-group
    # resources: drop every reference before the trackers and the process group go away.
    tracker.close()
    del model, optimizer, train_loader, eval_loader, scheduler
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return summary


# --------------------------------------------------------------------------- one optimizer step


def train_step(accelerator, model, optimizer, window, totals: MLMTotals, cfg: Config) -> torch.Tensor:
    """Forward/backward over the micro-batches of one optimizer step; returns the gradient norm before
    clipping, a device tensor (reading it would be a host sync)."""
    num_items = sum(batch["mlm_labels"].numel() for batch in window)
    num_items = torch.tensor(float(max(num_items, 0)), device=accelerator.device)
    if accelerator.num_processes > 1:
        num_items = accelerator.reduce(num_items, reduction="sum")
    num_items = num_items.clamp(min=1.0)
    for batch in window:
        with accelerator.accumulate(model):
            token_loss, correct = model(**batch)
            # x grad_accum: accelerator.backward divides by it; x num_processes: DDP averages over ranks.
            loss = token_loss.sum() / num_items * (cfg.train.grad_accum * accelerator.num_processes)
            accelerator.backward(loss)
            totals.add(token_loss, correct)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)  # the norm before clipping
    if grad_norm is None:  # DeepSpeed clips inside its engine
        grad_norm = torch.zeros((), device=accelerator.device)
    return grad_norm.detach().float().reshape(())


class NonFiniteGuard:
    """Makes the update of a step whose loss or gradient norm is inf/NaN a no-op, and counts such steps.

    torch's fused AdamW skips an update on the device when given a `found_inf` tensor (as GradScaler
    does), so a step needs no host sync; the counts are read once per logging interval. A GradScaler
    (fp16) already skips non-finite steps itself; other optimizers check on the host every step.
    """

    def __init__(self, optimizer, device, in_a_row: int = 0):
        self.inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer
        if getattr(optimizer, "scaler", None) is not None:
            self.mode = "scaler"
        elif getattr(self.inner, "_step_supports_amp_scaling", False):
            self.mode = "device"
        else:
            self.mode = "host"
        zero = torch.zeros((), device=device)
        self.skipped, self.longest, self.in_a_row = zero, zero, zero + in_a_row

    def step(self, optimizer, grad_norm: torch.Tensor) -> torch.Tensor:
        """optimizer.step() unless grad_norm is inf/NaN. Returns 1.0 (updated) or 0.0, on the device."""
        bad = (~torch.isfinite(grad_norm)).float()
        if self.mode == "device":
            self.inner.found_inf = bad
            try:
                optimizer.step()
            finally:
                del self.inner.found_inf
        elif self.mode == "scaler" or not bad.item():
            optimizer.step()
        self.skipped = self.skipped + bad
        self.in_a_row = (self.in_a_row + 1) * bad
        self.longest = torch.maximum(self.longest, self.in_a_row)
        return 1.0 - bad

    def read(self) -> tuple[int, int, int]:
        """(skipped steps, longest run of consecutive skips, current run) since the last read; a host sync."""
        skipped, longest, in_a_row = (int(x) for x in torch.stack([self.skipped, self.longest, self.in_a_row]).tolist())
        self.skipped, self.longest = torch.zeros_like(self.skipped), self.in_a_row.clone()  # a run goes on
        return skipped, longest, in_a_row


def stop_agreed(accelerator, stop: StopRequest, at_log_step: bool) -> bool:
    """Whether to stop for SIGTERM/SIGINT after this step. One process reads its own flag (no device work);
    several agree at logging steps (one all-reduce), so they all stop at the same step."""
    if accelerator.num_processes == 1:
        return stop.requested
    if not at_log_step:
        return False
    flag = accelerator.reduce(torch.tensor(float(stop.requested), device=accelerator.device), reduction="max")
    return bool(flag.item())


def reduce_totals(accelerator, totals: MLMTotals) -> MLMTotals:
    packed = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=accelerator.device)
                          for x in (totals.loss_sum, totals.tokens, totals.correct)])
    if accelerator.num_processes > 1:
        packed = accelerator.reduce(packed, reduction="sum")
    loss_sum, tokens, correct = packed.tolist()
    return MLMTotals(loss_sum, int(tokens), int(correct))


def build_optimizer(model, cfg: Config, device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights (BERT's recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.optim.fused and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                             eps=cfg.optim.eps, fused=fused)


# --------------------------------------------------------------------------- set-up helpers


def cuda_in_use() -> bool:
    """CUDA is there and not switched off (accelerate's use_cpu / ACCELERATE_USE_CPU)."""
    return torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")


def resolve_mixed_precision(choice: str) -> str:
    """'auto' -> bf16 where it is fast (CUDA with bf16, a CPU with avx512_bf16/AMX), else fp32."""
    use_cuda = cuda_in_use()
    if choice == "fp16" and not use_cuda:
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU (Accelerate would silently train in fp32 "
                          "on CPU); use --train.mixed_precision=bf16 or no")
    if choice != "auto":
        return choice
    if use_cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "no"


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def prepare_run_dir(cfg: Config, resume_from: Path | None) -> Path:
    """The run directory: the resumed run's, or a new `<output_root>/<run_name>`; must be writable."""
    if resume_from is not None:
        run_dir = run_dir_of(resume_from)
    else:
        name = cfg.log.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(cfg.log.output_root) / name
        suffix = 2
        while cfg.log.run_name is None and run_dir.exists():
            run_dir, suffix = Path(cfg.log.output_root) / f"{name}-{suffix}", suffix + 1
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to output directory {run_dir} ({e.strerror}); "
                          f"pass a writable --log.output_root") from None
    return run_dir


def load_training_state(accelerator, checkpoint: Path) -> TrainState:
    state = read_state(checkpoint)
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as e:
        first_line = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise CheckpointError(
            f"cannot load checkpoint {checkpoint}: {type(e).__name__}: {first_line} "
            f"(corrupted, or saved with a different model/recipe)") from e
    return state


def parameters_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def save_model(accelerator, model, tokenizer, model_dir: Path) -> None:
    """Save the inner BertForMaskedLM + tokenizer with save_pretrained (a plain HF model directory)."""
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP/DeepSpeed shards
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model).mlm
        state_dict = {k.removeprefix("mlm."): v for k, v in state_dict.items()}
        inner.save_pretrained(model_dir, state_dict=state_dict)
        tokenizer.save_pretrained(model_dir)
    accelerator.wait_for_everyone()


def log_samples(cfg: Config, model_dir: Path, tracker: RunTracker, console: TrainingConsole, step: int) -> None:
    """Fill-mask predictions of the saved model (loading it back also proves the save)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = fill_mask(model, tokenizer, cfg.log.probes, cfg.log.fill_mask_top_k)
    rows = []
    for probe, predictions in zip(cfg.log.probes, results):
        console.print(f"  {probe}  ->  " + ", ".join(f"{tok} ({p:.2f})" for tok, p in predictions),
                      markup=False, highlight=False)
        rows.append([probe, ", ".join(tok for tok, _ in predictions), predictions[0][0], round(predictions[0][1], 4)])
    tracker.log_table("samples/fill_mask", ["probe", "top_k", "top_1", "top_1_prob"], rows, step)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and exits. A second signal kills."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread (e.g. a notebook helper thread): no handler
                pass

    def handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))  # a second signal is not ignored
        print(f"\n{self.signal_name} received: finishing the current step, then checkpointing", file=sys.stderr)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
