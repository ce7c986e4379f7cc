"""Runs sized by a budget of tokens or of wall time, as Cramming sizes "a BERT in N hours".

A token budget fixes the step count (the budget over the tokens of one optimizer step, rounded down: a
run never trains past it), and the learning-rate schedule spans those steps exactly. A time budget
cannot know its step count in advance: its schedule follows the fraction of the budget spent
(`ProgressSchedule`, the shapes of `optim.schedule` as functions of progress in [0, 1]) and the run
stops at the step where the budget is spent. The time is the run's wall time, evaluations and saves
included, continued across resumes (it is in every checkpoint).

With several processes every rank must take the same learning rate and stop at the same step, but
their clocks differ: they agree on the slowest clock at each logging step (one all-reduce of a float)
and extrapolate between agreements at the pace measured then (`TimeBudget`).
"""

from __future__ import annotations

import math
import re

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(min|h|m|s)", re.IGNORECASE)
_SECONDS = {"h": 3600, "m": 60, "min": 60, "s": 1}


def parse_tokens(text: str) -> int:
    """"500000", "500k", "1.5M", "2e6" -> tokens."""
    match = re.fullmatch(r"\s*([\d.]+(?:e\d+)?)\s*([kmgb]?)\s*", str(text), re.IGNORECASE)
    try:
        tokens = int(float(match.group(1)) * _UNITS[match.group(2).lower()]) if match else 0
    except ValueError:
        tokens = 0
    if tokens < 1:
        raise ValueError(f"{text!r} is not a token count (e.g. 500000, 500k, 1.5M)")
    return tokens


def parse_duration(text: str) -> float:
    """"600" (seconds), "90s", "10m", "1.5h", "1h30m" -> seconds."""
    text = str(text).strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        seconds = sum(float(n) * _SECONDS[unit.lower()] for n, unit in parts)
        if not parts or _DURATION.sub("", text).strip():
            seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"{text!r} is not a duration (e.g. 600, 90s, 10m, 1.5h, 1h30m)")
    return seconds


def budget_steps(token_budget: int, tokens_per_step: int) -> int:
    """Optimizer steps that fit in the budget (at least one)."""
    return max(token_budget // tokens_per_step, 1)


def shape_at_progress(schedule: str, progress: float, warmup_ratio: float, decay_ratio: float) -> float:
    """The learning-rate multiplier of `optim.schedule` at `progress` in [0, 1]: the same curves as the
    step-based schedules of transformers.get_scheduler, with the step count replaced by the budget."""
    p = min(max(progress, 0.0), 1.0)
    if p < warmup_ratio:
        return p / warmup_ratio
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_start = 1.0 - decay_ratio
        return 1.0 if p < decay_start else max(0.0, (1.0 - p) / decay_ratio)
    after = (p - warmup_ratio) / max(1.0 - warmup_ratio, 1e-12)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * after)))
    return max(0.0, 1.0 - after)  # linear


class TimeBudget:
    """Progress through a wall-clock budget, identical on every process (see the module's docstring)."""

    def __init__(self, seconds: float, elapsed: float, step: int):
        self.seconds = seconds
        self.agreed_time, self.agreed_step = elapsed, step  # the last agreement
        self.pace: float | None = None  # seconds per step, measured between the last two agreements
        self.agreements = 0

    def agree(self, accelerator, elapsed: float, step: int) -> None:
        """Take the slowest process's clock (a host sync: call it where the loop syncs anyway)."""
        if accelerator.num_processes > 1:
            import torch

            elapsed = float(accelerator.reduce(torch.tensor(elapsed, device=accelerator.device), reduction="max"))
        if step > self.agreed_step:
            self.pace = (elapsed - self.agreed_time) / (step - self.agreed_step)
        self.agreed_time, self.agreed_step = elapsed, step
        self.agreements += 1

    def needs_pace(self) -> bool:
        """The first steps of a session agree at every step: at its start, after its first step (which
        pays for warm-up and compilation) and after its second, whose pace is the real one."""
        return self.agreements < 3

    def elapsed_at(self, step: int) -> float:
        return self.agreed_time + (step - self.agreed_step) * (self.pace or 0.0)

    def progress(self, step: int) -> float:
        return min(self.elapsed_at(step) / self.seconds, 1.0)

    def spent(self, step: int) -> bool:
        """Whether `step` is the last: the next one would end past the budget."""
        return self.elapsed_at(step + 1) > self.seconds


def progress_schedule(optimizer, schedule: str, warmup_ratio: float, decay_ratio: float, progress):
    """`optim.schedule` over the fraction of a budget spent: `progress(steps_done)` is read at each step
    (LambdaLR passes the steps done, restored from a checkpoint on resume)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda steps_done: shape_at_progress(schedule, progress(steps_done), warmup_ratio, decay_ratio))

