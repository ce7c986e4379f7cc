"""The run's model directory: the inner `BertForMaskedLM` saved with `save_pretrained`, its tokenizer,
and a model card. `pipeline("fill-mask", model="runs/<run>/model")` and every HF tool load it."""

from __future__ import annotations

import shutil
from pathlib import Path

from trainer.checkpoint import CheckpointError, any_process_failed

TOKENIZER_BYTES = 2**20  # vocab.txt + tokenizer.json of BERT's vocabulary, rounded up


def save_model(accelerator, model, tokenizer, model_dir: Path, resume_hint: str) -> None:
    """Save on the main process (FSDP/DeepSpeed shards are gathered first). A failure (a full disk)
    removes the partial directory and is one line naming the space needed; checkpoints stay intact."""
    state_dict = accelerator.get_state_dict(model)
    error = None
    if accelerator.is_main_process:
        state_dict = {k.removeprefix("mlm."): v for k, v in state_dict.items()}
        try:
            accelerator.unwrap_model(model).mlm.save_pretrained(model_dir, state_dict=state_dict)
            tokenizer.save_pretrained(model_dir)
        except Exception as e:  # OSError, SafetensorError, RuntimeError: all mean "not saved"
            error = e
            shutil.rmtree(model_dir, ignore_errors=True)
    if any_process_failed(accelerator, error is not None):
        needed = sum(t.numel() * t.element_size() for t in state_dict.values()) + TOKENIZER_BYTES
        free = shutil.disk_usage(model_dir.parent).free if model_dir.parent.exists() else 0
        reason = getattr(error, "strerror", None) or str(error or "failed on another process").splitlines()[0][:200]
        raise CheckpointError(f"cannot save the model to {model_dir} ({reason}): it needs ~{needed / 2**20:.0f} MiB, "
                              f"{free / 2**20:.0f} MiB are free there; the checkpoints are intact: free some space, "
                              f"then {resume_hint}")
