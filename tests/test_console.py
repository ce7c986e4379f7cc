"""What a person sees in a terminal: a training run in a real one (tmux), help piped into `head`."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env, write_recipe
from trainer.rundir import read_jsonl


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is the terminal")
def test_a_run_in_a_terminal_keeps_each_evaluation_on_screen(make_config, tmp_path):
    """Each evaluation is one labelled line that stays above the progress bar, marked when it is a new
    best; the first line says how the run runs in words; DeepSpeed, installed but unused, stays quiet."""
    cfg = make_config(optim={"lr": 0.03}, train={"max_steps": 40, "eval_every": 10, "log_every": 5},
                      log={"run_name": "terminal"})
    recipe = write_recipe(tmp_path / "recipe.py", cfg)
    session = f"console-{tmp_path.name}"
    command = f"{sys.executable} trainer/run.py {recipe}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", "-c", str(REPO)],
                   check=True, env=subprocess_env())
    try:
        subprocess.run(["tmux", "set-option", "-t", session, "remain-on-exit", "on"], check=True)
        subprocess.run(["tmux", "respawn-pane", "-k", "-t", session, command], check=True)
        deadline = time.time() + 300
        while subprocess.run(["tmux", "display", "-p", "-t", session, "#{pane_dead}"], capture_output=True,
                             text=True).stdout.strip() != "1":
            assert time.time() < deadline, "the run did not end"
            time.sleep(0.5)
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-J", "-t", session, "-S", "-200"], capture_output=True,
                                text=True, check=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    run_dir = Path(cfg.log.output_root) / "terminal"
    assert f"run terminal  dir {run_dir}  1 process, CPU, fp32" in screen, screen
    evaluations = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/loss" in r]
    best = float("inf")
    for record in evaluations:  # steps 10, 20, 26 (the epoch's end), 30, 40
        (line,) = [line for line in screen.splitlines() if f" step {record['step']}  eval  loss " in line]
        new_best, best = record["eval/loss"] <= best, min(best, record["eval/loss"])
        assert line.endswith("new best") == new_best and f"perplexity {record['eval/perplexity']:.4g}" in line, line
    assert len(evaluations) == 5 and "new best" in screen and "(best loss" in screen  # both kinds seen
    assert "Setting accelerator to CPU" not in screen and "Traceback" not in screen


@pytest.mark.parametrize("command", [[sys.executable, "-m", "trainer.config", "-h"],
                                     [sys.executable, "trainer/run.py", "-h"]], ids=["config", "run"])
def test_help_piped_into_head_ends_quietly(command):
    """`-h | head`: the reader stops early (`head -n 0` at once, so the pipe is closed before help is
    written); that is no error worth a traceback."""
    line = " ".join(command) + " | head -n 0"
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {line}"], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.stderr == "" and result.returncode == 0, result.stderr
