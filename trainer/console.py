"""Terminal output of the main process: a rich live progress bar in a terminal, plain log lines
otherwise (CI, files), and the end-of-run summary table."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def fmt(value) -> str:
    """Numbers for tables and log lines: 4 significant digits, thousands separators above 1,000."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class TrainingConsole:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        # Off a terminal (CI, log files) rich would wrap at 80 columns: keep one record per line.
        self.console = Console(soft_wrap=not sys.stdout.isatty())
        self.progress = None

    def start(self, total_steps: int, start_step: int = 0) -> None:
        """The live progress bar, on a terminal only; elsewhere `update` prints plain lines."""
        if self.enabled and sys.stdout.isatty():
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=self.console,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()

    def print(self, *args, **kwargs) -> None:
        if self.enabled:
            self.console.print(*args, **kwargs)

    def update(self, step: int, metrics: dict | None = None) -> None:
        """Called every step (cheap); `metrics` only at log intervals."""
        if not self.enabled:
            return
        if self.progress is not None:
            status = "" if metrics is None else "  ".join(
                f"{k.split('/')[-1]} {fmt(v)}" for k, v in metrics.items() if k in SHOWN)
            self.progress.update(self.task, completed=step, **({"status": status} if metrics else {}))
        elif metrics is not None:
            line = "  ".join(f"{k} {fmt(v)}" for k, v in metrics.items() if k in SHOWN or k.startswith("eval/"))
            self.console.print(f"{time.strftime('%H:%M:%S')} step {step}  {line}", highlight=False)
            self.console.file.flush()  # CI logs: show each line as it happens, not when a buffer fills

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def table(self, title: str, rows: list[tuple[str, object]]) -> None:
        if not self.enabled:
            return
        table = Table(title=title, show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        for name, value in rows:
            table.add_row(name, fmt(value))
        self.console.print(table)


SHOWN = ("epoch", "train/loss", "train/perplexity", "train/lr", "train/grad_norm", "train/tokens_per_s",
         "eval/loss", "eval/perplexity", "eval/accuracy")


def quiet_libraries() -> None:
    import logging

    import transformers

    # Accelerate warns on every save that the tied decoder weight is stored once; that is expected.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
