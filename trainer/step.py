"""One optimizer step, and what builds it: the optimizer, the learning-rate schedule, the guard that
turns a step with a NaN/inf loss or gradient into a no-op. `bench/bench.py` times this same step.

Loss normalisation (as in Accelerate's gradient_accumulation_for_autoregressive_models example): a
step divides the summed masked-token cross-entropy by the number of masked tokens in the whole step
(all micro-batches, all processes), so 2 processes x batch 4, 1 x 8 and 1 x 4 with 2 accumulation
steps give the same gradients.

Nothing here reads a value back from the device: a training step never waits for the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.config import Config
from trainer.metrics import MLMTotals


def build_optimizer(model, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights (BERT's recipe)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.optim.fused and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                             eps=cfg.optim.eps, fused=fused)


def build_scheduler(optimizer, cfg: Config, total_steps: int):
    """Linear warmup over `optim.warmup_ratio` of the steps, then `optim.schedule`; stepped once per
    optimizer step, whatever the number of processes."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.optim.schedule == "constant" else cfg.optim.schedule
    return get_scheduler(name, optimizer, num_warmup_steps=round(cfg.optim.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def grad_norm_tensor(grad_norm, device: torch.device) -> torch.Tensor:
    """What `accelerator.clip_grad_norm_` returns, as a 0-d float tensor on the device: a tensor (DDP),
    a DTensor (FSDP2), a Python float or None (DeepSpeed, which clips inside its engine)."""
    if grad_norm is None:
        return torch.zeros((), device=device)
    if not isinstance(grad_norm, torch.Tensor):
        return torch.full((), float(grad_norm), device=device)  # a fill kernel, not a host-to-device copy
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    return grad_norm.detach().float().reshape(())


class NonFiniteGuard:
    """Makes the update of a step whose loss or gradient norm is inf/NaN a no-op, and counts such steps.

    Modes: "device": torch's fused AdamW skips the update on the device when given a `found_inf`
    tensor (as GradScaler does), so the step needs no host sync; "host": other optimizers, checked on
    the host every step; "loss": fp16's GradScaler and DeepSpeed already skip overflowing steps
    themselves, so only non-finite losses are counted (a scaler's routine overflow is not divergence).
    Counts stay on the device and are read once per logging interval.
    """

    def __init__(self, accelerator, optimizer, in_a_row: int = 0):
        from accelerate.utils import DistributedType

        self.inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer
        if (getattr(optimizer, "scaler", None) is not None
                or accelerator.distributed_type == DistributedType.DEEPSPEED):
            self.mode = "loss"
        elif getattr(self.inner, "_step_supports_amp_scaling", False):
            self.mode = "device"
        else:
            self.mode = "host"
        zero = torch.zeros((), device=accelerator.device)
        self.skipped, self.longest, self.in_a_row = zero, zero, zero + in_a_row

    def step(self, optimizer, grad_norm: torch.Tensor, loss_sum: torch.Tensor) -> torch.Tensor:
        """optimizer.step() unless the step is non-finite. Returns 1.0 (counted as updated) or 0.0."""
        if self.mode == "loss":
            bad = (~torch.isfinite(loss_sum)).float()
        else:
            bad = (~(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))).float()
        if self.mode == "device":
            self.inner.found_inf = bad
            try:
                optimizer.step()
            finally:
                del self.inner.found_inf
        elif self.mode == "loss" or not bad.item():
            optimizer.step()
        self.skipped = self.skipped + bad
        self.in_a_row = (self.in_a_row + 1) * bad
        self.longest = torch.maximum(self.longest, self.in_a_row)
        return 1.0 - bad

    def read(self) -> tuple[int, int, int]:
        """(non-finite steps, longest run of them, current run) since the last read; a host sync."""
        skipped, longest, in_a_row = (int(x) for x in torch.stack([self.skipped, self.longest, self.in_a_row]).tolist())
        self.skipped, self.longest = torch.zeros_like(self.skipped), self.in_a_row.clone()  # a run goes on
        return skipped, longest, in_a_row


@dataclass
class StepResult:
    totals: MLMTotals  # this process's masked-token sums (device tensors)
    grad_norm: torch.Tensor  # before clipping
    updated: torch.Tensor  # 1.0, or 0.0 for a skipped non-finite step


class TrainStep:
    """Forward and backward over the micro-batches of one optimizer step, clipping, the guarded
    optimizer update and the schedule step."""

    def __init__(self, accelerator, model, optimizer, scheduler, cfg: Config, nonfinite_in_a_row: int = 0):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.seed, self.grad_accum = cfg.train.seed, cfg.train.grad_accum
        self.max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        self.guard = NonFiniteGuard(accelerator, optimizer, in_a_row=nonfinite_in_a_row)

    def __call__(self, window: list[dict], step: int) -> StepResult:
        accelerator, model = self.accelerator, self.model
        # Reseed per step: dropout draws depend only on (seed, step, rank), so a resumed run matches.
        torch.manual_seed(hash((self.seed, step, accelerator.process_index)) & 0x7FFF_FFFF)
        masked = sum(batch["mlm_labels"].numel() for batch in window)  # shapes are host metadata: no sync
        num_items = torch.full((), float(masked), device=accelerator.device)
        if accelerator.num_processes > 1:
            num_items = accelerator.reduce(num_items, reduction="sum")
        num_items = num_items.clamp(min=1.0)
        totals = MLMTotals()
        for batch in window:
            with accelerator.accumulate(model):
                token_loss, correct = model(**batch)
                # x grad_accum: accelerator.backward divides by it; x num_processes: DDP averages over ranks.
                loss = token_loss.sum() / num_items * (self.grad_accum * accelerator.num_processes)
                accelerator.backward(loss)
                totals.add(token_loss, correct)
        grad_norm = grad_norm_tensor(accelerator.clip_grad_norm_(model.parameters(), self.max_norm),
                                     accelerator.device)
        updated = self.guard.step(self.optimizer, grad_norm, totals.loss_sum)
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(totals, grad_norm, updated)
