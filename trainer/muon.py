"""torch's Muon with its Newton-Schulz orthogonalisation in a dtype the device runs natively.

`torch.optim.Muon` (torch 2.13) casts every update to bf16 before Newton-Schulz, hard-coded. On CPUs
without avx512_bf16/AMX and GPUs below compute capability 8 a bf16 matmul is emulated, ~50x slower
than fp32 on such a CPU, so one Muon step took ~30 s there. This subclass keeps torch's optimizer
(arguments, checks, state layout, `_init_group`, learning-rate adjustment) and runs the same
iteration in `ns_dtype`: bf16 where it is fast (then it equals torch's bitwise; tests/test_precision.py),
fp32 elsewhere (`trainer.runtime.fast_matmul_dtype`, the rule behind `mixed_precision=auto`).
"""

from __future__ import annotations

import torch
from torch.optim._muon import _adjust_lr
from torch.optim.optimizer import _to_scalar


def zeropower_via_newtonschulz(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                               eps: float, dtype: torch.dtype) -> torch.Tensor:
    """torch.optim._muon._zeropower_via_newtonschulz with the compute dtype as an argument (torch: bf16)."""
    a, b, c = ns_coefficients
    ortho = grad.to(dtype, copy=True)  # divided in place below: never the caller's tensor (the momentum buffer)
    if grad.size(0) > grad.size(1):  # iterate on the wide orientation: the Gram matrix is the small one
        ortho = ortho.T
    ortho.div_(ortho.norm().clamp(min=eps))  # spectral norm <= 1
    for _ in range(ns_steps):
        gram = ortho @ ortho.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        ortho = torch.addmm(ortho, gram_update, ortho, beta=a)
    return ortho.T if grad.size(0) > grad.size(1) else ortho


class Muon(torch.optim.Muon):
    """`torch.optim.Muon(params, **kwargs)` whose orthogonalisation runs in `ns_dtype`."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        """torch's `_single_tensor_muon`, with `zeropower_via_newtonschulz(..., self.ns_dtype)`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, momentum_bufs = [], [], []
            self._init_group(group, params, grads, momentum_bufs)
            lr, momentum = _to_scalar(group["lr"]), group["momentum"]
            for param, grad, buf in zip(params, grads, momentum_bufs):
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"],
                                                    group["eps"], self.ns_dtype)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss
