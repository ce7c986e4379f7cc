"""A sweep file in W&B's sweep format, read and checked before any trial starts (trainer/sweep.py runs it).

    method: bayes                      # grid | random | bayes  (Optuna: GridSampler, RandomSampler, TPESampler)
    metric: {name: eval/perplexity, goal: minimize}
    program: trainer/run.py
    command: ["${env}", "${interpreter}", "${program}", recipes/scratch_fast.py, "${args}"]   # names the recipe
    run_cap: 30
    parameters:
      optim.lr: {distribution: log_uniform_values, min: 1.0e-4, max: 3.0e-3}
      train.batch_size: {values: [8, 16, 32]}
      train.max_steps: {value: 500}    # one value: the same override in every trial
    early_terminate: {type: hyperband, min_iter: 50000, eta: 3}   # min_iter in tokens (see sweep.py)

W&B's sweep schema (wandb/sweeps, config/schema.json; the `sweeps` package behind `wandb sweep`) allows no
top-level key of its own (`additionalProperties: false`), so the recipe travels in `command:`, as the W&B agent runs it: `python trainer/run.py RECIPE --optim.lr=... ...`. Each
mistake is a `SweepError`: one line naming the file, the line and the key.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import SECTIONS, Config, ConfigError, apply_overrides, field_names, load_recipe, set_field

METHODS = ("grid", "random", "bayes")
PROGRAM = Path(__file__).resolve().parent / "run.py"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a directory name and part of W&B run ids
# W&B's top-level keys (its schema); these are read, the rest of them refused or ignored.
READ_KEYS = {"method", "metric", "parameters", "early_terminate", "program", "command", "name", "run_cap", "project"}
IGNORED_KEYS = {"description", "entity", "controller", "kind", "apiVersion"}
UNSUPPORTED_KEYS = {"metrics": "multi-objective sweeps", "scheduler": "custom schedulers", "job": "Launch jobs",
                    "image_uri": "Launch images"}
# W&B distribution names that Optuna can express (the others are refused by name).
RANGE_KINDS = ("int_uniform", "uniform", "log_uniform_values", "log_uniform", "q_uniform")
NOT_EXPRESSIBLE = ("normal", "log_normal", "q_normal", "q_log_normal", "q_log_uniform", "q_log_uniform_values",
                   "inv_log_uniform", "inv_log_uniform_values", "beta", "q_beta", "categorical_w_probabilities")


class SweepError(ValueError):
    """A mistake in the sweep file, or a sweep that cannot start; reported as one line, exit 2."""


@dataclass
class Param:
    """One swept config key: `categorical` (values) or a range; constants are `SweepSpec.fixed`."""

    key: str
    kind: str
    values: list = field(default_factory=list)
    low: float | None = None
    high: float | None = None
    q: float | None = None

    def suggest(self, trial):
        """The trial's value, drawn by the study's sampler (a grid point or an enqueued one is fixed)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, self.values)
        if self.kind == "int_uniform":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        if self.kind == "q_uniform":
            return trial.suggest_float(self.key, self.low, self.high, step=self.q)
        if self.kind == "log_uniform":  # W&B's bounds are natural-log exponents
            return trial.suggest_float(self.key, math.exp(self.low), math.exp(self.high), log=True)
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log_uniform_values")

    def grid_values(self) -> list | None:
        if self.kind == "categorical":
            return list(self.values)
        if self.kind == "int_uniform":
            return list(range(int(self.low), int(self.high) + 1))
        if self.kind == "q_uniform":
            count = int(math.floor((self.high - self.low) / self.q + 1e-9)) + 1
            return [round(self.low + i * self.q, 12) for i in range(count)]  # 0.1 + 2 * 0.1 is 0.30000000000000004
        return None


@dataclass
class SweepSpec:
    path: Path
    name: str
    method: str
    metric: str
    goal: str
    params: list[Param]
    fixed: dict[str, object]  # parameters with one `value`, passed to every trial like the swept ones
    recipe: str
    literal_args: list[str]  # --key=value written into `command:` itself
    run_cap: int | None = None
    early_terminate: dict | None = None
    project: str | None = None

    @property
    def direction(self) -> str:
        return "maximize" if self.goal == "maximize" else "minimize"

    def grid(self) -> list[dict]:
        """Every grid point, in the file's order (the last parameter varies fastest), as W&B walks a grid."""
        keys = [p.key for p in self.params]
        return [dict(zip(keys, combo)) for combo in itertools.product(*(p.grid_values() for p in self.params))]

    def sampler(self, seed: int):
        import optuna

        if self.method == "grid":
            return optuna.samplers.GridSampler({p.key: p.grid_values() for p in self.params}, seed=seed)
        if self.method == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def pruner(self):
        import optuna

        stop = self.early_terminate
        if stop is None:
            return optuna.pruners.NopPruner()
        if stop["type"] == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=stop.get("n_startup_trials", 1),
                                               n_warmup_steps=stop.get("min_iter", 0))
        eta = int(stop.get("eta", 3))
        min_iter = stop.get("min_iter") or max(1, round(stop["max_iter"] / eta ** stop["s"]))
        return optuna.pruners.HyperbandPruner(min_resource=int(min_iter), max_resource=stop.get("max_iter", "auto"),
                                              reduction_factor=eta)

    def identity(self) -> dict:
        """What makes two files the same study (a resume must not change it; run_cap may grow)."""
        return {"method": self.method, "metric": self.metric, "goal": self.goal, "recipe": self.recipe,
                "literal_args": self.literal_args, "fixed": {k: str(v) for k, v in self.fixed.items()},
                "params": [repr(p) for p in self.params], "early_terminate": self.early_terminate}

    def trial_args(self, params: dict) -> list[str]:
        """The overrides of one trial, spelled as the W&B agent spells `${args}`: `--key=value`, str(value)."""
        return [*self.literal_args, *(f"--{k}={v}" for k, v in {**self.fixed, **params}.items())]


# --------------------------------------------------------------------------- reading the file


def eval_metrics() -> list[str]:
    """What every evaluation record in metrics.jsonl holds (trainer/metrics.py and Trainer.evaluate)."""
    from trainer.metrics import MLMTotals

    logged = [k for k in MLMTotals(0.0, 1, 0, 0).compute("eval") if k != "eval/masked_tokens"]
    return [*logged, "eval/best_loss", "eval/best_perplexity"]


class Reader:
    """Reads a parsed file; `fail` names the file, the key and its line."""

    def __init__(self, path: Path, text: str):
        self.path, self.lines = path, key_lines(text)

    def fail(self, key: str, message: str) -> SweepError:
        line = self.lines.get(key)
        where = f"{self.path}" + (f" line {line}" if line else "")
        return SweepError(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def key_lines(text: str) -> dict[str, int]:
    """{"parameters.optim.lr": 12, ...}: the line of every mapping key."""
    import yaml

    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines.setdefault(path, key_node.start_mark.line + 1)
                walk(value_node, path)

    walk(yaml.compose(text), "")
    return lines


def load_spec(path: str | Path) -> SweepSpec:
    """Parse and check a sweep file; every mistake is a one-line SweepError."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SweepError(f"cannot read sweep file {path} ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SweepError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a sweep file is a mapping (method:, metric:, parameters:, ...)")
    reader = Reader(path, text)
    check_top_level(reader, data)
    method = data.get("method")
    if method not in METHODS:
        raise reader.fail("method", f"{method!r} is not one of {', '.join(METHODS)}"
                          + (" (W&B's custom method needs its own scheduler)" if method == "custom" else ""))
    metric, goal = read_metric(reader, data.get("metric"))
    recipe, literal_args = read_command(reader, data.get("command"), data.get("program"))
    params, fixed = read_parameters(reader, data.get("parameters"), method)
    name = str(data.get("name") or path.stem)
    if not NAME_PATTERN.match(name):
        raise reader.fail("name", f"{name!r}: use letters, digits, '_', '.' and '-' (it names runs/<name>/)")
    spec = SweepSpec(path, name, method, metric, goal, params, fixed, recipe, literal_args,
                     run_cap=read_run_cap(reader, data.get("run_cap")),
                     early_terminate=read_early_terminate(reader, data.get("early_terminate")),
                     project=data.get("project"))
    check_base_config(reader, spec)
    return spec


def check_top_level(reader: Reader, data: dict) -> None:
    for key in data:
        if key in UNSUPPORTED_KEYS:
            raise reader.fail(key, f"{UNSUPPORTED_KEYS[key]} are W&B-server features the local sweep does not run")
        if key not in READ_KEYS | IGNORED_KEYS:
            close = difflib.get_close_matches(str(key), sorted(READ_KEYS), n=1)
            raise reader.fail(key, "not a key of W&B's sweep schema"
                              + (f"; did you mean {close[0]}?" if close else f"; keys: {', '.join(sorted(READ_KEYS))}"))


def read_metric(reader: Reader, metric) -> tuple[str, str]:
    if not isinstance(metric, dict) or "name" not in metric:
        raise reader.fail("metric", "needs a name, e.g. metric: {name: eval/perplexity, goal: minimize}")
    name, goal = str(metric["name"]), metric.get("goal", "minimize")
    known = eval_metrics()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        raise reader.fail("metric.name", f"{name!r} is not in the trainer's evaluation records (metrics.jsonl): "
                          + (f"did you mean {close[0]}? " if close else "") + f"they hold {', '.join(known)}")
    if goal not in ("minimize", "maximize"):
        raise reader.fail("metric.goal", f"{goal!r} is not minimize or maximize")
    extra = set(metric) - {"name", "goal", "impute", "impute_while_running"}
    if extra:
        raise reader.fail("metric", f"{', '.join(sorted(map(str, extra)))}: not supported by the local sweep "
                          f"(a target would end the sweep early)")
    return name, goal


def read_command(reader: Reader, command, program) -> tuple[str, list[str]]:
    """The recipe and any literal --key=value in `command:` (W&B's list, with its ${...} macros)."""
    if program is not None and Path(str(program)).resolve() != PROGRAM:
        raise reader.fail("program", f"{program!r} is not {PROGRAM}: the local sweep runs trainer/run.py of this "
                                     f"checkout (start it from the checkout's root, as the W&B agent would)")
    example = '["${env}", "${interpreter}", "${program}", recipes/scratch_fast.py, "${args}"]'
    if not isinstance(command, list) or "${program}" not in command or "${args}" not in command:
        raise reader.fail("command", f"name the recipe in W&B's command list: command: {example}")
    recipe, literal_args = None, []
    for item in command[command.index("${program}") + 1:]:
        item = str(item)
        if item.startswith("${") and item != "${args}":
            raise reader.fail("command", f"{item}: trainer/run.py takes --key=value, which W&B writes as ${{args}}")
        if item.startswith("--"):
            literal_args.append(item)
        elif item != "${args}":
            if recipe is not None:
                raise reader.fail("command", f"{item!r}: a second recipe (the first is {recipe})")
            recipe = item
    for item in map(str, command[:command.index("${program}")]):
        if item not in ("${env}", "${interpreter}"):
            raise reader.fail("command", f"{item!r} before ${{program}}: the local sweep starts python trainer/run.py")
    if recipe is None:
        raise reader.fail("command", f"no recipe: command: {example}")
    if not Path(recipe).is_file():
        raise reader.fail("command", f"recipe {recipe} does not exist (paths are relative to where you run the sweep)")
    return recipe, literal_args


def read_run_cap(reader: Reader, run_cap) -> int | None:
    if run_cap is not None and (not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 1):
        raise reader.fail("run_cap", f"{run_cap!r} is not a positive integer")
    return run_cap


def read_early_terminate(reader: Reader, stop) -> dict | None:
    """W&B's hyperband (min_iter, or max_iter and s; eta), or `type: median` (ours: outside W&B's schema)."""
    if stop is None:
        return None
    kind = stop.get("type") if isinstance(stop, dict) else None
    allowed = {"hyperband": {"type", "min_iter", "max_iter", "s", "eta", "strict"},
               "median": {"type", "min_iter", "n_startup_trials"}}
    if kind not in allowed:
        raise reader.fail("early_terminate", f"type {kind!r} is not hyperband (W&B's) or median")
    for key, value in stop.items():
        if key not in allowed[kind]:
            raise reader.fail(f"early_terminate.{key}", f"not a key of {kind}: {', '.join(sorted(allowed[kind]))}")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key not in ("type", "strict") and (not number or value < 0):
            raise reader.fail(f"early_terminate.{key}", f"{value!r} is not a number >= 0")
    if kind == "hyperband":
        if "min_iter" not in stop and not {"max_iter", "s"} <= set(stop):
            raise reader.fail("early_terminate", "hyperband needs min_iter, or max_iter and s")
        eta = stop.get("eta", 3)
        if eta != int(eta) or eta < 2:
            raise reader.fail("early_terminate.eta", f"{eta!r}: Optuna's Hyperband takes a whole eta of 2 or more")
    return dict(stop)


def read_parameters(reader: Reader, parameters, method: str) -> tuple[list[Param], dict]:
    if not isinstance(parameters, dict) or not parameters:
        raise reader.fail("parameters", "needs at least one parameter, e.g. optim.lr: {values: [1e-3, 3e-3]}")
    params, fixed = [], {}
    for key, spec in parameters.items():
        where = f"parameters.{key}"
        check_key(reader, where, str(key))
        if not isinstance(spec, dict):
            raise reader.fail(where, "give value:, values: or min:/max: (with distribution:)")
        if "parameters" in spec:
            raise reader.fail(where, "nested parameters: name each key with dots (optim.lr); the W&B agent would "
                                     "pass a nested dict as one argument, which trainer/run.py does not take")
        if "value" in spec:
            check_value(reader, where, str(key), spec["value"])
            fixed[str(key)] = spec["value"]
            continue
        param = read_param(reader, where, str(key), spec)
        if method == "grid" and param.grid_values() is None:
            raise reader.fail(where, f"a grid needs values: (or int_uniform / q_uniform), not {param.kind}")
        params.append(param)
    if not params:
        raise reader.fail("parameters", "every parameter has one value: nothing to search")
    return params, fixed


def check_key(reader: Reader, where: str, key: str) -> None:
    keys = [f"{s}.{name}" for s, section in SECTIONS.items() for name in field_names(section)]
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        raise reader.fail(where, "not a config key" + (f"; did you mean {close[0]}?" if close else
                                                       " (python -m trainer.config -h lists them)"))


def check_value(reader: Reader, where: str, key: str, value) -> None:
    """The value as the agent writes it (str(value)) must parse as the field's type."""
    if isinstance(value, (list, dict)):
        raise reader.fail(where, f"{value!r}: one value per trial (a list is values:)")
    try:
        set_field(Config(), key, str(value))
    except ConfigError as e:
        raise reader.fail(where, str(e)) from None


def read_param(reader: Reader, where: str, key: str, spec: dict) -> Param:
    kind = spec.get("distribution")
    if kind is None:  # W&B's inference: values -> categorical; int bounds -> int_uniform; else uniform
        kind = ("categorical" if "values" in spec else
                "int_uniform" if all(isinstance(spec.get(b), int) for b in ("min", "max")) else "uniform")
    if kind in NOT_EXPRESSIBLE:
        raise reader.fail(f"{where}.distribution", f"{kind} has no Optuna counterpart here; use one of "
                          f"{', '.join(('categorical', 'constant') + RANGE_KINDS)}")
    if kind == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise reader.fail(where, "values: needs a non-empty list")
        for value in values:
            check_value(reader, f"{where}.values", key, value)
        return Param(key, kind, values=values)
    if kind not in RANGE_KINDS:
        raise reader.fail(f"{where}.distribution", f"{kind!r} is not a W&B distribution")
    return read_range(reader, where, key, kind, spec)


def read_range(reader: Reader, where: str, key: str, kind: str, spec: dict) -> Param:
    unknown = set(spec) - {"min", "max", "distribution", "q"}
    if unknown:
        raise reader.fail(where, f"{', '.join(sorted(map(str, unknown)))}: not a key of a {kind} parameter")
    low, high = spec.get("min"), spec.get("max")
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in (low, high)):
        raise reader.fail(where, f"{kind} needs numbers min: and max: (got {low!r}, {high!r})")
    if low >= high:
        raise reader.fail(where, f"min {low} is not below max {high}")
    if kind == "log_uniform_values" and low <= 0:
        raise reader.fail(f"{where}.min", f"{low}: log_uniform_values needs min > 0")
    q = spec.get("q", 1 if kind == "q_uniform" else None)
    if q is not None and (kind != "q_uniform" or not isinstance(q, (int, float)) or q <= 0):
        raise reader.fail(f"{where}.q", f"{q!r}: q is a step > 0 of q_uniform")
    section, _, name = key.partition(".")
    annotation = typing.get_type_hints(SECTIONS[section])[name]
    inner = {a for a in typing.get_args(annotation) if a is not type(None)} or {annotation}
    wanted = {int, float} if kind == "int_uniform" else {float}
    if not inner & wanted:
        kinds = "int_uniform or values:" if int in inner else "values:"
        type_name = " | ".join(getattr(t, "__name__", str(t)) for t in inner)
        raise reader.fail(where, f"{key} takes {type_name}, not the numbers {kind} draws: use {kinds}")
    if kind == "int_uniform" and not all(isinstance(b, int) for b in (low, high)):
        raise reader.fail(where, f"int_uniform needs whole min and max (got {low}, {high})")
    return Param(key, kind, low=low, high=high, q=q)


def check_base_config(reader: Reader, spec: SweepSpec) -> None:
    """The recipe with the overrides every trial shares must load and be valid (each trial's own values are
    the trainer's to refuse: that trial fails, the sweep goes on)."""
    try:
        config = load_recipe(spec.recipe)
    except ConfigError as e:
        raise reader.fail("command", str(e)) from None
    try:
        apply_overrides(config, spec.trial_args({})).validate()
    except ConfigError as e:
        raise reader.fail("parameters", f"the recipe with the fixed values: {e}") from None
