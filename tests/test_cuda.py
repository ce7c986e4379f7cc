"""What only a GPU can show; skipped without CUDA. `make gpu-check` runs these, then the GPU bench and a
full scratch run."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, subprocess_env, write_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "bench" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_auto_precision_is_bf16_only_where_native():
    from trainer.runtime import resolve_mixed_precision

    native = torch.cuda.get_device_capability()[0] >= 8
    assert resolve_mixed_precision("auto") == ("bf16" if native else "fp16")
    assert resolve_mixed_precision("auto", compiled=True) == ("bf16" if native else "no")


def test_a_training_step_never_waits_for_the_gpu(tiny_tokenizer_dir, monkeypatch):
    """CUDA's sync debug mode raises on any host-device synchronisation inside the steps."""
    bench = load_bench()
    monkeypatch.setattr(bench, "tokenizer_source", lambda: str(tiny_tokenizer_dir))
    from trainer.config import Config, ModelConfig
    from trainer.data import MLMCollator, load_tokenizer
    from trainer.model import build_model

    tokenizer = load_tokenizer(str(tiny_tokenizer_dir))
    collator = MLMCollator(tokenizer, 0.15, seed=0)
    blocks = bench.random_blocks(tokenizer, 64)
    batches = [collator([(i * 8 + j, blocks[i * 8 + j]) for j in range(8)]) for i in range(8)]
    cfg = Config(model=ModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128))
    hf, _ = build_model(cfg.model, len(tokenizer))
    step, _, _ = bench.trainer_step(cfg, hf, batches)
    step(0)  # warm-up: allocations, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 8):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_compiled_step_with_cuda_graphs_equals_eager_without_recompiles(tiny_tokenizer_dir, monkeypatch, grad_accum):
    """CUDA graphs over forward and backward, the update compiled without them, gradients in stable
    buffers: the eager step's losses (fp32, TF32 matmuls) with 1 and 2 micro-batches per step (pytorch#96693:
    accumulation into gradients a graph replay overwrites), no recompile, a non-finite update moves nothing."""
    bench = load_bench()
    monkeypatch.setattr(bench, "tokenizer_source", lambda: str(tiny_tokenizer_dir))
    result = bench.static_vs_dynamic(steps=100, batch=8, overrides=["train.mixed_precision=no",
                                                                     f"train.grad_accum={grad_accum}"])
    assert result["recompiles_after_warmup"] == 0 and result["max_abs_loss_diff"] < 3e-3, result
    assert result["gradient_buffers_stable"] and result["nonfinite_update_kept_parameters"], result


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_train_exactly_like_one(make_config, tmp_path):
    from safetensors.torch import load_file

    from trainer.loop import train

    steps = {"max_steps": 8, "eval_every": 4, "mixed_precision": "no"}
    one = make_config(train={"batch_size": 8, **steps}, log={"run_name": "one"})
    train(one)
    two = make_config(train={"batch_size": 4, **steps}, log={"run_name": "two"})
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(REPO / "accelerate_configs" / "multi_gpu.yaml"), "--num_processes", "2",
               str(REPO / "trainer" / "run.py"), str(write_recipe(tmp_path / "recipe.py", two))]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    root = Path(one.log.output_root)
    a, b = (load_file(str(root / n / "model" / "model.safetensors")) for n in ("one", "two"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4  # TF32 matmuls: looser than on CPU


def test_fp32_matmuls_use_tf32(make_config):
    from trainer.loop import train

    train(make_config(train={"max_steps": 1, "mixed_precision": "no"}))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
