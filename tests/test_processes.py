"""Runs in subprocesses: SIGTERM, kill -9, and 2 gloo processes against 1 process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, subprocess_env, write_recipe
from trainer.checkpoint import list_checkpoints, read_state
from trainer.loop import train
from trainer.tracking import read_jsonl

pytestmark = pytest.mark.slow


def start(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "trainer" / "run.py"), str(recipe), *args], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, process, timeout=120.0):
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early ({process.returncode}):\n{process.stdout.read()}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the trainer")
        time.sleep(0.2)


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]


def test_sigterm_checkpoints_and_exits_cleanly(make_config, tmp_path):
    cfg = make_config(train={"epochs": 200}, log={"run_name": "term"})
    run_dir = Path(cfg.log.output_root) / "term"
    process = start(write_recipe(tmp_path / "recipe.py", cfg))
    wait_for(lambda: len(train_steps(run_dir)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output  # 128 + SIGTERM: a scheduler can tell preemption from completion
    assert "Traceback" not in output and "Resume with:" in output and f"--resume={run_dir}" in output
    state = read_state(list_checkpoints(run_dir)[-1])
    assert state.step >= 3 and state.step == train_steps(run_dir)[-1]

    cfg.train.max_steps = state.step + 2
    summary = train(cfg, resume=str(run_dir))
    assert summary["steps"] == state.step + 2
    assert train_steps(run_dir) == list(range(1, state.step + 3))


def test_kill_9_loses_at_most_the_steps_since_the_last_checkpoint(make_config, tmp_path):
    cfg = make_config(train={"epochs": 200, "save_every": 3}, log={"run_name": "killed"})
    run_dir = Path(cfg.log.output_root) / "killed"
    process = start(write_recipe(tmp_path / "recipe.py", cfg))
    wait_for(lambda: list_checkpoints(run_dir) and len(train_steps(run_dir)) >= 7, process)
    process.kill()  # SIGKILL: no handler runs
    process.wait(timeout=30)
    reached = train_steps(run_dir)[-1]
    last = read_state(list_checkpoints(run_dir)[-1]).step
    assert reached - last <= 3 + 1  # save_every, plus a step that may have finished after we looked

    cfg.train.max_steps = last + 2
    summary = train(cfg, resume=str(run_dir))
    assert summary["steps"] == last + 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_exactly_like_one(make_config, tmp_path, capsys):
    """1 x batch 8 == 2 processes x batch 4 == 1 x batch 4 x 2 accumulation steps (dropout off)."""
    steps = {"max_steps": 8, "eval_every": 4}
    one = make_config(train={"batch_size": 8, **steps}, log={"run_name": "one"})
    accumulated = make_config(train={"batch_size": 4, "grad_accum": 2, **steps}, log={"run_name": "accum"})
    two = make_config(train={"batch_size": 4, **steps}, log={"run_name": "two", "tracker": "wandb"})
    train(one)
    train(accumulated)
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1"}  # several CPU processes, asked for explicitly
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(REPO / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               str(REPO / "trainer" / "run.py"), str(write_recipe(tmp_path / "recipe.py", two))]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "processes 2" in result.stdout

    root = Path(one.log.output_root)
    runs = {name: read_jsonl(root / name / "metrics.jsonl") for name in ("one", "accum", "two")}
    losses = {n: [r["train/loss"] for r in rs if "train/loss" in r] for n, rs in runs.items()}
    evals = {n: [r["eval/loss"] for r in rs if "eval/loss" in r] for n, rs in runs.items()}
    lrs = {n: [r["train/lr"] for r in rs if "train/lr" in r] for n, rs in runs.items()}
    params = {n: load_file(str(root / n / "model" / "model.safetensors")) for n in runs}
    assert len(losses["two"]) == len(losses["one"]) == 8
    assert lrs["two"] == pytest.approx(lrs["one"])  # the schedule advances once per optimizer step
    report = {}
    for other in ("accum", "two"):
        report[other] = (
            max(abs(a - b) for a, b in zip(losses["one"], losses[other])),
            max(abs(a - b) for a, b in zip(evals["one"], evals[other])),
            max((params["one"][k] - params[other][k]).abs().max().item() for k in params["one"]),
        )
        assert report[other][0] < 1e-5 and report[other][1] < 1e-5 and report[other][2] < 1e-5
    with capsys.disabled():
        print(f"\nequivalence vs 1x8 (max |train loss diff|, max |eval loss diff|, max |param diff|): {report}")
    # one run, one metrics file, one W&B run, written by the main process only
    assert len(list(root.glob("two*"))) == 1 and len(list(root.glob("*/wandb"))) == 0
    assert len(list((root / "wandb").glob("offline-run-*-two"))) == 1
    tokens = [r["eval/masked_tokens"] for rs in runs.values() for r in rs if "eval/masked_tokens" in r]
    assert len(set(tokens)) == 1  # no duplicated eval samples under 2 processes
