"""The GPU paths (issue 23), checked where a CPU can show them: the compiled step's gradient buffers and
refusals, ranks agreeing on a non-finite step, FSDP's mixed-precision policy, DeepSpeed's exported
dtype, non-blocking copies after a resume, and `make gpu-check` reporting every part. What only a GPU
can show is in tests/test_cuda.py (`make gpu-check`)."""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, subprocess_env, write_recipe
from trainer.config import ConfigError
from trainer.loop import train
from trainer.runtime import check_plugins_match_recipe

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (make install tries to build it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_gloo_ranks(check: str, *args: str) -> subprocess.CompletedProcess:
    """tests/ranks.py CHECK on two CPU processes started by torchrun (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(REPO / "tests" / "ranks.py"), check, *args]
    return subprocess.run(command, cwd=REPO, env={**subprocess_env(), "ACCELERATE_USE_CPU": "1"},
                          capture_output=True, text=True, timeout=300)


@needs_deepspeed
@pytest.mark.slow
def test_deepspeed_bf16_exports_the_fp32_master_weights(make_config, tmp_path):
    """ZeRO-2 in bf16 keeps the module in bf16; the saved model holds the optimizer's fp32 weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg = make_config(train={"max_steps": 3, "mixed_precision": "bf16"}, log={"run_name": "ds_bf16"})
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(REPO / "accelerate_configs" / "deepspeed_zero2.yaml"), "--num_processes", "1",
               str(REPO / "trainer" / "run.py"), str(write_recipe(tmp_path / "recipe.py", cfg))]
    result = subprocess.run(command, cwd=REPO, env={**subprocess_env(), "TRAINER_ALLOW_CPU": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "1 process (DeepSpeed), CPU, bf16 mixed precision" in result.stdout
    run_dir = Path(cfg.log.output_root) / "ds_bf16"
    exported = load_file(str(run_dir / "model" / "model.safetensors"))
    masters = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints" / "step-000003"))
    assert {t.dtype for t in exported.values()} == {torch.float32}
    trained = [k for k in exported if f"mlm.{k}" in masters]
    assert len(trained) > 10 and all(torch.equal(exported[k], masters[f"mlm.{k}"].float()) for k in trained)
    assert any(not torch.equal(exported[k], exported[k].bfloat16().float()) for k in trained)  # not bf16 values


def fake_accelerator(device: str, precision: str = "no", distributed="NO"):
    """What check_plugins_match_recipe reads of an Accelerator, for a device this machine lacks."""
    from accelerate.utils import DistributedType

    return SimpleNamespace(device=torch.device(device), mixed_precision=precision,
                           distributed_type=DistributedType[distributed])


@pytest.mark.parametrize("device, precision, overrides, refusal", [
    ("cuda", "bf16", {}, "needs one shape per step .* add --data.mask_count=fixed, or --train.cuda_graphs=false"),
    ("cuda", "fp16", {"data": {"mask_count": "fixed"}}, "does not unscale fp16 gradients .* --train.mixed_precision=no"),
    ("cuda", "bf16", {"data": {"mask_count": "fixed"}}, None),
    ("cuda", "bf16", {"train": {"cuda_graphs": False}}, None),  # Bernoulli masks, no CUDA graphs: one graph per count
    ("cpu", "no", {}, None),  # no CUDA graphs on a CPU
])
def test_compiled_step_refuses_what_it_cannot_run(make_config, device, precision, overrides, refusal):
    cfg = make_config(**{**overrides, "train": {"compile": True, **overrides.get("train", {})}})
    check = lambda: check_plugins_match_recipe(fake_accelerator(device, precision), cfg)  # noqa: E731
    if refusal is None:
        check()
    else:
        with pytest.raises(ConfigError, match=refusal):
            check()


def test_the_bench_refuses_an_fp16_compiled_step_like_the_loop(tiny_tokenizer_dir, monkeypatch):
    """bench.py built its own Accelerator and compiled the update without GradScaler's unscaling; it
    goes through the loop's checks now."""
    import trainer.runtime

    spec = importlib.util.spec_from_file_location("bench", REPO / "bench" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(trainer.runtime, "resolve_mixed_precision", lambda choice, compiled=False: choice)
    monkeypatch.setattr(bench, "tokenizer_source", lambda: str(tiny_tokenizer_dir))
    monkeypatch.setattr("accelerate.Accelerator", lambda **kwargs: fake_accelerator("cuda", kwargs["mixed_precision"]))
    with pytest.raises(ConfigError, match="does not unscale fp16 gradients"):
        bench.run_variant("trainer+compile", batch=2, seconds=0.0, overrides=["train.mixed_precision=fp16"])


@pytest.mark.slow
def test_ranks_agree_on_skipping_a_step_only_one_rank_saw_as_nonfinite():
    """Two gloo ranks, rank 1's loss alone inf (its gradients finite): both skip, parameters stay equal."""
    result = two_gloo_ranks("nonfinite_agreement")
    assert result.returncode == 0 and "OK nonfinite_agreement" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_fsdp2_keeps_the_loss_and_gradient_reduction_in_fp32():
    """The policy the trainer gives FSDP2 in bf16, applied with fully_shard on two gloo ranks."""
    result = two_gloo_ranks("fsdp_policy")
    assert result.returncode == 0 and "OK fsdp_policy" in result.stdout, result.stderr[-3000:]


def test_copies_stay_non_blocking_after_a_mid_epoch_resume(make_config, monkeypatch):
    """accelerate's skip_first_batches rebuilds the loader without non_blocking; the loop sets it back."""
    import accelerate.data_loader

    import trainer.loop

    monkeypatch.setattr(trainer.loop, "cuda_in_use", lambda: True)  # non_blocking is asked for where CUDA is
    cfg = make_config(train={"max_steps": 3, "save_every": 3}, log={"run_name": "nb"})
    train(cfg)
    calls = []

    def recording(tensor, device, non_blocking=False, **kwargs):
        calls.append(non_blocking)
        return original(tensor, device, non_blocking=non_blocking, **kwargs)

    original = accelerate.data_loader.send_to_device
    monkeypatch.setattr(accelerate.data_loader, "send_to_device", recording)
    cfg.train.max_steps = 6
    summary = train(cfg, resume=str(Path(cfg.log.output_root) / "nb"))
    assert summary["step"] == 6 and len(calls) >= 3 and all(calls), calls


@pytest.mark.parametrize("driver, index", [("13.0", None), ("12.9", "cu128"), ("12.6", "cu126"), ("12.4", "error")])
def test_make_install_picks_the_torch_build_the_gpu_driver_runs(driver, index):
    from trainer.runtime import torch_index_for_driver

    header = f"| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: {driver}     |"
    if index == "error":
        with pytest.raises(ConfigError, match="supports CUDA 12.4; torch 2.13 needs 12.6 or newer: update the driver"):
            torch_index_for_driver(header)
    else:
        found = torch_index_for_driver(header)
        assert (found is None) if index is None else found.endswith(f"/whl/{index}")


@pytest.mark.slow
def test_make_gpu_check_runs_every_part_and_fails_naming_the_failed_ones(tmp_path):
    """On a machine that claims a GPU (a fake nvidia-smi) but has none: the CUDA tests skip (pass), the
    bench fails (a recipe that does not exist), the compiled run is refused; all three parts run, the target
    exits 1 naming the two that failed."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    env = {**subprocess_env(), "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    result = subprocess.run(["make", "-o", ".venv/.installed", "gpu-check", "GPU_CHECK_BENCH=--recipe missing.py",
                             f"ARGS=--log.output_root={tmp_path / 'runs'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    for part in ("1/3: CUDA tests", "2/3: GPU bench", "3/3: 3 epochs of recipes/scratch.py, compiled step"):
        assert f"== gpu-check {part}" in output, output[-3000:]
    assert "gpu-check FAILED: bench 3-epoch-run" in output, output[-3000:]
