"""Experiment tracking: the loop emits each record once to a `MetricLogger`, which hands it to its sinks.

Sinks: `metrics.jsonl` + `summary.json` in the run directory (always), the console (console.py), and
the trackers named in `log.tracker`, started through Accelerate's `log_with` (W&B, TensorBoard,
trackio; several at once). Only the main process has sinks. Adding a tracker is one class below and
one line in `TRACKERS`.

Every record carries `step` (optimizer steps), `tokens` (input tokens seen) and `time_s` (wall time of
the run). W&B plots every metric against `step`; pick `tokens` as the x-axis to compare batch sizes.
W&B without a login (no WANDB_API_KEY, no ~/.netrc entry) runs offline: `runs/wandb/offline-run-*`,
uploaded later with `wandb sync`, browsed with `wandb leet runs/wandb`.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path
from typing import Protocol

from trainer.rundir import METRICS_FILE, SUMMARY_FILE, read_jsonl, write_json_atomic, write_text_atomic


HPARAMS_METRICS = ("eval/loss", "eval/perplexity", "eval/accuracy", "train/loss")  # TensorBoard's HPARAMS columns


class TrackerError(ValueError):
    """A requested tracker that cannot be used; reported as one line."""


class MetricSink(Protocol):
    def log(self, record: dict) -> None: ...
    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None: ...
    def summary(self, values: dict) -> None: ...
    def close(self) -> None: ...


class MetricLogger:
    """The loop's one metrics interface: each record goes to every sink."""

    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    def log(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log(record)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        for sink in self.sinks:
            sink.log_table(name, columns, rows, step)

    def summary(self, values: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        for sink in self.sinks:
            sink.summary(clean)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class JsonlSink:
    """metrics.jsonl (one record per line), summary.json and tables as JSON. A write that fails (a full
    disk) prints one warning and is skipped: the trackers still get the records, training goes on."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.run_dir, self.warned = Path(run_dir), False
        path = self.run_dir / METRICS_FILE
        if resume_step is not None:  # drop what was logged after the checkpoint; it will be logged again
            kept = [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step]
            self.guarded(lambda: write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept)))
        self.file = open(path, "a", buffering=1)

    def guarded(self, write) -> None:
        try:
            write()
        except OSError as e:
            if not self.warned:
                print(f"warning: cannot write to {self.run_dir} ({e.strerror}); metrics.jsonl misses records "
                      f"from here on, trackers still get them", flush=True)
                self.warned = True

    def log(self, record: dict) -> None:
        self.guarded(lambda: self.file.write(json.dumps(record) + "\n"))

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        path = self.run_dir / f"{name.replace('/', '_')}.json"
        self.guarded(lambda: path.write_text(json.dumps({"columns": columns, "rows": rows}, indent=1)))

    def summary(self, values: dict) -> None:
        self.guarded(lambda: write_json_atomic(self.run_dir / SUMMARY_FILE, values))

    def close(self) -> None:
        self.guarded(self.file.close)


# --------------------------------------------------------------------------- trackers through Accelerate


class WandbSink:
    """W&B: online with a login, else offline under `<output_root>/wandb`; a resumed run continues the
    same W&B run (its id is the run directory's name)."""

    name = "wandb"

    @staticmethod
    def init_kwargs(cfg, run_dir: Path, run_id: str) -> dict:
        mode = wandb_mode()
        if mode == "offline":
            print(f"W&B offline (no API key): the run is saved under {run_dir.parent}/wandb; upload it later with: "
                  f"wandb sync {run_dir.parent}/wandb/offline-run-*-{run_id}", flush=True)
        return {"name": run_id, "id": run_id, "resume": "allow", "group": cfg.log.group or cfg.name,
                "tags": [cfg.name, *cfg.log.tags], "dir": str(run_dir.parent), "mode": mode,
                "job_type": "finetune" if cfg.model.pretrained else "pretrain"}

    def __init__(self, accelerator):
        self.run = accelerator.get_tracker("wandb", unwrap=True)
        for axis in ("step", "tokens", "time_s"):
            self.run.define_metric(axis)
        self.run.define_metric("*", step_metric="step")
        self.tracker = accelerator.get_tracker("wandb")

    def store_config(self, config: dict) -> None:
        self.tracker.store_init_configuration(config)

    def log(self, record: dict) -> None:
        # No `step=`: W&B keeps its own monotonic counter (a resume re-logs the steps after the
        # checkpoint) and plots against our `step` metric instead.
        self.run.log(record)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=columns, data=rows), "step": step})

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        pass  # accelerator.end_training() finishes the run


class TensorBoardSink:
    """TensorBoard event files under `<run>/<project>`; scalars by `step`, tables as text, the config as hparams."""

    name = "tensorboard"

    @staticmethod
    def init_kwargs(cfg, run_dir: Path, run_id: str) -> dict:
        return {}

    def __init__(self, accelerator):
        self.writer = accelerator.get_tracker("tensorboard", unwrap=True)

    def store_config(self, config: dict) -> None:
        """The config in the HPARAMS tab, with the run's own losses as metric columns. Written into the
        run's event file: `SummaryWriter.add_hparams` (what Accelerate calls) would open a sub-run per call
        that holds nothing but the config."""
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(config, {metric: 0.0 for metric in HPARAMS_METRICS}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=record["step"])
        self.writer.flush()

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        self.writer.add_text(name, "\n".join(" | ".join(map(str, row)) for row in [columns, *rows]), step)

    def summary(self, values: dict) -> None:
        self.writer.add_text("summary", json.dumps(values, indent=1, default=str))

    def close(self) -> None:
        self.writer.flush()


class TrackioSink:
    """trackio: a local SQLite store under `<output_root>/trackio` and a browser dashboard on loopback
    (`make dashboard`)."""

    name = "trackio"

    @staticmethod
    def init_kwargs(cfg, run_dir: Path, run_id: str) -> dict:
        # trackio reads TRACKIO_DIR when it is first imported, which is just after this.
        os.environ.setdefault("TRACKIO_DIR", str(run_dir.parent / "trackio"))
        return {"name": run_id, "group": cfg.log.group or cfg.name, "resume": "allow", "embed": False}

    def __init__(self, accelerator):
        self.run = accelerator.get_tracker("trackio", unwrap=True)
        self.tracker = accelerator.get_tracker("trackio")

    def store_config(self, config: dict) -> None:
        self.tracker.store_init_configuration(config)

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        pass  # the tables are in the run directory and in W&B

    def summary(self, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


# Each also has `store_config(flat_config)`, called once the tracker has started.
TRACKERS = {sink.name: sink for sink in (WandbSink, TensorBoardSink, TrackioSink)}


def check_trackers_installed(trackers: list[str]) -> None:
    for name in trackers:
        if name not in TRACKERS:
            raise TrackerError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)} or none")
        if importlib.util.find_spec(name) is None:
            raise TrackerError(f"--log.tracker={name} but the {name} package is not installed "
                               f"(pip install {name}, or --log.tracker=none)")


def open_trackers(accelerator, cfg, run_dir: Path, run_id: str) -> list[MetricSink]:
    """Start the trackers Accelerate was given in `log_with`; returns their sinks (main process only)."""
    if not cfg.log.tracker:
        return []
    init_kwargs = {name: TRACKERS[name].init_kwargs(cfg, run_dir, run_id) for name in cfg.log.tracker
                   if accelerator.is_main_process}
    with dashboard_hint(run_dir.parent) if "trackio" in cfg.log.tracker and accelerator.is_main_process else nullcontext():
        accelerator.init_trackers(cfg.log.project, init_kwargs=init_kwargs)  # the config: store_config below
    if not accelerator.is_main_process:
        return []
    sinks = [TRACKERS[name](accelerator) for name in cfg.log.tracker]
    config = flatten(cfg.to_dict())
    for sink in sinks:
        sink.store_config(config)
    return sinks


@contextmanager
def dashboard_hint(output_root: Path):
    """trackio prints `trackio show --project ...`, which opens its default store, not this one
    (`<output_root>/trackio`): print its other lines, and the command that shows these runs instead."""
    printed = io.StringIO()
    try:
        with redirect_stdout(printed):
            yield
    finally:
        hint = ("View dashboard by running", "trackio show --project", "trackio.show(project=")
        for line in printed.getvalue().splitlines():
            if not any(text in line for text in hint):
                print(line)
        print(f"* trackio dashboard of these runs: python -m trainer.dashboard --runs {output_root}", flush=True)


def wandb_mode() -> str:
    """WANDB_MODE if set, else 'online' with credentials (env or ~/.netrc), else 'offline'.

    Never asks wandb itself: reading `wandb.api.api_key` freezes wandb's settings before the mode is
    chosen, and `wandb.init` then refuses to run without a key.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_credentials_found() else "offline"


def wandb_credentials_found() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            # TensorBoard's hparams take only scalars and strings.
            out[name] = "none" if value is None else ",".join(map(str, value)) if isinstance(value, list) else value
    return out
