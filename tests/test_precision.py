"""Precision follows the hardware: one rule (`trainer.runtime.fast_bf16`) decides `mixed_precision=auto`
and the dtype of Muon's Newton-Schulz matmuls. This CPU has avx512_bf16; the other kind of machine is
emulated by patching the capability check or with TRAINER_FAST_BF16=0."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import trainer.muon
import trainer.runtime
from trainer.config import ConfigError
from trainer.loop import Trainer
from trainer.muon import Muon, zeropower_via_newtonschulz

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every matmul that runs inside it."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            self.dtypes.append(args[-1].dtype)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def newton_schulz_matmul_dtypes(monkeypatch):
    """The dtypes of the matmuls inside Muon's orthogonalisation (nothing else: forward, AdamW)."""
    recorder = MatmulDtypes()

    def recorded(*args, _original=zeropower_via_newtonschulz, **kwargs):
        with recorder:
            return _original(*args, **kwargs)

    monkeypatch.setattr(trainer.muon, "zeropower_via_newtonschulz", recorded)
    yield recorder.dtypes


@pytest.mark.parametrize("fast", [True, False], ids=["avx512_bf16", "no_bf16"])
def test_one_rule_decides_auto_precision_and_newton_schulz_dtype(make_config, monkeypatch, fast):
    """A real run with mixed_precision=auto and Muon: the CPU kind decides both."""
    monkeypatch.delenv("TRAINER_FAST_BF16", raising=False)
    monkeypatch.setattr(trainer.runtime, "cpu_has_fast_bf16", lambda: fast)
    cfg = make_config(train={"mixed_precision": "auto", "max_steps": 2, "epochs": 1},
                      optim={"name": "muon", "muon_lr": 0.01, "muon_ns_steps": 2})
    run = Trainer(cfg)
    try:
        run.setup()
        with newton_schulz_matmul_dtypes(monkeypatch) as dtypes:
            run.fit()
        assert run.accelerator.mixed_precision == ("bf16" if fast else "no")
    finally:
        run.close()
    hidden_matrices = 2 * 6 + 1  # per layer: q, k, v, attention output, FFN in and out; the head's transform
    assert len(dtypes) == 2 * hidden_matrices * 2 * 3  # 2 steps x matrices x 2 iterations x 3 matmuls
    assert set(dtypes) == {torch.bfloat16 if fast else torch.float32}


def test_trainer_fast_bf16_overrides_the_detection(monkeypatch):
    from trainer.runtime import fast_matmul_dtype, resolve_mixed_precision

    assert trainer.runtime.cpu_has_fast_bf16()  # this session's CPU; the override must win over it
    monkeypatch.setenv("TRAINER_FAST_BF16", "0")
    assert resolve_mixed_precision("auto") == "no" and fast_matmul_dtype("cpu") == torch.float32
    assert resolve_mixed_precision("bf16") == "bf16"  # an explicit choice stays the user's
    monkeypatch.setenv("TRAINER_FAST_BF16", "1")
    monkeypatch.setattr(trainer.runtime, "cpu_has_fast_bf16", lambda: False)
    assert resolve_mixed_precision("auto") == "bf16" and fast_matmul_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("TRAINER_FAST_BF16", "fast")
    with pytest.raises(ConfigError, match=r"TRAINER_FAST_BF16='fast': use 1 .* or 0"):
        resolve_mixed_precision("auto")


def test_bf16_newton_schulz_is_torchs_own():
    """In bf16 the subclass is torch.optim.Muon bitwise: the same iteration, state and update."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.manual_seed(0)
    for shape in ((64, 32), (32, 64), (48, 48)):
        grad = torch.randn(shape)
        ours = zeropower_via_newtonschulz(grad, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.bfloat16)
        assert torch.equal(ours, _zeropower_via_newtonschulz(grad, (3.4445, -4.7750, 2.0315), 5, 1e-7))
    params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32, 96))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, theirs = Muon(params, lr=0.02, ns_dtype=torch.bfloat16), torch.optim.Muon(copies, lr=0.02)
    for _ in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
        assert all(torch.equal(p, q) for p, q in zip(params, copies))
    assert torch.equal(ours.state[params[0]]["momentum_buffer"], theirs.state[copies[0]]["momentum_buffer"])


def test_fp32_update_equals_the_bf16_one_up_to_bf16_rounding():
    """Same gradients, same start: Muon's update in fp32 and in bf16 differ by bf16's rounding, and the fp32
    orthogonalisation is the closer one to the same iteration in fp64."""
    torch.manual_seed(0)
    start = [torch.randn(256, 64) * 0.05, torch.randn(64, 256) * 0.05, torch.randn(64, 64) * 0.05]
    grads = [[torch.randn_like(w) for w in start] for _ in range(3)]
    updates = {}
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        optimizer = Muon(params, lr=0.02, weight_decay=0.0, ns_dtype=dtype)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        updates[dtype] = [p.detach() - w for p, w in zip(params, start)]
    for fp32, bf16 in zip(updates[torch.float32], updates[torch.bfloat16]):
        assert fp32.dtype == torch.float32 and bf16.dtype == torch.float32
        relative = ((fp32 - bf16).norm() / fp32.norm()).item()
        assert 1e-4 < relative < 2e-2, relative  # bf16 keeps 8 significant bits (2^-8 = 3.9e-3 per rounding)
    for g in grads[0]:
        exact = zeropower_via_newtonschulz(g.double(), (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float64)
        errors = {dtype: (zeropower_via_newtonschulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7, dtype).double()
                          - exact).norm().item() for dtype in (torch.float32, torch.bfloat16)}
        assert errors[torch.float32] < errors[torch.bfloat16] / 100, errors


def test_newton_schulz_leaves_the_momentum_buffer_alone():
    """Without Nesterov the update is the momentum buffer itself; the fp32 path must not scale it in place."""
    param = torch.nn.Parameter(torch.randn(32, 16))
    optimizer = Muon([param], lr=0.02, nesterov=False, ns_dtype=torch.float32)
    param.grad = torch.randn_like(param)
    optimizer.step()
    assert torch.allclose(optimizer.state[param]["momentum_buffer"], param.grad * (1 - 0.95))


@pytest.mark.parametrize("capability, eager, compiled", [((9, 0), "bf16", "bf16"), ((7, 5), "fp16", "no")])
def test_auto_precision_on_gpus_by_compute_capability(monkeypatch, capability, eager, compiled):
    """Below compute capability 8 bf16 is emulated: fp16, or fp32 for the compiled step (whose update
    cannot unscale fp16 gradients); Muon's Newton-Schulz in fp32 there."""
    from trainer.runtime import fast_matmul_dtype, resolve_mixed_precision

    monkeypatch.delenv("TRAINER_FAST_BF16", raising=False)
    monkeypatch.setattr(trainer.runtime, "cuda_in_use", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert resolve_mixed_precision("auto") == eager and resolve_mixed_precision("auto", compiled=True) == compiled
    assert fast_matmul_dtype("cuda") == (torch.bfloat16 if eager == "bf16" else torch.float32)


def test_gpu_peak_flops_follow_the_precision(monkeypatch):
    from trainer.metrics import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    peak_flops.cache_clear()
    try:
        assert peak_flops("cuda", "fp16") == 65e12 and peak_flops("cuda", "no") == 8.1e12  # no TF32 on a T4
    finally:
        peak_flops.cache_clear()


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_bench_runs_the_precision_it_is_given(tiny_tokenizer_dir, monkeypatch, precision):
    """`bench.py --set train.mixed_precision=no` times an fp32 step, also on a CPU where auto is bf16."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench", REPO / "bench" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "tokenizer_source", lambda: str(tiny_tokenizer_dir))
    small = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
             f"train.mixed_precision={precision}"]
    recorder = MatmulDtypes()
    with recorder:
        result = bench.run_variant("trainer", batch=2, seconds=0.0, min_steps=2, overrides=small)
    assert result["precision"] == precision
    assert (torch.bfloat16 in recorder.dtypes) == (precision == "bf16")
