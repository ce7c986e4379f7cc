"""Local sweeps (trainer/sweep.py): W&B's sweep file run by Optuna, each trial an ordinary run of a tiny model
started as a subprocess; pruning, failures, kill -9 and resume, several workers and drivers, bad input, and the
command line the W&B agent builds from the same file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, subprocess_env, write_recipe
from trainer.rundir import read_jsonl

pytestmark = pytest.mark.slow


def write_sweep(path: Path, recipe: Path, parameters: str, extra: str = "", method: str = "grid",
                metric: str = "eval/perplexity") -> Path:
    path.write_text(f"""method: {method}
metric:
  name: {metric}
  goal: minimize
program: trainer/run.py
command:
  - ${{env}}
  - ${{interpreter}}
  - ${{program}}
  - {recipe}
  - ${{args}}
parameters:
{parameters}
{extra}""")
    return path


@pytest.fixture
def recipe(make_config, tmp_path) -> Path:
    cfg = make_config(train={"epochs": 2, "eval_every": 5, "save_every": 0})
    return write_recipe(tmp_path / "tiny.py", cfg)


def sweep_command(sweep_file: Path, root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "trainer.sweep", str(sweep_file), "--root", str(root), "--top", "0", *args]


def run_sweep(sweep_file: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(sweep_command(sweep_file, root, *args), cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def trials(sweep_dir: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(sweep_dir / "study.journal")))
    return optuna.load_study(study_name=sweep_dir.name, storage=storage).get_trials()


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]


def test_a_sweep_prunes_records_a_failed_trial_and_reports(recipe, tmp_path):
    """A grid in the file's order: lr 3e-3 completes; lr 0 is refused by the trainer (failed, with its error
    line, and the sweep goes on); lr 1e-6 hardly learns, so the median pruner (one complete trial) stops it."""
    sweep_file = write_sweep(tmp_path / "tiny.yaml", recipe, """  optim.lr: {values: [0.003, 0, 0.002, 1.0e-6]}
  train.max_steps: {value: 40}""", "early_terminate: {type: median, n_startup_trials: 1}")
    root = tmp_path / "runs"
    result = run_sweep(sweep_file, root, "--top", "1")
    sweep_dir = root / "tiny"
    found = trials(sweep_dir)
    assert [t.params["optim.lr"] for t in found] == [0.003, 0, 0.002, 1e-6]
    assert [t.state.name for t in found][:2] == ["COMPLETE", "FAIL"] and found[3].state.name == "PRUNED"
    assert found[1].user_attrs["error"] == "optim.lr=0.0 must be positive"
    assert not (sweep_dir / "tiny-trial-001").exists()  # the refused run left no directory
    evals = [r for r in read_jsonl(sweep_dir / "tiny-trial-000" / "metrics.jsonl") if "eval/loss" in r]
    assert found[0].value == pytest.approx(min(r["eval/perplexity"] for r in evals))
    assert found[0].user_attrs["tokens"] == evals[-1]["tokens"] == 40 * 8 * 32
    from trainer.sweep_spec import eval_metrics

    assert set(eval_metrics()) <= set(evals[-1])  # every metric a sweep may name is in the eval records
    pruned_run = sweep_dir / "tiny-trial-003"
    summary = json.loads((pruned_run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["exit_code"] == 143 and summary["step"] < 40
    assert min(found[3].intermediate_values) == 5 * 8 * 32  # reported at tokens seen, from the first evaluation

    for text in ("trial 1 failed: optim.lr=0.0 must be positive", "trial 3 pruned at", "4 trials: ", " 1 failed",
                 "best: trial 0", "report:"):
        assert text in result.stdout, text
    table = (sweep_dir / "trials.csv").read_text().splitlines()
    assert table[0] == "trial,state,optim.lr,best eval/perplexity,tokens,wall time (s),run,error"
    assert table[2].startswith("1,failed,0,,,,,optim.lr=0.0 must be positive") and ",pruned," in table[4]
    assert (sweep_dir / "compare" / "report.html").is_file()
    from trainer.dashboard import run_metrics_files

    assert pruned_run / "metrics.jsonl" in run_metrics_files(root)  # make dashboard shows every trial

    again = run_sweep(sweep_file, root)  # the grid is done: nothing runs again
    assert "started" not in again.stdout and len(trials(sweep_dir)) == 4


def test_kill_9_of_the_driver_then_the_same_command_finishes_the_sweep(recipe, tmp_path):
    sweep_file = write_sweep(tmp_path / "k.yaml", recipe, """  optim.lr: {values: [0.003, 0.002]}
  train.epochs: {value: 30}
  train.max_steps: {value: 400}
  train.eval_every: {value: 50}
  train.save_every: {value: 25}""", "name: killed")
    root = tmp_path / "runs"
    sweep_dir, second = root / "killed", root / "killed" / "killed-trial-001"
    driver = subprocess.Popen(sweep_command(sweep_file, root), cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not list(second.glob("checkpoints/step-*/trainer_state.json")) and time.time() < deadline:
            assert driver.poll() is None, "the sweep ended before its second trial saved a checkpoint"
            time.sleep(0.1)
        trainer = psutil.Process(driver.pid).children()
        driver.kill()
        driver.wait()
    finally:
        driver.kill()
    assert len(trainer) == 1
    gone, alive = psutil.wait_procs(trainer, timeout=120)  # it checkpoints and exits: no orphan goes on training
    assert not alive
    killed, log = json.loads((second / "summary.json").read_text()), sweep_dir / "logs" / "killed-trial-001.log"
    killed_at = killed["step"]  # its checkpoint: the trainer saw its parent die (SIGUSR1 from the kernel)
    assert killed["exit_code"] == 143 and 0 < killed_at < 400 and "launcher exited" in log.read_text()
    first_metrics = (sweep_dir / "killed-trial-000" / "metrics.jsonl").read_bytes()
    assert [t.state.name for t in trials(sweep_dir)] == ["COMPLETE", "RUNNING"]

    result = run_sweep(sweep_file, root)
    assert "trial 1 resumed from its checkpoint" in result.stdout and "trial 0 started" not in result.stdout
    assert [t.state.name for t in trials(sweep_dir)] == ["COMPLETE", "COMPLETE"]
    assert (sweep_dir / "killed-trial-000" / "metrics.jsonl").read_bytes() == first_metrics  # not run again
    assert train_steps(second) == list(range(1, 401))  # continued from its checkpoint, every step once
    assert f"resumed from {second}/checkpoints/step-{killed_at:06d}" in log.read_text()
    assert sorted(p.name for p in sweep_dir.glob("killed-trial-*")) == ["killed-trial-000", "killed-trial-001"]
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(sweep_dir) in " ".join(p.info["cmdline"] or [])]


def assert_disjoint(sweep_dir: Path, lrs: list[float]) -> list:
    found = trials(sweep_dir)
    assert [t.state.name for t in found] == ["COMPLETE"] * len(lrs)
    assert sorted(t.params["optim.lr"] for t in found) == sorted(lrs)  # each grid point once
    runs = sorted(sweep_dir.glob(f"{sweep_dir.name}-trial-*"))
    assert [p.name for p in runs] == [f"{sweep_dir.name}-trial-{n:03d}" for n in range(len(lrs))]
    for run, trial in zip(runs, found):  # each run trained its own trial's value, once
        assert json.loads((run / "config.json").read_text())["optim"]["lr"] == trial.params["optim.lr"]
        assert train_steps(run) == list(range(1, 11))
    return found


def test_two_workers_run_disjoint_trials_at_once(recipe, tmp_path):
    lrs = [0.003, 0.002]
    sweep_file = write_sweep(tmp_path / "w.yaml", recipe, f"""  optim.lr: {{values: {lrs}}}
  train.max_steps: {{value: 10}}""")
    run_sweep(sweep_file, tmp_path / "runs", "--workers", "2")
    found = assert_disjoint(tmp_path / "runs" / "w", lrs)
    assert found[1].datetime_start < found[0].datetime_complete  # the first two ran side by side


def test_two_drivers_on_one_study_run_disjoint_trials(recipe, tmp_path):
    lrs = [0.003, 0.002, 0.001]
    sweep_file = write_sweep(tmp_path / "d.yaml", recipe, f"""  optim.lr: {{values: {lrs}}}
  train.max_steps: {{value: 10}}""")
    root = tmp_path / "runs"
    drivers = [subprocess.Popen(sweep_command(sweep_file, root), cwd=REPO, env=subprocess_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [driver.communicate(timeout=300)[0] for driver in drivers]
    assert [driver.returncode for driver in drivers] == [0, 0], outputs
    assert_disjoint(root / "d", lrs)
    started = [{n for n in range(3) if f"trial {n} started" in output} for output in outputs]
    assert started[0].isdisjoint(started[1]) and started[0] | started[1] == {0, 1, 2}, outputs


BAD_INPUTS = {  # name: (parameters, extra top-level lines, what the one line names)
    "unknown key": ("  optim.lrr: {values: [0.1, 0.2]}", "",
                    "line 13: parameters.optim.lrr: not a config key; did you mean optim.lr?"),
    "distribution": ("  optim.lr: {distribution: normal, mu: 0, sigma: 1}", "",
                     "parameters.optim.lr.distribution: normal has no Optuna counterpart"),
    "min above max": ("  optim.lr: {distribution: log_uniform_values, min: 0.1, max: 0.01}", "",
                      "parameters.optim.lr: min 0.1 is not below max 0.01"),
    "no values": ("  optim.lr: {values: []}", "", "parameters.optim.lr: values: needs a non-empty list"),
    "bad value": ("  train.batch_size: {values: [8, eight]}", "",
                  "parameters.train.batch_size.values: bad value for train.batch_size: 'eight' is not an integer"),
    "float range on an int": ("  train.batch_size: {distribution: uniform, min: 4, max: 32}", "",
                              "parameters.train.batch_size: train.batch_size takes int, not the numbers uniform "
                              "draws: use int_uniform"),
    "metric": ("  optim.lr: {values: [0.1]}", "", "metric.name: 'eval/perplexit' is not in the trainer's evaluation "
                                                  "records (metrics.jsonl): did you mean eval/perplexity?"),
    "method": ("  optim.lr: {values: [0.1]}", "", "method: 'bayesian' is not one of grid, random, bayes"),
    "recipe": ("  optim.lr: {values: [0.1]}", "", "command: recipe missing.py does not exist"),
    "yaml": ("  optim.lr: {values: [0.1, 0.2}", "", "line 13, column 31: not valid YAML"),
    "top-level key": ("  optim.lr: {values: [0.1]}", "recipe: recipes/scratch.py",
                      "recipe: not a key of W&B's sweep schema"),
    "no run cap": ("  optim.lr: {distribution: uniform, min: 0.001, max: 0.01}", "",
                   "a random sweep needs a bound: run_cap: in the file, or --trials N"),
    "early terminate": ("  optim.lr: {values: [0.1]}", "early_terminate: {type: hyperband, eta: 3}",
                        "early_terminate: hyperband needs min_iter, or max_iter and s"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_starts_nothing(case, recipe, tmp_path, capsys, monkeypatch):
    from trainer.sweep import main

    parameters, extra, expected = BAD_INPUTS[case]
    monkeypatch.chdir(REPO)
    sweep_file = write_sweep(tmp_path / "bad.yaml", "missing.py" if case == "recipe" else recipe, parameters, extra,
                             method="random" if case == "no run cap" else "bayesian" if case == "method" else "grid",
                             metric="eval/perplexit" if case == "metric" else "eval/perplexity")
    assert main([str(sweep_file), "--root", str(tmp_path / "runs")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"error: {sweep_file}"), err
    assert expected in err, err
    assert not (tmp_path / "runs").exists()


def test_the_shipped_sweep_reads(monkeypatch):
    """sweeps/fewest_tokens.yaml: TPE with Hyperband over recipes/scratch_fast.py. Its fixed token budget is a
    config key that lands with the budgets work: until then it is the file's only refusal."""
    from trainer.config import TrainConfig, field_names
    from trainer.sweep_spec import SweepError, load_spec

    monkeypatch.chdir(REPO)
    if "token_budget" not in field_names(TrainConfig):
        with pytest.raises(SweepError, match=r"line \d+: parameters.train.token_budget: not a config key"):
            load_spec("sweeps/fewest_tokens.yaml")
        return
    spec = load_spec("sweeps/fewest_tokens.yaml")
    assert type(spec.sampler(0)).__name__ == "TPESampler" and type(spec.pruner()).__name__ == "HyperbandPruner"
    assert spec.recipe == "recipes/scratch_fast.py" and spec.fixed["train.token_budget"] == 500000


def test_the_command_the_wandb_agent_builds_trains(recipe, tmp_path, monkeypatch):
    """W&B's agent fills `command:` with its own code (wandb.sdk.launch.sweeps.utils, as wandb_agent.py does);
    the line it builds is the driver's own, and trainer/run.py trains with it."""
    from wandb.sdk.launch.sweeps import utils as wandb_sweeps

    from trainer.run import main as run_main
    from trainer.sweep_spec import load_spec

    monkeypatch.chdir(REPO)
    sweep_file = write_sweep(tmp_path / "agent.yaml", recipe, """\
  optim.lr: {distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-2}
  train.batch_size: {values: [4, 8]}
  optim.warmup_ratio: {distribution: uniform, min: 0.0, max: 0.2}
  model.zero_init_output: {values: [true, false]}
  train.max_steps: {value: 3}
  log.run_name: {value: agent}""", "run_cap: 2", method="random")
    spec = load_spec(sweep_file)
    params = {"optim.lr": 0.0012345678901234, "train.batch_size": 4, "optim.warmup_ratio": 1e-05,
              "model.zero_init_output": True}
    args = {key: {"value": value} for key, value in {**spec.fixed, **params}.items()}
    sweep_vars = wandb_sweeps.create_sweep_command_args({"args": args})
    sweep_vars.update(interpreter=["python"], program=["trainer/run.py"], env=["/usr/bin/env"])
    command = []
    for item in wandb_sweeps.create_sweep_command(list(spec_command(sweep_file))):  # wandb_agent.py's own loop
        command += sweep_vars.get(item[2:-1], []) if item.startswith("${") and item.endswith("}") else [item]
    assert command[:4] == ["/usr/bin/env", "python", "trainer/run.py", str(recipe)]
    assert sorted(command[4:]) == sorted(spec.trial_args(params))  # what the local driver passes
    assert run_main(command[3:]) == 0
    stored = json.loads((tmp_path / "runs" / "agent" / "config.json").read_text())
    assert stored["optim"]["lr"] == 0.0012345678901234 and stored["optim"]["warmup_ratio"] == 1e-05
    assert stored["train"]["batch_size"] == 4 and stored["model"]["zero_init_output"] is True


def spec_command(sweep_file: Path) -> list[str]:
    import yaml

    return yaml.safe_load(sweep_file.read_text())["command"]
