"""Your own corpus: every kind of file, the text column, held-out validation, the token cache, a
tokenizer trained on the corpus, two processes, and each bad input, on files made in the test."""

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NOUNS, REPO, subprocess_env, write_recipe
from trainer.config import DataConfig
from trainer.data import DataError, load_blocks
from trainer.loop import train

# Document i reads its index in nouns, one per digit: [CLS] the n n n n . [SEP] is exactly one 8-token
# block, so which documents a split holds can be read back from its blocks.
BLOCK = 8


def numbered(i: int) -> str:
    return "the " + " ".join(NOUNS[int(d)] for d in f"{i:04d}") + " ."


def index_of(block, tokenizer) -> int:
    words = tokenizer.convert_ids_to_tokens(block.tolist())[2:6]
    return int("".join(str(NOUNS.index(w)) for w in words))


def indices(split, tokenizer) -> list[int]:
    return [index_of(split.blocks[i], tokenizer) for i in range(len(split.blocks))]


def write_kind(directory: Path, kind: str, texts: list[str]) -> Path:
    """The same documents as a file (or dataset directory) of `kind`, with an extra non-text column."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "text": t} for i, t in enumerate(texts)]
    path = directory / f"corpus.{kind}"
    if kind in ("txt", "md"):
        path.write_text("\n".join(texts) + "\n")
    elif kind == "txt.gz":
        path.write_bytes(gzip.compress(("\n\n".join(texts) + "\n").encode()))
    elif kind in ("jsonl", "jsonl.gz"):
        lines = "".join(json.dumps(r) + "\n" for r in rows)
        path.write_bytes(gzip.compress(lines.encode()) if kind.endswith(".gz") else lines.encode())
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, ["id", "text"])
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=16)
    elif kind == "saved":
        import datasets

        path = directory / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def data(path, tmp_path, **fields) -> DataConfig:
    return DataConfig(**{"dataset": str(path), "block_size": BLOCK, "cache_dir": str(tmp_path / "cache"), **fields})


KINDS = ["txt", "md", "txt.gz", "jsonl", "jsonl.gz", "json", "csv", "parquet", "saved"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_file_gives_the_documents_in_order(tmp_path, tiny_tokenizer, kind):
    texts = [numbered(i) for i in range(40)]
    path = write_kind(tmp_path / "data", kind, texts)
    split = load_blocks(data(path, tmp_path, validation_split=0.0), tiny_tokenizer, "train", log=lambda *_: None)
    assert indices(split, tiny_tokenizer) == list(range(40))
    assert split.blocks[0].dtype.is_floating_point is False and len(split.blocks) == 40


@pytest.mark.parametrize("kind", ["txt.gz", "jsonl", "csv", "parquet"])
def test_each_kind_trains_a_few_steps(make_config, tmp_path, kind):
    from conftest import make_sentence
    import random

    rng = random.Random(0)
    path = write_kind(tmp_path / "data", kind, [make_sentence(rng) for _ in range(300)])
    cfg = make_config(data={"dataset": str(path), "validation_split": 0.1}, train={"max_steps": 3})
    summary = train(cfg)
    assert summary["step"] == 3 and summary["eval/loss"] > 0


def test_the_text_column_is_found_or_named(tmp_path, tiny_tokenizer):
    def jsonl(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    body = jsonl("body.jsonl", [{"id": i, "body": numbered(i), "score": 0.5} for i in range(20)])
    split = load_blocks(data(body, tmp_path, validation_split=0.0), tiny_tokenizer, "train", log=lambda *_: None)
    assert indices(split, tiny_tokenizer) == list(range(20))  # the only string column

    two = jsonl("two.jsonl", [{"title": "the cat", "body": numbered(i)} for i in range(20)])
    with pytest.raises(DataError, match=r"two.jsonl, line 1: no column 'text'; string columns: title, body: "
                                        r"pass --data.text_column=NAME"):
        load_blocks(data(two, tmp_path), tiny_tokenizer, "train")
    split = load_blocks(data(two, tmp_path, validation_split=0.0, text_column="body"), tiny_tokenizer, "train",
                        log=lambda *_: None)
    assert indices(split, tiny_tokenizer) == list(range(20))
    with pytest.raises(DataError, match=r"no column 'summary'; string columns: title, body"):
        load_blocks(data(two, tmp_path, text_column="summary"), tiny_tokenizer, "train")


def test_a_hub_dataset_with_its_own_split_names(tmp_path, tiny_tokenizer, monkeypatch):
    """What `datasets.load_dataset(name, config)` returns, with a 'valid' split instead of 'validation'."""
    import datasets

    splits = datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": [numbered(i) for i in range(a, b)],
                                                                       "label": list(range(a, b))})
                                   for name, (a, b) in {"train": (0, 30), "valid": (30, 40), "test": (40, 50)}.items()})
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kw: asked.append(args) or splits)
    cfg = DataConfig(dataset="someone/notes", dataset_config="en", block_size=BLOCK, cache_dir=str(tmp_path / "c"))
    got = {s: indices(load_blocks(cfg, tiny_tokenizer, s, log=lambda *_: None), tiny_tokenizer)
           for s in ("train", "validation", "test")}
    assert got == {"train": list(range(30)), "validation": list(range(30, 40)), "test": list(range(40, 50))}
    assert asked[0] == ("someone/notes", "en")


def test_held_out_validation_is_disjoint_the_same_every_time_and_printed(tmp_path, tiny_tokenizer):
    path = write_kind(tmp_path / "data", "txt", [numbered(i) for i in range(500)])
    lines = []
    cfg = data(path, tmp_path, validation_split=0.2)
    train_ids = indices(load_blocks(cfg, tiny_tokenizer, "train", log=lines.append), tiny_tokenizer)
    held_ids = indices(load_blocks(cfg, tiny_tokenizer, "validation", log=lines.append), tiny_tokenizer)
    assert not set(train_ids) & set(held_ids) and sorted(train_ids + held_ids) == list(range(500))
    assert train_ids == sorted(train_ids) and 70 < len(held_ids) < 130  # order kept, about 20% held out
    assert "20% of the training documents held out" in lines[1] and f"{len(held_ids)} blocks" in lines[1]
    # A fresh cache, another share: the same documents are chosen again (a larger share holds out a superset).
    again = data(path, tmp_path, validation_split=0.2, cache_dir=str(tmp_path / "other"))
    assert indices(load_blocks(again, tiny_tokenizer, "validation", log=lambda *_: None), tiny_tokenizer) == held_ids
    more = indices(load_blocks(data(path, tmp_path, validation_split=0.4), tiny_tokenizer, "validation",
                               log=lambda *_: None), tiny_tokenizer)
    assert set(held_ids) < set(more)


def test_the_token_cache_is_reused_and_follows_content_and_tokenizer(tmp_path, tiny_tokenizer, monkeypatch):
    import trainer.data.store as store
    from conftest import write_tokenizer
    from trainer.data import load_tokenizer

    builds = []
    real_build = store.build_store
    monkeypatch.setattr(store, "build_store", lambda *a, **k: builds.append(a[0].describe()) or real_build(*a, **k))
    path = write_kind(tmp_path / "data", "txt", [numbered(i) for i in range(64)])

    def load(cfg=None, tokenizer=tiny_tokenizer):
        return load_blocks(cfg or data(path, tmp_path, validation_split=0.0), tokenizer, "train", log=lambda *_: None)

    first = load()
    assert len(builds) == 1
    (store_dir,) = [p for p in (tmp_path / "cache" / "tokens").iterdir() if p.is_dir()]
    assert (store_dir / "train.bin").stat().st_size == 64 * BLOCK * 2  # uint16 on disk
    load()
    os.utime(path, (0, 0))  # a new date, the same content
    load(data(path, tmp_path, validation_split=0.0, block_size=16))  # blocks are cut when read
    assert len(builds) == 1
    path.write_text(path.read_text().replace(NOUNS[3], NOUNS[4]))
    assert load().blocks.tensor().tolist() != first.blocks.tensor().tolist() and len(builds) == 2
    other = load_tokenizer(str(write_tokenizer(tmp_path / "tok2", extra_words=3)))
    load(tokenizer=other)
    assert len(builds) == 3


def test_a_tokenizer_trained_on_the_corpus_trains_a_model(make_config, tmp_path):
    from transformers import AutoTokenizer

    from conftest import make_sentence
    import random

    rng = random.Random(1)
    corpus = tmp_path / "notes"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(make_sentence(rng).upper() + " Zébu." for _ in range(200)))
    (corpus / "b.jsonl").write_text("".join(json.dumps({"text": make_sentence(rng)}) + "\n" for _ in range(200)))
    out = tmp_path / "my-tokenizer"
    command = [sys.executable, "-m", "trainer.tokenizer", f"--data.dataset={corpus}", "--vocab-size=120",
               "--min-frequency=1", f"--output={out}"]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"use it with: --data.tokenizer={out}" in result.stdout
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.tokenize("The big CAT zebu") == ["the", "big", "cat", "zebu"]  # lowercased, accents stripped
    assert tokenizer.mask_token == "[MASK]" and tokenizer("cat")["input_ids"][0] == tokenizer.cls_token_id
    assert 40 < len(tokenizer) <= 120

    cfg = make_config(data={"dataset": str(corpus), "tokenizer": str(out)}, train={"max_steps": 2})
    summary = train(cfg)
    assert summary["step"] == 2
    saved = json.loads((Path(summary["model_dir"]) / "config.json").read_text())
    assert saved["vocab_size"] == len(tokenizer)


def test_a_pretrained_model_refuses_another_vocabulary_unless_resized(make_config, tmp_path, tiny_tokenizer_dir):
    from conftest import write_tokenizer
    from trainer.model import ModelError

    base = make_config(train={"max_steps": 2}, log={"run_name": "base"})
    model_dir = Path(train(base)["model_dir"])
    bigger = write_tokenizer(tmp_path / "bigger", extra_words=7)
    cfg = make_config(model={"pretrained": str(model_dir)}, data={"tokenizer": str(bigger)}, train={"max_steps": 2})
    with pytest.raises(ModelError, match=r"--model.resize_embeddings=true"):
        train(cfg)
    cfg.model.resize_embeddings = True
    summary = train(cfg)
    assert json.loads((Path(summary["model_dir"]) / "config.json").read_text())["vocab_size"] == 34 + 7


TWO_RANKS = """
import json, os, sys
import trainer.data.store as store
from trainer.config import Config
from trainer.data import MLMCollator
from trainer.loop import train

seen, real_call, real_build = [], MLMCollator.__call__, store.build_store
def record(self, items):
    seen.append([self.epoch, [i for i, _ in items]])
    return real_call(self, items)
def build(*args, **kwargs):
    with open(os.environ["BUILDS"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    return real_build(*args, **kwargs)
MLMCollator.__call__, store.build_store = record, build
train(Config.from_dict(json.loads(open(sys.argv[1]).read())).validate())
with open(f"{os.environ['SEEN']}.{os.environ['RANK']}", "w") as f:
    json.dump(seen, f)
"""


@pytest.mark.slow
def test_two_processes_train_on_every_block_once_per_epoch_and_tokenize_once(make_config, tmp_path):
    from test_processes import free_port

    path = write_kind(tmp_path / "data", "txt", [numbered(i) for i in range(80)])
    cfg = make_config(data={"dataset": str(path), "block_size": BLOCK, "validation_split": 0.2},
                      train={"epochs": 2, "batch_size": 4})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "two.py").write_text(TWO_RANKS)
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1", "BUILDS": str(tmp_path / "builds"),
           "SEEN": str(tmp_path / "seen")}
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(REPO / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               str(tmp_path / "two.py"), str(tmp_path / "config.json")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len((tmp_path / "builds").read_text().split()) == 1  # one process tokenized, the other waited
    from trainer.data import load_tokenizer

    blocks = load_blocks(cfg.data, load_tokenizer(cfg.data.tokenizer), "train", log=lambda *_: None).blocks
    for epoch in (0, 1):
        per_rank = [[i for e, batch in json.loads((tmp_path / f"seen.{rank}").read_text()) if e == epoch for i in batch]
                    for rank in (0, 1)]
        assert len(per_rank[0]) == len(per_rank[1]) == len(blocks) // 8 * 4
        everything = sorted(per_rank[0] + per_rank[1])
        assert len(set(everything)) == len(everything) == len(blocks) // 8 * 8  # each block at most once
        assert set(everything) <= set(range(len(blocks)))


def put(path: Path, content) -> Path:
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


BAD_INPUTS = {
    "no usable file": (lambda d: put(d / "a.png", b"\x89PNG") and put(d / "b.bin", b"\0").parent,
                       r"no usable data file \(found: a.png, b.bin\); the trainer reads .txt"),
    "empty file": (lambda d: put(d / "e.txt", ""), r"e.txt is empty: remove it or add text"),
    "not UTF-8": (lambda d: put(d / "l.txt", b"the cat\nthe caf\xe9 sees\n"),
                  r"l.txt is not UTF-8 text \(byte b'\\xe9' at offset 15, line 2\); convert it, e.g. iconv"),
    "binary": (lambda d: put(d / "x.txt", b"the cat\x00\x01\x02"), r"x.txt is a binary file \(a NUL byte at offset 7\)"),
    "bad JSON line": (lambda d: put(d / "j.jsonl", '{"text": "the cat"}\n\n{"text": "the dog"\n'),
                      r"j.jsonl, line 3: not JSON \(Expecting ',' delimiter at column \d+\)"),
    "missing column": (lambda d: put(d / "m.jsonl", '{"title": "a", "body": "b"}\n'),
                       r"m.jsonl, line 1: no column 'text'; string columns: title, body"),
    "smaller than a batch": (lambda d: put(d / "s.txt", "the cat sees a dog .\n" * 30),
                             r"the train split has \d blocks of 32 tokens; one step needs train.batch_size=8"),
    "share leaves no training": (lambda d: put(d / "h.txt", "the cat sees a dog .\n" * 20),
                                 r"fewer than one block .* data.validation_split=0.99 holds out"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_leaves_no_run(make_config, tmp_path, capsys, case):
    from trainer.run import main

    make, message = BAD_INPUTS[case]
    (tmp_path / "in").mkdir()
    target = make(tmp_path / "in")
    share = {"share leaves no training": 0.99, "smaller than a batch": 0.5}.get(case, 0.1)
    cfg = make_config(data={"dataset": str(target), "validation_split": share})
    assert main([str(write_recipe(tmp_path / "recipe.py", cfg))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err
    runs = Path(cfg.log.output_root)
    assert not runs.exists() or not [p for p in runs.iterdir() if p.is_dir()]


def test_a_tokenizer_without_a_mask_token_is_refused(make_config, tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast

    from conftest import WORDS
    from trainer.run import main

    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *WORDS])}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    cfg = make_config(data={"tokenizer": str(tmp_path / "tok")})
    assert main([str(write_recipe(tmp_path / "recipe.py", cfg))]) == 2
    assert "has no mask token, which masked-language modelling needs" in capsys.readouterr().err


def test_a_mid_epoch_resume_reads_only_the_blocks_it_trains_on(make_config, monkeypatch):
    from trainer.data.store import Blocks

    cfg = make_config(train={"epochs": 1, "max_steps": 3, "save_every": 3}, log={"run_name": "skip"})
    train(cfg)
    reads = []
    real = Blocks.__getitem__
    monkeypatch.setattr(Blocks, "__getitem__", lambda self, i: reads.append(self.path) or real(self, i))
    cfg.train.max_steps = 5
    summary = train(cfg, resume=str(Path(cfg.log.output_root) / "skip"))
    assert summary["step"] == 5
    from trainer.data import load_tokenizer

    train_file = load_blocks(cfg.data, load_tokenizer(cfg.data.tokenizer), "train", log=lambda *_: None).blocks.path
    # Steps 4 and 5, plus the one batch Accelerate's loader fetches ahead; the 3 skipped batches are not read.
    assert reads.count(train_file) == 3 * cfg.train.batch_size
