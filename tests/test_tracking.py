"""Trackers, read back with their own tools: W&B's `wandb leet`, TensorBoard's event reader, trackio's
store and dashboard sync. Subprocesses: trackio reads its directory when first imported."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env, write_recipe
from trainer.rundir import read_jsonl

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def train_run(recipe: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "trainer/run.py", str(recipe), *args], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def trackio_logs(store: Path, project: str, run: str) -> list[dict]:
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
            "print(json.dumps(SQLiteStorage.get_logs(sys.argv[1], sys.argv[2]), default=str))")
    out = subprocess.run([sys.executable, "-c", code, project, run], env={**subprocess_env(), "TRACKIO_DIR": str(store)},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def values(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if key in r]


def test_three_trackers_at_once_get_the_same_records(make_config, tmp_path):
    cfg = make_config(train={"max_steps": 4, "eval_every": 2}, log={"run_name": "all3"})
    train_run(write_recipe(tmp_path / "recipe.py", cfg), "--log.tracker=wandb,tensorboard,trackio")
    root = Path(cfg.log.output_root)
    run_dir = root / "all3"
    records = read_jsonl(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())

    (wandb_run,) = (root / "wandb").glob("offline-run-*-all3")  # W&B's own reader
    inspect = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--summary", str(wandb_run)],
                             capture_output=True, text=True, timeout=60).stdout
    shown = dict(line.split(None, 1) for line in inspect.splitlines() if line.startswith("  ") and len(line.split()) > 1)
    assert float(shown["eval/loss"]) == pytest.approx(summary["eval/loss"], rel=1e-12)
    assert float(shown["train/loss"]) == pytest.approx(values(records, "train/loss")[-1][1], rel=1e-12)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / cfg.log.project)).Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in board.Scalars("train/loss")] == values(records, "train/loss")

    logged = trackio_logs(root / "trackio", cfg.log.project, "all3")
    assert values(logged, "train/loss") == values(records, "train/loss")
    assert values(logged, "eval/loss") == values(records, "eval/loss") and len(values(records, "eval/loss")) == 2


def test_an_unknown_tracker_is_one_line(make_config, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.py", make_config())
    result = subprocess.run([sys.executable, "trainer/run.py", str(recipe), "--log.tracker=wandb,mlflow"], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: bad value for log.tracker: 'mlflow' is not one of wandb, tensorboard, "
                                     "trackio")


def test_dashboard_sync_brings_every_run_into_trackio(make_config, tmp_path):
    root = Path(make_config().log.output_root)
    for name, tracker in (("with-trackio", "trackio"), ("without", "none")):
        cfg = make_config(train={"max_steps": 3}, log={"run_name": name})
        train_run(write_recipe(tmp_path / f"{name}.py", cfg), f"--log.tracker={tracker}")
    result = subprocess.run([sys.executable, "-m", "trainer.dashboard", "--runs", str(root), "--sync-only"], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "1 run(s) added from metrics.jsonl" in result.stdout, result.stderr[-2000:]
    for name in ("with-trackio", "without"):
        logged = trackio_logs(root / "trackio", "bert-mlm", name)
        assert values(logged, "train/loss") == values(read_jsonl(root / name / "metrics.jsonl"), "train/loss")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux drives W&B's terminal viewer")
def test_wandb_leet_shows_the_runs_side_by_side(make_config, tmp_path):
    """`wandb leet runs/wandb`, W&B's own terminal UI, lists every offline run of the output root."""
    root = Path(make_config().log.output_root)
    for name in ("first", "second"):
        cfg = make_config(train={"max_steps": 2}, log={"run_name": name, "tracker": ["wandb"]})
        train_run(write_recipe(tmp_path / f"{name}.py", cfg))
    session = f"leet-{tmp_path.name}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "40",
                    f"{BIN / 'wandb'} leet {root / 'wandb'}"], check=True, env={**subprocess_env(), "HOME": str(tmp_path)})
    try:
        screen, deadline = "", time.time() + 60
        while not ("-first" in screen and "-second" in screen) and time.time() < deadline:
            time.sleep(1)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    assert "Runs [2 items]" in screen and "-first" in screen and "-second" in screen, screen


def test_wandb_goes_online_with_a_login_and_offline_without(tmp_path, monkeypatch):
    from trainer.tracking import wandb_mode

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode() == "online"  # what `wandb login` leaves behind
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
