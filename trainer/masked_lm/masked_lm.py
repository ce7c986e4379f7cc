"""Masked-language-model metrics as an `evaluate` module: `evaluate.load("trainer/masked_lm")`.

Inputs are per-example sums over the example's masked tokens, so that examples from several batches
and processes combine token-weighted (a long block with many masked tokens counts for more):

    loss_sum        sum of the cross-entropy of the masked tokens (nats)
    masked_tokens   number of masked tokens
    correct         masked tokens whose label is the top prediction
    top5_correct    masked tokens whose label is among the 5 top predictions

Outputs: loss (sum loss / masked tokens), perplexity (exp(loss), inf past exp(700)), accuracy,
top5_accuracy, masked_tokens.
"""

import math

import datasets
import evaluate

MAX_LOG_PERPLEXITY = 700.0  # exp(709) overflows a float64; as trainer/metrics.py (this module stands alone)


class MaskedLM(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=__doc__.split("\n\n")[1],
            features=datasets.Features({
                "loss_sum": datasets.Value("float64"),
                "masked_tokens": datasets.Value("int64"),
                "correct": datasets.Value("int64"),
                "top5_correct": datasets.Value("int64"),
            }),
        )

    def _compute(self, loss_sum, masked_tokens, correct, top5_correct):
        tokens = sum(masked_tokens)
        loss = math.fsum(loss_sum) / max(tokens, 1)
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if math.isfinite(loss) and loss <= MAX_LOG_PERPLEXITY else math.inf,
            "accuracy": sum(correct) / max(tokens, 1),
            "top5_accuracy": sum(top5_correct) / max(tokens, 1),
            "masked_tokens": tokens,
        }
