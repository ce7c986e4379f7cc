"""Runs sized by a token or wall-time budget: the schedule spans the budget, the run ends at it, a
resume continues it; max_steps warns and prints the token budget that would fit its schedule."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, subprocess_env, write_recipe
from test_processes import launch_two
from trainer.budget import parse_duration, parse_tokens, shape_at_progress
from trainer.config import ConfigError
from trainer.loop import train

TOKENS_PER_STEP = 8 * 32  # the tiny config: batch 8 x block 32, one process


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if any(k.startswith(f"{kind}/") for k in r)]


def run_dir_of(cfg, name: str) -> Path:
    return Path(cfg.log.output_root) / name


def test_parsing():
    assert [parse_tokens(t) for t in ("500000", "500k", "1.5M", "2e6", 4096)] == [500_000, 500_000, 1_500_000,
                                                                                   2_000_000, 4096]
    assert [parse_duration(t) for t in ("600", "90s", "10m", "1.5h", "1h30m", "2 min")] == [600, 90, 600, 5400,
                                                                                          5400, 120]
    for bad in ("", "0", "-5", "lots", "10x"):
        with pytest.raises(ValueError):
            parse_tokens(bad)
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant", "wsd"])
def test_progress_shapes_are_the_step_schedules(make_config, schedule):
    """A time budget's schedule (over progress) draws the same curve as the step schedule (over steps)."""
    from trainer.step import build_scheduler

    cfg = make_config(optim={"schedule": schedule, "warmup_ratio": 0.1, "decay_ratio": 0.3})
    total = 200
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    steps = build_scheduler(optimizer, cfg, total).lr_lambdas[0]
    for step in range(total + 1):
        assert shape_at_progress(schedule, step / total, 0.1, 0.3) == pytest.approx(steps(step), abs=1e-6), step


def test_bad_budgets_are_refused(make_config):
    with pytest.raises(ConfigError, match="give one"):
        make_config(train={"token_budget": "10k", "time_budget": "1m"})
    with pytest.raises(ConfigError, match=r"bad value for train.token_budget: '10q' is not a token count"):
        make_config(train={"token_budget": "10q"})
    with pytest.raises(ConfigError, match=r"bad value for train.time_budget: 'soon' is not a duration"):
        make_config(train={"time_budget": "soon"})


def test_token_budget_sizes_the_run_and_its_schedule(make_config):
    # 2 epochs hold ~2 x 20 steps: the budget asks for more, so the run goes past train.epochs.
    budget = 57 * TOKENS_PER_STEP + 100  # not a whole number of steps: rounded down, never past the budget
    cfg = make_config(train={"token_budget": str(budget)}, log={"run_name": "tokens"})
    summary = train(cfg)
    assert summary["step"] == 57 and summary["tokens"] == 57 * TOKENS_PER_STEP <= budget
    assert summary["epoch"] > cfg.train.epochs and summary["budget/tokens"] == budget
    assert summary["budget/used"] == pytest.approx(57 * TOKENS_PER_STEP / budget)
    lrs = [r["train/lr"] for r in records(run_dir_of(cfg, "tokens"), "train")]
    warmup = round(0.1 * 57)
    assert lrs[warmup - 1] == pytest.approx(cfg.optim.lr) and lrs[-1] == 0.0  # the schedule ends with the run


def test_token_budget_resumed_ends_where_one_session_ends(make_config):
    straight = make_config(train={"token_budget": "12k"}, log={"run_name": "straight"})
    train(straight)
    first = make_config(train={"token_budget": "12k", "max_steps": 17, "save_every": 17}, log={"run_name": "split"})
    train(first)
    rest = make_config(train={"token_budget": "12k"}, log={"run_name": "split"})
    summary = train(rest, resume=str(run_dir_of(rest, "split")))
    assert summary["step"] == 12_000 // TOKENS_PER_STEP
    a = load_file(str(run_dir_of(straight, "straight") / "model" / "model.safetensors"))
    b = load_file(str(run_dir_of(rest, "split") / "model" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_time_budget_schedule_follows_the_clock(make_config):
    seconds = 6.0
    cfg = make_config(train={"time_budget": f"{seconds}s"}, log={"run_name": "clock"})
    summary = train(cfg)
    train_records = records(run_dir_of(cfg, "clock"), "train")
    # Ends when the next step would pass the budget: within a step or two of it (plus the final save).
    assert seconds * 0.8 < train_records[-1]["time_s"] <= seconds + 1.0
    assert summary["budget/time_s"] == seconds and 0.8 < summary["budget/used"] < 1.5
    assert summary["epoch"] > cfg.train.epochs  # the budget, not the epochs, sized it
    peak = cfg.optim.lr
    assert train_records[-1]["train/lr"] < 0.05 * peak
    for r in train_records[5:]:  # each step's lr is the schedule at the fraction of the budget spent
        expected = shape_at_progress("linear", r["time_s"] / seconds, cfg.optim.warmup_ratio, 0.2)
        assert r["train/lr"] / peak == pytest.approx(expected, abs=0.06), r


def test_time_budget_resumed_continues_the_same_budget(make_config):
    seconds = 6.0
    first = make_config(train={"time_budget": "6s", "max_steps": 30, "save_every": 30}, log={"run_name": "t"})
    assert train(first)["ended_by"] == "max_steps"
    run_dir = run_dir_of(first, "t")
    before = records(run_dir, "train")[-1]["time_s"]
    rest = make_config(train={"time_budget": "6s"}, log={"run_name": "t"})
    summary = train(rest, resume=str(run_dir))
    after = [r for r in records(run_dir, "train") if r["step"] > 30]
    assert after[0]["time_s"] > before  # the clock went on from the checkpoint's
    assert seconds * 0.8 < after[-1]["time_s"] <= seconds + 1.5 and summary["budget/used"] < 1.6
    assert after[-1]["train/lr"] < 0.1 * rest.optim.lr and summary["ended_by"] == "time_budget"
    # Resumed again: its end is where it ended, even if the clock its checkpoint saved stopped just short of it.
    with pytest.raises(ConfigError, match=r"already at the end of its time budget \(6s\): nothing to train"):
        train(rest, resume=str(run_dir))


def test_max_steps_warns_and_the_printed_budget_fits_the_schedule(make_config, tmp_path):
    """The warning's suggestion, typed as printed, trains that many steps with the schedule ending there."""
    cfg = make_config(train={"max_steps": 9})
    recipe = write_recipe(tmp_path / "tiny_recipe.py", cfg)
    command = [sys.executable, "trainer/run.py", str(recipe), "--log.run_name=warned"]
    first = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    (warning,) = [line for line in first.stdout.splitlines() if "warning: train.max_steps=9" in line]
    planned = int(re.search(r"= ([\d,]+) steps", first.stdout).group(1).replace(",", ""))
    assert f"stops the run at step 9 of its schedule's {planned}" in warning and planned > 9, warning
    suggested = warning.split("use ")[1].split(" instead")[0]
    assert suggested == f"--train.token_budget={9 * TOKENS_PER_STEP}"
    second = subprocess.run([*command[:3], "--train.max_steps=none", suggested, "--log.run_name=fitted"], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "warning" not in second.stdout
    fitted = records(Path(cfg.log.output_root) / "fitted", "train")
    assert fitted[-1]["step"] == 9 and fitted[-1]["train/lr"] == 0.0
    assert not math.isclose(records(Path(cfg.log.output_root) / "warned", "train")[-1]["train/lr"], 0.0)


def test_two_processes_stop_at_one_step_of_a_time_budget(make_config, tmp_path):
    """The ranks' clocks differ; they agree at logging steps, so they stop together (else one would hang
    in the other's collective) with the same learning rates."""
    cfg = make_config(train={"time_budget": "8s", "log_every": 4, "batch_size": 4})
    launcher = launch_two(write_recipe(tmp_path / "tiny_recipe.py", cfg), "--log.run_name=two")
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output[-3000:]
    summary = json.loads((Path(cfg.log.output_root) / "two" / "summary.json").read_text())
    assert summary["status"] == "finished" and 0.7 < summary["budget/used"] < 1.6, summary
