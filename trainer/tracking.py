"""Experiment tracking: Accelerate's trackers (W&B or TensorBoard) plus a local JSONL file per run.

Only the main process logs. Every record carries `step` (optimizer steps) and `tokens` (input tokens
seen), and W&B plots every metric against `step` (`define_metric`); pick `tokens` as the x-axis to
compare runs with different batch sizes. `metrics.jsonl`, `config.json` and `summary.json` in the run
directory hold the same numbers offline; `python -m trainer.compare` reads them.

W&B: with an API key the run is online; without one (or with WANDB_MODE=offline) it is written under
`<run>/wandb/` and can be uploaded later with `wandb sync <run>/wandb/offline-run-*`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

from trainer.checkpoint import write_json_atomic

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"


class TrackerError(ValueError):
    """A requested tracker that cannot be used; reported as one line."""


def check_tracker_installed(tracker: str) -> None:
    module = {"wandb": "wandb", "tensorboard": "tensorboard"}.get(tracker)
    if module and importlib.util.find_spec(module) is None:
        raise TrackerError(f"--log.tracker={tracker} but the {module} package is not installed "
                           f"(pip install {module}, or --tracker=none)")


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


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


class RunTracker:
    """Logs to the Accelerate tracker(s) and to `metrics.jsonl`; everything is a no-op off the main process."""

    def __init__(self, accelerator, cfg, run_dir: Path, run_id: str, resume_step: int | None):
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.enabled = accelerator.is_main_process
        self.tracker = cfg.log.tracker
        if not self.enabled:
            return
        self.metrics_path = self.run_dir / METRICS_FILE
        if resume_step is not None:  # drop what was logged after the checkpoint; it will be logged again
            kept = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= resume_step]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.metrics_file = open(self.metrics_path, "a", buffering=1)
        write_json_atomic(self.run_dir / CONFIG_FILE, {"run_id": run_id, **cfg.to_dict()})

        if self.tracker == "none":
            return
        init_kwargs = {}
        if self.tracker == "wandb":
            mode = wandb_mode()
            if mode == "offline":
                print(f"W&B offline (no API key): the run is saved under {self.run_dir}/wandb; "
                      f"upload it later with: wandb sync {self.run_dir}/wandb/offline-run-*")
            init_kwargs["wandb"] = {
                "name": run_id,  # the run directory's name: "<recipe>-<time>" or log.run_name
                "id": run_id,
                "resume": "allow",  # a resumed run continues the same W&B run
                "group": cfg.log.group or cfg.name,
                "tags": [cfg.name, *cfg.log.tags],
                "dir": str(self.run_dir),
                "job_type": "finetune" if cfg.model.pretrained else "pretrain",
                "mode": mode,
            }
        accelerator.init_trackers(cfg.log.project, config=flatten(cfg.to_dict()), init_kwargs=init_kwargs)
        if self.tracker == "wandb":
            run = accelerator.get_tracker("wandb", unwrap=True)
            run.define_metric("step")
            run.define_metric("tokens")
            run.define_metric("time_s")
            run.define_metric("*", step_metric="step")

    def log(self, metrics: dict, step: int, tokens: int, time_s: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, "tokens": tokens, "time_s": round(time_s, 3), **metrics}
        self.metrics_file.write(json.dumps(record, allow_nan=True) + "\n")
        if self.tracker != "none":
            # No `step=`: W&B keeps its own monotonic counter (a resume re-logs steps after the
            # checkpoint) and plots against our `step` metric instead.
            self.accelerator.log(record if self.tracker == "wandb" else metrics, step=None if self.tracker == "wandb" else step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        if not self.enabled:
            return
        (self.run_dir / f"{name.replace('/', '_')}.json").write_text(json.dumps({"columns": columns, "rows": rows}, indent=1))
        if self.tracker == "wandb":
            self.accelerator.get_tracker("wandb").log_table(name, columns=columns, data=rows)
        elif self.tracker == "tensorboard":
            text = "\n".join(" | ".join(map(str, row)) for row in [columns, *rows])
            self.accelerator.get_tracker("tensorboard", unwrap=True).add_text(name, text, step)

    def summary(self, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        write_json_atomic(self.run_dir / SUMMARY_FILE, clean)
        if self.tracker == "wandb":
            self.accelerator.get_tracker("wandb", unwrap=True).summary.update(clean)

    def close(self) -> None:
        if self.enabled:
            self.metrics_file.close()


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
