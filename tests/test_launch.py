"""`python -m trainer.launch` as users and schedulers run it: the trainer's exit status and one line, SIGTERM to
the launcher, the launcher as a container's PID 1 (a new PID namespace, SIGTERM then SIGKILL after a grace
period, as Docker stops a container), the printed resume command run as printed; one live run per directory;
FSDP refused where Accelerate cannot give it."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from conftest import REPO, subprocess_env, write_recipe
from test_processes import free_port, start, train_steps, wait_for
from trainer.checkpoint import list_checkpoints, read_state
from trainer.config import ConfigError
from trainer.run import main
from trainer.tracking import read_jsonl

pytestmark = pytest.mark.slow
VENV_BIN = Path(sys.executable).parent
DOCKER_GRACE_S = 60  # `docker stop -t 60`: SIGKILL this long after SIGTERM


def launch(processes: int, recipe: Path, *args: str, config: str | None = None) -> list[str]:
    """The README's launch command, with absolute paths (the tests run from any directory)."""
    config = config or ("cpu.yaml" if processes == 1 else "cpu_2proc.yaml")
    command = [sys.executable, "-m", "trainer.launch", "--config_file", str(REPO / "accelerate_configs" / config)]
    if processes > 1:
        command += ["--num_processes", str(processes), "--main_process_port", str(free_port())]
    return [*command, str(REPO / "trainer" / "run.py"), str(recipe), *args]


def launch_env(processes: int, **extra: str) -> dict:
    """A shell where the venv is active (the printed commands name `python`, `accelerate` as typed)."""
    env = {**subprocess_env(), "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **extra}
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def error_lines(output: str) -> list[str]:
    assert "Traceback" not in output, output[-3000:]
    return [line for line in output.splitlines() if line.startswith("error: ")]


def printed_resume(output: str) -> str:
    found = re.findall(r"Resume with: (.*)", output)
    assert len(found) == 1, output[-3000:]  # printed once, by the main process
    return found[0].strip()


def stopped_with_a_checkpoint(run_dir: Path, output: str, code: int = 143) -> int:
    """The run stopped on the signal: summary.json says so, and a checkpoint holds the step it stopped at."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["exit_code"] == code, output[-3000:]
    assert read_state(list_checkpoints(run_dir)[-1]).step == summary["step"]
    return summary["step"]


def stop_like_docker(process: subprocess.Popen, init_pid: int) -> str:
    """SIGTERM to the namespace's PID 1; SIGKILL (which kills every process in it) if it outlives the grace."""
    os.kill(init_pid, signal.SIGTERM)
    try:
        return process.communicate(timeout=DOCKER_GRACE_S)[0]
    except subprocess.TimeoutExpired:
        os.kill(init_pid, signal.SIGKILL)
        output = process.communicate(timeout=30)[0]
        raise AssertionError(f"PID 1 outlived the {DOCKER_GRACE_S} s grace and was killed:\n{output[-3000:]}")


@pytest.mark.parametrize("processes", [1, 2])
def test_exit_status_preemption_as_pid_1_and_the_printed_resume(make_config, tmp_path, processes):
    cfg = make_config(train={"epochs": 200, "max_steps": 600, "batch_size": 8 // processes, "log_every": 2},
                      log={"run_name": "job"})
    run_dir = Path(cfg.log.output_root) / "job"
    recipe = write_recipe(tmp_path / "recipe.py", cfg)
    env = launch_env(processes)

    # Bad input: the trainer's exit status and its one line, no launcher traceback, nothing created.
    bad = subprocess.run(launch(processes, recipe, "--optim.lr=abc"), cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and error_lines(bad.stdout + bad.stderr) == [
        "error: bad value for optim.lr: 'abc' is not a number"], bad.stderr[-3000:]
    assert not run_dir.exists()

    # The launcher as PID 1 of a new PID namespace, stopped as Docker stops a container.
    command = launch(processes, recipe)
    process = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", *command], cwd=tmp_path,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(train_steps(run_dir)) >= 3, process, timeout=300)
    (init,) = psutil.Process(process.pid).children()  # `unshare --fork`'s child: PID 1 in the namespace
    output = stop_like_docker(process, init.pid)
    assert process.returncode == 143 and not error_lines(output), output[-3000:]
    first = stopped_with_a_checkpoint(run_dir, output)
    resume = printed_resume(output)
    typed = " ".join(command[:-1])  # the launch as typed, up to the script
    assert resume == ("ACCELERATE_USE_CPU=1 " if processes > 1 else "") + f"{typed} --resume={run_dir}"

    # The printed command, run as printed; then SIGTERM to the launcher (as a scheduler sends it).
    process = subprocess.Popen(["bash", "-c", resume], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: train_steps(run_dir)[-1] >= first + 6, process, timeout=300)
    assert "trainer.launch" in psutil.Process(process.pid).cmdline()  # bash runs a single command in its own process
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 143 and not error_lines(output), output[-3000:]
    second = stopped_with_a_checkpoint(run_dir, output)
    assert second > first and printed_resume(output) == resume

    # Run as printed again, it finishes the run: every step once, in order, across the three sessions.
    result = subprocess.run(["bash", "-c", resume], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert train_steps(run_dir) == list(range(2, 601, 2))


def test_ctrl_c_on_a_terminal_reaches_the_trainer_once(make_config, tmp_path):
    """A terminal's Ctrl-C signals its whole foreground process group: the launcher's group here. The trainer,
    in its own session, gets it once, from the launcher: it checkpoints (130) instead of stopping at once."""
    cfg = make_config(train={"epochs": 200}, log={"run_name": "ctrlc"})
    run_dir = Path(cfg.log.output_root) / "ctrlc"
    process = subprocess.Popen(launch(1, write_recipe(tmp_path / "recipe.py", cfg)), cwd=tmp_path, env=launch_env(1),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(lambda: len(train_steps(run_dir)) >= 3, process, timeout=300)
    os.killpg(process.pid, signal.SIGINT)  # the launcher leads its process group, as a shell's foreground job
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130 and "SIGINT: stopped at step" in output and not error_lines(output), output[-3000:]
    stopped_with_a_checkpoint(run_dir, output, code=130)


def snapshot(directory: Path) -> dict:
    """Every file under `directory`: size, modification time, content hash."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_live_run_refuses_a_second_resume_until_it_is_killed(make_config, tmp_path, capsys):
    cfg = make_config(train={"epochs": 200, "save_every": 5}, log={"run_name": "live"})
    run_dir = Path(cfg.log.output_root) / "live"
    live = start(write_recipe(tmp_path / "recipe.py", cfg))
    wait_for(lambda: list_checkpoints(run_dir) and len(train_steps(run_dir)) >= 12, live)
    live.send_signal(signal.SIGSTOP)  # frozen mid-run: whatever the second launch changed would show
    try:
        before = snapshot(run_dir)
        assert main([f"--resume={run_dir}", "--train.max_steps=100000"]) == 2
        (error,) = error_lines(capsys.readouterr().err)
        assert error.startswith(f"error: run {run_dir} is live: process {live.pid} on ") and "then resume" in error
        assert snapshot(run_dir) == before  # nothing moved to abandoned/, no config rewritten, no .tmp removed
    finally:
        live.kill()  # kill -9, stopped as it is: the kernel releases its lock
        live.wait(timeout=30)

    last = read_state(list_checkpoints(run_dir)[-1]).step
    assert main([f"--resume={run_dir}", f"--train.max_steps={last + 2}"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["step"] == last + 2


def test_fsdp_without_cuda_is_refused_in_one_line(make_config, tmp_path):
    """Accelerate 1.15 would train plain DDP (MULTI_CPU) from an FSDP config on a CPU machine."""
    cfg = make_config(train={"max_steps": 2})
    recipe = write_recipe(tmp_path / "recipe.py", cfg)
    result = subprocess.run(launch(2, recipe, config="fsdp.yaml"), cwd=tmp_path, env=launch_env(1, TRAINER_ALLOW_CPU="1"),
                            capture_output=True, text=True, timeout=300)
    (error,) = error_lines(result.stdout + result.stderr)
    assert result.returncode == 2 and "asks for FSDP" in error and "plain DDP" in error, result.stderr[-3000:]
    assert "accelerate_configs/cpu_2proc.yaml" in error and not Path(cfg.log.output_root).exists()


@pytest.mark.parametrize("asked_by", ["accelerator", "environment"])
def test_muon_is_refused_wherever_parameters_are_sharded(make_config, monkeypatch, asked_by):
    from accelerate.utils import DistributedType

    from trainer.runtime import check_plugins_match_recipe

    cfg = make_config(optim={"name": "muon"})
    kind = DistributedType.FSDP if asked_by == "accelerator" else DistributedType.MULTI_CPU
    if asked_by == "environment":  # whatever Accelerate made of it: the launch asked for FSDP
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    accelerator = SimpleNamespace(distributed_type=kind, mixed_precision="no")
    with pytest.raises(ConfigError, match="optim.name=muon needs whole weight matrices; FSDP shards them"):
        check_plugins_match_recipe(accelerator, cfg)
    check_plugins_match_recipe(accelerator, make_config())  # AdamW is fine
