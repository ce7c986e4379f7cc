"""Checkpoints: Accelerate's full training state, written atomically, the last K and the best kept.

Layout of a run directory:

    runs/<run>/checkpoints/step-000500/   accelerate state (model, optimizer, scheduler, RNG of every
                                          process, sampler) + trainer_state.json (written last)
    runs/<run>/checkpoints/.tmp-step-...  a save in progress; never mistaken for a checkpoint

A checkpoint is written into a temporary directory and renamed into place only once every file is
on disk, so a crash or a full disk mid-save leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read or used with this recipe; reported as one line."""


@dataclass
class TrainState:
    """Where the loop stands; saved with every checkpoint and enough to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batches_in_epoch: int = 0  # micro-batches of this epoch already consumed (by this process)
    tokens_seen: int = 0  # input tokens seen, all processes
    best_eval_loss: float = float("inf")
    eval_loss: float | None = None  # eval loss at this step, if it was evaluated
    nonfinite_skips: int = 0
    elapsed_s: float = 0.0  # wall time of the run so far, summed over resumed sessions


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_state(checkpoint: Path) -> TrainState:
    try:
        return TrainState(**json.loads((Path(checkpoint) / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{checkpoint} is not a readable checkpoint ({type(e).__name__}: {e})") from e


def save_checkpoint(accelerator, run_dir: Path, state: TrainState, keep_last: int) -> Path | None:
    """Save on all processes; return the checkpoint path, or None if saving failed (nothing is lost)."""
    root = checkpoints_dir(run_dir)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-step-{state.step:06d}"
    error = None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except OSError as e:  # disk full, permissions: report, keep training, keep the old checkpoints
        error = e
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            if error is not None:
                raise error
            write_json_atomic(tmp / STATE_FILE, asdict(state))
            if final.exists():  # the same step saved twice (epoch end == save_every)
                shutil.rmtree(final)
            os.replace(tmp, final)
            prune_checkpoints(run_dir, keep_last)
        except OSError as e:
            error = e
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    if error is not None:
        accelerator.print(f"warning: checkpoint at step {state.step} NOT saved ({error.strerror or error}); "
                          f"previous checkpoints are intact")
        return None
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints and the one with the lowest eval loss."""
    checkpoints = list_checkpoints(run_dir)
    evaluated = [(read_state(p).eval_loss, p) for p in checkpoints]
    evaluated = [(loss, p) for loss, p in evaluated if loss is not None]
    keep = set(checkpoints[-keep_last:])
    if evaluated:
        keep.add(min(evaluated, key=lambda item: item[0])[1])
    for path in checkpoints:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def resolve_resume(resume: str, output_root: Path, recipe_name: str) -> Path:
    """`--resume` -> a checkpoint directory. Accepts "latest", a run directory or a checkpoint directory."""
    if resume == "latest":
        runs = [p for p in Path(output_root).glob(f"{recipe_name}-*") if list_checkpoints(p)]
        if not runs:
            raise CheckpointError(f"--resume: no run of recipe {recipe_name!r} with a checkpoint under {output_root}/")
        run_dir = max(runs, key=lambda p: list_checkpoints(p)[-1].stat().st_mtime)
        return list_checkpoints(run_dir)[-1]
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    if path.is_dir() and list_checkpoints(path):
        return list_checkpoints(path)[-1]
    raise CheckpointError(f"--resume={resume}: not a checkpoint, nor a run directory with checkpoints")


def run_dir_of(checkpoint: Path) -> Path:
    return Path(checkpoint).resolve().parent.parent


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
