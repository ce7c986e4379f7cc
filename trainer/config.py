"""Typed run configuration: dataclasses, recipe loading, `--section.key=value` overrides, validation.

A recipe is a Python module that defines `config = Config(...)`, or derives one from another recipe
with `Config.derive`. Every field below can be overridden from the command line with its dotted name
(`--optim.lr=1e-3`); values are parsed with the field's type, and a bad key or value is a one-line
`ConfigError`. `python -m trainer.config -h` lists every field with its type, default and doc.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from trainer.budget import parse_duration, parse_tokens


class ConfigError(ValueError):
    """A user mistake in a recipe or an override; reported as one line, without a traceback."""


def option(default, doc: str, *, safe_on_resume: bool = False):
    """A config field with its one-line doc. `safe_on_resume`: may change when a run is resumed,
    because it does not change what the model trains on or how (logging, intervals, workers)."""
    metadata = {"doc": doc, "safe_on_resume": safe_on_resume}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    pretrained: str | None = option(
        None, "Hub id or directory to start from (fine-tuning): its config.json sets the architecture "
              "and dropout, and the size and init fields are ignored; none = train from scratch")
    init_from: str | None = option(
        None, "a checkpoint (runs/<run>/checkpoints/step-N) whose model weights start this run; the optimizer, "
              "schedule and step count start fresh, so any optim.* may differ (trainer/run.py --from=CHECKPOINT "
              "sets it); none = the weights above")
    resize_embeddings: bool = option(
        False, "with pretrained: accept a tokenizer whose vocabulary is not the model's, resizing the embeddings "
               "(new rows start untrained); otherwise such a tokenizer is refused")
    hidden_size: int = option(256, "width of the encoder")
    num_layers: int = option(3, "transformer layers")
    num_heads: int = option(4, "attention heads per layer")
    intermediate_size: int = option(1024, "width of the feed-forward layer")
    max_position_embeddings: int = option(512, "rows of the learned position table (longest block)")
    dropout: float = option(0.1, "hidden and attention-probability dropout")
    init_std: float = option(0.02, "std of the normal init of every weight matrix and embedding (BERT's 0.02)")
    zero_init_output: bool = option(
        False, "start each layer's attention-output and feed-forward-output matrices at zero (each "
               "residual branch starts as a no-op)")
    sinusoidal_position_init: bool = option(
        False, "start the position embeddings as sinusoids (at init_std scale) instead of noise: position "
               "p+k is then a linear map of position p from step 0; the model stays a plain BertForMaskedLM")
    attn_implementation: Literal["sdpa", "eager"] = option("sdpa", "attention kernel")
    fast_dropout: bool = option(True, "on CPU, cheaper dropout random numbers (model.py); same distribution")


@dataclass
class DataConfig:
    dataset: str = option(
        "wikitext", "the data: a Hub dataset name (with dataset_config), a directory saved by datasets.save_to_disk, "
                    "or local files: a file, a directory or a glob of .txt/.md/.raw/.tokens (a document per line), "
                    ".jsonl/.json, .csv, .parquet (text and JSON also .gz); a directory's train*/valid*/test* files "
                    "(e.g. wiki.train.raw) give the splits, else all of it is training data")
    dataset_config: str | None = option("wikitext-2-raw-v1", "Hub dataset configuration")
    train_dataset: str | None = option(None, "another source for the train split only (the raw train split "
                                             "is missing offline); none = dataset")
    validation_dataset: str | None = option(
        None, "another source for validation (its validation split, else all of it); none = the dataset's own "
              "validation split, else data.validation_split of the training documents")
    validation_split: float = option(
        0.05, "share of the training documents held out for validation when there is no validation split "
              "(chosen by document index: the same in every run and process)")
    text_column: str = option("text", "the text field of JSON/CSV/Parquet/Hub records; if missing, the only "
                                      "string column")
    tokenizer: str = option("bert-base-uncased", "Hub id or directory of the tokenizer")
    block_size: int = option(128, "tokens per training block (the stream is cut into blocks)")
    mlm_probability: float = option(0.15, "fraction of tokens masked in training; evaluation always masks 15%")
    mask_count: Literal["bernoulli", "fixed"] = option(
        "bernoulli", "bernoulli: each token masked with probability mlm_probability (the count varies per batch); "
                     "fixed: exactly round(mlm_probability x block_size) per block, as BERT's original pipeline: "
                     "one shape every step, what a compiled step wants")
    max_train_blocks: int | None = option(None, "keep only the first N train blocks (smoke runs)")
    max_eval_blocks: int | None = option(None, "keep only the first N validation blocks")
    num_workers: int = option(0, "DataLoader worker processes (masks are the same with any number)",
                              safe_on_resume=True)
    num_proc: int | None = option(None, "processes that tokenize a corpus (once; it is cached); none = the CPU "
                                        "count, at most 8 (1 below 8 MB of text)", safe_on_resume=True)
    cache_dir: str | None = option(None, "Hub datasets and tokenized corpora (under tokens/); none = HF_DATASETS_CACHE",
                                   safe_on_resume=True)


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = option(
        "adamw", "adamw: AdamW everywhere; muon: torch.optim.Muon on the encoder's and head's 2-D hidden "
                 "matrices, AdamW (lr, betas) on embeddings, LayerNorms and biases")
    lr: float = option(5e-4, "peak learning rate (of AdamW)")
    weight_decay: float = option(0.01, "decoupled weight decay (not on biases and LayerNorm weights)")
    beta1: float = option(0.9, "Adam beta1")
    beta2: float = option(0.999, "Adam beta2")
    eps: float = option(1e-8, "Adam epsilon")
    muon_lr: float = option(0.02, "peak learning rate of Muon's matrices (optim.name=muon)")
    muon_momentum: float = option(0.95, "Muon's Nesterov momentum")
    muon_ns_steps: int = option(5, "Newton-Schulz iterations per Muon update (fewer: cheaper, rougher)")
    schedule: Literal["linear", "cosine", "constant", "wsd"] = option(
        "linear", "learning-rate shape after warmup; wsd = constant, then linear decay to 0 over the last "
                  "optim.decay_ratio of the steps")
    decay_ratio: float = option(0.2, "fraction of the steps in the final decay of the wsd schedule")
    warmup_ratio: float = option(0.06, "fraction of the optimizer steps spent warming up linearly from 0")
    grad_clip: float = option(1.0, "max global gradient norm; 0 disables clipping (the norm is still logged)")
    fused: bool = option(True, "fused AdamW kernel where torch has one for the device")


@dataclass
class TrainConfig:
    epochs: int = option(3, "passes over the training blocks")
    max_steps: int | None = option(None, "stop after this many optimizer steps (the schedule still spans the "
                                          "whole run, and a warning says so: train.token_budget fits it)",
                                   safe_on_resume=True)
    token_budget: str | None = option(
        None, "size the run in input tokens (500000, 500k, 1.5M): the step count and the learning-rate schedule "
              "fit the budget (never past it), train.epochs is ignored")
    time_budget: str | None = option(
        None, "size the run in wall time (600, 90s, 10m, 1.5h): the schedule follows the fraction of the budget "
              "spent and the run stops when it is spent (evaluations and saves count; a resume continues it)")
    batch_size: int = option(8, "blocks per process per micro-batch")
    eval_batch_size: int = option(16, "blocks per evaluation batch", safe_on_resume=True)
    grad_accum: int = option(1, "micro-batches per optimizer step")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", "auto = bf16 where the hardware runs it natively (CUDA compute capability 8+, CPU with "
                "avx512_bf16/AMX; TRAINER_FAST_BF16=0/1 overrides), fp16 on older GPUs (fp32 for train.compile), "
                "else fp32")
    compile: bool = option(
        False, "torch.compile the training step: forward, head, loss and backward, and clipping with the "
               "optimizer update (capturable AdamW, the learning rate a tensor); best with data.mask_count=fixed")
    cuda_graphs: bool = option(True, "with train.compile on a GPU: forward and backward as CUDA graphs "
                                     "(mode=reduce-overhead); needs data.mask_count=fixed")
    seed: int = option(42, "initial weights, data order, masks and dropout")
    eval_every: int = option(500, "evaluate every N optimizer steps (and at every epoch end); 0 = only then",
                             safe_on_resume=True)
    eval_at_start: bool = option(False, "evaluate before the first step (the starting point of a fine-tune)",
                                 safe_on_resume=True)
    log_every: int = option(50, "optimizer steps per logged training record", safe_on_resume=True)
    save_every: int = option(1000, "checkpoint every N optimizer steps (and at every epoch end); 0 = only then",
                             safe_on_resume=True)
    keep_last: int = option(2, "checkpoints kept besides the one with the best eval loss", safe_on_resume=True)
    on_nonfinite: Literal["skip", "stop"] = option(
        "skip", "a step with a NaN/inf loss or gradient norm makes no update; stop = end the run at the next "
                "log step", safe_on_resume=True)
    max_nonfinite_skips: int = option(10, "consecutive skipped steps before the run stops anyway",
                                      safe_on_resume=True)


@dataclass
class LogConfig:
    tracker: list[Literal["wandb", "tensorboard", "trackio"]] = option(
        ["wandb"], "experiment trackers, comma-separated; W&B goes offline without a login; none = only "
                   "metrics.jsonl", safe_on_resume=True)
    project: str = option("bert-mlm", "tracker project", safe_on_resume=True)
    run_name: str | None = option(None, "run directory name; none = <recipe>-<time>", safe_on_resume=True)
    group: str | None = option(None, "W&B group; none = the recipe name", safe_on_resume=True)
    tags: list[str] = option([], "W&B tags (comma-separated)", safe_on_resume=True)
    output_root: str = option("runs", "where run directories are created", safe_on_resume=True)
    fill_mask_top_k: int = option(5, "predictions shown per fill-mask probe", safe_on_resume=True)
    probes: list[str] = option([
        "The capital of France is [MASK].",
        "He played [MASK] for the national team.",
        "The song was released as a [MASK] in 1998.",
        "The battle took place during the [MASK] war.",
        "She was born in [MASK], England.",
    ], "fill-mask sentences sampled at the end of a run", safe_on_resume=True)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig, "log": LogConfig}


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def derive(self, name: str | None = None, **sections: dict) -> Config:
        """A copy with some fields changed: `scratch.derive(name="x", optim={"lr": 1e-3})`."""
        derived = copy.deepcopy(self)
        derived.name = name or self.name
        for section_name, changes in sections.items():
            for key, value in changes.items():
                if section_name not in SECTIONS or key not in field_names(SECTIONS[section_name]):
                    raise ConfigError(f"unknown config key '{section_name}.{key}'")
                setattr(getattr(derived, section_name), key, value)
        return derived

    def flat(self) -> dict[str, object]:
        """{"optim.lr": 5e-4, ...} for every field."""
        return {f"{s}.{k}": v for s in SECTIONS for k, v in dataclasses.asdict(getattr(self, s)).items()}

    def changes_on_resume(self, resumed: Config) -> list[str]:
        """Fields that differ from `resumed` and would change the training trajectory."""
        mine, theirs = self.flat(), resumed.flat()
        return [key for key in mine if mine[key] != theirs[key] and not field_meta(key)["safe_on_resume"]]

    def validate(self) -> Config:
        m, d, o, t = self.model, self.data, self.optim, self.train
        if isinstance(self.log.tracker, str):  # a recipe may say tracker="tensorboard"
            self.log.tracker = [] if self.log.tracker == "none" else [self.log.tracker]
        self.log.tracker = list(dict.fromkeys(self.log.tracker))  # wandb,wandb is one W&B run, not two sinks
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
            (d.num_workers >= 0, f"data.num_workers={d.num_workers} must be >= 0"),
            (0.0 <= d.validation_split < 1.0, f"data.validation_split={d.validation_split} must be in [0, 1)"),
            (d.num_proc is None or d.num_proc >= 1, f"data.num_proc={d.num_proc} must be at least 1"),
            (o.lr > 0, f"optim.lr={o.lr} must be positive"),
            (0.0 <= o.warmup_ratio < 1.0, f"optim.warmup_ratio={o.warmup_ratio} must be in [0, 1)"),
            (o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)"),
            (not (t.compile and o.name != "adamw"), f"train.compile compiles AdamW's update; optim.name={o.name} "
                                                    f"runs eager: drop --train.compile"),
            (o.muon_lr > 0 and 0 <= o.muon_momentum < 1 and 1 <= o.muon_ns_steps <= 10,
             "optim.muon_lr must be > 0, optim.muon_momentum in [0, 1), optim.muon_ns_steps in 1..10"),
            (0.0 < o.decay_ratio <= 1.0 and o.warmup_ratio + (o.decay_ratio if o.schedule == "wsd" else 0) <= 1.0,
             f"optim.decay_ratio={o.decay_ratio} must be in (0, 1], and with warmup_ratio at most 1"),
            (t.epochs >= 1, f"train.epochs={t.epochs} must be at least 1"),
            (t.max_steps is None or t.max_steps >= 1, f"train.max_steps={t.max_steps} must be at least 1"),
            (not (t.token_budget and t.time_budget), "train.token_budget and train.time_budget both size the run: "
                                                     "give one"),
            (t.batch_size >= 1 and t.eval_batch_size >= 1 and t.grad_accum >= 1,
             "train.batch_size, train.eval_batch_size and train.grad_accum must be at least 1"),
            (t.log_every >= 1, f"train.log_every={t.log_every} must be at least 1"),
            (t.max_nonfinite_skips >= 1, f"train.max_nonfinite_skips={t.max_nonfinite_skips} must be at least 1"),
            (t.eval_every >= 0 and t.save_every >= 0, "train.eval_every and train.save_every must be >= 0"),
            (t.keep_last >= 1, f"train.keep_last={t.keep_last} must be at least 1"),
            (all("[MASK]" in p for p in self.log.probes), f"log.probes: every sentence needs a [MASK] (they are "
             f"comma-separated on the command line): {[p for p in self.log.probes if '[MASK]' not in p]}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for key, parse in (("token_budget", parse_tokens), ("time_budget", parse_duration)):
            if getattr(t, key) is not None:
                try:
                    parse(getattr(t, key))
                except ValueError as e:
                    raise ConfigError(f"bad value for train.{key}: {e}") from None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        """The inverse of `to_dict` (a run's stored config.json); unknown keys are an error."""
        try:
            sections = {name: SECTIONS[name](**data.get(name, {})) for name in SECTIONS}
        except TypeError as e:
            raise ConfigError(f"stored config does not match this version of the trainer ({e})") from None
        return cls(name=data.get("name", "run"), **sections)


def field_names(section: type) -> list[str]:
    return [f.name for f in dataclasses.fields(section)]


def field_meta(dotted_key: str) -> dict:
    section, _, name = dotted_key.partition(".")
    return next(f.metadata for f in dataclasses.fields(SECTIONS[section]) if f.name == name)


def help_text() -> str:
    """Every field: `--section.key  type = default  doc`."""
    lines = []
    for section_name, section in SECTIONS.items():
        hints = typing.get_type_hints(section)
        lines.append(f"{section_name}:")
        for f in dataclasses.fields(section):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kind = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            lines.append(f"  --{section_name}.{f.name}  {kind} = {default!r}\n      {f.metadata['doc']}")
    return "\n".join(lines)


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
    return copy.deepcopy(config)


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
    if dotted_key == "name":
        config.name = text
        return
    section_name, _, field_name = dotted_key.partition(".")
    if section_name not in SECTIONS or not field_name:
        raise ConfigError(f"unknown config key {dotted_key!r}; sections are: {', '.join(sorted(SECTIONS))}")
    hints = typing.get_type_hints(SECTIONS[section_name])
    if field_name not in hints:
        known = ", ".join(field_names(SECTIONS[section_name]))
        raise ConfigError(f"unknown config key {dotted_key!r}; {section_name} has: {known}")
    try:
        value = parse_value(text, hints[field_name])
    except ValueError as e:
        raise ConfigError(f"bad value for {dotted_key}: {e}") from None
    setattr(getattr(config, section_name), field_name, value)


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
        if text.strip().lower() == "none":
            return []
        return [parse_value(part.strip(), args[0]) for part in text.split(",") if part.strip()]
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false)")
    for kind, name in ((int, "an integer"), (float, "a number")):
        if annotation is kind:
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"{text!r} is not {name}") from None
    return text


USAGE = ("usage: trainer/run.py RECIPE.py [--resume[=RUN_OR_CHECKPOINT]] [--section.key=value ...]\n"
         "       trainer/run.py --resume=RUN [--section.key=value ...]   (the run's own config)\n"
         "       trainer/run.py --from=RUN_OR_CHECKPOINT [--section.key=value ...]   (a new run with that run's "
         "config; from a checkpoint, also its weights)")


def print_help() -> None:
    print_to_stdout(f"{USAGE}\n\n{help_text()}")


def print_to_stdout(text: str) -> None:
    """Print `text`; a reader that stops early (`-h | head`) is not an error."""
    import os

    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python's recipe: point stdout at /dev/null so the flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@dataclass
class CommandLine:
    recipe: str | None  # None only with --resume=RUN: the run's stored config is used
    overrides: list[str]
    resume: str | None  # None: fresh run; "latest": newest run of this recipe; else a run or checkpoint dir
    start_from: str | None = None  # --from: a new run with this run's config (and a checkpoint's weights)


class HelpRequested(Exception):
    """-h/--help: print `help_text()` and exit 0."""


def parse_command_line(argv: list[str]) -> CommandLine:
    """`RECIPE [--resume[=PATH]] [--tracker=X] [--section.key=value ...]`, or `--resume=PATH [...]`, or
    `--from=PATH [...]`."""
    if any(arg in ("-h", "--help") for arg in argv):
        raise HelpRequested
    rest = list(argv)
    recipe = rest.pop(0) if rest and not rest[0].startswith("--") else None
    overrides, resume, start_from = [], None, None
    while rest:
        arg = rest.pop(0)
        if arg == "--resume":  # bare: the newest run of this recipe; or followed by a path
            resume = rest.pop(0) if rest and not rest[0].startswith("--") else "latest"
        elif arg.startswith("--resume="):
            resume = arg.split("=", 1)[1] or "latest"
        elif arg == "--from" or arg.startswith("--from="):
            start_from = arg.split("=", 1)[1] if "=" in arg else (rest.pop(0) if rest else "")
            if not start_from or start_from.startswith("--"):
                raise ConfigError("--from needs a run directory or a checkpoint: --from=runs/<run>/checkpoints/step-N")
        elif arg == "--tracker" or arg.startswith("--tracker="):  # shorthand for --log.tracker
            overrides.append("--log." + arg[2:])
        else:
            overrides.append(arg)
    if start_from is not None and (recipe is not None or resume is not None):
        raise ConfigError("--from starts a new run with the config stored in that run: give it without a recipe "
                          "and without --resume (a recipe with other weights: --model.init_from=CHECKPOINT)")
    if recipe is None and start_from is None and (resume is None or resume == "latest"):
        raise ConfigError(USAGE.splitlines()[0].removeprefix("usage: ") + " (a recipe, or --resume=RUN)")
    return CommandLine(recipe, overrides, resume, start_from)


def build_config(argv: list[str]) -> tuple[Config, CommandLine]:
    """The recipe's config with the overrides applied (a fresh run; resume: see rundir.resume_config)."""
    cli = parse_command_line(argv)
    if cli.recipe is None:
        raise ConfigError("a recipe is needed here (RECIPE.py [--section.key=value ...])")
    config = apply_overrides(load_recipe(cli.recipe), cli.overrides).validate()
    return config, cli


if __name__ == "__main__":  # `python -m trainer.config RECIPE [overrides]` prints the resolved config
    import json

    from trainer import config as module  # the importable module: recipes build its Config, not __main__'s

    try:
        module.print_to_stdout(json.dumps(module.build_config(sys.argv[1:])[0].to_dict(), indent=2))
    except module.HelpRequested:
        module.print_help()
    except module.ConfigError as e:
        sys.exit(f"error: {e}")
