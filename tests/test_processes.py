"""Runs in subprocesses: SIGTERM, kill -9, and 2 gloo processes against 1 process."""

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])  # SIGUSR1: e.g. SLURM's --signal warning
def test_sigterm_checkpoints_and_exits_cleanly(make_config, tmp_path, sig):
    cfg = make_config(train={"epochs": 200}, log={"run_name": "term"})
    run_dir = Path(cfg.log.output_root) / "term"
    process = start(write_recipe(tmp_path / "recipe.py", cfg))
    wait_for(lambda: len(train_steps(run_dir)) >= 3, process)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, output  # a scheduler can tell preemption from completion
    assert "Traceback" not in output and "Resume with:" in output and f"--resume={run_dir}" in output
    state = read_state(list_checkpoints(run_dir)[-1])
    assert state.step >= 3 and state.step == train_steps(run_dir)[-1]

    cfg.train.max_steps = state.step + 2
    summary = train(cfg, resume=str(run_dir))
    assert summary["step"] == state.step + 2
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
    assert summary["step"] == last + 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_processes_train_exactly_like_one(make_config, tmp_path, capsys, optimizer):
    """1 x batch 8 == 2 processes x batch 4 == 1 x batch 4 x 2 accumulation steps (dropout off)."""
    steps, optim = {"max_steps": 8, "eval_every": 4}, {"name": optimizer, "muon_lr": 0.01}
    one = make_config(optim=optim, train={"batch_size": 8, **steps}, log={"run_name": "one"})
    accumulated = make_config(optim=optim, train={"batch_size": 4, "grad_accum": 2, **steps}, log={"run_name": "accum"})
    two = make_config(optim=optim, train={"batch_size": 4, **steps}, log={"run_name": "two", "tracker": "wandb"})
    train(one)
    train(accumulated)
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1"}  # several CPU processes, asked for explicitly
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(REPO / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               str(REPO / "trainer" / "run.py"), str(write_recipe(tmp_path / "recipe.py", two))]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 processes (DDP), CPU, fp32" in result.stdout

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
        if optimizer == "adamw":
            assert max(report[other]) < 1e-6, report
        else:  # Newton-Schulz runs in bf16 and amplifies last-bit gradient differences in weak directions:
            # losses agree to 1e-4, single weights move by up to a fraction of one update (muon_lr 0.01)
            assert report[other][0] < 5e-4 and report[other][1] < 5e-4 and report[other][2] < 0.01, report
    with capsys.disabled():
        print(f"\n{optimizer} equivalence vs 1x8 (max |train loss diff|, max |eval loss diff|, max |param diff|): {report}")
    # one run, one metrics file, one W&B run, written by the main process only
    assert len(list(root.glob("two*"))) == 1 and len(list(root.glob("*/wandb"))) == 0
    assert len(list((root / "wandb").glob("offline-run-*-two"))) == 1
    tokens = [r["eval/masked_tokens"] for rs in runs.values() for r in rs if "eval/masked_tokens" in r]
    assert len(set(tokens)) == 1  # no duplicated eval samples under 2 processes


def lines_until(process: subprocess.Popen, text: str, timeout: float = 120.0) -> str:
    """Read the process's merged output until a line contains `text`."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"never saw {text!r}:\n{''.join(seen)[-3000:]}")


def test_ctrl_c_checkpoints_and_exits_130_and_a_second_one_stops_at_once(make_config, tmp_path):
    # A model big enough (13M parameters) that saving takes a while after the first Ctrl-C.
    cfg = make_config(model={"hidden_size": 512, "intermediate_size": 2048, "num_heads": 4, "num_layers": 4},
                      train={"epochs": 200, "log_every": 1}, log={"run_name": "ctrlc"})
    run_dir = Path(cfg.log.output_root) / "ctrlc"
    recipe = write_recipe(tmp_path / "recipe.py", cfg)
    process = start(recipe)
    lines_until(process, "step 3 ")
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130 and "SIGINT: stopped at step" in output, output
    stopped = read_state(list_checkpoints(run_dir)[-1]).step

    process = start(recipe, f"--resume={run_dir}")
    lines_until(process, f"step {stopped + 2} ")
    process.send_signal(signal.SIGINT)
    lines_until(process, "SIGINT: finishing the current step")
    process.send_signal(signal.SIGINT)  # while it is still saving
    output, _ = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGINT and "Resume with:" not in output
    assert read_state(list_checkpoints(run_dir)[-1]).step == stopped  # no half-written newer checkpoint counts


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes a launcher started."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == launcher_pid:
            rank = [e for e in environ if e.startswith(b"RANK=")]
            if rank:
                ranks[int(rank[0][5:])] = int(stat.parent.name)
    return ranks


def launch_two(recipe: Path, *args: str) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(REPO / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               str(REPO / "trainer" / "run.py"), str(recipe), *args]
    return subprocess.Popen(command, cwd=REPO, env={**subprocess_env(), "ACCELERATE_USE_CPU": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_stop_together_on_a_signal_to_one_rank_or_to_the_launcher(make_config, tmp_path):
    cfg = make_config(train={"epochs": 200, "batch_size": 4, "log_every": 2}, log={"run_name": "pair"})
    run_dir = Path(cfg.log.output_root) / "pair"
    recipe = write_recipe(tmp_path / "recipe.py", cfg)

    def stopped_together(output: str, who: str) -> int:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "interrupted" and f"{who}: stopped at step" in output, output[-3000:]
        checkpoint = list_checkpoints(run_dir)[-1]
        assert read_state(checkpoint).step == summary["step"] and summary["step"] % 2 == 0  # a logging step
        assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
        return summary["step"]

    launcher = launch_two(recipe)
    lines_until(launcher, "step 6 ")
    os.kill(worker_pids(launcher.pid)[1], signal.SIGTERM)  # rank 1 only; rank 0 learns it at a log step
    output = launcher.communicate(timeout=120)[0]
    first = stopped_together(output, "signal on another process")

    # The printed resume command is the launch as typed (read from the launcher's command line and environment)
    resume = re.search(r"Resume with: (.*)", output).group(1).strip()
    typed = " ".join(launcher.args[:-1]).replace(str(Path(sys.executable).parent / "accelerate"), "accelerate")
    assert resume == f"ACCELERATE_USE_CPU=1 {typed} --resume={run_dir}"
    launcher = subprocess.Popen(["bash", "-c", resume], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={**subprocess_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    lines_until(launcher, f"step {first + 4} ")  # torchrun forwards the launcher's SIGTERM to both
    launcher.send_signal(signal.SIGTERM)
    assert stopped_together(launcher.communicate(timeout=120)[0], "SIGTERM") > first


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (make install tries to build it)")


@needs_deepspeed
def test_deepspeed_zero2_trains_like_one_process_and_the_recipe_decides_accumulation(make_config, tmp_path):
    """DeepSpeed on the CPU (one process, ZeRO-2): batch 4 x 2 accumulation steps == batch 8 without it."""
    steps = {"max_steps": 6, "eval_every": 3}
    plain = make_config(train={"batch_size": 8, **steps}, log={"run_name": "plain"})
    train(plain)
    ds = make_config(train={"batch_size": 4, "grad_accum": 2, **steps}, log={"run_name": "ds"})
    recipe = write_recipe(tmp_path / "recipe.py", ds)

    def launch(config_file: Path) -> subprocess.CompletedProcess:
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config_file),
                   "--num_processes", "1", str(REPO / "trainer" / "run.py"), str(recipe)]
        return subprocess.run(command, cwd=REPO, env={**subprocess_env(), "TRAINER_ALLOW_CPU": "1"},
                              capture_output=True, text=True, timeout=300)

    mismatched = tmp_path / "ds_gas1.yaml"  # a config that sets accumulation itself, as the old one did
    mismatched.write_text((REPO / "accelerate_configs" / "deepspeed_zero2.yaml").read_text().replace(
        "  zero_stage: 2\n", "  zero_stage: 2\n  gradient_accumulation_steps: 1\n"))
    result = launch(mismatched)
    assert result.returncode != 0 and ("error: the DeepSpeed config sets gradient_accumulation_steps=1 but the "
                                       "recipe has train.grad_accum=2") in result.stderr
    recipe = write_recipe(tmp_path / "muon.py", ds.derive(optim={"name": "muon"}))
    result = launch(REPO / "accelerate_configs" / "deepspeed_zero2.yaml")  # Muon needs whole matrices
    assert result.returncode != 0 and "error: optim.name=muon needs whole weight matrices; DEEPSPEED shards" in result.stderr
    recipe = write_recipe(tmp_path / "recipe.py", ds)
    result = launch(REPO / "accelerate_configs" / "deepspeed_zero2.yaml")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "1 process (DeepSpeed), CPU" in result.stdout  # the engine really ran (ZeRO checkpoints below)
    assert (Path(ds.log.output_root) / "ds" / "checkpoints" / "step-000006" / "pytorch_model").is_dir()

    root = Path(plain.log.output_root)
    a, b = (read_jsonl(root / name / "metrics.jsonl") for name in ("plain", "ds"))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for key in ("train/loss", "train/grad_norm", "eval/loss"):
        diffs = [abs(x[key] - y[key]) for x, y in zip(a, b) if key in x]
        assert diffs and max(diffs) < 1e-5, key
    pa, pb = (load_file(str(root / name / "model" / "model.safetensors")) for name in ("plain", "ds"))
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-5


@needs_deepspeed
def test_deepspeed_zero2_two_processes_train_like_one_process_with_twice_the_batch(make_config, tmp_path):
    """2 ranks x batch 4 under DeepSpeed ZeRO-2 on the CPU (gloo) == 1 process x batch 8."""
    steps = {"max_steps": 6, "eval_every": 3}
    one = make_config(train={"batch_size": 8, **steps}, log={"run_name": "one"})
    train(one)
    two = make_config(train={"batch_size": 4, **steps}, log={"run_name": "ds2"})
    command = [sys.executable, "-m", "trainer.launch", "--config_file", str(REPO / "accelerate_configs" / "deepspeed_zero2.yaml"),
               "--num_processes", "2", "--main_process_port", str(free_port()), str(REPO / "trainer" / "run.py"),
               str(write_recipe(tmp_path / "recipe.py", two))]
    result = subprocess.run(command, cwd=REPO, env={**subprocess_env(), "TRAINER_ALLOW_CPU": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 processes (DeepSpeed)" in result.stdout  # one process group of 2, not two runs of 1
    root = Path(one.log.output_root)
    assert {p.name for p in (root / "ds2" / "checkpoints" / "step-000006" / "pytorch_model").glob("*optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}  # ZeRO: one shard per rank

    a, b = (read_jsonl(root / name / "metrics.jsonl") for name in ("one", "ds2"))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for key in ("train/loss", "train/grad_norm", "eval/loss"):
        diffs = [abs(x[key] - y[key]) for x, y in zip(a, b) if key in x]
        assert diffs and max(diffs) < 1e-5, (key, diffs)
    assert len({r["eval/masked_tokens"] for r in a + b if "eval/masked_tokens" in r}) == 1
    pa, pb = (load_file(str(root / name / "model" / "model.safetensors")) for name in ("one", "ds2"))
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-5
