"""Trackers, read back with their own tools: W&B's `wandb leet`, TensorBoard's event reader, trackio's
store and dashboard sync. Subprocesses: trackio reads its directory when first imported."""

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
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
    result = train_run(write_recipe(tmp_path / "recipe.py", cfg), "--log.tracker=wandb,tensorboard,trackio,wandb")
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
    # One name per value: the summary uses the logged metrics' names (no final/eval_loss beside eval/loss).
    assert not [key for key in shown if key.startswith(("final/", "best/")) or key in ("steps", "tokens_seen",
                                                                                        "wall_time_s")]
    assert int(shown["step"]) == summary["step"] == 4 and float(shown["eval/best_loss"]) == summary["eval/best_loss"]
    # wandb listed twice is one W&B run that gets each record once (and the fill-mask table).
    logged = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(wandb_run)],
                            capture_output=True, text=True, timeout=60).stdout
    assert sum('"type":"history"' in line for line in logged.splitlines()) == len(records) + 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / cfg.log.project)).Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in board.Scalars("train/loss")] == values(records, "train/loss")

    logged = trackio_logs(root / "trackio", cfg.log.project, "all3")
    assert values(logged, "train/loss") == values(records, "train/loss")
    assert values(logged, "eval/loss") == values(records, "eval/loss") and len(values(records, "eval/loss")) == 2
    assert "trackio show" not in result.stdout  # it would open trackio's default store, not this one
    assert f"* trackio dashboard of these runs: python -m trainer.dashboard --runs {root}" in result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url: str, body: dict, headers: dict | None = None):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_tensorboard_shows_one_run_per_run_with_hparams_and_metric_columns(make_config, tmp_path):
    """A real TensorBoard server over two runs: two runs (no empty hparams sub-run each), and its HPARAMS
    tab has a session per run with the config and the run's final losses as metric columns."""
    root = Path(make_config().log.output_root)
    for name, lr in (("low", 1e-3), ("high", 5e-3)):
        cfg = make_config(optim={"lr": lr}, train={"max_steps": 4, "eval_every": 2}, log={"run_name": name})
        train_run(write_recipe(tmp_path / f"{name}.py", cfg), "--log.tracker=tensorboard")
    assert not [p for p in root.glob("*/bert-mlm/*") if p.is_dir()]
    port = free_port()
    server = subprocess.Popen([str(BIN / "tensorboard"), "--logdir", str(root), "--port", str(port), "--host", "127.0.0.1"],
                              env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            try:
                runs = json.loads(urllib.request.urlopen(f"{base}/data/runs", timeout=5).read())
                if len(runs) == 2:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, "TensorBoard did not start"
            time.sleep(0.5)
        assert sorted(runs) == ["high/bert-mlm", "low/bert-mlm"]
        groups = post_json(f"{base}/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 10, "colParams": [],
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]},
            {"X-XSRF-Protected": "1"})["sessionGroups"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    by_run = {group["name"].split("/")[0]: group for group in groups}
    assert sorted(by_run) == ["high", "low"] and by_run["high"]["hparams"]["optim.lr"] == 5e-3
    for name, group in by_run.items():
        columns = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        final = [r for r in read_jsonl(root / name / "metrics.jsonl") if "eval/loss" in r][-1]
        assert set(columns) == {"eval/loss", "eval/perplexity", "eval/accuracy", "train/loss"}
        assert columns["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-6)


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None, reason="needs a network namespace")
def test_the_printed_trackio_hint_opens_the_store_these_runs_are_in(make_config, tmp_path):
    """The dashboard command a trackio run prints, typed as printed (its default port, in a network
    namespace of its own), serves the project and the run that trackio logged during training."""
    cfg = make_config(train={"max_steps": 3}, log={"run_name": "tracked"})
    result = train_run(write_recipe(tmp_path / "recipe.py", cfg), "--log.tracker=trackio")
    command = re.search(r"trackio dashboard of these runs: (.*)", result.stdout).group(1).strip()
    query = ("import json, time, urllib.request\n"
             "def post(name, body):\n"
             "    request = urllib.request.Request('http://127.0.0.1:7860/api/' + name, data=json.dumps(body).encode(),"
             " headers={'Content-Type': 'application/json'})\n"
             "    return json.loads(urllib.request.urlopen(request, timeout=10).read())['data']\n"
             "for _ in range(240):\n"
             "    try:\n"
             "        print(json.dumps([post('get_all_projects', {}), post('get_runs_for_project', {'project': 'bert-mlm'})]))\n"
             "        break\n"
             "    except OSError:\n"
             "        time.sleep(0.5)\n")
    log = tmp_path / "dashboard.log"
    script = f"ip link set lo up; {command} > {log} 2>&1 & server=$!; python -c \"$QUERY\"; kill $server; cat {log}"
    env = {**subprocess_env(), "PATH": f"{BIN}:{subprocess_env()['PATH']}", "QUERY": query}
    env.pop("TRACKIO_DIR", None)
    shown = subprocess.run(["unshare", "--net", "bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    projects, runs = json.loads(shown.stdout.splitlines()[0])
    assert projects == ["bert-mlm"] and [run["name"] for run in runs] == ["tracked"], shown.stdout + shown.stderr
    assert "0 run(s) added from metrics.jsonl" in shown.stdout  # trackio had logged it there during training


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
