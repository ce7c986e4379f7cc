"""Typed run configuration: dataclasses, recipe loading, `--section.key=value` overrides, validation.

A recipe is a Python module that defines `config = Config(...)`. Every field below can be overridden
from the command line with its dotted name (`--optim.lr=1e-3`); values are parsed with the field's
type, and a bad key or value is a one-line `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


class ConfigError(ValueError):
    """A user mistake in a recipe or an override; reported as one line, without a traceback."""


@dataclass
class ModelConfig:
    # A Hub id or directory to start from (fine-tuning): its config.json then sets the architecture and
    # dropout, and the size and init fields below are ignored. None: train from scratch.
    pretrained: str | None = None
    hidden_size: int = 256
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 1024
    max_position_embeddings: int = 512
    dropout: float = 0.1  # hidden and attention-probability dropout
    init_std: float = 0.02  # std of the normal init of every weight matrix and embedding (BERT's)
    # Start the learned position embeddings as sinusoids (at init_std scale) instead of noise: position
    # p+k is then a linear map of position p from step 0. The model stays a plain BertForMaskedLM.
    sinusoidal_position_init: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    fast_dropout: bool = True  # on CPU, cheaper dropout random numbers (see model.py); same distribution


@dataclass
class DataConfig:
    # A Hub dataset name (with `dataset_config`) or a local directory with wiki.{train,valid,test}.{raw,tokens}.
    dataset: str = "wikitext"
    dataset_config: str = "wikitext-2-raw-v1"
    # Optional other source for the train split only (the raw train split is missing offline).
    train_dataset: str | None = None
    tokenizer: str = "bert-base-uncased"
    block_size: int = 128
    mlm_probability: float = 0.15  # training masks; evaluation always masks 15% (comparable across runs)
    max_train_blocks: int | None = None  # keep only the first N train blocks (smoke runs)
    max_eval_blocks: int | None = None
    num_workers: int = 0
    cache_dir: str | None = None  # datasets cache; None = HF_DATASETS_CACHE


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    fused: bool = True  # fused AdamW kernel where torch has one for the device


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule still spans all epochs)
    batch_size: int = 8  # per process, per micro-batch
    eval_batch_size: int = 16
    grad_accum: int = 1
    # "auto" = bf16 where the hardware runs it fast (CUDA with bf16, CPU with avx512_bf16/AMX), else fp32.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    compile: bool = False
    seed: int = 42
    eval_every: int = 500  # optimizer steps; evaluation also runs at every epoch end
    eval_at_start: bool = False  # evaluate before the first step (the starting point of a fine-tune)
    log_every: int = 50
    save_every: int = 1000  # optimizer steps; a checkpoint is also saved at every epoch end
    keep_last: int = 2  # checkpoints kept besides the best one (by eval loss)
    # A step with a NaN/inf loss or grad norm makes no update; "stop" ends the run at the next log step.
    on_nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite_skips: int = 10  # consecutive skipped steps before the run stops anyway


@dataclass
class LogConfig:
    tracker: Literal["wandb", "tensorboard", "none"] = "wandb"
    project: str = "bert-mlm"
    run_name: str | None = None  # default: "<recipe>-<timestamp>"
    group: str | None = None  # default: the recipe name
    tags: list[str] = field(default_factory=list)
    output_root: str = "runs"
    fill_mask_top_k: int = 5
    probes: list[str] = field(
        default_factory=lambda: [
            "The capital of France is [MASK].",
            "He played [MASK] for the national team.",
            "The song was released as a [MASK] in 1998.",
            "The battle took place during the [MASK] war.",
            "She was born in [MASK], England.",
        ]
    )


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> Config:
        m, d, o, t = self.model, self.data, self.optim, self.train
        checks = [
            (m.hidden_size > 0 and m.num_layers > 0 and m.num_heads > 0, "model sizes must be positive"),
            (m.hidden_size % m.num_heads == 0,
             f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}"),
            (0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)"),
            (m.init_std > 0, f"model.init_std={m.init_std} must be positive (BERT uses 0.02)"),
            (d.block_size >= 8, f"data.block_size={d.block_size} must be at least 8"),
            (m.pretrained is not None or d.block_size <= m.max_position_embeddings,
             f"data.block_size={d.block_size} exceeds model.max_position_embeddings={m.max_position_embeddings}"),
            (0.0 < d.mlm_probability < 1.0, f"data.mlm_probability={d.mlm_probability} must be in (0, 1)"),
            (o.lr > 0, f"optim.lr={o.lr} must be positive"),
            (0.0 <= o.warmup_ratio < 1.0, f"optim.warmup_ratio={o.warmup_ratio} must be in [0, 1)"),
            (o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)"),
            (t.epochs >= 1, f"train.epochs={t.epochs} must be at least 1"),
            (t.max_steps is None or t.max_steps >= 1, f"train.max_steps={t.max_steps} must be at least 1"),
            (t.batch_size >= 1 and t.eval_batch_size >= 1 and t.grad_accum >= 1,
             "train.batch_size, train.eval_batch_size and train.grad_accum must be at least 1"),
            (t.log_every >= 1, f"train.log_every={t.log_every} must be at least 1"),
            (t.max_nonfinite_skips >= 1, f"train.max_nonfinite_skips={t.max_nonfinite_skips} must be at least 1"),
            (t.eval_every >= 0 and t.save_every >= 0, "train.eval_every and train.save_every must be >= 0"),
            (t.keep_last >= 1, f"train.keep_last={t.keep_last} must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- recipes and overrides


def load_recipe(path: str | Path) -> Config:
    """Import a recipe file and return a copy of its `config`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path} (try recipes/scratch.py)")
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a broken recipe is the user's file: name it and the error, one line
        raise ConfigError(f"recipe {path} failed to import: {type(e).__name__}: {e}") from e
    config = getattr(module, "config", None)
    if not isinstance(config, Config):
        raise ConfigError(f"recipe {path} must define `config = Config(...)` (from trainer.config)")
    return dataclasses.replace(config)  # shallow copy; overrides replace sections' fields below


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply `--section.key=value` (or `--section.key value`) overrides with type checking."""
    args = list(overrides)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --optim.lr=1e-3")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if not args or args[0].startswith("--"):
                raise ConfigError(f"--{key} needs a value, e.g. --{key}=VALUE")
            value = args.pop(0)
        set_field(config, key, value)
    return config


def set_field(config: Config, dotted_key: str, text: str) -> None:
    section_name, _, field_name = dotted_key.partition(".")
    sections = {f.name for f in dataclasses.fields(Config) if f.name != "name"}
    if dotted_key == "name":
        config.name = text
        return
    if section_name not in sections or not field_name:
        raise ConfigError(f"unknown config key {dotted_key!r}; sections are: {', '.join(sorted(sections))}")
    section = dataclasses.replace(getattr(config, section_name))  # recipes' defaults stay untouched
    hints = typing.get_type_hints(type(section))
    if field_name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(section))
        raise ConfigError(f"unknown config key {dotted_key!r}; {section_name} has: {known}")
    try:
        value = parse_value(text, hints[field_name])
    except ValueError as e:
        raise ConfigError(f"bad value for {dotted_key}: {e}") from None
    setattr(section, field_name, value)
    setattr(config, section_name, section)


def parse_value(text: str, annotation) -> object:
    """Parse command-line text as `annotation` (int, float, bool, str, Literal, list[str], X | None)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return parse_value(text, inner)
    if origin is Literal:
        if text not in args:
            raise ValueError(f"{text!r} is not one of {', '.join(map(str, args))}")
        return text
    if origin is list:
        return [parse_value(part.strip(), args[0]) for part in text.split(",") if part.strip()]
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false)")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    return text


@dataclass
class CommandLine:
    recipe: str
    overrides: list[str]
    resume: str | None  # None: fresh run; "latest": newest run of this recipe; else a run or checkpoint dir


def parse_command_line(argv: list[str]) -> CommandLine:
    """`RECIPE [--resume[=PATH]] [--tracker=X] [--section.key=value ...]`."""
    if not argv or argv[0] in ("-h", "--help"):
        raise ConfigError("usage: trainer/run.py RECIPE.py [--resume[=RUN_OR_CHECKPOINT]] [--section.key=value ...]")
    recipe, rest = argv[0], list(argv[1:])
    overrides, resume = [], None
    while rest:
        arg = rest.pop(0)
        if arg == "--resume":  # bare: the newest run of this recipe; or followed by a path
            resume = rest.pop(0) if rest and not rest[0].startswith("--") else "latest"
        elif arg.startswith("--resume="):
            resume = arg.split("=", 1)[1] or "latest"
        elif arg == "--tracker" or arg.startswith("--tracker="):  # shorthand for --log.tracker
            overrides.append("--log." + arg[2:])
        else:
            overrides.append(arg)
    return CommandLine(recipe, overrides, resume)


def build_config(argv: list[str]) -> tuple[Config, CommandLine]:
    cli = parse_command_line(argv)
    config = apply_overrides(load_recipe(cli.recipe), cli.overrides).validate()
    return config, cli


if __name__ == "__main__":  # `python -m trainer.config RECIPE [overrides]` prints the resolved config
    import json

    from trainer import config as module  # the importable module: recipes build its Config, not __main__'s

    try:
        print(json.dumps(module.build_config(sys.argv[1:])[0].to_dict(), indent=2))
    except module.ConfigError as e:
        sys.exit(f"error: {e}")
