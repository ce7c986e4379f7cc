"""A local dashboard of every run under `runs/` (a sweep's trials too): trackio's browser UI, offline, on loopback.

    python -m trainer.dashboard                  # or: make dashboard; then open http://127.0.0.1:7860
    python -m trainer.dashboard --sync-only      # fill the store without serving

Runs trained with `--log.tracker=trackio` are in trackio's store (`runs/trackio`) already; every other
run is replayed into it once from its `metrics.jsonl`, with the same steps, so runs logged to W&B or
TensorBoard (or to nothing but the run directory) are compared in the same charts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer.rundir import METRICS_FILE, read_jsonl


def use_store(runs_root: Path) -> None:
    """trackio reads TRACKIO_DIR when it is imported: point it at the runs' store first."""
    os.environ.setdefault("TRACKIO_DIR", str(Path(runs_root).resolve() / "trackio"))


def run_metrics_files(runs_root: Path) -> list[Path]:
    """metrics.jsonl of every run: runs/<run>/ and a sweep's trials, runs/<sweep>/<sweep>-trial-NNN/ (their names
    are unique: the sweep's name is in them)."""
    root = Path(runs_root)
    return sorted([*root.glob(f"*/{METRICS_FILE}"), *root.glob(f"*/*/{METRICS_FILE}")])


def sync(runs_root: Path, project: str) -> list[str]:
    """Replay the runs that trackio does not have yet; returns their names."""
    use_store(runs_root)
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    known = set(SQLiteStorage.get_runs(project)) if project in SQLiteStorage.get_projects() else set()
    added = []
    for metrics_file in run_metrics_files(runs_root):
        run_name = metrics_file.parent.name
        records = read_jsonl(metrics_file)
        if run_name in known or not records:
            continue
        trackio.init(project=project, name=run_name, embed=False)
        for record in records:
            trackio.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                        step=record["step"])
        trackio.finish()
        added.append(run_name)
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="the output root holding the run directories")
    parser.add_argument("--project", default="bert-mlm", help="trackio project (the recipes' log.project)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--sync-only", action="store_true", help="replay the runs into the store, do not serve")
    args = parser.parse_args(argv)
    if not Path(args.runs).is_dir():
        print(f"error: no run directory {args.runs}/ (train a run first, or pass --runs DIR)", file=sys.stderr)
        return 2
    added = sync(Path(args.runs), args.project)
    print(f"trackio store {os.environ['TRACKIO_DIR']}: {len(added)} run(s) added from metrics.jsonl", flush=True)
    if not args.sync_only:
        import trackio

        print(f"dashboard: http://127.0.0.1:{args.port}/ (Ctrl-C stops it)", flush=True)
        trackio.show(project=args.project, open_browser=False, block_thread=True, host="127.0.0.1",
                     server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
