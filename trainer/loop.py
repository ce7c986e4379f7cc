"""The training loop: `Trainer.setup()` builds the run, `fit()` trains, `finish()` saves and reports.

Accelerate does device placement, mixed precision, gradient accumulation and the process group; the
same code runs on one CPU, one GPU, DDP, FSDP or DeepSpeed (see accelerate_configs/). What one
optimizer step does is in step.py; what is logged, evaluated and saved after it is decided in
`Trainer.due`.
"""

from __future__ import annotations

import gc
import itertools
import math
import shlex
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import PartialState

from trainer.budget import TimeBudget, budget_steps, parse_duration, parse_tokens, progress_schedule
from trainer.checkpoint import (TrainState, best_checkpoint, load_checkpoint, parameters_finite, read_state,
                                remove_partial_saves, save_checkpoint, set_aside_later_checkpoints)
from trainer.config import Config, ConfigError, load_recipe
from trainer.console import ConsoleSink, TrainingConsole, describe_launch, quiet_libraries
from trainer.data import DataError, IndexedBlocks, MLMCollator, eval_dataloader, load_blocks, load_tokenizer
from trainer.evaluate import evaluate_mlm
from trainer.export import save_model, trained_length, write_model_card
from trainer.fillmask import log_samples
from trainer.metrics import IntervalMeter, model_flops_per_token, peak_flops, perplexity
from trainer.model import (build_model, check_attention_fits, check_block_size, count_parameters, match_vocabulary,
                           training_model)
from trainer.rundir import (CONFIG_FILE, MODEL_DIR, SUMMARY_FILE, RunLock, check_resume_config, create_run_dir,
                            find_checkpoint, list_checkpoints, read_json, remove_if_empty, run_dir_of, write_json_atomic)
from trainer.runtime import (StopRequest, check_device_matches_launch, check_plugins_match_recipe, cuda_in_use,
                             enable_tf32, force_cpu, launch_command, process_group_backend, resolve_mixed_precision)
from trainer.step import TrainStep, build_optimizer, build_scheduler, learning_rates
from trainer.tracking import JsonlSink, MetricLogger, check_trackers_installed, open_trackers


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss policy); a one-line reason."""

    exit_code = 3


@dataclass
class Due:
    """What a step triggers."""

    log: bool
    eval: bool
    save: bool
    stop: bool


def train(cfg: Config, resume: str | None = None, recipe: str | None = None, command: list[str] | None = None) -> dict:
    """Train `cfg`; `resume` is "latest", a run directory or a checkpoint; `recipe` and `command` (the
    command line) are recorded in the run. Returns the run summary."""
    trainer = Trainer(cfg, resume, recipe, command)
    try:
        trainer.setup()
        trainer.fit()
        return trainer.finish()
    finally:
        trainer.close()


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, recipe: str | None = None,
                 command: list[str] | None = None):
        self.cfg, self.recipe, self.command = cfg, recipe, command
        self.resume_from = find_checkpoint(resume, Path(cfg.log.output_root), cfg.name) if resume else None
        if self.resume_from is not None:
            read_state(self.resume_from)  # a broken state file fails here, before any work
        self.state = TrainState()
        self.started = time.time()
        self.stop = StopRequest()
        self.accelerator = self.logger = self.run_dir = self.console = self.run_lock = None
        self.elapsed_before = 0.0  # wall time of the sessions before a resume
        self.epoch_ended, self.skipped, self.longest_skip_run = False, 0, 0
        self.train_metrics: dict = {}
        self.eval_metrics: dict = {}

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        quiet_libraries()
        check_trackers_installed(self.cfg.log.tracker)
        check_device_matches_launch()
        self.setup_accelerator()
        if not self.cfg.model.pretrained:  # before anything is loaded; a pretrained model is checked once loaded
            m, d = self.cfg.model, self.cfg.data
            check_attention_fits(m.num_layers, m.num_heads, d.block_size, self.cfg.train.batch_size, self.accelerator.device)
        self.setup_data()
        self.setup_model()
        self.setup_resume_and_logging()

    def setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed

        cfg, state = self.cfg, PartialState(cpu=force_cpu(), backend=process_group_backend())
        launch_command()  # read now, while the launcher that started this process is there to be read
        if self.resume_from is not None:
            check_resume_config(cfg, run_dir_of(self.resume_from))
        shared = [None]  # the main process picks the run directory and shares it (or its error)
        if state.is_main_process:
            try:
                shared = [self.pick_run_dir()]
            except ConfigError as e:
                shared = [e]
        (shared,) = broadcast_object_list(shared)
        if isinstance(shared, Exception):
            raise shared
        self.run_dir = shared
        self.accelerator = accelerator = Accelerator(
            cpu=force_cpu(),
            mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision, compiled=cfg.train.compile),
            gradient_accumulation_steps=cfg.train.grad_accum,
            log_with=cfg.log.tracker or None,
            project_dir=str(self.run_dir),
            step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed,
                                                      non_blocking=cuda_in_use()),  # with pinned memory
        )
        enable_tf32()
        check_plugins_match_recipe(accelerator, cfg)
        self.console = TrainingConsole(accelerator.is_main_process)
        self.console.print(f"run [bold]{self.run_dir.name}[/bold]  dir {self.run_dir}  " + describe_launch(
            accelerator.num_processes, accelerator.distributed_type.value, accelerator.device.type,
            accelerator.mixed_precision))
        set_seed(cfg.train.seed)  # identical initial weights on every process

    def pick_run_dir(self) -> Path:
        """The resumed run's directory (cleared of interrupted saves), or a new one. Its config.json is
        the latest session's config, so the printed resume command continues what this session runs."""
        if self.resume_from is not None:
            run_dir, saved = run_dir_of(self.resume_from), read_state(self.resume_from)
            self.run_lock = RunLock(run_dir)  # a live run is refused before it is touched
            if saved.processes != PartialState().num_processes:
                raise ConfigError(f"run {run_dir} was trained with {saved.processes} process(es), this launch has "
                                  f"{PartialState().num_processes}: resume with --num_processes {saved.processes}")
            remove_partial_saves(run_dir)
        else:
            run_dir = create_run_dir(Path(self.cfg.log.output_root), self.cfg.log.run_name, self.cfg.name)
            self.run_lock = RunLock(run_dir)
        config = {"run_id": run_dir.name, "recipe": self.recipe, "command": self.command, **self.cfg.to_dict()}
        try:
            write_json_atomic(run_dir / CONFIG_FILE, config)
        except OSError as e:
            if self.resume_from is None:
                raise ConfigError(f"cannot write to output directory {run_dir} ({e.strerror})") from None
            print(f"warning: {run_dir / CONFIG_FILE} not updated ({e.strerror})", flush=True)
        return run_dir

    def setup_data(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        with accelerator.local_main_process_first():  # one process per machine tokenizes; the others read its cache
            self.train_blocks = load_blocks(cfg.data, self.tokenizer, "train", log=self.console.print).blocks
            eval_blocks = load_blocks(cfg.data, self.tokenizer, "validation", log=self.console.print).blocks
        needed = cfg.train.batch_size * accelerator.num_processes
        if len(self.train_blocks) < needed:  # the loader drops a partial last batch: 0 steps would "finish"
            raise DataError(f"the train split has {len(self.train_blocks):,} blocks of {cfg.data.block_size} tokens; "
                            f"one step needs train.batch_size={cfg.train.batch_size} x {accelerator.num_processes} "
                            f"process(es) = {needed} blocks: add text, or lower --train.batch_size or --data.block_size")
        self.collator = MLMCollator(self.tokenizer, cfg.data.mlm_probability, seed=cfg.train.seed,
                                    fixed_count=cfg.data.mask_count == "fixed")
        loader_args = dict(num_workers=cfg.data.num_workers, pin_memory=cuda_in_use())
        self.train_loader = torch.utils.data.DataLoader(
            IndexedBlocks(self.train_blocks), batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
            collate_fn=self.collator, **loader_args)
        self.eval_loader = eval_dataloader(eval_blocks, self.tokenizer, cfg.train.eval_batch_size, **loader_args)

    def setup_model(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        # A resume's weights are its checkpoint's: the checkpoint a run started from may be gone by then.
        model_cfg = cfg.model if self.resume_from is None else replace(cfg.model, init_from=None)
        hf_model, report = build_model(model_cfg, len(self.tokenizer))
        check_block_size(hf_model, cfg.data.block_size)
        if cfg.model.pretrained:  # also on resume: a resized run's checkpoint holds the resized embeddings
            resized = match_vocabulary(hf_model, self.tokenizer, cfg.model, cfg.data.tokenizer)
            if resized:
                self.console.print(resized)
        if cfg.model.pretrained:
            check_attention_fits(hf_model.config.num_hidden_layers, hf_model.config.num_attention_heads,
                                 cfg.data.block_size, cfg.train.batch_size, accelerator.device)
        self.n_params, self.model_config = count_parameters(hf_model), hf_model.config
        self.console.print(f"model BertForMaskedLM  {self.n_params / 1e6:.2f}M parameters  "
                           f"{hf_model.config.num_hidden_layers} layers, hidden {hf_model.config.hidden_size}"
                           + (f"  from {cfg.model.pretrained}" if cfg.model.pretrained else "  (from scratch)")
                           + (f", weights of {model_cfg.init_from}" if model_cfg.init_from else ""))
        if report.new_weights:
            self.console.print(f"newly initialised (not in the checkpoint): {', '.join(report.new_weights)}")
        if report.unused_weights:
            self.console.print(f"checkpoint weights not used: {', '.join(report.unused_weights)}")
        model = training_model(hf_model, cfg, accelerator.device)
        optimizer = build_optimizer(model, cfg, accelerator.device)
        self.model, self.optimizer, self.train_loader, self.eval_loader = accelerator.prepare(
            model, optimizer, self.train_loader, self.eval_loader)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.train.grad_accum)
        self.plan_length()
        accelerator.register_for_checkpointing(self.scheduler)
        self.flops_per_token = model_flops_per_token(hf_model.config, cfg.data.block_size, cfg.data.mlm_probability)

    def plan_length(self) -> None:
        """The run's length and the schedule that spans it: epochs, the steps a token budget holds, or a
        time budget (open-ended: the schedule follows the time spent, see budget.py)."""
        t, o = self.cfg.train, self.cfg.optim
        self.tokens_per_batch = t.batch_size * self.cfg.data.block_size * self.accelerator.num_processes
        self.time_budget = None
        if t.time_budget:
            self.time_budget = TimeBudget(parse_duration(t.time_budget), elapsed=0.0, step=0)
            self.total_steps = None
            self.scheduler = progress_schedule(self.optimizer, o.schedule, o.warmup_ratio, o.decay_ratio,
                                               lambda steps_done: self.time_budget.progress(steps_done))
        else:
            self.total_steps = (budget_steps(parse_tokens(t.token_budget), self.tokens_per_batch * t.grad_accum)
                                if t.token_budget else self.steps_per_epoch * t.epochs)
            self.scheduler = build_scheduler(self.optimizer, self.cfg, self.total_steps)
        ends = [n for n in (self.total_steps, t.max_steps) if n]
        self.last_step = min(ends) if ends else None  # None: when the time budget is spent

    def describe_length(self) -> str:
        t, steps = self.cfg.train, self.total_steps
        head = f"train {len(self.train_blocks):,} blocks, {self.steps_per_epoch:,} steps/epoch"
        shape = (f"(batch {t.batch_size} x {t.grad_accum} accum x {self.accelerator.num_processes} proc = "
                 f"{self.tokens_per_batch * t.grad_accum:,} tokens/step)")
        if self.time_budget is not None:
            return (f"{head}; time budget {t.time_budget} ({self.time_budget.seconds:,.0f} s): the schedule follows "
                    f"the time spent {shape}")
        if t.token_budget:
            return (f"{head}; token budget {parse_tokens(t.token_budget):,} = {steps:,} steps "
                    f"({steps / self.steps_per_epoch:.2f} epochs) {shape}")
        return f"{head} x {t.epochs} epochs = {steps:,} steps {shape}"

    def setup_resume_and_logging(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        if self.resume_from is not None:
            self.resume()
        self.state.processes = accelerator.num_processes
        self.take_step = TrainStep(accelerator, self.model, self.optimizer, self.scheduler, cfg,
                                   nonfinite_in_a_row=self.state.nonfinite_in_a_row)
        self.meter = IntervalMeter(accelerator.device, self.flops_per_token,
                                   peak_flops(accelerator.device.type, accelerator.mixed_precision))
        resume_step = self.state.step if self.resume_from else None
        sinks = [JsonlSink(self.run_dir, resume_step), *open_trackers(accelerator, cfg, self.run_dir, self.run_dir.name),
                 ConsoleSink(self.console)] if accelerator.is_main_process else []
        self.logger = MetricLogger(sinks)
        self.console.print(self.describe_length())
        if cfg.train.max_steps and self.last_step < (self.total_steps or math.inf):
            self.console.print(self.early_stop_warning())

    def early_stop_warning(self) -> str:
        t = self.cfg.train
        if self.total_steps is None:
            return f"[yellow]warning: train.max_steps={t.max_steps} may stop the run before its time budget is spent[/yellow]"
        left = self.scheduler.lr_lambdas[0](self.last_step)  # the schedule's multiplier where the run stops
        return (f"[yellow]warning: train.max_steps={t.max_steps} stops the run at step {self.last_step:,} of its "
                f"schedule's {self.total_steps:,} (the learning rate still at {left:.0%} of its peak); "
                f"to fit the schedule to {self.last_step:,} steps, use --train.token_budget="
                f"{self.last_step * self.tokens_per_batch * t.grad_accum} instead[/yellow]")

    def resume(self) -> None:
        """Continue from the checkpoint; refuse what cannot continue exactly or has nothing left to train."""
        accelerator = self.accelerator
        self.state = load_checkpoint(accelerator, self.resume_from)
        self.elapsed_before = self.state.elapsed_s
        if self.time_budget is not None:  # the budget continues where the checkpoint left it
            self.time_budget = TimeBudget(self.time_budget.seconds, self.state.elapsed_s, self.state.step)
        past_end = self.last_step is not None and self.state.step > self.last_step
        finished = self.finished_before()  # a time budget's end is where it ended: a checkpoint's clock may stop short
        if past_end or (finished and (self.at_last_step() or finished.get("ended_by") == "time_budget")):
            at_schedule_end = self.total_steps is None or self.state.step >= self.total_steps
            hint = "start a new run" if at_schedule_end else "raise --train.max_steps"
            where = (f"step {self.state.step} of {self.last_step}" if self.last_step is not None
                     else f"the end of its time budget ({self.cfg.train.time_budget})")
            raise ConfigError(f"run {self.run_dir} is already at {where}: nothing to train ({hint})")
        for group in self.optimizer.param_groups:  # a compiled step's tensor lr comes back on the CPU
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = group["lr"].to(accelerator.device)
        if accelerator.is_main_process:  # only once the checkpoint has loaded
            for path in set_aside_later_checkpoints(self.run_dir, self.state.step):
                self.console.print(f"resuming from an earlier checkpoint: {path.name} moved to {path.parent / 'abandoned'}")
        self.console.print(f"resumed from {self.resume_from} at step {self.state.step} (epoch "
                           f"{self.state.epoch + 1}, batch {self.state.batches_in_epoch})")

    def finished_before(self) -> dict | None:
        """The summary of an earlier session that finished at this step (its model saved whole), if any. If
        none, a run at its last step has only its model to save, which finish() does."""
        try:
            summary = read_json(self.run_dir / SUMMARY_FILE)
        except (OSError, ValueError):
            return None
        finished = summary.get("status") == "finished" and summary.get("step", summary.get("steps")) == self.state.step
        return summary if finished else None

    # ------------------------------------------------------------------ fit

    def fit(self) -> None:
        """Train until the last step or a stop signal: one optimizer step, then whatever it makes due."""
        if self.cfg.train.eval_at_start and self.state.step == 0:
            self.evaluate()
        if self.time_budget is not None:
            self.time_budget.agree(self.accelerator, self.elapsed(), self.state.step)
        self.console.start(*self.bar())
        self.model.train()
        self.meter.restart_clock()
        # A resumed run that had trained to its last step but not saved its model only saves it (finish).
        for window in self.step_windows() if not self.at_last_step() else []:
            self.train_step(window)
            due = self.due()
            if due.log:
                self.log_train()
            new_best = False
            if due.eval:
                new_best = self.evaluate()
            if due.save or new_best:
                self.save()
            if due.log or due.eval or due.save or new_best:
                self.meter.restart_clock()  # logging, evaluation and saving are not training time
            if due.stop:
                break
        self.console.close()

    def step_windows(self):
        """The micro-batches of each optimizer step, from where the run stands to the end of the last epoch."""
        budgeted = self.cfg.train.token_budget or self.time_budget  # as many epochs as the budget holds
        while budgeted or self.state.epoch < self.cfg.train.epochs:
            self.train_loader.set_epoch(self.state.epoch)
            self.collator.set_epoch(self.state.epoch)
            # Mid-epoch resume: skip the batches already trained on without loading or computing them.
            skip = self.state.batches_in_epoch
            loader = self.accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
            loader._non_blocking = self.train_loader._non_blocking  # accelerate 1.15's skip_first_batches drops it
            batches = iter(loader)
            while window := list(itertools.islice(batches, self.cfg.train.grad_accum)):
                yield window

    def train_step(self, window: list[dict]) -> None:
        state = self.state
        result = self.take_step(window, state.step)
        state.step += 1
        state.batches_in_epoch += len(window)
        state.tokens_seen += self.tokens_per_batch * len(window)
        self.epoch_ended = state.batches_in_epoch >= len(self.train_loader)
        if self.epoch_ended:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        if self.time_budget is not None and (state.step % self.cfg.train.log_every == 0 or self.time_budget.needs_pace()):
            self.time_budget.agree(self.accelerator, self.elapsed(), state.step)
        if self.is_log_step():  # the interval's one host sync, inside the timed region: the device catches up here
            self.skipped, self.longest_skip_run, _ = self.take_step.guard.read()  # the run in a row: saved by save()
        self.meter.add(result.totals, result.grad_norm, result.updated, self.tokens_per_batch * len(window))
        self.console.advance(self.bar()[1])

    def is_log_step(self) -> bool:
        return self.state.step % self.cfg.train.log_every == 0 or self.at_last_step()

    def at_last_step(self) -> bool:
        """The last step of the run: its step count, or the one after which the time budget is spent
        (decided alike on every process: see budget.TimeBudget)."""
        step = self.state.step
        return ((self.last_step is not None and step >= self.last_step)
                or (self.time_budget is not None and self.time_budget.spent(step)))

    def bar(self) -> tuple[int, int]:
        """The progress bar's (total, completed): steps, or seconds of a time budget."""
        if self.last_step is None:
            return int(self.time_budget.seconds), int(self.time_budget.elapsed_at(self.state.step))
        return self.last_step, self.state.step

    def due(self) -> Due:
        """What this step makes due. Log: every `log_every` steps and at the last step. Evaluate: every
        `eval_every` steps, at each epoch end and at the last step. Save: every `save_every` steps, at
        each epoch end, at the last step, on a stop signal, and after an evaluation with a new best
        loss (which `fit` learns from the evaluation). Stop: at the last step, or on a signal (agreed
        by all processes at a logging step)."""
        t, step = self.cfg.train, self.state.step
        last = self.at_last_step()
        log = self.is_log_step()
        interrupted = self.stop.agreed(self.accelerator, at_log_step=log)
        evaluate = (t.eval_every and step % t.eval_every == 0) or self.epoch_ended or last
        save = (t.save_every and step % t.save_every == 0) or self.epoch_ended or last or interrupted
        return Due(log=log, eval=bool(evaluate), save=bool(save), stop=last or interrupted)

    def log_train(self) -> None:
        """Emit the interval's training record; warn about, or stop for, non-finite steps."""
        state, t = self.state, self.cfg.train
        if self.skipped:
            self.console.print(f"[yellow]steps {state.step - self.meter.steps + 1}-{state.step}: {self.skipped} with a "
                               f"non-finite loss or gradient norm, update skipped ({self.longest_skip_run} in a row)[/yellow]")
            if t.on_nonfinite == "stop" or self.longest_skip_run >= t.max_nonfinite_skips:
                self.logger.summary(self.run_summary("diverged", TrainingStopped.exit_code, model_dir=None))
                raise TrainingStopped(f"stopped at step {state.step}: non-finite loss or gradient norm "
                                      f"(train.on_nonfinite={t.on_nonfinite}, {self.longest_skip_run} in a row); "
                                      f"{self.where_to_resume_after_divergence()}")
        metrics = self.meter.flush(self.accelerator, self.skipped)
        if metrics:  # an interval of skipped steps only has nothing to report
            rates = learning_rates(self.optimizer)
            self.train_metrics = {**metrics, "train/lr": rates["adamw"],
                                  **({"train/lr_muon": rates["muon"]} if "muon" in rates else {}), "epoch": self.epoch()}
            self.logger.log(self.record(self.train_metrics))

    def evaluate(self) -> bool:
        """Evaluate, log, and return whether the loss is a new best."""
        metrics = evaluate_mlm(self.model, self.eval_loader, self.accelerator, track=self.console.track)
        state = self.state
        new_best = metrics["eval/loss"] <= state.best_eval_loss
        state.last_eval_step, state.last_eval_loss = state.step, metrics["eval/loss"]
        state.best_eval_loss = min(state.best_eval_loss, metrics["eval/loss"])
        self.eval_metrics = {**metrics, "eval/best_loss": state.best_eval_loss,
                             "eval/best_perplexity": perplexity(state.best_eval_loss)}
        self.logger.log(self.record({**self.eval_metrics, "epoch": self.epoch()}))
        return new_best

    def save(self) -> None:
        self.state.elapsed_s = self.elapsed()
        self.state.nonfinite_in_a_row = self.take_step.guard.in_a_row_now()
        if not parameters_finite(self.accelerator, self.model):  # never replace a good checkpoint with a broken model
            self.console.print(f"[red]parameters are not finite at step {self.state.step}: checkpoint NOT written[/red]")
            return
        save_checkpoint(self.accelerator, self.run_dir, self.state, self.cfg.train.keep_last)

    # ------------------------------------------------------------------ finish

    def finish(self) -> dict:
        """Save the model, sample it, write the summary; the resume command if the run was interrupted."""
        state, interrupted = self.state, self.stop.requested
        if interrupted:
            self.console.print(f"[yellow]{self.stop.signal_name}: stopped at step {state.step}; checkpoint in "
                               f"{self.run_dir}/checkpoints. Resume with:[/yellow] {self.resume_command()}")
        model_dir = self.run_dir / MODEL_DIR
        if not parameters_finite(self.accelerator, self.model):
            self.logger.summary(self.run_summary("diverged", TrainingStopped.exit_code, model_dir=None))
            raise TrainingStopped(f"parameters are not finite at step {state.step}: the model is NOT saved; "
                                  f"{self.where_to_resume_after_divergence()}")
        save_model(self.accelerator, self.model, self.tokenizer, model_dir,
                   max_length=trained_length(self.cfg, self.model_config, self.tokenizer),
                   after_failure=self.after_failed_model_save())
        if not self.eval_metrics and state.last_eval_step == state.step:  # a resume that only saves the model
            self.eval_metrics = {"eval/loss": state.last_eval_loss, "eval/perplexity": perplexity(state.last_eval_loss)}
        summary = self.run_summary("interrupted" if interrupted else "finished", self.stop.exit_code, model_dir)
        samples = None
        if self.accelerator.is_main_process and not interrupted:
            samples = log_samples(self.cfg, model_dir, self.logger, state.step)
        self.logger.summary(summary)
        if self.accelerator.is_main_process:
            try:
                write_model_card(model_dir, self.cfg, summary, self.model_config, samples, self.command)
            except OSError as e:  # the model itself is saved; its card is a convenience
                self.console.print(f"warning: model card not written ({e.strerror})")
        return summary

    def run_summary(self, status: str, exit_code: int, model_dir: Path | None) -> dict:
        """summary.json, the trackers' summary, the console table and the model card: what ran and where it
        ended, each value under its logged metric's name (`eval/loss` is the last evaluation's)."""
        state, optim, meter = self.state, self.cfg.optim, self.meter
        precision = self.accelerator.mixed_precision
        return {
            "run_id": self.run_dir.name, "recipe": self.cfg.name, "status": status, "exit_code": exit_code,
            **({"ended_by": self.ended_by()} if status == "finished" else {}),
            "parameters": self.n_params, "step": state.step, "epoch": self.epoch(), "tokens": state.tokens_seen,
            "time_s": self.elapsed(), "train_time_s": meter.session_seconds,
            "train/tokens_per_s": meter.session_tokens_per_s,
            "train/mfu": meter.mfu(meter.session_tokens_per_s, self.accelerator.num_processes),
            "train/loss": self.train_metrics.get("train/loss"),
            "train/perplexity": self.train_metrics.get("train/perplexity"),
            "eval/loss": self.eval_metrics.get("eval/loss"), "eval/perplexity": self.eval_metrics.get("eval/perplexity"),
            "eval/accuracy": self.eval_metrics.get("eval/accuracy"),
            "eval/best_loss": state.best_eval_loss, "eval/best_perplexity": perplexity(state.best_eval_loss),
            **self.budget_used(),
            "peak_lr/adamw": optim.lr, **({"peak_lr/muon": optim.muon_lr} if optim.name == "muon" else {}),
            "precision": "fp32" if precision == "no" else precision,
            "model_dir": str(model_dir) if model_dir else None,
        }

    def ended_by(self) -> str:
        """What ended a finished run: its time budget, train.max_steps, or the length it was planned for."""
        t, step = self.cfg.train, self.state.step
        if self.time_budget is not None and self.time_budget.spent(step):
            return "time_budget"
        if t.max_steps and step >= t.max_steps and step < (self.total_steps or math.inf):
            return "max_steps"
        return "token_budget" if t.token_budget else "epochs"

    def budget_used(self) -> dict:
        """The budget and how much of it the run used (a fraction), for the summary."""
        t = self.cfg.train
        if t.token_budget:
            budget = parse_tokens(t.token_budget)
            return {"budget/tokens": budget, "budget/used": self.state.tokens_seen / budget}
        if self.time_budget is not None:
            return {"budget/time_s": self.time_budget.seconds, "budget/used": self.elapsed() / self.time_budget.seconds}
        return {}

    def close(self) -> None:
        """Release everything, also after an error; a run that failed before producing anything leaves no directory."""
        self.stop.restore()
        try:
            self.release_all()
        finally:
            if self.run_lock is not None:  # last: the run is another process's to resume from here on
                self.run_lock.release()

    def release_all(self) -> None:
        if self.accelerator is None:
            if self.run_dir is not None and self.resume_from is None and PartialState().is_main_process:
                remove_if_empty(self.run_dir)
            return
        if self.console is not None:
            self.console.close()
        if self.logger is not None:
            self.logger.close()
        # torch's gloo backend can abort at exit while a DDP model or loader still holds process-group
        # resources: drop every reference before the trackers and the process group go away.
        for name in ("model", "optimizer", "train_loader", "eval_loader", "scheduler", "take_step"):
            self.__dict__.pop(name, None)
        self.accelerator.free_memory()
        gc.collect()
        self.accelerator.end_training()
        if self.accelerator.is_main_process and self.resume_from is None:
            remove_if_empty(self.run_dir)

    # ------------------------------------------------------------------ helpers

    def where_to_resume_after_divergence(self) -> str:
        """The command to type: a new run (`--from`: fresh optimizer and schedule, which a resume would
        keep) with lower learning rates, from the weights of the best checkpoint by eval loss (not the
        last one, which may hold a finite but diverged model) if it beats an untrained model, else from
        the run's starting point."""
        lower = self.lower_learning_rates()
        best = best_checkpoint(self.run_dir) if self.accelerator.is_main_process else None
        best_loss, untrained = (read_state(best).eval_loss if best else None), math.log(self.model_config.vocab_size)
        if best is not None and best_loss < untrained:
            return (f"the best checkpoint is {best} (eval loss {best_loss:.4g}): continue from its weights with lower "
                    f"learning rates in a new run: {self.launch_command(f'--from={best}', *lower)}")
        why = ("no checkpoint was saved at a finite evaluation" if best is None else
               f"no checkpoint beats an untrained model (the best, {best.name}, has eval loss {best_loss:.4g}; a "
               f"uniform guess over {self.model_config.vocab_size:,} tokens has {untrained:.2f})")
        return (f"{why}: start again with lower learning rates: "
                f"{self.launch_command(f'--from={self.run_dir}', *lower)}")

    def lower_learning_rates(self) -> list[str]:
        """Overrides after a divergence: the recipe's own rates where this run raised them (an override
        that went too far), else a tenth of each rate."""
        optim, names = self.cfg.optim, ["lr"] + (["muon_lr"] if self.cfg.optim.name == "muon" else [])
        try:
            recipe = load_recipe(self.recipe).optim if self.recipe else None
        except ConfigError:  # the recipe file moved or broke since the run started
            recipe = None
        raised = [name for name in names if recipe is not None and getattr(optim, name) > getattr(recipe, name)]
        return ([f"--optim.{name}={getattr(recipe, name):g}" for name in raised]
                or [f"--optim.{name}={getattr(optim, name) / 10:g}" for name in names])

    def after_failed_model_save(self) -> str:
        """What to do when the final model did not fit: resume from the checkpoints, or, if none fit
        either, start again (a resume needs a checkpoint)."""
        if list_checkpoints(self.run_dir):
            return f"the checkpoints are intact: free some space, then {self.resume_command()}"
        return (f"no checkpoint was saved either, so the {self.state.step} steps are lost: free some space, then "
                f"start again with the run's config: {self.launch_command(f'--from={self.run_dir}')}")

    def record(self, metrics: dict) -> dict:
        return {"step": self.state.step, "tokens": self.state.tokens_seen, "time_s": round(self.elapsed(), 3), **metrics}

    def elapsed(self) -> float:
        """Wall time of the run, continued across resumes."""
        return self.elapsed_before + time.time() - self.started

    def epoch(self) -> float:
        return self.state.epoch + self.state.batches_in_epoch / max(len(self.train_loader), 1)

    def launch_command(self, *args: str) -> str:
        """The launch this run was started with (as typed: same launcher, options and variables), with `args`."""
        return " ".join([launch_command(), *(shlex.quote(a) for a in args)])

    def resume_command(self) -> str:
        return self.launch_command(f"--resume={self.run_dir}")
