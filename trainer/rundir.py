"""The run directory: its file names, atomic JSON, creating it, and finding the run to resume.

    runs/<run>/config.json            the resolved config (+ run id, recipe, command line): what --resume restores
    runs/<run>/metrics.jsonl          every logged record
    runs/<run>/summary.json           final and best metrics, tokens, wall time
    runs/<run>/checkpoints/step-NNNNNN/   Accelerate's training state + trainer_state.json (checkpoint.py)
    runs/<run>/checkpoints/.tmp-*     a save in progress (a crash's leftover, removed on resume)
    runs/<run>/model/                 save_pretrained model + tokenizer + README.md model card
    runs/<run>/samples_fill_mask.json
    runs/<run>/.lock                  held (flock) by the process training the run: one live run per directory
    runs/wandb/offline-run-*          W&B's files of every run, side by side (`wandb leet runs/wandb`)
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from trainer.config import CommandLine, Config, ConfigError, apply_overrides, load_recipe

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATE_FILE = "trainer_state.json"
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"


class CheckpointError(ValueError):
    """A run or checkpoint that cannot be found, read or used; reported as one line."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file, fsync, rename: readers (and a full disk) see the old file or the new
    one, never half of one."""
    tmp = Path(f"{path}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def read_json(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def model_path(path: str) -> str:
    """A run directory means its saved model; anything else is passed to from_pretrained as is."""
    return str(Path(path) / MODEL_DIR) if (Path(path) / MODEL_DIR / "config.json").is_file() else path


# --------------------------------------------------------------------------- creating a run directory


def create_run_dir(output_root: Path, name: str | None, recipe_name: str) -> Path:
    """A new, empty run directory. `mkdir` is atomic, so two runs started in the same second never share
    one: the second gets `<name>-2`. An explicit `log.run_name` that exists is an error (resume it instead)."""
    output_root = Path(output_root)
    try:
        output_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write to output directory {output_root} ({e.strerror}); "
                          f"pass a writable --log.output_root") from None
    base = name or f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(1, 1000):
        run_dir = output_root / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            if name:
                raise ConfigError(f"run directory {run_dir} already exists: continue it with --resume={run_dir}, "
                                  f"or pick another --log.run_name") from None
        except OSError as e:
            raise ConfigError(f"cannot write to output directory {output_root} ({e.strerror}); "
                              f"pass a writable --log.output_root") from None
    raise ConfigError(f"too many runs named {base}-* in {output_root}")


def remove_if_empty(run_dir: Path) -> None:
    """A run that failed before producing anything (a config, an empty metrics file and its lock at most)
    leaves no directory behind."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    made = list(run_dir.iterdir())
    if all(p.name in (CONFIG_FILE, LOCK_FILE) or (p.name == METRICS_FILE and p.stat().st_size == 0) for p in made):
        for path in made:
            path.unlink()
        run_dir.rmdir()


class RunLock:
    """One live run per run directory: the main process holds an exclusive flock on `<run>/.lock` for the
    run's whole life. The kernel releases it when the process ends in any way (kill -9 too), so a crashed
    run never leaves a stale lock; a second launch or resume of a live run is refused before it touches
    anything. The file names its holder, for the refusal."""

    def __init__(self, run_dir: Path):
        path = Path(run_dir) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot write to run directory {run_dir} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"run {run_dir} is live: {holder} is training it (it holds {path}); wait for it "
                              f"to finish, or stop it (SIGTERM checkpoints it), then resume") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def run_is_live(run_dir: Path) -> bool:
    """Whether a process holds the run's lock (is training it), asked without taking the lock for longer than
    the question (a shared lock, which an exclusive holder refuses) and without writing anything."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- finding a run to resume


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a checkpoint is complete once its state file exists)."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def run_dir_of(checkpoint: Path) -> Path:
    return Path(checkpoint).resolve().parent.parent


def runs_of_recipe(output_root: Path, recipe_name: str) -> list[Path]:
    """Run directories whose stored config names `recipe_name` (whatever the directory is called)."""
    runs = []
    for config_file in Path(output_root).glob(f"*/{CONFIG_FILE}"):
        try:
            if read_json(config_file).get("name") == recipe_name:
                runs.append(config_file.parent)
        except (OSError, ValueError):
            continue
    return runs


def find_checkpoint(resume: str, output_root: Path, recipe_name: str | None) -> Path:
    """`--resume` -> a checkpoint directory: "latest" (the newest run of the recipe), a run directory
    (its newest checkpoint) or a checkpoint directory."""
    if resume == "latest":
        runs = [p for p in runs_of_recipe(output_root, recipe_name) if list_checkpoints(p)]
        if not runs:
            raise CheckpointError(f"--resume: no run of recipe {recipe_name!r} with a checkpoint under {output_root}/")
        return max((list_checkpoints(p)[-1] for p in runs), key=lambda c: c.stat().st_mtime)
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    if path.is_dir() and list_checkpoints(path):
        return list_checkpoints(path)[-1]
    raise CheckpointError(f"--resume={resume}: not a checkpoint, nor a run directory with checkpoints")


def stored_config(run_dir: Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    try:
        return Config.from_dict(read_json(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the config of run {run_dir} ({type(e).__name__}: {e}); "
                          f"start a new run instead") from None


def check_resume_config(cfg: Config, run_dir: Path) -> None:
    """Refuse a config that would train the resumed run differently from how it started."""
    stored = stored_config(run_dir)
    changed = stored.changes_on_resume(cfg)
    if changed:
        old, new = stored.flat(), cfg.flat()
        listing = "; ".join(f"{key}: run {old[key]!r}, now {new[key]!r}" for key in changed)
        raise ConfigError(f"--resume cannot change what the run trains on or how ({listing}); "
                          f"drop these overrides, or start a new run")


def resume_config(cli: CommandLine) -> tuple[Config, Path]:
    """The config of the run to resume, as stored in its directory, plus the command line's overrides,
    and the checkpoint to continue from. The recipe (if given) only names the run for a bare --resume."""
    base = apply_overrides(load_recipe(cli.recipe), list(cli.overrides)) if cli.recipe else Config()
    checkpoint = find_checkpoint(cli.resume, Path(base.log.output_root), base.name)
    stored = stored_config(run_dir_of(checkpoint))
    return apply_overrides(copy.deepcopy(stored), cli.overrides).validate(), checkpoint  # checked by the Trainer


def start_from_config(cli: CommandLine) -> tuple[Config, str | None]:
    """`--from=PATH`: a new run with the config stored in PATH's run, plus the command line's overrides
    (any field may change: nothing continues but the weights). From a checkpoint, the new run starts
    from its weights (`model.init_from`); from a run directory, from the config's own starting point.
    The new run gets a new directory unless an override names one. Returns the config and the recipe
    the source run recorded."""
    path = Path(cli.start_from)
    checkpoint = path if (path / STATE_FILE).is_file() else None
    run_dir = run_dir_of(checkpoint) if checkpoint else path
    if not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"--from={cli.start_from}: not a checkpoint, nor a run directory with {CONFIG_FILE}")
    config = copy.deepcopy(stored_config(run_dir))
    config.log.run_name = None
    if checkpoint:
        config.model.init_from = str(checkpoint.resolve())
    recipe = read_json(run_dir / CONFIG_FILE).get("recipe")
    return apply_overrides(config, cli.overrides).validate(), recipe
