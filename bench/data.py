"""Benchmark of the data path at scale: tokenizing a corpus into the token store, opening it again, and
training on it, against HF run_mlm's tokenize + group_texts.

    make bench-data                                   # = python bench/data.py (100 MB and 1 GB corpora)
    python bench/data.py --sizes 100 --procs 1 2      # quicker

The corpora are reproducible: lines of the offline WikiText-2 files (train, validation, test), shuffled
with a fixed seed and repeated until the size is reached, written under --workdir. Every measurement
runs in its own process; peak memory is the PSS summed over the process and its workers (shared
pages counted once), sampled every 100 ms.
Measured per corpus size: tokenizing with 1 and with N processes (a cold cache: wall time, MB/s,
tokens/s, peak memory), a warm start (the same command with the cache built), and 50 training steps of
recipes/scratch.py on the corpus (peak memory); beside them run_mlm's tokenize_function + group_texts (its
code path ported, `datasets.map` with num_proc) on the smallest corpus. Writes bench/results/data-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def shared(name: str) -> Path:
    from trainer.hub import shared_data_dir

    return shared_data_dir() / name


def build_corpus(path: Path, megabytes: int, seed: int = 0) -> Path:
    """WikiText-2's lines, shuffled and repeated to `megabytes` (a new shuffle each repeat)."""
    if path.is_file() and path.stat().st_size >= megabytes * 10**6:
        return path
    lines = []
    for name in ("wikitext-2-v1/wiki.train.tokens", "wikitext-2-raw-v1/wiki.valid.raw", "wikitext-2-raw-v1/wiki.test.raw"):
        lines += [l for l in shared(name).read_text(encoding="utf-8").splitlines() if l.strip()]
    rng, written = random.Random(seed), 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 10**6:
            rng.shuffle(lines)
            for line in lines:
                f.write(line + "\n")
                written += len(line.encode()) + 1
                if written >= megabytes * 10**6:
                    break
    return path


def measured(command: list[str]) -> dict:
    """Run `command`; wall time, its peak memory summed over the process tree (PSS: pages shared by forked
    workers counted once), and the JSON it prints last."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            peak = max(peak, sum(pss_bytes(p.pid) for p in [root, *root.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.1)
    output = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}\n{output[-3000:]}")
    result = next((json.loads(l) for l in reversed(output.splitlines()) if l.startswith("{")), {})
    return {**result, "wall_s": round(time.perf_counter() - started, 2), "peak_pss_gb": round(peak / 2**30, 3)}


def pss_bytes(pid: int) -> int:
    """Proportional set size from /proc/PID/smaps_rollup (cheap to read, unlike the full smaps)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------- what each child process runs


def child_tokenize(corpus: str, cache: str, procs: int) -> dict:
    from trainer.config import DataConfig
    from trainer.data import load_blocks, load_tokenizer

    cfg = DataConfig(dataset=corpus, tokenizer=str(shared("bert-base-uncased")), cache_dir=cache, num_proc=procs)
    tokenizer = load_tokenizer(cfg.tokenizer)
    started = time.perf_counter()
    train = load_blocks(cfg, tokenizer, "train", log=lambda *_: None)
    held = load_blocks(cfg, tokenizer, "validation", log=lambda *_: None)
    return {"load_s": round(time.perf_counter() - started, 2), "tokens": train.num_tokens + held.num_tokens}


def child_run_mlm(corpus: str, cache: str, procs: int) -> dict:
    """transformers' examples/pytorch/language-modeling/run_mlm.py, line_by_line=False: tokenize every line
    (special tokens mask included), then group_texts into 128-token blocks, each a datasets.map."""
    from itertools import chain

    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(shared("bert-base-uncased")))
    started = time.perf_counter()
    raw = datasets.load_dataset("text", data_files={"train": corpus}, cache_dir=cache)

    def tokenize_function(examples):
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    tokenized = raw.map(tokenize_function, batched=True, num_proc=procs, remove_columns=["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]]) // 128 * 128
        return {k: [t[i:i + 128] for i in range(0, total_length, 128)] for k, t in concatenated.items()}

    grouped = tokenized.map(group_texts, batched=True, num_proc=procs)
    return {"load_s": round(time.perf_counter() - started, 2), "tokens": len(grouped["train"]) * 128}


# --------------------------------------------------------------------------- the parent


def tokenize_runs(corpus: Path, workdir: Path, procs: list[int]) -> list[dict]:
    rows, size_mb = [], corpus.stat().st_size / 1e6
    for n in procs:
        cache = workdir / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        command = [sys.executable, __file__, "child", "tokenize", str(corpus), str(cache), str(n)]
        cold = measured(command)
        warm = measured(command)
        rows.append({"corpus_mb": round(size_mb), "procs": n, "cold": cold, "warm": warm,
                     "mb_per_s": round(size_mb / cold["load_s"], 2), "tokens_per_s": round(cold["tokens"] / cold["load_s"])})
        print(f"{size_mb:,.0f} MB, {n} process(es): tokenized in {cold['load_s']:.1f} s ({rows[-1]['mb_per_s']} MB/s, "
              f"{rows[-1]['tokens_per_s']:,} tokens/s), peak memory {cold['peak_pss_gb']} GB; warm start "
              f"{warm['load_s']:.2f} s in a {warm['wall_s']:.1f} s process", flush=True)
        if n != procs[-1]:
            shutil.rmtree(cache, ignore_errors=True)
    return rows


def training_run(corpus: Path, workdir: Path, cache: Path, steps: int) -> dict:
    out = workdir / "runs"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "trainer/run.py", "recipes/scratch.py", f"--data.dataset={corpus}",
               f"--data.tokenizer={shared('bert-base-uncased')}", f"--data.cache_dir={cache}",
               f"--train.max_steps={steps}", "--train.eval_every=0", "--data.max_eval_blocks=8", "--log.tracker=none",
               f"--log.output_root={out}", "--train.log_every=10"]
    result = measured(command)
    print(f"{corpus.stat().st_size / 1e6:,.0f} MB: {steps} training steps, peak memory {result['peak_pss_gb']} GB "
          f"({result['wall_s']:.0f} s with start-up)", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return {"corpus_mb": round(corpus.stat().st_size / 1e6), "steps": steps, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="corpus sizes in MB")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="tokenizing processes to compare")
    parser.add_argument("--steps", type=int, default=50, help="training steps per corpus")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "results" / "data")
    parser.add_argument("--skip-run-mlm", action="store_true")
    args = parser.parse_args()
    report = {"cpu": cpu_kind(), "tokenize": [], "train": [], "run_mlm": []}
    for size in args.sizes:
        corpus = build_corpus(args.workdir / f"wiki-{size}mb.txt", size)
        report["tokenize"] += tokenize_runs(corpus, args.workdir, args.procs)
        report["train"].append(training_run(corpus, args.workdir, args.workdir / f"cache-{args.procs[-1]}", args.steps))
        shutil.rmtree(args.workdir / f"cache-{args.procs[-1]}", ignore_errors=True)
        if not args.skip_run_mlm and size == min(args.sizes):
            for n in args.procs:
                cache = args.workdir / "hf-cache"
                shutil.rmtree(cache, ignore_errors=True)
                row = measured([sys.executable, __file__, "child", "run-mlm", str(corpus), str(cache), str(n)])
                row.update(corpus_mb=size, procs=n, mb_per_s=round(corpus.stat().st_size / 1e6 / row["load_s"], 2))
                report["run_mlm"].append(row)
                print(f"run_mlm tokenize + group_texts, {size} MB, {n} process(es): {row['load_s']:.1f} s "
                      f"({row['mb_per_s']} MB/s), peak memory {row['peak_pss_gb']} GB", flush=True)
                shutil.rmtree(cache, ignore_errors=True)
    out = REPO / "bench" / "results" / f"data-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


def cpu_kind() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
    return f"{model}, {'avx512_bf16' if 'avx512_bf16' in info else 'no avx512_bf16'}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        kind, corpus, cache, procs = sys.argv[2:6]
        run = child_tokenize if kind == "tokenize" else child_run_mlm
        print(json.dumps(run(corpus, cache, int(procs))))
    else:
        main()
