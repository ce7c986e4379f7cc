"""Checkpoints: Accelerate's full training state, written atomically; the last K and the best kept.

A checkpoint is written into `checkpoints/.tmp-step-N` and renamed to `checkpoints/step-N` only once
every file is on disk (`trainer_state.json` last). A failure while writing (a full disk raises OSError,
safetensors' SafetensorError or torch's RuntimeError) removes the partial directory, prints one warning
line and lets training go on with the earlier checkpoints intact. A crash (kill -9) can leave a
`.tmp-*` directory; it is removed when that run is resumed.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from trainer.rundir import CHECKPOINTS, STATE_FILE, CheckpointError, list_checkpoints, read_json, write_json_atomic


@dataclass
class TrainState:
    """Where the run stands; saved with every checkpoint and enough to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batches_in_epoch: int = 0  # micro-batches of this epoch already consumed (by this process)
    tokens_seen: int = 0  # input tokens seen, all processes
    best_eval_loss: float = math.inf
    last_eval_step: int = -1  # the step of the latest evaluation (-1: none yet)
    last_eval_loss: float | None = None
    nonfinite_in_a_row: int = 0  # consecutive non-finite steps up to now
    elapsed_s: float = 0.0  # wall time of the run so far, summed over resumed sessions
    processes: int = 1  # batches_in_epoch and the RNG files are per process: a resume needs as many

    @property
    def eval_loss(self) -> float | None:
        """The eval loss at this step, if the run evaluated at this step."""
        return self.last_eval_loss if self.last_eval_step == self.step else None

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        """Checked field by field: a file that is JSON but not a state is an error, never a silent reset."""
        expected = {f.name: f.type for f in fields(cls)}
        missing = [name for name in expected if name not in data]
        unknown = [name for name in data if name not in expected]
        if missing or unknown:
            raise ValueError(f"missing {missing}, unknown {unknown}")
        for name, kind in expected.items():
            value = data[name]
            ok = (isinstance(value, int) and not isinstance(value, bool) if kind == "int"
                  else value is None or isinstance(value, (int, float)) if "None" in kind
                  else isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok:
                raise ValueError(f"{name}={value!r} is not a{'n integer' if kind == 'int' else ' number'}")
        if data["step"] < 0 or data["epoch"] < 0 or data["batches_in_epoch"] < 0:
            raise ValueError("step, epoch and batches_in_epoch must be >= 0")
        return cls(**data)


def read_state(checkpoint: Path) -> TrainState:
    try:
        return TrainState.from_dict(read_json(Path(checkpoint) / STATE_FILE))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{checkpoint} is not a usable checkpoint: {STATE_FILE} {type(e).__name__}: {e}") from e


def load_checkpoint(accelerator, checkpoint: Path) -> TrainState:
    """Restore model, optimizer, scheduler, RNG and sampler state; return where the run stands."""
    state = read_state(checkpoint)
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as e:
        first_line = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise CheckpointError(f"cannot load checkpoint {checkpoint}: {type(e).__name__}: {first_line} "
                              f"(corrupted, or saved with a different model/recipe)") from e
    return state


def remove_partial_saves(run_dir: Path) -> None:
    """`.tmp-*` directories are saves a crash interrupted: never complete, never needed."""
    for tmp in (Path(run_dir) / CHECKPOINTS).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def set_aside_later_checkpoints(run_dir: Path, step: int) -> list[Path]:
    """Resuming from an older checkpoint abandons the ones after it: move them to `checkpoints/abandoned/`,
    where neither retention nor `--resume` sees them."""
    later = [p for p in list_checkpoints(run_dir) if int(p.name.split("-")[1]) > step]
    for path in later:
        target = Path(run_dir) / CHECKPOINTS / "abandoned" / path.name
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(exist_ok=True)
        path.rename(target)
    return later


def save_checkpoint(accelerator, run_dir: Path, state: TrainState, keep_last: int) -> Path | None:
    """Save on all processes; return the checkpoint, or None if saving failed (nothing earlier is lost)."""
    root = Path(run_dir) / CHECKPOINTS
    final, tmp = root / f"step-{state.step:06d}", root / f".tmp-step-{state.step:06d}"
    error = None
    if accelerator.is_main_process:
        error = attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)))
    if not any_process_failed(accelerator, error is not None):  # also the barrier before saving
        error = attempt(lambda: accelerator.save_state(str(tmp)))
    if any_process_failed(accelerator, error is not None):
        error = error or RuntimeError("failed on another process")
    elif accelerator.is_main_process:
        error = attempt(lambda: finalize(tmp, final, state, run_dir, keep_last))
    accelerator.wait_for_everyone()
    if error is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(error, "strerror", None) or f"{type(error).__name__}: {str(error).strip()[:200]}"
        accelerator.print(f"warning: checkpoint at step {state.step} NOT saved ({reason.splitlines()[0]}); "
                          f"earlier checkpoints are intact, training goes on")
        return None
    return final


def attempt(action) -> Exception | None:
    try:
        action()
    except Exception as e:  # a full disk surfaces as OSError, SafetensorError or RuntimeError
        return e
    return None


def finalize(tmp: Path, final: Path, state: TrainState, run_dir: Path, keep_last: int) -> None:
    write_json_atomic(tmp / STATE_FILE, asdict(state))  # written last: marks the checkpoint complete
    if final.exists():  # the same step saved again (e.g. a resumed run's last step)
        shutil.rmtree(final)
    tmp.rename(final)
    prune_checkpoints(run_dir, keep_last)


def any_process_failed(accelerator, failed: bool) -> bool:
    if accelerator.num_processes == 1:
        return failed
    flag = torch.tensor(float(failed), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="max").item())


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints and the one with the lowest eval loss. One whose evaluation
    gave a NaN/inf loss holds a diverged model: it is never one of the newest kept (a resume would start
    from it)."""
    checkpoints = list_checkpoints(run_dir)
    keep = set([p for p in checkpoints if not evaluated_nonfinite(p)][-keep_last:])
    best = best_checkpoint(run_dir)
    if best is not None:
        keep.add(best)
    for path in checkpoints:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def evaluated_nonfinite(checkpoint: Path) -> bool:
    loss = read_state(checkpoint).eval_loss
    return loss is not None and not math.isfinite(loss)


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint saved at the evaluation with the lowest loss, if any was saved at an evaluation."""
    evaluated = [(read_state(p).eval_loss, p) for p in list_checkpoints(run_dir)]
    evaluated = [(loss, p) for loss, p in evaluated if loss is not None and math.isfinite(loss)]
    return min(evaluated, key=lambda item: item[0])[1] if evaluated else None


def parameters_finite(accelerator, model) -> bool:
    """Whether every parameter on every process is finite (FSDP shards included); one host sync, done
    only before a save."""
    finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
    return not any_process_failed(accelerator, not bool(finite))
