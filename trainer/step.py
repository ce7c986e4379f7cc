"""One optimizer step, and what builds it: the optimizer, the learning-rate schedule, the guard that
turns a step with a NaN/inf loss or gradient into a no-op. `bench/bench.py` times this same step.

Loss normalisation (as in Accelerate's gradient_accumulation_for_autoregressive_models example): a
step divides the summed masked-token cross-entropy by the number of masked tokens in the whole step
(all micro-batches, all processes), so 2 processes x batch 4, 1 x 8 and 1 x 4 with 2 accumulation
steps give the same gradients.

A step reads nothing back from the device (it never waits for the GPU), except where the guard runs in
"host" mode: an optimizer without a device-side skip (Muon, AdamW with optim.fused=false).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.config import Config
from trainer.metrics import MLMTotals
from trainer.muon import Muon
from trainer.runtime import fast_matmul_dtype, uses_cuda_graphs


def build_optimizer(model, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and LayerNorm weights (BERT's recipe); with optim.name=muon,
    torch's Muon on the hidden matrices instead (all 2-D weights but the embeddings, which are also the
    tied output projection; Newton-Schulz in bf16 where the device runs it natively, else fp32), both
    behind one `Optimizers` that the schedule and Accelerate see as one."""
    o = cfg.optim
    decay, no_decay, hidden = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if o.name == "muon" and param.ndim == 2 and "embeddings" not in name:
            hidden.append(param)
        else:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.compile:  # inductor fuses the update itself; the lr is a tensor so a new value is not a recompile
        adamw = torch.optim.AdamW(groups, lr=torch.tensor(o.lr, device=device), betas=(o.beta1, o.beta2), eps=o.eps,
                                  foreach=True, capturable=True)
    else:
        fused = o.fused and device.type in ("cuda", "cpu")
        adamw = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)
    if not hidden:
        return adamw
    muon = Muon(hidden, ns_dtype=fast_matmul_dtype(device.type), lr=o.muon_lr, weight_decay=o.weight_decay,
                momentum=o.muon_momentum, ns_steps=o.muon_ns_steps)
    return Optimizers(adamw, muon)


class Optimizers(torch.optim.Optimizer):
    """Several optimizers stepped as one. `param_groups` are the parts' own group dicts, read anew each
    time (loading a state dict replaces them), so the schedule's learning rate reaches every part."""

    def __init__(self, *parts: torch.optim.Optimizer):  # no super().__init__: the parts own the groups
        self.parts = parts
        self.defaults = {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    @property
    def state(self):
        return {p: s for part in self.parts for p, s in part.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict) -> None:
        for part, part_state in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(part_state)


def build_scheduler(optimizer, cfg: Config, total_steps: int):
    """Linear warmup over `optim.warmup_ratio` of the steps, then `optim.schedule`; stepped once per
    optimizer step, whatever the number of processes."""
    from transformers import get_scheduler

    o = cfg.optim
    warmup = round(o.warmup_ratio * total_steps)
    if o.schedule == "wsd":
        return get_scheduler("warmup_stable_decay", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                             scheduler_specific_kwargs={"num_decay_steps": round(o.decay_ratio * total_steps),
                                                        "decay_type": "linear"})
    name = "constant_with_warmup" if o.schedule == "constant" else o.schedule
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def step_grad_norm(accelerator, model, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` and return the norm before clipping, as a device tensor. DeepSpeed clips inside
    its engine: its norm is read from the engine, not through Accelerate's wrapper (an `.item()` each step)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return grad_norm_tensor(accelerator.deepspeed_engine_wrapped.engine.get_global_grad_norm(), accelerator.device)
    return grad_norm_tensor(accelerator.clip_grad_norm_(model.parameters(), max_norm), accelerator.device)


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

        self.accelerator = accelerator
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
        return self.record(bad)

    def record(self, bad: torch.Tensor) -> torch.Tensor:
        """Count a step that was (1.0) or was not (0.0) non-finite; returns 1.0 - bad (updated)."""
        self.skipped = self.skipped + bad
        self.in_a_row = (self.in_a_row + 1) * bad
        self.longest = torch.maximum(self.longest, self.in_a_row)
        return 1.0 - bad

    def read(self) -> tuple[int, int, int]:
        """(non-finite steps, longest run of them, current run) since the last read, the most of any
        process (all of them decide alike whether to stop); a host sync."""
        counts = torch.stack([self.skipped, self.longest, self.in_a_row])
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="max")
        skipped, longest, in_a_row = (int(x) for x in counts.tolist())
        self.skipped, self.longest = torch.zeros_like(self.skipped), self.in_a_row.clone()  # a run goes on
        return skipped, longest, in_a_row

    def in_a_row_now(self) -> int:
        """The current run of non-finite steps, for a checkpoint (a host sync, at saves only)."""
        return int(self.in_a_row)


@dataclass
class StepResult:
    totals: MLMTotals  # this process's masked-token sums (device tensors)
    grad_norm: torch.Tensor  # before clipping
    updated: torch.Tensor  # 1.0, or 0.0 for a skipped non-finite step


class TrainStep:
    """Forward and backward over the micro-batches of one optimizer step, clipping, the guarded
    optimizer update and the schedule step.

    With several processes every rank decides on the sum of all ranks' losses whether the step is
    non-finite (gradients are all-reduced, losses are not): one rank's inf loss skips the step everywhere,
    so the replicas never diverge.

    With `train.compile`, torch.compile builds the forward, head and loss (and through AOTAutograd the
    backward), and the clipping with the update. A static shape (`data.mask_count=fixed`) compiles
    once. On a GPU the forward and backward run as CUDA graphs (`train.cuda_graphs`, which needs that
    static shape); the update is compiled without them, so the learning rate (a tensor the schedule
    fills in place) and the gradients are plain inputs. The gradients live in buffers allocated here,
    outside any CUDA-graph memory pool, and are zeroed, never freed: each backward adds into them in
    place, so no graph replay can overwrite a gradient the update has yet to read. A non-finite step
    there zeroes the gradients and the learning rate on the device: the parameters stay as they were,
    Adam's moments decay one step.
    """

    def __init__(self, accelerator, model, optimizer, scheduler, cfg: Config, nonfinite_in_a_row: int = 0):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.seed, self.grad_accum = cfg.train.seed, cfg.train.grad_accum
        self.max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        self.guard = NonFiniteGuard(accelerator, optimizer, in_a_row=nonfinite_in_a_row)
        self.forward_loss, self.update, self.free_grads = forward_loss, None, True
        if cfg.train.compile:
            dynamic = False if cfg.data.mask_count == "fixed" else None
            self.params = [p for p in model.parameters() if p.requires_grad]
            for param in self.params:  # stable gradient buffers (see above)
                param.grad = torch.zeros_like(param)
            self.free_grads = False
            self.forward_loss = torch.compile(forward_loss, dynamic=dynamic, mode="reduce-overhead"
                                              if uses_cuda_graphs(cfg, accelerator.device.type) else None)
            self.update = torch.compile(self.clip_and_update, dynamic=dynamic)

    def __call__(self, window: list[dict], step: int) -> StepResult:
        accelerator, model = self.accelerator, self.model
        # Reseed per step: dropout draws depend only on (seed, step, rank), so a resumed run matches.
        torch.manual_seed(hash((self.seed, step, accelerator.process_index)) & 0x7FFF_FFFF)
        num_items = sum((batch["mlm_labels"] >= 0).sum() for batch in window).float()  # on the device: no sync
        if accelerator.num_processes > 1:
            num_items = accelerator.reduce(num_items, reduction="sum")
        num_items = num_items.clamp(min=1.0)
        # x grad_accum: accelerator.backward divides by it; x num_processes: DDP averages over ranks.
        scale = float(self.grad_accum * accelerator.num_processes)
        totals = MLMTotals()
        for batch in window:
            with accelerator.accumulate(model):
                loss, token_loss, rank = self.forward_loss(model, batch, num_items, scale)
                accelerator.backward(loss)
                totals.add(token_loss, rank)
        loss_sum = totals.loss_sum  # what decides a non-finite step: the same on every rank
        if accelerator.num_processes > 1:
            loss_sum = accelerator.reduce(loss_sum, reduction="sum")
        if self.update is not None:
            grad_norm, bad = self.update(loss_sum)
            updated = self.guard.record(bad)
        else:
            grad_norm = step_grad_norm(accelerator, model, self.max_norm)
            updated = self.guard.step(self.optimizer, grad_norm, loss_sum)
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=self.free_grads)
        return StepResult(totals, grad_norm, updated)

    def clip_and_update(self, loss_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compiled: clip, and update unless non-finite (then zero gradients and lr: no parameter moves)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        bad = ~(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))
        for param in self.params:
            if param.grad is not None:
                param.grad.copy_(torch.where(bad, 0.0, param.grad))  # NaN * 0 would stay NaN
        for group in self.guard.inner.param_groups:
            group["lr"].mul_((~bad).float())  # the schedule sets the next step's lr afterwards
        self.guard.inner.step()
        return grad_norm.detach().float(), bad.float()


def forward_loss(model, batch: dict, num_items: torch.Tensor, scale: float):
    """One micro-batch: per-token losses and label ranks, and the loss to backpropagate (normalised by
    the masked tokens of the whole step)."""
    token_loss, rank = model(**batch)
    return token_loss.sum() / num_items * scale, token_loss, rank


def learning_rates(optimizer) -> dict[str, float]:
    """The learning rate of each optimizer `build_optimizer` made, now: {"adamw": ..., "muon": ...} (Muon's
    only when it runs); a group's lr is a tensor in the compiled step."""
    inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
    parts = inner.parts if isinstance(inner, Optimizers) else (inner,)
    return {name: float(part.param_groups[0]["lr"]) for name, part in zip(("adamw", "muon"), parts)}
