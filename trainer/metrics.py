"""MLM metrics and the per-interval accounting of training.

Perplexity = exp(sum of masked-token cross-entropy / number of masked tokens). Sums, not means, are
accumulated (and all-reduced across processes), so a metric over many batches or ranks is exactly the
metric over all their masked tokens together.

`IntervalMeter` owns what one logging interval adds up (loss sums, gradient norms, steps, tokens,
time) and turns it into the `train/*` record; `model_flops_per_token` and `peak_flops` give its MFU.
"""

from __future__ import annotations

import functools
import math
import resource
import time
from dataclasses import dataclass

import torch

MAX_LOG_PERPLEXITY = 700.0  # exp(709) overflows a float64; report inf past this instead of raising


def perplexity(mean_loss: float) -> float:
    if not math.isfinite(mean_loss) or mean_loss > MAX_LOG_PERPLEXITY:
        return math.inf
    return math.exp(mean_loss)


@dataclass
class MLMTotals:
    """Running sums over masked tokens. Tensors stay on the device until `.compute()`."""

    loss_sum: torch.Tensor | float = 0.0
    tokens: torch.Tensor | int = 0
    correct: torch.Tensor | int = 0  # the label is the top prediction
    top5: torch.Tensor | int = 0  # the label is among the top 5

    def add(self, token_loss: torch.Tensor, rank: torch.Tensor) -> None:
        """`rank` of each label among the predictions; -1 marks an ignored row."""
        self.loss_sum = self.loss_sum + token_loss.detach().float().sum()
        self.tokens = self.tokens + (rank >= 0).sum()
        self.correct = self.correct + (rank == 0).sum()
        self.top5 = self.top5 + ((rank >= 0) & (rank < 5)).sum()

    def merge(self, other: MLMTotals, keep: torch.Tensor) -> None:
        """Add `other`'s sums if the 0/1 device tensor `keep` is 1 (0: a skipped step), without a host sync."""
        self.loss_sum = self.loss_sum + torch.where(keep > 0, other.loss_sum, 0.0)  # NaN * 0 would be NaN
        self.tokens = self.tokens + other.tokens * keep
        self.correct = self.correct + other.correct * keep
        self.top5 = self.top5 + other.top5 * keep

    def reduced(self, accelerator) -> MLMTotals:
        """The sums over all processes, on the host (one all-reduce, one host sync)."""
        packed = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=accelerator.device)
                              for x in (self.loss_sum, self.tokens, self.correct, self.top5)])
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        loss_sum, tokens, correct, top5 = packed.tolist()
        return MLMTotals(loss_sum, round(tokens), round(correct), round(top5))

    def compute(self, prefix: str) -> dict[str, float]:
        loss_sum, tokens = float(self.loss_sum), max(round(float(self.tokens)), 1)
        mean = loss_sum / tokens
        return {
            f"{prefix}/loss": mean,
            f"{prefix}/perplexity": perplexity(mean),
            f"{prefix}/accuracy": round(float(self.correct)) / tokens,
            f"{prefix}/top5_accuracy": round(float(self.top5)) / tokens,
            f"{prefix}/masked_tokens": round(float(self.tokens)),
        }


class IntervalMeter:
    """What the steps of one logging interval add up to; `flush` turns it into the `train/*` metrics.

    Step time is wall time since the previous step ended, so data loading counts; work that is not
    training (evaluation, checkpoints, logging) calls `restart_clock` and is left out. Device sums
    are read only in `flush`.
    """

    def __init__(self, device: torch.device, flops_per_token: float, peak_flops: float | None):
        self.device, self.flops_per_token, self.peak_flops = device, flops_per_token, peak_flops
        self.session_tokens = self.session_seconds = 0.0  # this process's lifetime (a resume restarts it)
        self.reset()
        self.restart_clock()

    def reset(self) -> None:
        self.totals, self.grad_norm_sum = MLMTotals(), torch.zeros((), device=self.device)
        self.grad_norm_steps = torch.zeros((), device=self.device)
        self.steps, self.tokens, self.seconds = 0, 0, 0.0

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def add(self, totals: MLMTotals, grad_norm: torch.Tensor, updated: torch.Tensor, tokens: int) -> None:
        now = time.perf_counter()
        self.totals.merge(totals, keep=updated)
        counted = (updated > 0) & torch.isfinite(grad_norm)  # a scaler's overflow step is updated=1 with an inf norm
        self.grad_norm_sum = self.grad_norm_sum + torch.where(counted, grad_norm, 0.0)
        self.grad_norm_steps = self.grad_norm_steps + counted
        self.steps, self.tokens, self.seconds = self.steps + 1, self.tokens + tokens, self.seconds + now - self.clock
        self.session_tokens, self.session_seconds = self.session_tokens + tokens, self.session_seconds + now - self.clock
        self.clock = now

    def flush(self, accelerator, skipped: int) -> dict[str, float]:
        """The interval's metrics (empty if every step was skipped), then start a new interval."""
        metrics = {}
        if self.steps > skipped:
            tokens_per_s = self.tokens / max(self.seconds, 1e-9)
            metrics = {
                **self.totals.reduced(accelerator).compute("train"),
                "train/grad_norm": float(self.grad_norm_sum) / max(float(self.grad_norm_steps), 1),  # before clipping
                "train/tokens_per_s": tokens_per_s,
                "train/peak_memory_gib": peak_memory_bytes(self.device) / 2**30,
            }
            mfu = self.mfu(tokens_per_s, accelerator.num_processes)
            if mfu is not None:
                metrics["train/mfu"] = mfu
        self.reset()
        return metrics

    def mfu(self, tokens_per_s: float | None, processes: int) -> float | None:
        """Model FLOPs utilisation: tokens/s counts every process's tokens, the peak is one device's."""
        if not self.peak_flops or tokens_per_s is None:
            return None
        return tokens_per_s * self.flops_per_token / (self.peak_flops * processes)

    @property
    def session_tokens_per_s(self) -> float | None:
        return self.session_tokens / self.session_seconds if self.session_seconds else None


def model_flops_per_token(config, block_size: int, mlm_probability: float) -> float:
    """Matmul FLOPs of one training token, forward and backward (3x forward): the encoder on every
    token, attention scores over the block, the MLM head on the masked share of tokens only."""
    h, f, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    encoder = layers * (2 * (4 * h * h + 2 * h * f) + 2 * 2 * block_size * h)
    head = mlm_probability * 2 * (h * h + h * vocab)
    return 3.0 * (encoder + head)


# Dense tensor-core peaks (no sparsity), FLOP/s, by device name: (bf16/fp16, fp32). From compute
# capability 8 on, fp32 matmuls run as TF32 (runtime.enable_tf32) at half the bf16 rate; V100 and T4
# have fp16 tensor cores only (bf16 is emulated) and plain fp32 units.
GPU_PEAKS = {"H200": (989e12, 494e12), "H100": (989e12, 494e12), "A100": (312e12, 156e12),
             "L40S": (362e12, 181e12), "L4": (121e12, 60e12), "A10": (125e12, 62e12),
             "RTX 4090": (165e12, 82e12), "RTX 3090": (71e12, 35e12), "V100": (125e12, 15.7e12),
             "T4": (65e12, 8.1e12)}


@functools.cache
def peak_flops(device_type: str, precision: str) -> float | None:
    """One device's peak matmul FLOP/s: a table for known GPUs; on CPU, the fastest of 0.4 s of 2048^3
    matmuls in the run's precision, measured once per process (other load on the machine lowers it)."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        low, fp32 = next((v for k, v in GPU_PEAKS.items() if k in name), (None, None))
        return low if precision in ("bf16", "fp16") else fp32
    if device_type != "cpu":
        return None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(2048, 2048, dtype=dtype)
    best, deadline = float("inf"), time.perf_counter() + 0.4
    while time.perf_counter() < deadline:  # the fastest single call: robust to other processes' load
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def peak_memory_bytes(device: torch.device) -> float:
    """The CUDA allocator's peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
