"""Where the text comes from, and how it splits into train / validation / test.

`data.dataset` names the data: a Hub dataset (with `data.dataset_config`), a directory written by
`datasets.save_to_disk`, or local files: one file, a directory (searched recursively) or a glob.
Local files may be text (.txt .text .md .raw .tokens: one document per line), JSON lines (.jsonl,
.ndjson, or .json with one object per line or one array of objects), .csv or .parquet; the text and
JSON kinds may be gzip-compressed (.gz). A directory's files go to splits by name as HF datasets
does it (`train*`, `*.valid.*`, `test/`, ...); with no such names every file is training data.

A record's text is `data.text_column` ("text"), else its only string column. Every source is read as a
stream of chunks of documents; nothing here holds a whole file in memory (but a .json array).
"""

from __future__ import annotations

import csv
import functools
import glob
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw", ".tokens")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
USABLE = (*TEXT_SUFFIXES, *JSON_SUFFIXES, ".csv", ".parquet")
SPLITS = ("train", "validation", "test")
HUB_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev", "val"),
                   "test": ("test",)}
CHUNK_CHARS = 1 << 20  # documents are handed on in chunks of about 1 MB of text


class DataError(ValueError):
    """Missing or unusable data; reported as one line telling the user what to do."""


def suffix_of(path: Path) -> str:
    """The format suffix, looking through .gz: notes.jsonl.gz -> .jsonl."""
    name = path.name.lower().removesuffix(".gz")
    return Path(name).suffix


@dataclass
class Stream:
    """One split's documents: local files, or one split of a `datasets.Dataset`.

    `chunks()` yields lists of non-blank documents; `records` and `documents` count what was read
    (lines or rows, and the non-blank ones). `identity()` names the content for the token cache."""

    origin: str  # what the user named, for messages
    files: list[Path] = field(default_factory=list)
    dataset: object = None  # a datasets.Dataset (Hub or save_to_disk)
    split: str = "train"
    text_column: str = "text"
    records: int = 0
    documents: int = 0

    def describe(self) -> str:
        if self.dataset is not None:
            return f"{self.origin} ({self.split})"
        if len(self.files) == 1:
            return str(self.files[0])
        return f"{self.origin} ({len(self.files)} files)"

    def size_bytes(self) -> int:
        if self.dataset is not None:
            return self.dataset.data.nbytes
        return sum(p.stat().st_size * (4 if p.name.lower().endswith(".gz") else 1) for p in self.files)

    def identity(self) -> dict:
        """What the tokenized result depends on: file contents (not names or dates) or the dataset's fingerprint."""
        if self.dataset is not None:
            return {"dataset": self.dataset._fingerprint, "column": self.column_of_dataset()}
        return {"files": [file_digest(p) for p in self.files], "column": self.text_column}

    def chunks(self, chunk_chars: int = CHUNK_CHARS) -> Iterator[list[str]]:
        self.records = self.documents = 0
        chunk, size = [], 0
        for text in self.texts():
            self.records += 1
            if text is None or not text.strip():
                continue
            self.documents += 1
            chunk.append(text)
            size += len(text)
            if size >= chunk_chars:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    def texts(self) -> Iterator[str | None]:
        if self.dataset is not None:
            column = self.column_of_dataset()
            for batch in self.dataset.iter(batch_size=1000):
                yield from batch[column]
            return
        for path in self.files:
            kind = suffix_of(path)
            reader = (read_text_lines if kind in TEXT_SUFFIXES else read_json if kind in JSON_SUFFIXES
                      else read_csv if kind == ".csv" else read_parquet)
            yield from reader(path, self.text_column)

    def column_of_dataset(self) -> str:
        features = self.dataset.features
        strings = [name for name, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        return choose_column(strings, list(features), self.text_column, self.origin)


def choose_column(strings: list[str], columns: list[str], wanted: str, where: str) -> str:
    """`wanted` if present, else the only string column; a one-line error naming the choices otherwise."""
    if wanted in columns:
        return wanted
    if wanted == "text" and len(strings) == 1:
        return strings[0]
    if not strings:
        raise DataError(f"{where}: no text column {wanted!r} and no string column (columns: {', '.join(columns)})")
    raise DataError(f"{where}: no column {wanted!r}; string columns: {', '.join(strings)}: "
                    f"pass --data.text_column=NAME")


# --------------------------------------------------------------------------- file readers


def file_digest(path: Path) -> str:
    """SHA-256 of the file's content (about 2 s per GB), computed once per process for an unchanged file."""
    stat = path.stat()
    return content_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=4096)
def content_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def open_text(path: Path):
    """Text mode with universal newlines (as the datasets `text` builder reads), gzip looked through."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def check_not_binary(path: Path) -> None:
    """A NUL byte in the first 8 KB: a binary file (what git calls binary), not text."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(8192)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read it ({e}); is it really {suffix_of(path)}"
                        f"{' compressed with gzip' if path.name.lower().endswith('.gz') else ''}?") from None
    if b"\0" in head:
        offset = head.index(b"\0")
        raise DataError(f"{path} is a binary file (a NUL byte at offset {offset:,}), not text: "
                        f"remove it from the data or convert it to text")
    if not head:
        raise DataError(f"{path} is empty: remove it or add text")


def decode_error(path: Path, error: UnicodeDecodeError) -> DataError:
    """Where the first non-UTF-8 byte is (byte offset, line), and how to convert the file."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
        where = ""
    except UnicodeDecodeError as bad:
        line = data.count(b"\n", 0, bad.start) + 1
        where = f" (byte {data[bad.start:bad.start + 1]!r} at offset {bad.start:,}, line {line:,})"
    return DataError(f"{path} is not UTF-8 text{where}; convert it, e.g. "
                     f"iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}")


def guarded(path: Path, lines: Iterator) -> Iterator:
    """Re-raise a decoding error as a DataError naming the file and the byte."""
    try:
        yield from lines
    except UnicodeDecodeError as e:
        raise decode_error(path, e) from None


def read_text_lines(path: Path, column: str) -> Iterator[str]:
    check_not_binary(path)

    def lines():
        with open_text(path) as f:
            for line in f:
                yield line.rstrip("\n")

    yield from guarded(path, lines())


def read_json(path: Path, column: str) -> Iterator[str | None]:
    """JSON lines (one object per line), or a .json file holding one array of objects."""
    check_not_binary(path)

    def records():
        with open_text(path) as f:
            first = f.read(1)
            while first.isspace():
                first = f.read(1)
            f.seek(0)
            if first == "[":  # a JSON array: read whole (JSON lines are the streaming format)
                for number, record in enumerate(json.load(f), 1):
                    yield f"record {number:,}", record
                return
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"line {number:,}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {number:,}: not JSON ({e.msg} at column {e.colno}); "
                                    f"JSON lines files hold one JSON object per line") from None

    yield from guarded(path, pick_column(path, records(), column))


def pick_column(path: Path, records: Iterator, column: str) -> Iterator[str | None]:
    """The text of each (where, record) dict; the column is chosen from the first record."""
    chosen = None
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{path}, {where}: expected an object with a {column!r} field, got {type(record).__name__}")
        if chosen is None:
            strings = [k for k, v in record.items() if isinstance(v, str)]
            chosen = choose_column(strings, list(record), column, f"{path}, {where}")
        value = record.get(chosen)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{path}, {where}: {chosen!r} is a {type(value).__name__}, not text")
        yield value


def read_csv(path: Path, column: str) -> Iterator[str | None]:
    """CSV with a header line. CSV has no types: a "string column" is one whose first value is not a number."""
    check_not_binary(path)
    csv.field_size_limit(1 << 30)

    def texts():
        with open_text(path) as f:
            reader, chosen = csv.DictReader(f), None
            for row in reader:
                if chosen is None:
                    strings = [k for k, v in row.items() if k is not None and v and not is_number(v)]
                    chosen = choose_column(strings, reader.fieldnames, column, f"{path}, line {reader.line_num:,}")
                yield row.get(chosen)
            if chosen is None:
                raise DataError(f"{path}: no rows under the header line; add data or remove the file")

    yield from guarded(path, texts())


def is_number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def read_parquet(path: Path, column: str) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    schema = file.schema_arrow
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    chosen = choose_column(strings, schema.names, column, str(path))
    if chosen not in strings:
        raise DataError(f"{path}: column {chosen!r} is {schema.field(chosen).type}, not text")
    for batch in file.iter_batches(columns=[chosen], batch_size=4096):
        yield from batch.column(0).to_pylist()


# --------------------------------------------------------------------------- naming the data


def looks_like_path(spec: str) -> bool:
    return (spec.startswith((".", "/", "~")) or "\\" in spec or any(c in spec for c in "*?[")
            or spec.lower().removesuffix(".gz").endswith(USABLE))


def local_splits(spec: str) -> dict[str, list[Path]] | None:
    """Files of each split for a local file, directory or glob; None if `spec` is not local."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    path = Path(spec).expanduser()
    if path.is_file():
        return {"train": [path]}
    if path.is_dir():
        try:
            patterns = get_data_patterns(str(path))
        except EmptyDatasetError:
            raise DataError(f"{path} has no files: put .txt/.jsonl/.csv/.parquet files in it") from None
        found = DataFilesDict.from_patterns(patterns, base_path=str(path))
        splits = {str(split): usable(files, spec) for split, files in found.items()}
        return {split: files for split, files in splits.items() if files} or no_usable_file(spec, found)
    if any(c in spec for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        return {"train": usable(matches, spec) or no_usable_file(spec, {"": matches})}
    return None


def usable(files, spec: str) -> list[Path]:
    return sorted(Path(f) for f in files if suffix_of(Path(f)) in USABLE)


def no_usable_file(spec: str, found) -> dict:
    names = sorted({Path(f).name for files in found.values() for f in files})
    seen = f" (found: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})" if names else " (no files)"
    raise DataError(f"{spec}: no usable data file{seen}; the trainer reads {', '.join(USABLE)} and their .gz")


def saved_dataset(path: Path):
    """A directory written by `datasets.save_to_disk` (a Dataset or a DatasetDict), else None."""
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return None
    import datasets

    return datasets.load_from_disk(str(path))


def hub_dataset(name: str, config: str | None, cache_dir: str | None):
    import datasets

    try:
        return datasets.load_dataset(name, config, cache_dir=cache_dir)
    except Exception as e:
        raise DataError(f"could not load {name}/{config} from the Hub ({type(e).__name__}). Offline? Pass local "
                        f"files: --data.dataset=DIR (wiki.train.raw/wiki.valid.raw/..., or any .txt/.jsonl/.csv/"
                        f".parquet files) or --data.dataset=FILE") from e


def dataset_splits(dataset, origin: str, text_column: str) -> dict[str, Stream]:
    """The train/validation/test splits of a DatasetDict, whatever the source calls them."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        dataset = {"train": dataset}
    out = {}
    for split, names in HUB_SPLIT_NAMES.items():
        name = next((n for n in names if n in dataset), None)
        if name is not None:
            out[split] = Stream(origin, dataset=dataset[name], split=name, text_column=text_column)
    return out


def open_source(spec: str, cfg) -> dict[str, Stream]:
    """The splits `spec` provides, as streams."""
    path = Path(spec).expanduser()
    if path.is_dir() and (dataset := saved_dataset(path)) is not None:
        return dataset_splits(dataset, spec, cfg.text_column)
    files = local_splits(spec)
    if files is not None:
        return {split: Stream(spec, files=paths, split=split, text_column=cfg.text_column)
                for split, paths in files.items()}
    if looks_like_path(spec):
        raise DataError(f"data not found: {spec} (no such file or directory)")
    return dataset_splits(hub_dataset(spec, cfg.dataset_config, cfg.cache_dir), spec, cfg.text_column)


@dataclass
class SplitPlan:
    """Where each split comes from. `heldout`: validation is this share of the training documents."""

    train: Stream
    validation: Stream | None
    test: Stream | None
    heldout: float = 0.0


def plan_splits(cfg) -> SplitPlan:
    """Train from `data.train_dataset` or `data.dataset`; validation from the source's own split, else
    `data.validation_dataset`, else `data.validation_split` of the training documents."""
    main = open_source(cfg.dataset, cfg)
    train_splits = open_source(cfg.train_dataset, cfg) if cfg.train_dataset else main
    if "train" not in train_splits:
        where = cfg.train_dataset or cfg.dataset
        raise DataError(f"no train split in {where}: its files are named for "
                        f"{' and '.join(sorted(train_splits))} only; add a train file (e.g. wiki.train.raw, "
                        f"train.jsonl) or point --data.train_dataset at the training data")
    validation = main.get("validation")
    if cfg.validation_dataset:
        own = open_source(cfg.validation_dataset, cfg)
        validation = own.get("validation") or own.get("train")
    heldout = 0.0 if validation is not None else cfg.validation_split
    return SplitPlan(train_splits["train"], validation, main.get("test"), heldout)
