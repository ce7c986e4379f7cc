import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import Config, ConfigError, apply_overrides, build_config, load_recipe, parse_command_line

REPO = Path(__file__).resolve().parent.parent


def test_scratch_recipe_matches_the_seed_setup():
    cfg = load_recipe(REPO / "recipes/scratch.py").validate()
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    assert (m.num_layers, m.hidden_size, m.num_heads, m.intermediate_size, m.max_position_embeddings) == (3, 256, 4, 1024, 512)
    assert m.dropout == 0.1 and m.pretrained is None
    assert (d.dataset_config, d.tokenizer, d.block_size, d.mlm_probability) == ("wikitext-2-raw-v1", "bert-base-uncased", 128, 0.15)
    assert (o.lr, o.schedule, o.warmup_ratio, o.grad_clip) == (5e-4, "linear", 0.06, 1.0)
    assert (t.epochs, t.batch_size, t.eval_batch_size) == (3, 8, 16)


def test_tuned_recipe_inherits_the_scratch_model_and_init():
    scratch, tuned = load_recipe(REPO / "recipes/scratch.py"), load_recipe(REPO / "recipes/scratch_tuned.py")
    assert (scratch.model.init_std, scratch.model.sinusoidal_position_init) == (0.05, True)
    assert tuned.model == dataclasses.replace(scratch.model, dropout=0.0)
    assert (tuned.data.mlm_probability, tuned.optim.lr, tuned.optim.beta2) == (0.75, 1e-3, 0.98)
    assert (tuned.train, tuned.data.block_size) == (scratch.train, scratch.data.block_size)  # same budget
    fast = load_recipe(REPO / "recipes/scratch_fast.py")  # same model shape and budget, other training choices
    assert fast.model == dataclasses.replace(tuned.model, zero_init_output=True) and fast.data == tuned.data
    assert (fast.optim.name, fast.optim.muon_lr, fast.optim.schedule) == ("muon", 0.005, "wsd")
    assert fast.train == tuned.train


def test_printing_the_resolved_config():
    out = subprocess.run([sys.executable, "-m", "trainer.config", "recipes/scratch_tuned.py", "--optim.lr=2e-3"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    resolved = json.loads(out)
    assert resolved["optim"]["lr"] == 2e-3 and resolved["data"]["mlm_probability"] == 0.75


def test_finetune_recipe_changes_only_model_lr_and_epochs():
    scratch, finetune = load_recipe(REPO / "recipes/scratch.py"), load_recipe(REPO / "recipes/finetune.py")
    assert finetune.model.pretrained == "bert-base-uncased"
    assert (finetune.optim.lr, finetune.train.epochs) == (5e-5, 4)
    assert finetune.data == scratch.data and finetune.optim.schedule == scratch.optim.schedule


def test_overrides_are_parsed_with_field_types():
    cfg = apply_overrides(Config(), ["--optim.lr=1e-3", "--train.epochs", "5", "--train.compile=true",
                                     "--model.pretrained=none", "--train.max_steps=10", "--log.tags=a,b",
                                     "--train.mixed_precision=bf16"])
    assert cfg.optim.lr == 1e-3 and cfg.train.epochs == 5 and cfg.train.compile is True
    assert cfg.model.pretrained is None and cfg.train.max_steps == 10 and cfg.log.tags == ["a", "b"]
    assert cfg.train.mixed_precision == "bf16"


def test_overrides_do_not_leak_into_the_recipe_defaults():
    base = load_recipe(REPO / "recipes/scratch.py")
    apply_overrides(base, ["--optim.lr=0.1"])
    assert load_recipe(REPO / "recipes/scratch.py").optim.lr == 5e-4


@pytest.mark.parametrize("override, message", [
    ("--optim.learning_rate=1", "unknown config key 'optim.learning_rate'"),
    ("--optimizer.lr=1", "unknown config key 'optimizer.lr'"),
    ("--optim.lr=fast", "bad value for optim.lr: 'fast' is not a number"),
    ("--train.epochs=2.5", "bad value for train.epochs: '2.5' is not an integer"),
    ("--train.compile=maybe", "bad value for train.compile: 'maybe' is not a boolean"),
    ("--train.mixed_precision=fp8", "bad value for train.mixed_precision: 'fp8' is not one of"),
    ("--optim.lr", "--optim.lr needs a value"),
    ("optim.lr=1", "unexpected argument 'optim.lr=1'"),
])
def test_bad_overrides_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        apply_overrides(Config(), [override])
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("override, message", [
    ("--data.block_size=1024", "exceeds model.max_position_embeddings=512"),
    ("--model.num_heads=3", "not divisible by model.num_heads=3"),
    ("--optim.lr=-1", "optim.lr=-1.0 must be positive"),
    ("--data.mlm_probability=1.5", "data.mlm_probability=1.5 must be in (0, 1)"),
    ("--optim.warmup_ratio=1", "optim.warmup_ratio=1.0 must be in [0, 1)"),
    ("--model.init_std=0", "model.init_std=0.0 must be positive"),
    ("--log.probes=She was born in [MASK], England.", "log.probes: every sentence needs a [MASK] (they are "
     "comma-separated on the command line): ['England.']"),
])
def test_validation_rejects_inconsistent_configs(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        build_config([str(REPO / "recipes/scratch.py"), override])


def test_recipe_errors(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match=r"must define `config = Config\(...\)`"):
        load_recipe(tmp_path / "empty.py")
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(ConfigError, match="failed to import: ModuleNotFoundError"):
        load_recipe(tmp_path / "broken.py")


def test_command_line_resume_and_tracker_shorthands():
    cli = parse_command_line(["r.py", "--resume", "--optim.lr=1"])
    assert cli.resume == "latest" and cli.overrides == ["--optim.lr=1"]
    assert parse_command_line(["r.py", "--resume", "runs/x"]).resume == "runs/x"
    assert parse_command_line(["r.py", "--resume=runs/y/checkpoints/step-000010"]).resume.endswith("step-000010")
    cli = parse_command_line(["r.py", "--tracker", "none"])
    assert apply_overrides(Config(), cli.overrides).log.tracker == []  # none: metrics.jsonl only
    assert apply_overrides(Config(), parse_command_line(["r.py", "--tracker=tensorboard"]).overrides).log.tracker == ["tensorboard"]
    assert apply_overrides(Config(), ["--log.tracker=wandb,tensorboard"]).log.tracker == ["wandb", "tensorboard"]


def test_help_lists_every_field_with_type_default_and_doc():
    from trainer.config import SECTIONS

    for command in ([sys.executable, "-m", "trainer.config", "-h"], [sys.executable, "trainer/run.py", "-h"]):
        out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout
        for section, fields in SECTIONS.items():
            for f in dataclasses.fields(fields):
                assert f"--{section}.{f.name}  " in out and f.metadata["doc"] in out, f.name
    assert "--optim.lr  float = 0.0005\n      peak learning rate" in out


def test_recipes_derive_without_touching_their_parent():
    scratch = load_recipe(REPO / "recipes/scratch.py")
    derived = scratch.derive(name="x", optim={"lr": 1.0}, train={"epochs": 9})
    assert (derived.name, derived.optim.lr, derived.train.epochs) == ("x", 1.0, 9)
    assert (scratch.optim.lr, scratch.train.epochs, derived.model) == (5e-4, 3, scratch.model)
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        scratch.derive(optim={"learning_rate": 1.0})
