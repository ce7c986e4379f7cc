"""The run's model directory: the inner `BertForMaskedLM` saved with `save_pretrained`, its tokenizer,
and a model card. `pipeline("fill-mask", model="runs/<run>/model")` and every HF tool load it."""

from __future__ import annotations

import shutil
from pathlib import Path

from trainer.checkpoint import CheckpointError, any_process_failed

TOKENIZER_BYTES = 2**20  # vocab.txt + tokenizer.json of BERT's vocabulary, rounded up


def master_state_dict(accelerator, model) -> dict:
    """The model's state dict with the weights the optimizer trains: DeepSpeed in bf16/fp16 keeps the
    module in that precision and the fp32 master weights in its (ZeRO-partitioned) optimizer, so those
    are gathered instead (a collective: every process calls this)."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.distributed_type.value != "DEEPSPEED" or accelerator.mixed_precision not in ("bf16", "fp16"):
        return state_dict
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}  # by parameter: tied weights stay one tensor
    for name, param in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        if id(param) not in masters:
            masters[id(param)] = safe_get_full_fp32_param(param)
        if masters[id(param)] is not None and name in state_dict:
            state_dict[name] = masters[id(param)].detach().to("cpu")
    return state_dict


def save_model(accelerator, model, tokenizer, model_dir: Path, resume_hint: str) -> None:
    """Save on the main process (FSDP/DeepSpeed shards are gathered first). A failure (a full disk)
    removes the partial directory and is one line naming the space needed; checkpoints stay intact."""
    state_dict = master_state_dict(accelerator, model)
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


def write_model_card(model_dir: Path, cfg, summary: dict, model_config, samples: list[list] | None,
                     command: list[str] | None) -> None:
    """model/README.md in the Hugging Face model-card format (YAML metadata, then markdown)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from trainer.console import fmt

    data = cfg.data
    dataset = Path(data.dataset).name  # "wikitext", or the local copy's directory name
    metrics = [("loss", "final/eval_loss"), ("perplexity", "final/eval_perplexity"), ("accuracy", "final/eval_accuracy")]
    card_data = ModelCardData(
        language="en", library_name="transformers", pipeline_tag="fill-mask", license="apache-2.0",
        model_name=summary["run_id"], base_model=cfg.model.pretrained, datasets=[dataset],
        tags=["bert", "masked-lm", "bert-mlm-trainer", cfg.name], metrics=["perplexity", "accuracy"],
        eval_results=[EvalResult(task_type="fill-mask", dataset_type=dataset, dataset_name=dataset,
                                 dataset_config=data.dataset_config, dataset_split="validation", metric_type=name,
                                 metric_value=summary[key]) for name, key in metrics if summary.get(key) is not None])
    rows = "\n".join(f"| {name} | {fmt(summary.get(key))} |" for name, key in [
        ("final validation loss", "final/eval_loss"), ("final validation perplexity", "final/eval_perplexity"),
        ("final validation accuracy", "final/eval_accuracy"), ("best validation perplexity", "best/eval_perplexity"),
        ("final training loss", "final/train_loss"), ("optimizer steps", "steps"), ("tokens seen", "tokens_seen"),
        ("wall time (s)", "wall_time_s"), ("training tokens/s", "train/tokens_per_s")])
    sample_rows = "\n".join(f"| {probe} | {predictions} |" for probe, predictions, *_ in samples or [])
    body = f"""
# {summary['run_id']}

A `BertForMaskedLM` trained with masked language modelling by bert-mlm-trainer, recipe
`{cfg.name}`{' (interrupted at step ' + str(summary['steps']) + ')' if summary['status'] != 'finished' else ''}.

```python
from transformers import pipeline
fill = pipeline("fill-mask", model="{model_dir}")
fill("The capital of France is [MASK].")
```

## Model

{model_config.num_hidden_layers} layers, hidden size {model_config.hidden_size}, {model_config.num_attention_heads} heads,
feed-forward {model_config.intermediate_size}, {model_config.max_position_embeddings} positions, vocabulary
{model_config.vocab_size:,}; {summary['parameters']:,} parameters (the output projection is tied to the word
embeddings). {'Started from `' + cfg.model.pretrained + '`.' if cfg.model.pretrained else 'Trained from scratch.'}

## Training

Data: `{data.train_dataset or data.dataset}` (train), `{data.dataset}` (validation); {data.block_size}-token
blocks; {data.mlm_probability:.0%} of tokens masked in training (80% [MASK], 10% random, 10% kept), 15% in
evaluation with fixed masks. Optimizer {cfg.optim.name} (lr {cfg.optim.lr:g}), {cfg.optim.schedule} schedule,
batch {cfg.train.batch_size} x {cfg.train.grad_accum} accumulation per process, {cfg.train.epochs} epochs, precision
`{cfg.train.mixed_precision}`, seed {cfg.train.seed}.

Command: `{' '.join(command or ['(library call)'])}`; the full configuration is `config.json` in the run directory.

## Results

| metric | value |
| --- | --- |
{rows}

## Fill-mask samples

| probe | top predictions |
| --- | --- |
{sample_rows or '| (none: the run was interrupted) | |'}
"""
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}").save(model_dir / "README.md")
