"""A sweep's table of trials: printed with rich, written to runs/<sweep>/trials.csv, and the best runs compared
by trainer.compare (plots and report.html in runs/<sweep>/compare/). Shown at the end of a sweep and by
`python -m trainer.sweep SWEEP.yaml --report`.

Per trial: number, state (complete, pruned, failed, running; interrupted = running in the journal with no
driver), its parameters, the best value of the sweep's metric and the best eval perplexity over its
evaluations so far, tokens seen, wall time, its run directory and, for a failed trial, the trainer's error line.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from trainer.console import fmt
from trainer.rundir import METRICS_FILE

STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def read_records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl so far; a line still being written is skipped."""
    try:
        lines = (Path(run_dir) / METRICS_FILE).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def best_of(values: list[float], goal: str) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return (max(values) if goal == "maximize" else min(values)) if values else None


def trial_rows(sweep, target: float | None = None) -> list[dict]:
    """One row per trial of the study, read from the journal and from the trial's run directory."""
    spec, rows = sweep.spec, []
    with sweep.locked():  # no driver is claiming a trial while its claim is probed here
        trials = sweep.study().get_trials(deepcopy=False)
        interrupted = {t.number for t in trials if t.state.name == "RUNNING" and not sweep.claimed(t.number)}
    for trial in trials:
        run_dir = sweep.run_dir(trial.number)
        records = read_records(run_dir)
        evals = [r for r in records if "eval/loss" in r]
        state = STATES.get(trial.state.name, trial.state.name.lower())
        if trial.number in interrupted:
            state = "interrupted"
        row = {"trial": trial.number, "state": state, **trial.params,
               "best eval/perplexity": best_of([r.get("eval/perplexity") for r in evals], "minimize"),
               f"best {spec.metric}": best_of([r.get(spec.metric) for r in evals], spec.goal),
               "tokens": records[-1].get("tokens") if records else None,
               "wall time (s)": round(records[-1]["time_s"], 1) if records and "time_s" in records[-1] else None}
        if target is not None:
            reached = [r["tokens"] for r in evals if r.get("eval/perplexity", math.inf) <= target]
            row[f"tokens to perplexity <= {target:g}"] = reached[0] if reached else None
        row.update({"run": run_dir.name if run_dir.is_dir() else None, "error": trial.user_attrs.get("error")})
        rows.append(row)
    return rows


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = Table(title=title)
    for column in columns:
        left = column in ("state", "run", "error")
        table.add_column(escape(column), overflow="fold", justify="left" if left else "right")
    for row in rows:
        table.add_row(*(escape(fmt(row.get(column))) for column in columns))
    import sys

    Console(width=None if sys.stdout.isatty() else 160).print(table)  # a log file gets the whole table


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def best_runs(sweep, top: int) -> list:
    """The `top` complete trials, best first, as (trial, run directory)."""
    from optuna.trial import TrialState

    done = [t for t in sweep.study().get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if (sweep.run_dir(t.number) / METRICS_FILE).is_file()]
    done.sort(key=lambda t: t.value, reverse=sweep.spec.goal == "maximize")
    return [(t, sweep.run_dir(t.number)) for t in done[:top]]


def report(sweep, top: int = 3, target: float | None = None) -> None:
    """Print the table, write trials.csv, and compare the best `top` runs."""
    from trainer.compare import main as compare

    rows = trial_rows(sweep, target)
    if not rows:
        print(f"sweep {sweep.spec.name}: no trials yet")
        return
    print_table(rows, f"sweep {sweep.spec.name}: {sweep.spec.method}, {sweep.spec.metric} ({sweep.spec.goal})")
    write_csv(rows, sweep.dir / "trials.csv")
    counts = {state: sum(row["state"] == state for row in rows) for state in dict.fromkeys(r["state"] for r in rows)}
    print(f"{len(rows)} trial{'s' if len(rows) > 1 else ''}: " + ", ".join(f"{n} {state}" for state, n in counts.items())
          + f"; table: {sweep.dir / 'trials.csv'}")
    ranked = best_runs(sweep, top)
    if ranked:
        trial, run_dir = ranked[0]
        print(f"best: trial {trial.number}, {sweep.spec.metric} {fmt(trial.value)}, "
              + " ".join(f"{k}={v}" for k, v in trial.params.items()) + f" ({run_dir})")
        target_args = ["--target-perplexity", str(target)] if target is not None else []
        compare([str(d) for _, d in ranked] + ["--out", str(sweep.dir / "compare")] + target_args)
