"""Terminal output of the main process: a rich live progress bar in a terminal, plain log lines otherwise
(CI, files), the same for long loops (evaluation, fill-mask), and the end-of-run summary table.
`ConsoleSink` is the console's side of the metrics interface (tracking.py)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

SHOWN = ("epoch", "train/loss", "train/perplexity", "train/lr", "train/grad_norm", "train/tokens_per_s",
         "train/mfu", "eval/loss", "eval/perplexity", "eval/accuracy")
EVAL_SHOWN = ("eval/loss", "eval/perplexity", "eval/accuracy", "eval/top5_accuracy")  # on an evaluation's line
PLAIN_PROGRESS_EVERY_S = 15.0  # off a terminal, a long loop prints a line this often


def fmt(value) -> str:
    """Numbers for tables and log lines: 4 significant digits, thousands separators from 1,000 to 1e9,
    powers of ten above (a diverging loss's perplexity has hundreds of digits)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 or abs(value) >= 1e9 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class TrainingConsole:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.interactive = sys.stdout.isatty()
        # Off a terminal (CI, log files) rich would wrap at 80 columns: keep one record per line.
        self.console = Console(soft_wrap=not self.interactive)
        self.progress = None

    def start(self, total_steps: int, start_step: int = 0) -> None:
        """The live progress bar, on a terminal only; elsewhere `show` prints plain lines."""
        if self.enabled and self.interactive:
            self.progress = self.new_progress()
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()

    def new_progress(self, transient: bool = False) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=self.console,
                        transient=transient)

    def print(self, *args, **kwargs) -> None:
        if self.enabled:
            self.console.print(*args, **kwargs)
            self.console.file.flush()  # CI logs: show each line as it happens, not when a buffer fills

    def advance(self, step: int) -> None:
        """Called every step (cheap)."""
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def show(self, record: dict) -> None:
        """A logged record. Training: the progress bar's status on a terminal, a plain line elsewhere. An
        evaluation: a line that stays (above the bar on a terminal), marked when it is a new best."""
        if not self.enabled:
            return
        shown = {k: v for k, v in record.items() if k in SHOWN or k.startswith("eval/")}
        evaluation = any(k.startswith("eval/") for k in shown)
        if self.progress is not None and not evaluation:
            status = "  ".join(f"{k.split('/')[-1]} {fmt(v)}" for k, v in shown.items() if k in SHOWN)
            self.progress.update(self.task, status=status)
        elif evaluation:
            line = "  ".join(f"{k.removeprefix('eval/')} {fmt(v)}" for k, v in shown.items() if k in EVAL_SHOWN)
            best = record.get("eval/loss") == record.get("eval/best_loss")  # a NaN loss never is
            self.print(f"{time.strftime('%H:%M:%S')} step {record.get('step', '-')}  [bold]eval[/bold]  {escape(line)}  "
                       + ("[bold green]new best[/bold green]" if best else f"(best loss {fmt(record.get('eval/best_loss'))})"),
                       highlight=False)
        elif shown:
            line = "  ".join(f"{k} {fmt(v)}" for k, v in shown.items())
            self.print(f"{time.strftime('%H:%M:%S')} step {record.get('step', '-')}  {escape(line)}", highlight=False)

    def track(self, items: Iterable, total: int, label: str) -> Iterator:
        """Iterate with a transient progress bar on a terminal (a second bar under training's), or a
        plain line every 15 s elsewhere."""
        if not self.enabled:
            yield from items
            return
        if self.progress is not None:  # training's live display: one more bar, removed when done
            task = self.progress.add_task(label, total=total, status="")
            try:
                for item in items:
                    yield item
                    self.progress.advance(task)
            finally:
                self.progress.remove_task(task)
            return
        if self.interactive:
            with self.new_progress(transient=True) as progress:
                task = progress.add_task(label, total=total, status="")
                for item in items:
                    yield item
                    progress.advance(task)
            return
        started = last = time.perf_counter()
        for done, item in enumerate(items, 1):
            yield item
            if time.perf_counter() - last >= PLAIN_PROGRESS_EVERY_S:
                last = time.perf_counter()
                self.print(f"{time.strftime('%H:%M:%S')} {label} {done}/{total} ({last - started:.0f} s)", highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def table(self, title: str, rows: list[tuple[str, object]]) -> None:
        if not self.enabled:
            return
        table = Table(title=escape(title), show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        for name, value in rows:
            table.add_row(name, escape(fmt(value)))
        self.print(table)


# The run summary's values (summary.json, W&B's summary, the model card): the logged metrics' own names.
SUMMARY_ROWS = [("steps", "step"), ("epochs", "epoch"), ("tokens seen", "tokens"), ("final train loss", "train/loss"),
                ("final train perplexity", "train/perplexity"), ("final val loss", "eval/loss"),
                ("final val perplexity", "eval/perplexity"), ("final val accuracy", "eval/accuracy"),
                ("best val loss", "eval/best_loss"), ("best val perplexity", "eval/best_perplexity"),
                ("peak lr, AdamW", "peak_lr/adamw"), ("peak lr, Muon", "peak_lr/muon"), ("wall time (s)", "time_s"),
                ("token budget", "budget/tokens"), ("time budget (s)", "budget/time_s"), ("budget used", "budget/used"),
                ("train tokens/s", "train/tokens_per_s"), ("MFU", "train/mfu"), ("model", "model_dir")]


def describe_launch(num_processes: int, distributed_type: str, device_type: str, mixed_precision: str) -> str:
    """'1 process, CPU, fp32' or '4 processes (FSDP), CUDA, bf16 mixed precision'."""
    kind = {"NO": "", "MULTI_CPU": "DDP", "MULTI_GPU": "DDP", "DEEPSPEED": "DeepSpeed"}.get(distributed_type,
                                                                                            distributed_type)
    processes = f"{num_processes} process{'es' if num_processes > 1 else ''}" + (f" ({kind})" if kind else "")
    precision = "fp32" if mixed_precision == "no" else f"{mixed_precision} mixed precision"
    return f"{processes}, {'CPU' if device_type == 'cpu' else device_type.upper()}, {precision}"


class ConsoleSink:
    """The console as a metrics sink: records as status/lines, tables and the summary printed."""

    def __init__(self, console: TrainingConsole):
        self.console = console

    def log(self, record: dict) -> None:
        self.console.show(record)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        for row in rows:
            self.console.print("  " + "  ->  ".join(map(str, row[:2])), markup=False, highlight=False)

    def summary(self, values: dict) -> None:
        wall = values.get("time_s")
        shown = {**values, "time_s": round(wall, 1) if wall is not None else None}
        self.console.table(f"{values.get('run_id')} ({values.get('status')})",
                           [(label, shown.get(key)) for label, key in SUMMARY_ROWS if key in shown])

    def close(self) -> None:
        pass


def quiet_libraries() -> None:
    import logging
    import os

    import transformers

    # Accelerate warns on every save that the tied decoder weight is stored once; that is expected.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        # Accelerate imports DeepSpeed (when installed) to unwrap any model, and DeepSpeed then guesses
        # the hardware aloud; a run that does not use DeepSpeed has no use for that guess.
        logging.getLogger("DeepSpeed").addFilter(not_deepspeed_accelerator_guess)


def not_deepspeed_accelerator_guess(record) -> bool:
    return "Setting accelerator to" not in record.getMessage()
