"""The run's model directory: the inner `BertForMaskedLM` saved with `save_pretrained`, its tokenizer,
and a model card. `pipeline("fill-mask", model="runs/<run>/model")` and every HF tool load it."""

from __future__ import annotations

import shutil
from pathlib import Path

from trainer.checkpoint import CheckpointError, any_process_failed
from trainer.rundir import read_json

SMALL_FILES_BYTES = 16 * 2**10  # config.json, tokenizer_config.json and the model card


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


def trained_length(cfg, model_config, tokenizer) -> int:
    """The longest input the saved model handles: the positions it learned (the block size from scratch;
    a pretrained model's table, within its tokenizer's own limit). Saved as the tokenizer's
    `model_max_length`, so `truncation=True` cuts longer texts there."""
    if not cfg.model.pretrained:
        return cfg.data.block_size
    return min(model_config.max_position_embeddings, int(min(tokenizer.model_max_length, 2**31)))


def model_bytes(state_dict: dict, tokenizer) -> int:
    """What `save_model` writes: each stored tensor once (tied weights share one), the tokenizer's JSON,
    the small files. Measured before saving: `save_pretrained` empties the state dict it is handed."""
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in state_dict.values()}
    backend = getattr(tokenizer, "backend_tokenizer", None)  # tokenizer.json; a tokenizer without one: 1 MiB
    tokenizer_bytes = len(backend.to_str(pretty=True).encode()) if backend is not None else 2**20
    return sum(tensors.values()) + tokenizer_bytes + SMALL_FILES_BYTES


def size_text(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def save_model(accelerator, model, tokenizer, model_dir: Path, max_length: int, after_failure: str) -> None:
    """Save on the main process (FSDP/DeepSpeed shards are gathered first), into a temporary directory
    that replaces `model_dir` only once complete: a failure (a full disk) leaves the model saved before,
    if any, and is one line naming the space needed, then `after_failure` (what to do next)."""
    state_dict = master_state_dict(accelerator, model)
    error, needed = None, 0
    if accelerator.is_main_process:
        state_dict = {k.removeprefix("mlm."): v for k, v in state_dict.items()}
        needed = model_bytes(state_dict, tokenizer)
        try:
            write_model_dir(accelerator.unwrap_model(model).mlm, state_dict, tokenizer, Path(model_dir), max_length)
        except Exception as e:  # OSError, SafetensorError, RuntimeError: all mean "not saved"
            error = e
    if any_process_failed(accelerator, error is not None):
        free = shutil.disk_usage(model_dir.parent).free if model_dir.parent.exists() else 0
        reason = getattr(error, "strerror", None) or str(error or "failed on another process").splitlines()[0][:200]
        kept = " (the model saved before is kept)" if model_dir.is_dir() else ""
        raise CheckpointError(f"cannot save the model to {model_dir} ({reason}){kept}: it needs ~{size_text(needed)}, "
                              f"{size_text(free)} are free there; {after_failure}")


def write_model_dir(hf_model, state_dict: dict, tokenizer, model_dir: Path, max_length: int) -> None:
    tmp, old = model_dir.parent / f".tmp-{model_dir.name}", model_dir.parent / f".old-{model_dir.name}"
    if old.is_dir() and not model_dir.exists():  # a crash between the two renames below: put it back
        old.rename(model_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    saved_length = tokenizer.model_max_length
    try:
        hf_model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.model_max_length = max_length
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        tokenizer.model_max_length = saved_length
    if model_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        model_dir.rename(old)
    tmp.rename(model_dir)
    shutil.rmtree(old, ignore_errors=True)


def write_model_card(model_dir: Path, cfg, summary: dict, model_config, samples: list[list] | None,
                     command: list[str] | None) -> None:
    """model/README.md in the Hugging Face model-card format (YAML metadata, then markdown)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from trainer.console import SUMMARY_ROWS, fmt

    data = cfg.data
    dataset = Path(data.dataset).name  # "wikitext", or the local copy's directory name
    metrics = [("loss", "eval/loss"), ("perplexity", "eval/perplexity"), ("accuracy", "eval/accuracy")]
    card_data = ModelCardData(
        language="en", library_name="transformers", pipeline_tag="fill-mask", license="apache-2.0",
        model_name=summary["run_id"], base_model=cfg.model.pretrained, datasets=[dataset],
        tags=["bert", "masked-lm", "bert-mlm-trainer", cfg.name], metrics=["perplexity", "accuracy"],
        eval_results=[EvalResult(task_type="fill-mask", dataset_type=dataset, dataset_name=dataset,
                                 dataset_config=data.dataset_config, dataset_split="validation", metric_type=name,
                                 metric_value=summary[key]) for name, key in metrics if summary.get(key) is not None])
    rows = "\n".join(f"| {name} | {fmt(summary.get(key))} |" for name, key in SUMMARY_ROWS
                     if key != "model_dir" and not (key.startswith("budget/") and summary.get(key) is None))
    sample_rows = "\n".join(f"| {probe} | {predictions} |" for probe, predictions, *_ in samples or [])
    max_length = read_json(model_dir / "tokenizer_config.json").get("model_max_length")
    started = (f"Started from `{cfg.model.pretrained}`" if cfg.model.pretrained else "Trained from scratch")
    if cfg.model.init_from:
        started += f", from the weights of the checkpoint `{cfg.model.init_from}`"
    t = cfg.train
    planned = (f"a token budget of {t.token_budget}" if t.token_budget else f"a time budget of {t.time_budget}"
               if t.time_budget else f"{t.epochs} epochs") + " planned" + (
        f", at most {t.max_steps:,} steps" if t.max_steps else "")
    body = f"""
# {summary['run_id']}

A `BertForMaskedLM` trained with masked language modelling by bert-mlm-trainer, recipe
`{cfg.name}`{' (' + summary['status'] + ' at step ' + str(summary['step']) + ')' if summary['status'] != 'finished' else ''}.

```python
from transformers import pipeline
fill = pipeline("fill-mask", model="{model_dir}")
fill("The capital of France is [MASK].")
fill(long_text, tokenizer_kwargs={{"truncation": True}})  # a text over {max_length} tokens: cut there
```

## Model

{model_config.num_hidden_layers} layers, hidden size {model_config.hidden_size}, {model_config.num_attention_heads} heads,
feed-forward {model_config.intermediate_size}, {model_config.max_position_embeddings} positions (inputs up to {max_length}
tokens: the positions it was trained on), vocabulary {model_config.vocab_size:,}; {summary['parameters']:,} parameters
(the output projection is tied to the word embeddings). {started}.

## Training

Data: `{data.train_dataset or data.dataset}` (train), `{data.dataset}` (validation); {data.block_size}-token
blocks; {data.mlm_probability:.0%} of tokens masked in training (80% [MASK], 10% random, 10% kept), 15% in
evaluation with fixed masks. Optimizer: {optimizer_text(summary, cfg.optim)}; {cfg.optim.schedule} schedule.
Batch {cfg.train.batch_size} x {cfg.train.grad_accum} accumulation per process; trained {summary['epoch']:.2f} epochs,
{summary['step']:,} optimizer steps, {summary['tokens']:,} tokens ({planned}); precision
{summary.get('precision', cfg.train.mixed_precision)}, seed {cfg.train.seed}.

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


def optimizer_text(summary: dict, optim) -> str:
    """What each optimizer ran with: the peak learning rates the run's summary recorded."""
    adamw = f"AdamW (peak lr {summary['peak_lr/adamw']:g}, betas ({optim.beta1:g}, {optim.beta2:g}), weight decay " \
            f"{optim.weight_decay:g})"
    if "peak_lr/muon" not in summary:
        return adamw
    return (f"Muon (peak lr {summary['peak_lr/muon']:g}, momentum {optim.muon_momentum:g}) on the encoder's and "
            f"head's 2-D weight matrices, {adamw} on embeddings, LayerNorms and biases")
