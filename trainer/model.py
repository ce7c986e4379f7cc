"""Model: a plain HF `BertForMaskedLM`, built from scratch or from a checkpoint, and `SparseMLM`,
the training wrapper that runs the MLM output head only on the masked positions.

The head (a 256->256 transform and a 256->30,522 projection) costs more than the 3-layer encoder when
applied to all 128 positions; only ~15% of them have a label, so gathering those rows first makes a
step ~3x faster on CPU with the same loss and gradients. What gets saved is the inner
`BertForMaskedLM`, so `pipeline("fill-mask")` and any HF tool load it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from trainer.config import ModelConfig


class ModelError(ValueError):
    """A model that cannot be loaded or does not fit the data; reported as one line."""


@dataclass
class LoadReport:
    new_weights: list[str]  # created fresh (e.g. the MLM head of an encoder-only checkpoint)
    unused_weights: list[str]  # in the checkpoint but not in BertForMaskedLM (e.g. a pooler)


def build_model(cfg: ModelConfig, vocab_size: int) -> tuple[BertForMaskedLM, LoadReport]:
    if cfg.pretrained:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load table would repeat the report the loop prints
        try:
            model, info = BertForMaskedLM.from_pretrained(
                cfg.pretrained, output_loading_info=True, attn_implementation=cfg.attn_implementation
            )
        except Exception as e:
            raise ModelError(
                f"could not load model {cfg.pretrained!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                f"pass a local directory with config.json and model.safetensors"
            ) from e
        finally:
            hf_logging.set_verbosity(verbosity)
        report = LoadReport(sorted(info["missing_keys"]), sorted(info["unexpected_keys"]))
    else:
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            initializer_range=cfg.init_std,
        )
        config._attn_implementation = cfg.attn_implementation
        model = BertForMaskedLM(config)
        with torch.no_grad():
            if cfg.sinusoidal_position_init:
                table = model.bert.embeddings.position_embeddings.weight
                table.copy_(sinusoids(table.shape[0], table.shape[1]) * cfg.init_std)
            if cfg.zero_init_output:
                for layer in model.bert.encoder.layer:
                    layer.attention.output.dense.weight.zero_()
                    layer.output.dense.weight.zero_()
        report = LoadReport([], [])
    if cfg.init_from:
        load_checkpoint_weights(model, cfg.init_from)
    if model.config.vocab_size < vocab_size and not cfg.resize_embeddings:
        raise ModelError(
            f"tokenizer has {vocab_size} tokens but the model's embeddings have {model.config.vocab_size} rows; "
            f"use the tokenizer the model was trained with (or --model.resize_embeddings=true)"
        )
    return model, report


def match_vocabulary(model: BertForMaskedLM, tokenizer, cfg: ModelConfig, tokenizer_name: str) -> str | None:
    """A pretrained model's embedding rows belong to its own vocabulary: another tokenizer would feed it
    the wrong rows. Refused unless `model.resize_embeddings`, which resizes the embeddings (new rows
    start untrained; rows of tokens both share keep their ids only if the vocabularies agree there).
    Compared with the tokenizer saved beside the model where there is one, else by size."""
    from transformers import AutoTokenizer

    try:
        same = AutoTokenizer.from_pretrained(cfg.pretrained).get_vocab() == tokenizer.get_vocab()
    except Exception:  # no tokenizer beside the weights
        same = model.config.vocab_size == len(tokenizer)
    if same:
        return None
    if not cfg.resize_embeddings:
        raise ModelError(f"tokenizer {tokenizer_name} ({len(tokenizer):,} tokens) is not the vocabulary "
                         f"{cfg.pretrained} was trained with ({model.config.vocab_size:,} rows): use the model's own "
                         f"(--data.tokenizer={cfg.pretrained}), or resize its embeddings to the new vocabulary with "
                         f"--model.resize_embeddings=true (the new rows start untrained)")
    model.resize_token_embeddings(len(tokenizer))
    return f"embeddings resized to the tokenizer's {len(tokenizer):,} tokens (model.resize_embeddings)"


def sinusoids(length: int, dim: int) -> torch.Tensor:
    """The Transformer's sin/cos position table, scaled to unit std: position p+k is a fixed linear map
    of position p, which makes "attend to the next token" easy to learn."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-torch.log(torch.tensor(1e4)) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]  # odd dim: one sine more than cosines
    return table * 2**0.5


def load_checkpoint_weights(model: BertForMaskedLM, checkpoint: str) -> None:
    """Start from the model weights of a training checkpoint (Accelerate's `model.safetensors`, keys
    under the training wrapper's `mlm.`); every weight must be there with its shape."""
    from safetensors.torch import load_file

    path = Path(checkpoint) / "model.safetensors"
    try:
        saved = {k.removeprefix("mlm."): v for k, v in load_file(str(path)).items()}
    except Exception as e:  # missing, or not a safetensors file
        raise ModelError(f"model.init_from={checkpoint}: cannot read {path.name} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); name a checkpoint directory "
                         f"runs/<run>/checkpoints/step-N") from e
    expected = model.state_dict()
    tied = {name for name in expected if name not in saved and any(
        expected[name].data_ptr() == expected[other].data_ptr() for other in saved if other in expected)}
    wrong = sorted({*(set(expected) - set(saved) - tied), *(set(saved) - set(expected))}
                   | {k for k in saved if k in expected and saved[k].shape != expected[k].shape})
    if wrong:
        raise ModelError(f"model.init_from={checkpoint}: its weights do not fit this model ({', '.join(wrong[:4])}"
                         f"{', ...' if len(wrong) > 4 else ''}); use the model config the checkpoint was trained with")
    model.load_state_dict(saved, strict=False)


def check_block_size(model: BertForMaskedLM, block_size: int) -> None:
    if block_size > model.config.max_position_embeddings:
        raise ModelError(
            f"data.block_size={block_size} exceeds the model's max_position_embeddings="
            f"{model.config.max_position_embeddings}; lower --data.block_size"
        )


def check_attention_fits(num_layers: int, num_heads: int, block_size: int, batch_size: int, device) -> None:
    """Refuse, before anything is allocated, a block size whose attention would not fit in memory: the
    CPU and eager paths keep scores, probabilities and the dropout mask (fp32, B x heads x L x L) of
    every layer for the backward pass. CUDA's fused attention kernels keep none of that: not checked there."""
    if torch.device(device).type != "cpu":
        return
    needed = 3 * 4 * batch_size * num_heads * block_size**2 * num_layers
    available = available_memory(device)
    if available is not None and needed > available:
        raise ModelError(f"data.block_size={block_size}: attention over {batch_size} blocks x {num_heads} heads x "
                         f"{block_size}^2 positions x {num_layers} layers needs ~{needed / 2**30:.1f} GiB, "
                         f"{available / 2**30:.1f} GiB is available; lower --data.block_size or --train.batch_size")


def available_memory(device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (the tied output projection counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------- fast dropout
# On CPU, torch's dropout draws one float per element (bernoulli_), and SDPA with dropout_p > 0 falls
# back to an unfused path: together ~30% of a training step of the scratch model. Drawing 16 random
# bits per element from int32 draws is ~3x cheaper and keeps p exact to 1e-5. The modules and the
# attention function below are swapped in for training only; saved models are plain HF BERT.

ATTENTION_WITH_FAST_DROPOUT = "sdpa_fast_dropout"


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    if p <= 0.0:
        return x
    bits = torch.empty((x.numel() + 1) // 2, dtype=torch.int32, device=x.device).random_(-(2**31), 2**31 - 1)
    threshold = round(p * 65536) - 32768  # int16 values are uniform on [-32768, 32767]
    keep = bits.view(torch.int16)[: x.numel()].view(x.shape) >= threshold
    return x * keep * (1.0 / (1.0 - p))


class FastDropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p) if self.training else x


def sdpa_with_fast_dropout(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for BERT: SDPA unless dropout is active on an unmasked block (training), then
    softmax(QK^T) with `fast_dropout` on the probabilities (what eager attention computes)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0 or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    probs = torch.matmul(query, key.transpose(2, 3)).mul_(scaling).softmax(-1)
    output = torch.matmul(fast_dropout(probs, dropout), value)
    return output.transpose(1, 2).contiguous(), None


def use_fast_dropout(model: BertForMaskedLM) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_WITH_FAST_DROPOUT, sdpa_with_fast_dropout)
    for name, child in list(model.named_modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is nn.Dropout:
                setattr(child, attr, FastDropout(sub.p).train(sub.training))
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(ATTENTION_WITH_FAST_DROPOUT)


class RowsGradEmbedding(nn.Embedding):
    """The input embedding whose backward is sparse (only the rows looked up). Its weight is tied to the
    output projection, whose gradient is dense: autograd adds the rows into that gradient, instead of
    zero-filling a second vocab x hidden gradient and adding the two (memory-bound passes over 31 MB
    for the scratch model, a few % of a CPU step). The parameter's gradient stays dense, so AdamW and
    DDP (which sees `sparse=False`) are unchanged."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, sparse=True)


def use_rows_grad_embedding(model: BertForMaskedLM) -> None:
    """Swap in `RowsGradEmbedding` (same Parameter) where the word embeddings are tied to the decoder."""
    embeddings = model.get_input_embeddings()
    if type(embeddings) is not nn.Embedding or model.get_output_embeddings().weight is not embeddings.weight:
        return  # untied, its gradient would be sparse alone: AdamW takes dense gradients only
    rows_grad = RowsGradEmbedding(embeddings.num_embeddings, embeddings.embedding_dim, embeddings.padding_idx,
                                  device="meta")
    rows_grad.weight = embeddings.weight
    model.set_input_embeddings(rows_grad)


def training_model(hf_model: BertForMaskedLM, cfg, device: torch.device) -> SparseMLM:
    """What the training step runs (the loop and bench/bench.py): the masked-rows-only head; on CPU in
    eager mode fast dropout (CUDA's dropout kernels are fused already, and under torch.compile inductor
    generates its own) and the word embeddings' row-sparse backward."""
    if device.type == "cpu" and not cfg.train.compile:
        if cfg.model.fast_dropout:
            use_fast_dropout(hf_model)
        use_rows_grad_embedding(hf_model)
    return SparseMLM(hf_model)


class SparseMLM(nn.Module):
    """Training/eval view of a `BertForMaskedLM`: encoder on all tokens, head only where there is a label.

    forward returns per-predicted-token cross-entropy (M,) in fp32 and the rank of the label among the
    predictions (M,): 0 when it is the top prediction, < 5 when it is among the top 5; rows labelled
    -100 (padding of a fixed mask count) have loss 0 and rank -1.
    It goes through `nn.Module.__call__`, so DDP/FSDP wrappers see it as the model's forward.
    """

    def __init__(self, mlm: BertForMaskedLM):
        super().__init__()
        self.mlm = mlm

    def forward(
        self, input_ids: torch.Tensor, mlm_positions: torch.Tensor, mlm_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.mlm.bert(input_ids=input_ids).last_hidden_state  # full blocks: no attention mask
        rows = hidden.flatten(0, 1).index_select(0, mlm_positions)
        logits = self.mlm.cls(rows).float()
        token_loss = F.cross_entropy(logits, mlm_labels, reduction="none", ignore_index=-100)
        scores, labels = logits.detach(), mlm_labels.clamp(min=0)[:, None]
        label_logit = scores.gather(1, labels)
        # The label's place in a stable descending sort: ties rank by index, as argmax does (bf16 ties often).
        ahead = (scores > label_logit) | ((scores == label_logit) & (torch.arange(scores.size(1), device=scores.device) < labels))
        rank = ahead.sum(-1)  # 0: the label is the top prediction (argmax)
        return token_loss, rank.masked_fill(mlm_labels < 0, -1)  # -1: an ignored (padding) row
