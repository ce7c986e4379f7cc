"""Fixtures: a tiny word-level BERT tokenizer, a tiny synthetic WikiText-like corpus and a tiny
config, all made in the test's temporary directory (no download, no shared data)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from trainer.config import Config, DataConfig, LogConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NOUNS = "cat dog bird fish horse king queen river city ship".split()
VERBS = "sees likes follows eats finds builds crosses rules".split()
ADJECTIVES = "big small red old new quiet".split()
WORDS = ["the", "a", ".", ",", "and", *NOUNS, *VERBS, *ADJECTIVES]


def make_sentence(rng: random.Random) -> str:
    return (f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"a {rng.choice(NOUNS)} and the {rng.choice(NOUNS)} .")


def write_corpus(directory: Path, lines_per_split=(300, 40, 40), seed=0, suffix=".raw") -> Path:
    """wiki.{train,valid,test}.raw with blank lines and headings, like WikiText."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "valid", "test"), lines_per_split):
        lines = []
        for i in range(count):
            if i % 10 == 0:
                lines += [" ", f" = the {rng.choice(NOUNS)} = ", " "]
            lines.append(" " + " ".join(make_sentence(rng) for _ in range(2)) + " ")
        (directory / f"wiki.{split}{suffix}").write_text("\n".join(lines) + "\n")
    return directory


def write_tokenizer(directory: Path, extra_words: int = 0) -> Path:
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + WORDS + [f"word{i}" for i in range(extra_words)]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5: `vocab=` (a path); `vocab_file=` would be silently ignored.
    tokenizer = BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from trainer.data import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


def tiny_config(tmp_path: Path, corpus: Path, tokenizer: Path, **sections) -> Config:
    """A ~20k-parameter BERT trained a few dozen steps; `sections` override fields per section."""
    cfg = Config(
        name="tiny",
        model=ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          max_position_embeddings=64, dropout=0.0),
        data=DataConfig(dataset=str(corpus), tokenizer=str(tokenizer), block_size=32,
                        cache_dir=str(tmp_path / "hf_cache")),
        optim=OptimConfig(lr=3e-3, warmup_ratio=0.1),
        train=TrainConfig(epochs=2, batch_size=8, eval_batch_size=16, eval_every=0, log_every=1,
                          save_every=0, mixed_precision="no", seed=0),
        log=LogConfig(tracker=[], output_root=str(tmp_path / "runs"), probes=["the big [MASK] sees a dog ."],
                      fill_mask_top_k=3),
    )
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg.validate()


@pytest.fixture
def make_config(tmp_path, tiny_corpus_dir, tiny_tokenizer_dir):
    def make(**sections) -> Config:
        return tiny_config(tmp_path, tiny_corpus_dir, tiny_tokenizer_dir, **sections)

    return make


def write_recipe(path: Path, cfg: Config) -> Path:
    """A recipe file reproducing `cfg`, for subprocess runs."""
    path.write_text(
        "from trainer.config import *\n"
        f"config = Config(name={cfg.name!r}, model=ModelConfig(**{vars(cfg.model)!r}), "
        f"data=DataConfig(**{vars(cfg.data)!r}), optim=OptimConfig(**{vars(cfg.optim)!r}), "
        f"train=TrainConfig(**{vars(cfg.train)!r}), log=LogConfig(**{vars(cfg.log)!r}))\n"
    )
    return path


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one AcceleratorState per process; each in-process run starts from a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
