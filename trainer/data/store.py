"""The token store: a split tokenized once, packed, kept on disk and read by memory map.

Each document becomes `[CLS] text [SEP]` and is appended to one token stream per split; blocks are
cut from the whole stream (they may span documents, and only the split's last partial block is
dropped, unlike run_mlm's per-batch remainders). The stream is stored as uint16 (uint32 for a
vocabulary over 65,536 tokens) in `train.bin` (and `heldout.bin`: the documents held out for
validation) and read by memory map, so training holds no copy of the corpus in RAM.

A store is cached under a key of the documents' content (file hashes, or a dataset's fingerprint),
the tokenizer (its whole definition) and the held-out share: a second run opens it at once, a changed
file or tokenizer makes a new one. Building takes a file lock on the key, so concurrent runs and the
processes of a multi-process launch (on one machine or on shared storage) tokenize it once; the
others wait and open it. `num_proc` worker processes tokenize chunks of documents, the main process
reads the source and writes their output in order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.sources import DataError, Stream

STORE_VERSION = 1  # bump when the stored layout or the tokenization rule changes
PROGRESS_EVERY_S = 15.0


# --------------------------------------------------------------------------- reading a store


class Blocks:
    """`count` rows of `block_size` tokens from a token file, as int32 tensors, read by memory map.
    Picklable without its data (DataLoader workers reopen the file)."""

    def __init__(self, path: Path, dtype: str, block_size: int, count: int):
        self.path, self.dtype, self.block_size, self.count = Path(path), dtype, block_size, count
        self._rows = None

    @property
    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = (np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.count, self.block_size))
                          if self.count else np.zeros((0, self.block_size), dtype=self.dtype))
        return self._rows

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        import torch

        return torch.from_numpy(self.rows[index].astype(np.int32))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": None}

    def numel(self) -> int:
        return self.count * self.block_size

    def tensor(self):
        """All rows as one int32 tensor (small splits, tests)."""
        import torch

        return torch.from_numpy(np.asarray(self.rows, dtype=np.int32))


@dataclass
class TokenStore:
    directory: Path
    meta: dict

    def blocks(self, part: str, block_size: int, limit: int | None = None) -> Blocks:
        count = self.meta["tokens"][part] // block_size
        if limit is not None:
            count = min(count, limit)
        return Blocks(self.directory / f"{part}.bin", self.meta["dtype"], block_size, count)


# --------------------------------------------------------------------------- the cache


def tokenizer_digest(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def store_key(stream: Stream, tokenizer, heldout: float) -> str:
    identity = {"version": STORE_VERSION, "source": stream.identity(), "tokenizer": tokenizer_digest(tokenizer),
                "heldout": heldout}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def open_store(stream: Stream, tokenizer, heldout: float, cache_root: Path, num_proc: int, log=print) -> TokenStore:
    """The store of `stream` (documents held out at `heldout`), built first if it is not cached."""
    from filelock import FileLock

    key = store_key(stream, tokenizer, heldout)
    directory = Path(cache_root) / key
    if (directory / "meta.json").is_file():
        return TokenStore(directory, json.loads((directory / "meta.json").read_text()))
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(directory) + ".lock")
        lock.acquire()
    except OSError as e:
        raise DataError(f"cannot write the token cache in {directory.parent} ({e.strerror}); "
                        f"pass a writable --data.cache_dir") from None
    try:
        if not (directory / "meta.json").is_file():  # another process may have built it while we waited
            for stale in directory.parent.glob(f".tmp-{key}-*"):  # a build killed midway
                shutil.rmtree(stale, ignore_errors=True)
            tmp = directory.parent / f".tmp-{key}-{os.getpid()}"
            try:
                build_store(stream, tokenizer, heldout, tmp, num_proc, log)
                os.rename(tmp, directory)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
    return TokenStore(directory, json.loads((directory / "meta.json").read_text()))


# --------------------------------------------------------------------------- building


def build_store(stream: Stream, tokenizer, heldout: float, directory: Path, num_proc: int, log) -> None:
    """Tokenize `stream` into `directory`: train.bin (+ heldout.bin), then meta.json, which marks it complete."""
    directory.mkdir(parents=True)
    dtype = "uint16" if len(tokenizer) <= 1 << 16 else "uint32"
    spec = TokenizeSpec(tokenizer.backend_tokenizer.to_str(), tokenizer.unk_token, heldout, dtype)
    parts = ["train", "heldout"] if heldout else ["train"]
    files = {part: open(directory / f"{part}.bin", "wb") for part in parts}
    tokens = dict.fromkeys(parts, 0)
    documents = dict.fromkeys(parts, 0)
    started = last_report = time.perf_counter()
    try:
        for outputs in tokenize_stream(stream, spec, num_proc):
            for part, (ids, docs) in zip(parts, outputs):
                ids.tofile(files[part])
                tokens[part] += len(ids)
                documents[part] += docs
            if time.perf_counter() - last_report > PROGRESS_EVERY_S:
                last_report = time.perf_counter()
                log(f"tokenizing {stream.describe()}: {sum(documents.values()):,} documents, "
                    f"{sum(tokens.values()):,} tokens ({last_report - started:.0f} s)")
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise DataError(f"cannot write the token cache in {directory.parent} ({e.strerror}); free some space "
                        f"or pass another --data.cache_dir") from None
    finally:
        for f in files.values():
            f.close()
    if stream.documents == 0:
        raise DataError(f"{stream.describe()} has no text (every line or record is blank)")
    meta = {"version": STORE_VERSION, "source": stream.describe(), "dtype": dtype, "vocab_size": len(tokenizer),
            "records": stream.records, "documents": documents, "tokens": tokens, "heldout": heldout,
            "seconds": round(time.perf_counter() - started, 2), "num_proc": num_proc}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))


@dataclass
class TokenizeSpec:
    """What a worker needs (picklable): the tokenizer's JSON, WikiText's `<unk>` mapping, the held-out share."""

    tokenizer_json: str
    unk_token: str | None
    heldout: float
    dtype: str


def tokenize_stream(stream: Stream, spec: TokenizeSpec, num_proc: int):
    """Per chunk of documents, in order: [(train ids, documents), (held-out ids, documents)]. With
    several processes at most 2 chunks per worker are in flight, so memory stays flat."""
    chunks = numbered(stream.chunks())
    if num_proc <= 1:
        init_worker(spec)
        yield from itertools.starmap(tokenize_chunk, chunks)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork: spawn would re-run an unguarded calling script (a notebook, a user's script). The workers
    # only use a tokenizer built fresh from JSON and numpy, none of the parent's threads or locks.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context(method), initializer=init_worker,
                             initargs=(spec,)) as pool:
        pending = deque()
        for first, docs in chunks:
            pending.append(pool.submit(tokenize_chunk, first, docs))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def numbered(chunks):
    """(index of the chunk's first document in the stream, documents)."""
    first = 0
    for docs in chunks:
        yield first, docs
        first += len(docs)


WORKER: dict = {}


def init_worker(spec: TokenizeSpec) -> None:
    # One thread per worker: the library's own thread pool on top of num_proc workers (or beside torch's
    # threads, in process) oversubscribes the cores and was 1.5x slower here.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(spec.tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    WORKER.update(tokenizer=tokenizer, spec=spec)


def tokenize_chunk(first: int, docs: list[str]) -> list[tuple[np.ndarray, int]]:
    tokenizer, spec = WORKER["tokenizer"], WORKER["spec"]
    if spec.unk_token:  # WikiText's tokenized variant writes unknown words as <unk>
        docs = [doc.replace("<unk>", spec.unk_token) for doc in docs]
    encodings = tokenizer.encode_batch_fast(docs, add_special_tokens=True)
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=spec.dtype)
    if not spec.heldout:
        return [(ids, len(docs))]
    held = heldout_mask(first, len(docs), spec.heldout)
    per_token = np.repeat(held, [len(e.ids) for e in encodings])
    return [(ids[~per_token], int((~held).sum())), (ids[per_token], int(held.sum()))]


def heldout_mask(first: int, count: int, share: float) -> np.ndarray:
    """Whether documents first..first+count-1 are held out: a hash of the document's index (splitmix64)
    below `share`, so the choice is the same in every run and process, and spread over the corpus."""
    x = np.arange(first, first + count, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return x < np.uint64(min(int(share * 2**64), 2**64 - 1))
