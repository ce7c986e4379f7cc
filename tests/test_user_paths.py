"""The README's commands, typed as a new user types them: in a subprocess, with no WANDB_* variable
and an empty HOME (so no W&B login is found), the installed environment on PATH (as after
`source .venv/bin/activate`), on the real recipes and the offline data in ../shared."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, write_recipe
from trainer.rundir import list_checkpoints, read_jsonl
from trainer.checkpoint import read_state

pytestmark = pytest.mark.slow
VENV = Path(sys.executable).parent.parent
SHARED = REPO.parent / "shared" / "data"
TINY = "--train.max_steps=4 --data.max_train_blocks=64 --data.max_eval_blocks=8 --train.eval_every=0"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"the offline data is not at {SHARED}")


@pytest.fixture(scope="module")
def user_env(tmp_path_factory) -> dict:
    """A new user's environment: no W&B variables, an empty HOME (no ~/.netrc, no W&B settings, a cold
    HF cache shared by this module's runs), the venv's bin first on PATH."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_"))}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", PATH=f"{VENV / 'bin'}:{env['PATH']}", VIRTUAL_ENV=str(VENV))
    return env


def shell(command: str, env: dict, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def the_run(output_root: Path) -> Path:
    (run,) = [p for p in output_root.iterdir() if p.is_dir() and p.name != "wandb"]
    return run


def assert_complete_offline_run(out: Path, stdout: str) -> Path:
    run = the_run(out)
    assert "W&B offline (no API key)" in stdout and f"wandb sync {out}/wandb/offline-run-*-{run.name}" in stdout
    assert len(list((out / "wandb").glob(f"offline-run-*-{run.name}/*.wandb"))) == 1
    for name in ("metrics.jsonl", "summary.json", "model/config.json", "model/model.safetensors"):
        assert (run / name).is_file(), name
    return run


@needs_shared
def test_make_scratch_without_a_wandb_login(user_env, tmp_path):
    out = tmp_path / "runs"
    result = shell(f'make scratch ARGS="{TINY} --log.output_root={out}"', user_env)
    assert_complete_offline_run(out, result.stdout)


@needs_shared
def test_make_finetune_on_a_folder_of_your_own_text_without_a_wandb_login(user_env, tmp_path):
    """Domain-adaptive pre-training as the README types it: the pretrained model, the user's folder."""
    lines = [l for l in (SHARED / "wikitext-2-raw-v1" / "wiki.test.raw").read_text().splitlines() if l.strip()]
    notes = tmp_path / "notes"
    (notes / "2026").mkdir(parents=True)
    (notes / "field-notes.txt").write_text("\n".join(lines[:300]))
    (notes / "2026" / "more.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                                       for i, t in enumerate(lines[300:400])))
    out = tmp_path / "runs"
    result = shell(f'make finetune ARGS="--data.dataset={notes} --train.max_steps=2 --data.max_train_blocks=16 '
                   f'--data.max_eval_blocks=4 --train.eval_every=0 --log.output_root={out}"', user_env)
    run = assert_complete_offline_run(out, result.stdout)
    assert "NEW MLM head" in result.stderr  # offline: the all-MiniLM-L6-v2 encoder stands in for bert-base-uncased
    assert f"from {notes} (2 files)" in result.stdout and "wikitext" not in result.stdout.split("model ")[0]
    assert "5% of the training documents held out: data.validation_split" in result.stdout
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 2]  # the fine-tune's starting point, then the end


@needs_shared
def test_accelerate_launch_as_typed_sigterm_to_the_launcher_and_the_printed_resume(user_env, tmp_path):
    """SIGTERM to `accelerate launch` (as a scheduler sends it) reaches the trainer, which checkpoints
    and exits 143; the printed resume command, run as printed, finishes the run in the same W&B run."""
    out = tmp_path / "runs"
    command = (f"exec accelerate launch trainer/run.py recipes/scratch.py $(python -m trainer.hub scratch) "
               f"--data.max_train_blocks=512 --data.max_eval_blocks=8 --train.max_steps=40 --train.log_every=1 "
               f"--train.eval_every=0 --log.output_root={out}")
    launcher = subprocess.Popen(["bash", "-c", command], cwd=REPO, env=user_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list(out.glob("*/metrics.jsonl")) or len(read_jsonl(next(out.glob("*/metrics.jsonl")))) < 3:
        assert launcher.poll() is None and time.time() < deadline, "the run did not start"
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == -signal.SIGTERM  # the launcher dies at once, as before
    output = launcher.stdout.read()  # EOF once the trainer, which shares the pipe, has exited too
    run = the_run(out)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["exit_code"] == 143, output
    assert "launcher exited: stopped at step" in output and "Traceback" not in output.split("launcher exited")[-1]
    stopped = read_state(list_checkpoints(run)[-1]).step
    assert stopped == summary["step"] < 40

    resume = re.search(r"Resume with: (.*)", output).group(1).strip()
    assert resume == f"accelerate launch trainer/run.py --resume={run}"
    shell(resume, user_env)  # exactly as printed: the run's own config (offline data paths included)
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 41)) and json.loads((run / "summary.json").read_text())["status"] == "finished"
    sessions = sorted((out / "wandb").glob(f"offline-run-*-{run.name}"))
    assert len(sessions) == 2  # two sessions of one W&B run (same id): `wandb sync` joins them


@needs_shared
def test_fresh_clone_make_scratch(user_env, tmp_path):
    """What is committed is enough: a clone with ../shared beside it runs `make scratch` (reusing this
    checkout's installed environment instead of installing a new one)."""
    clone = tmp_path / "clone" / "main"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    (tmp_path / "clone" / "shared").symlink_to(SHARED.parent)
    result = shell(f'make -o {VENV}/.installed scratch VENV={VENV} ARGS="{TINY} --log.tracker=none"', user_env, cwd=clone)
    run = the_run(clone / "runs")
    assert (run / "model" / "model.safetensors").is_file() and "Hub unreachable: using local data" in result.stderr


def test_tracker_none_never_imports_wandb(user_env, make_config, tmp_path):
    from conftest import write_recipe

    recipe = write_recipe(tmp_path / "recipe.py", make_config(train={"max_steps": 2}))
    result = subprocess.run([sys.executable, "-X", "importtime", "trainer/run.py", str(recipe), "--log.tracker=none"],
                            cwd=REPO, env=user_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "torch" in imported and not [m for m in imported if m.split(".")[0] == "wandb"]


@needs_shared
def test_make_keeps_the_trainer_status_and_line_and_passes_sigterm_on(user_env, make_config, tmp_path):
    """Through make: bad input prints the trainer's one line (make's own line reports its status), SIGTERM to
    make reaches the launcher (make's child), which has the trainer checkpoint; the printed command, run as
    printed, finishes the run."""
    out = tmp_path / "runs"
    cfg = make_config(train={"epochs": 100, "max_steps": 300, "log_every": 1}, log={"output_root": str(out), "run_name": "made"})
    recipe = write_recipe(tmp_path / "tiny.py", cfg)  # the tiny model on the offline WikiText-2 (make adds its paths)
    args = "--data.max_train_blocks=256 --data.max_eval_blocks=8"
    bad = subprocess.run(["make", "train", f"RECIPE={recipe}", f"ARGS={args} --optim.lr=abc"], cwd=REPO, env=user_env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stdout + bad.stderr, bad.stderr[-3000:]
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: bad value for optim.lr: 'abc' is not a number"]
    assert re.search(r"make(\[\d+\])?: \*\*\* \[Makefile:\d+: train\] Error 2", bad.stderr)  # make[1] under make test

    make = subprocess.Popen(["make", "train", f"RECIPE={recipe}", f"ARGS={args}"], cwd=REPO, env=user_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = out / "made"
    deadline = time.time() + 300
    while len([r for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]) < 3:
        assert make.poll() is None and time.time() < deadline, "the run did not start"
        time.sleep(0.2)
    make.send_signal(signal.SIGTERM)
    output = make.communicate(timeout=120)[0]
    assert make.returncode == -signal.SIGTERM and "Traceback" not in output, output[-3000:]  # make re-raises it
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["exit_code"] == 143
    assert read_state(list_checkpoints(run)[-1]).step == summary["step"] < 300

    resume = re.search(r"Resume with: (.*)", output).group(1).strip()
    assert resume == f".venv/bin/python -m trainer.launch --config_file accelerate_configs/cpu.yaml trainer/run.py --resume={run}"
    shell(resume, user_env)  # as printed, from the checkout
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 301)) and json.loads((run / "summary.json").read_text())["status"] == "finished"
