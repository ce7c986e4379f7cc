"""Checks that need two processes, run by tests/test_gpu_paths.py on two CPU ranks (gloo):

    python -m torch.distributed.run --nproc_per_node 2 tests/ranks.py nonfinite_agreement
    python -m torch.distributed.run --nproc_per_node 2 tests/ranks.py fsdp_policy

Each raises on a failed check; rank 0 prints "OK <check>" when all held.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB = 40


def tiny_model():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)  # the same weights on both ranks
    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0))


def batch(seed: int) -> dict:
    """A micro-batch in the collator's format: 4 blocks of 16 tokens, 10 of them to predict."""
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, VOCAB, (4, 16), generator=generator),
            "mlm_positions": torch.randperm(64, generator=generator)[:10],
            "mlm_labels": torch.randint(5, VOCAB, (10,), generator=generator)}


def nonfinite_agreement() -> None:
    """Rank 1's loss alone is inf at step 2 (its gradients stay finite): every rank must skip that step,
    with fused AdamW (decided on the device) and unfused (decided on the host), and the replicas stay equal."""
    from accelerate import Accelerator

    from trainer.config import Config, ModelConfig, TrainConfig
    from trainer.model import training_model
    from trainer.step import TrainStep, build_optimizer, forward_loss

    def inf_loss(model, micro_batch, num_items, scale):
        loss, token_loss, rank = forward_loss(model, micro_batch, num_items, scale)
        inf = torch.tensor(float("inf"))
        return loss + inf, token_loss + inf, rank

    for fused in (True, False):
        accelerator = Accelerator(cpu=True)
        assert accelerator.num_processes == 2, accelerator.distributed_type
        cfg = Config(model=ModelConfig(dropout=0.0), train=TrainConfig(mixed_precision="no"))
        cfg.optim.fused = fused
        model = training_model(tiny_model(), cfg, accelerator.device)
        model, optimizer = accelerator.prepare(model, build_optimizer(model, cfg, accelerator.device))
        step = TrainStep(accelerator, model, optimizer, None, cfg)
        for i in range(4):
            step.forward_loss = inf_loss if (i == 2 and accelerator.process_index == 1) else forward_loss
            step([batch(10 * i + accelerator.process_index)], i)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        replicas = accelerator.gather(flat[None])
        assert torch.equal(replicas[0], replicas[1]), f"fused={fused}: the replicas diverged"
        skipped, _, _ = step.guard.read()
        assert skipped == 1, f"fused={fused}: {skipped} skipped steps, expected 1"
        accelerator.free_memory()


def fsdp_policy() -> None:
    """The policy the trainer gives FSDP2 for bf16: parameters in bf16, gradient reduction and the root's
    outputs in fp32 (Accelerate's own is bf16 for all three), applied with `fully_shard`."""
    import torch.distributed as dist
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import fully_shard

    from trainer.config import Config
    from trainer.model import SparseMLM
    from trainer.runtime import check_plugins_match_recipe

    dist.init_process_group("gloo")
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")  # what Accelerate does for mixed_precision=bf16
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, mixed_precision="bf16",
                                  device=torch.device("cpu"), state=SimpleNamespace(fsdp_plugin=plugin))
    check_plugins_match_recipe(accelerator, Config())  # the trainer's call, before prepare
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (
        torch.bfloat16, torch.float32, torch.float32), policy
    model = SparseMLM(tiny_model())
    for layer in model.mlm.bert.encoder.layer:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as Accelerate runs the forward in bf16
        token_loss, _ = model(**batch(dist.get_rank()))
    assert token_loss.dtype == torch.float32, f"token_loss {token_loss.dtype}"
    token_loss.mean().backward()
    dtypes = {p.grad.dtype for p in model.parameters()}
    assert dtypes == {torch.float32}, dtypes
    dist.destroy_process_group()


if __name__ == "__main__":
    check = sys.argv[1]
    {"nonfinite_agreement": nonfinite_agreement, "fsdp_policy": fsdp_policy}[check]()
    if os.environ.get("RANK", "0") == "0":
        print(f"OK {check}", flush=True)
