"""MLM metrics. Perplexity = exp(sum of masked-token cross-entropy / number of masked tokens).

Sums, not means, are accumulated (and all-reduced across processes), so a metric over many batches
or ranks is exactly the metric over all their masked tokens together.
"""

from __future__ import annotations

import math
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
    correct: torch.Tensor | int = 0

    def add(self, token_loss: torch.Tensor, correct: torch.Tensor) -> None:
        self.loss_sum = self.loss_sum + token_loss.detach().float().sum()
        self.tokens = self.tokens + token_loss.numel()
        self.correct = self.correct + correct.sum()

    def merge(self, other: "MLMTotals", keep: torch.Tensor) -> None:
        """Add `other`'s sums if the 0/1 device tensor `keep` is 1 (0: a skipped step), without a host sync."""
        self.loss_sum = self.loss_sum + torch.where(keep > 0, other.loss_sum, 0.0)  # NaN * 0 would be NaN
        self.tokens = self.tokens + other.tokens * keep
        self.correct = self.correct + other.correct * keep

    def compute(self, prefix: str) -> dict[str, float]:
        loss_sum, correct = float(self.loss_sum), round(float(self.correct))
        tokens = round(float(self.tokens))
        mean = loss_sum / max(tokens, 1)
        return {
            f"{prefix}/loss": mean,
            f"{prefix}/perplexity": perplexity(mean),
            f"{prefix}/accuracy": correct / max(tokens, 1),
            f"{prefix}/masked_tokens": tokens,
        }
