"""Compare runs offline: a summary table, config differences, PNG plots and one HTML report.

    python -m trainer.compare runs/scratch-20261124-031000 runs/finetune-20261124-040000 [--out DIR]
    make compare RUNS="runs/a runs/b"

Reads each run directory's `metrics.jsonl`, `config.json` and (if the run finished
or was interrupted) `summary.json`.
W&B's own files are W&B's to read: `wandb leet runs/wandb` shows the offline runs side by side.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.console import fmt
from trainer.rundir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_json, read_jsonl
from trainer.tracking import flatten

PANELS = [  # (title, [(metric, line label)], log scale?)
    ("MLM loss", [("train/loss", "train"), ("eval/loss", "val")], False),
    ("perplexity", [("train/perplexity", "train"), ("eval/perplexity", "val")], True),
    ("learning rate", [("train/lr", "lr")], False),
    ("gradient norm (before clipping)", [("train/grad_norm", "grad norm")], True),
]


@dataclass
class Run:
    name: str
    path: Path
    records: list[dict]
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def series(self, metric: str, axis: str) -> tuple[list[float], list[float]]:
        points = [(r[axis], r[metric]) for r in self.records if metric in r and axis in r and r[metric] is not None]
        points = [(x, y) for x, y in points if isinstance(y, (int, float)) and math.isfinite(y)]
        return [x for x, _ in points], [y for _, y in points]

    def last(self, metric: str):
        values = [r[metric] for r in self.records if r.get(metric) is not None]
        return values[-1] if values else None

    def best(self, metric: str):
        values = [r[metric] for r in self.records if isinstance(r.get(metric), (int, float))]
        return min(values) if values else None


class CompareError(ValueError):
    pass


def load_run(path: Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise CompareError(f"{path} is not a run directory")
    records = read_jsonl(path / METRICS_FILE)
    if not records:
        raise CompareError(f"{path} has no {METRICS_FILE} with records (W&B's files are read by W&B's tools: "
                           f"wandb leet {path.parent}/wandb)")
    try:
        config, summary = ({} if not (path / name).is_file() else read_json(path / name) for name in (CONFIG_FILE, SUMMARY_FILE))
    except ValueError as e:
        raise CompareError(f"{path}: {e}") from None
    return Run(path.name, path, records, config, summary)


def config_differences(runs: list[Run]) -> dict[str, list]:
    """Keys whose values differ between the runs; the command line as the user typed it (words joined by spaces)."""
    flat = [flatten({k: (" ".join(v) if k == "command" and isinstance(v, list) else v)
                     for k, v in run.config.items() if k != "run_id"}) for run in runs]
    keys = sorted(set().union(*flat))
    return {k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1}


def time_to_perplexity(run: Run, target: float) -> tuple[float | None, int | None]:
    """(seconds, tokens) at the first evaluation with val perplexity <= target."""
    for record in run.records:
        if record.get("eval/perplexity") is not None and record["eval/perplexity"] <= target:
            return record.get("time_s"), record.get("tokens")
    return None, None


def summary_rows(runs: list[Run], target_perplexity: float | None) -> list[tuple[str, list]]:
    """The runs' summary values (summary.json, else the last logged record); the time and tokens to
    `target_perplexity` when one is given."""
    def pick(run: Run, key: str, best=False):
        value = run.summary.get(key)
        return value if value is not None else (run.best(key.replace("best_", "")) if best else run.last(key))

    rows = [
        ("steps", [pick(run, "step") for run in runs]),
        ("tokens seen", [pick(run, "tokens") for run in runs]),
        ("final train loss", [pick(run, "train/loss") for run in runs]),
        ("final val loss", [pick(run, "eval/loss") for run in runs]),
        ("best val loss", [pick(run, "eval/best_loss", best=True) for run in runs]),
        ("final val perplexity", [pick(run, "eval/perplexity") for run in runs]),
        ("best val perplexity", [pick(run, "eval/best_perplexity", best=True) for run in runs]),
        ("final val accuracy", [pick(run, "eval/accuracy") for run in runs]),
        ("train tokens/s", [pick(run, "train/tokens_per_s") for run in runs]),
        ("wall time (s)", [pick(run, "time_s") for run in runs]),
    ]
    if target_perplexity is not None:
        reached = [time_to_perplexity(run, target_perplexity) for run in runs]
        rows += [(f"time to val perplexity <= {target_perplexity:g} (s)", [seconds for seconds, _ in reached]),
                 (f"tokens to val perplexity <= {target_perplexity:g}", [tokens for _, tokens in reached])]
    return rows + [("parameters", [run.summary.get("parameters") for run in runs])]


def plot(runs: list[Run], axis: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, metrics, log_scale) in zip(axes.flat, PANELS):
        for i, run in enumerate(runs):
            for metric, label in metrics:
                xs, ys = run.series(metric, axis)
                if xs:
                    style = dict(marker="o", markersize=3, linestyle="--") if metric.startswith("eval/") else dict(linewidth=1.2, alpha=0.85)
                    ax.plot(xs, ys, color=colors[i % len(colors)], label=f"{run.name} {label}", **style)
        ax.set_title(title)
        ax.set_xlabel("optimizer steps" if axis == "step" else "tokens seen")
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{len(runs)} runs vs {'step' if axis == 'step' else 'tokens'}", fontsize=13)
    fig.tight_layout()
    path = out / f"curves_vs_{axis}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c) if not isinstance(c, str) else c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(runs: list[Run], rows, diffs, images: list[Path], out: Path) -> Path:
    embedded = "".join(
        f'<h2>{html.escape(p.stem.replace("_", " "))}</h2><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in images)
    names = [run.name for run in runs]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Run comparison</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right;max-width:40em;overflow-wrap:anywhere}}
td:first-child,th:first-child{{text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>Run comparison</h1><p>{html.escape(", ".join(str(r.path) for r in runs))} &mdash; {time.strftime('%Y-%m-%d %H:%M')}</p>
<h2>Summary</h2>{html_table(["", *names], [[k, *v] for k, v in rows])}
<h2>Config differences</h2>{html_table(["key", *names], [[k, *map(str, v)] for k, v in diffs.items()]) if diffs else "<p>none</p>"}
{embedded}</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="python -m trainer.compare", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (runs/<name>)")
    parser.add_argument("--out", default=None, help="report directory (default reports/compare-<time>)")
    parser.add_argument("--target-perplexity", type=float, default=None,
                        help="also report the time and tokens each run took to reach this val perplexity (the seed "
                             "reached 657)")
    args = parser.parse_args(argv)
    console = Console()
    try:
        runs = [load_run(Path(p)) for p in args.runs]
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"reports/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)

    rows, diffs = summary_rows(runs, args.target_perplexity), config_differences(runs)
    table = Table(title="runs")
    table.add_column("")
    for run in runs:  # fold, not cut: runs named <recipe>-<date>-<time> differ only at the end
        table.add_column(escape(run.name), justify="right", overflow="fold")
    for name, values in rows:
        table.add_row(name, *(escape(fmt(v)) for v in values))
    console.print(table)
    if diffs:
        diff_table = Table(title="config differences")
        diff_table.add_column("key")
        for run in runs:
            diff_table.add_column(escape(run.name), justify="right", overflow="fold")
        for key, values in diffs.items():
            diff_table.add_row(key, *(escape(str(v)) for v in values))
        console.print(diff_table)
    else:
        console.print("config differences: none")
    images = [plot(runs, "step", out), plot(runs, "tokens", out)]
    report = write_html(runs, rows, diffs, images, out)
    (out / "summary.json").write_text(json.dumps({"runs": [str(r.path) for r in runs], "rows": dict(rows),
                                                  "config_differences": diffs}, indent=1, default=str))
    console.print(f"plots: {', '.join(map(str, images))}\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
