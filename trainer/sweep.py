"""Local, resumable hyperparameter sweeps: W&B's sweep file (trainer/sweep_spec.py), run by Optuna here.

    python -m trainer.sweep sweeps/fewest_tokens.yaml [--workers 2] [--trials 20] [--section.key=value ...]
    python -m trainer.sweep sweeps/fewest_tokens.yaml --report      # the trials' table and the best runs compared
    make sweep SWEEP=sweeps/fewest_tokens.yaml ARGS="--workers 2"

Everything lives in the sweep directory `runs/<name>/`:

    sweep.yaml                    a copy of the file the study was started with
    study.journal                 Optuna's JournalStorage (file locks: any number of drivers, on machines sharing it)
    <name>-trial-NNN/             one ordinary run per trial: `python trainer/run.py RECIPE --key=value ...`
    logs/<name>-trial-NNN.log     what the trial's trainer printed
    .claims/NNN.lock              held (flock) by the driver running trial NNN, for the trial's whole life
    .sweep.lock                   held while a driver picks its next trial
    trials.csv, compare/          the table of trials and the best runs compared (at the end and with --report)

The driver reports each evaluation in the trial's metrics.jsonl to Optuna (step = tokens seen, so runs with
different batch sizes are compared at equal tokens) and stops a trial its pruner prunes with SIGTERM (the
trainer checkpoints, exits 143). A trial whose driver died (RUNNING in the journal, its claim lock free) is
resumed from its run's checkpoint once its run lock is free, or started again if it has none. What one trial
does is in trainer/sweep_trial.py, the table in trainer/sweep_report.py.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from trainer.config import ConfigError, apply_overrides, load_recipe
from trainer.rundir import run_is_live
from trainer.sweep_report import report
from trainer.sweep_spec import SweepError, SweepSpec, load_spec
from trainer.sweep_trial import Job, run_trial

WAIT = "wait"  # next_job: nothing to start now, but a dead driver's trial is about to be free


class Sweep:
    def __init__(self, spec: SweepSpec, root: Path, extra: list[str], seed: int):
        self.spec, self.extra, self.seed = spec, extra, seed
        self.dir = Path(root) / spec.name
        self.stopping, self.stop_signal, self.crashed = threading.Event(), None, False
        self.children: set[subprocess.Popen] = set()
        self.print_lock = threading.Lock()
        self._storage = None

    # ------------------------------------------------------------------ storage and locks

    @property
    def storage(self):
        if self._storage is None:
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            self._storage = JournalStorage(JournalFileBackend(str(self.dir / "study.journal")))
        return self._storage

    def study(self, number: int = 0):
        """The study, with a sampler seeded for trial `number`: drivers sharing the study never draw alike. The seed
        is hashed from (--seed, number): MT19937's first draws for seeds 0 and 3 are nearly the same numbers."""
        import optuna

        digest = hashlib.sha256(f"{self.seed}/{number}".encode()).digest()
        return optuna.Study(study_name=self.spec.name, storage=self.storage, pruner=self.spec.pruner(),
                            sampler=self.spec.sampler(int.from_bytes(digest[:4], "little")))

    def exists(self) -> bool:
        return (self.dir / "study.journal").is_file()

    def open(self) -> None:
        """Create the study, or check that the file still describes the one in the directory."""
        import optuna

        for sub in ("logs", ".claims"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with self.locked():
            study = optuna.create_study(study_name=self.spec.name, storage=self.storage, load_if_exists=True,
                                        direction=self.spec.direction)
            identity = json.loads(json.dumps(self.spec.identity()))
            stored = study.user_attrs.get("spec")
            if stored is None:
                study.set_user_attr("spec", identity)
                shutil.copyfile(self.spec.path, self.dir / "sweep.yaml")
            elif stored != identity:
                changed = sorted(k for k in identity if identity[k] != stored.get(k))
                raise SweepError(f"{self.spec.path}: {', '.join(changed)} differ from the sweep in {self.dir} (its "
                                 f"file is {self.dir / 'sweep.yaml'}); a changed sweep needs another name (name:)")

    @contextmanager
    def locked(self):
        fd = os.open(self.dir / ".sweep.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def claim(self, number: int) -> int | None:
        """The trial's claim lock (a descriptor to keep open), or None when a live driver holds it."""
        fd = os.open(self.dir / ".claims" / f"{number:03d}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
            return None

    def claimed(self, number: int) -> bool:
        fd = self.claim(number)
        if fd is not None:
            os.close(fd)
        return fd is None

    def run_dir(self, number: int) -> Path:
        return self.dir / f"{self.spec.name}-trial-{number:03d}"

    def say(self, text: str) -> None:
        with self.print_lock:
            print(text, flush=True)

    # ------------------------------------------------------------------ picking trials

    def next_job(self, cap: int):
        """Under the sweep lock: a trial whose driver died, to resume; else a new trial (at most `cap` in all; a
        grid's next unstarted point); None when there is nothing left; WAIT while a dead driver's trainer saves."""
        import optuna
        from optuna.trial import TrialState

        with self.locked():
            trials = self.study().get_trials(deepcopy=False)
            saving = False
            for frozen in trials:
                if frozen.state != TrialState.RUNNING:
                    continue
                claim = self.claim(frozen.number)
                if claim is None:
                    continue  # its driver is alive
                if run_is_live(self.run_dir(frozen.number)):  # its trainer outlived the driver: still checkpointing
                    os.close(claim)
                    saving = True
                    continue
                study = self.study(frozen.number)
                return Job(study, optuna.trial.Trial(study, frozen._trial_id), self.run_dir(frozen.number), claim,
                           resume=True, reported=set(frozen.intermediate_values))
            started = sum(t.state != TrialState.WAITING for t in trials)
            taken = [t.params for t in trials]
            point = next((p for p in self.spec.grid() if p not in taken), None) if self.spec.method == "grid" else {}
            if started >= cap or point is None:
                return WAIT if saving else None
            study = self.study(len(trials))
            if point:
                study.enqueue_trial(point)
            trial = study.ask()
            for param in self.spec.params:
                param.suggest(trial)
            return Job(study, trial, self.run_dir(trial.number), self.claim(trial.number))

    def worker(self, cap: int) -> None:
        try:
            while not self.stopping.is_set():
                job = self.next_job(cap)
                if job is None:
                    return
                if job == WAIT:
                    time.sleep(1.0)
                    continue
                try:
                    run_trial(self, job)
                finally:
                    os.close(job.claim)
        except Exception as e:  # a bug, or the storage gone: stop the sweep, leave the trials resumable
            self.say(f"error: sweep worker: {type(e).__name__}: {e}")
            self.crashed = True
            self.stop(signal.SIGTERM)

    # ------------------------------------------------------------------ the whole sweep

    def stop(self, signum: int, frame=None) -> None:
        """SIGTERM/SIGINT: every running trial checkpoints and the driver exits; the trials stay resumable."""
        if self.stopping.is_set():
            return
        self.stop_signal = signum
        self.stopping.set()
        self.say(f"{signal.Signals(signum).name}: stopping the running trials (each checkpoints); "
                 f"the same command resumes the sweep")
        for proc in list(self.children):
            proc.terminate()

    def run(self, workers: int, cap: int) -> int:
        previous = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            threads = [threading.Thread(target=self.worker, args=(cap,), name=f"worker-{i}", daemon=True)
                       for i in range(workers)]
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                for thread in threads:
                    thread.join(timeout=0.2)  # short waits: the main thread keeps handling signals
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 1 if self.crashed else 128 + self.stop_signal if self.stop_signal else 0


def trial_cap(spec: SweepSpec, trials: int | None) -> int:
    cap = trials or spec.run_cap
    if spec.method == "grid":
        return min(cap or len(spec.grid()), len(spec.grid()))
    if cap is None:
        raise SweepError(f"{spec.path}: a {spec.method} sweep needs a bound: run_cap: in the file, or --trials N")
    return cap


def check_extra(spec: SweepSpec, extra: list[str]) -> None:
    """Overrides after the sweep file apply to every trial; they may not replace a swept key."""
    for arg in extra:
        key = arg[2:].partition("=")[0]
        if not arg.startswith("--") or "." not in key:
            raise SweepError(f"unexpected argument {arg!r}; overrides for every trial look like --data.dataset=DIR")
        if key in {p.key for p in spec.params}:
            raise SweepError(f"{arg}: {key} is swept by {spec.path}")
    try:
        apply_overrides(load_recipe(spec.recipe), [*spec.trial_args({}), *extra]).validate()
    except ConfigError as e:
        raise SweepError(f"{e}") from None


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m trainer.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="the sweep file (W&B's sweep YAML)")
    parser.add_argument("--workers", type=int, default=1, help="trials run at once by this driver")
    parser.add_argument("--trials", type=int, default=None, help="bound on the trials of the study (all drivers "
                        "together; default the file's run_cap; a grid ends when it is exhausted)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the samplers (trial N draws with a seed hashed from this and N)")
    parser.add_argument("--root", default="runs", help="where the sweep directory <root>/<name>/ lives")
    parser.add_argument("--report", action="store_true", help="print the table of trials and compare the best; "
                        "run nothing")
    parser.add_argument("--top", type=int, default=3, help="best runs compared by trainer.compare (0: none)")
    parser.add_argument("--target-perplexity", type=float, default=None,
                        help="also show each trial's tokens to this val perplexity")
    args, extra = parser.parse_known_args(argv)
    if args.workers < 1 or (args.trials is not None and args.trials < 1):
        parser.error("--workers and --trials take a positive number")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    try:
        spec = load_spec(args.sweep)
        sweep = Sweep(spec, Path(args.root), extra, args.seed)
        if args.report:
            if not sweep.exists():
                raise SweepError(f"no sweep in {sweep.dir}/ yet: run python -m trainer.sweep {spec.path}")
        else:
            check_extra(spec, extra)
            cap = trial_cap(spec, args.trials)
            sweep.open()
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    code = 0 if args.report else sweep.run(args.workers, cap)
    report(sweep, top=args.top, target=args.target_perplexity)
    return code


if __name__ == "__main__":
    sys.exit(main())
