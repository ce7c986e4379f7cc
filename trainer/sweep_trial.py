"""One trial of a sweep (trainer/sweep.py picks it): its trainer process, started as a user would start it, its
evaluations reported to Optuna, pruning by SIGTERM, and what the journal records when it ends."""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.console import fmt
from trainer.rundir import SUMMARY_FILE, list_checkpoints, read_json
from trainer.runtime import PR_SET_PDEATHSIG
from trainer.sweep_report import best_of, read_records
from trainer.sweep_spec import PROGRAM

POLL_S = 0.5


@dataclass
class Job:
    study: object  # optuna.Study with this trial's sampler and the sweep's pruner
    trial: object  # optuna.trial.Trial
    run_dir: Path
    claim: int  # the claim lock's descriptor, held until the trial is recorded
    resume: bool = False
    reported: set = field(default_factory=set)  # steps (tokens) already reported to Optuna


def die_with_parent_function():
    """preexec_fn: the kernel sends the trial SIGTERM when the thread that started it dies (kill -9 of the driver).
    The trainer later asks for SIGUSR1 instead, which it turns into a checkpoint and exit 143. Looked up here,
    in the parent: the child, forked from a threaded process, only calls it."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def evaluations(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(tokens, value) of each evaluation record in the run's metrics.jsonl so far."""
    return [(int(r["tokens"]), float(r[metric])) for r in read_records(run_dir)
            if isinstance(r.get(metric), (int, float)) and "tokens" in r]


def error_line(log: Path, start: int) -> str | None:
    """The trainer's last `error: ...` line written to the log since `start`."""
    try:
        with open(log, errors="replace") as f:
            f.seek(start)
            lines = [line.strip() for line in f.read().splitlines()]
    except OSError:
        return None
    errors = [line for line in lines if line.startswith("error: ")]
    return errors[-1].removeprefix("error: ") if errors else None


def trial_command(sweep, job: Job) -> list[str]:
    run = [sys.executable, str(PROGRAM)]
    if job.resume:
        if list_checkpoints(job.run_dir):
            return run + [f"--resume={job.run_dir}"]
        shutil.rmtree(job.run_dir, ignore_errors=True)  # stopped before its first checkpoint: start it again
    project = [f"--log.project={sweep.spec.project}"] if sweep.spec.project else []
    return run + [sweep.spec.recipe, *sweep.spec.trial_args(job.trial.params), *sweep.extra, *project,
                  f"--log.output_root={sweep.dir}", f"--log.run_name={job.run_dir.name}",
                  f"--log.group={sweep.spec.name}"]


def run_trial(sweep, job: Job) -> None:
    """Run the trial's trainer to its end (or its pruning) and record the outcome. `sweep`: trainer.sweep.Sweep."""
    number = job.trial.number
    if job.resume and recover(sweep, job):
        return
    command = trial_command(sweep, job)
    log = sweep.dir / "logs" / f"{job.run_dir.name}.log"
    start = log.stat().st_size if log.is_file() else 0
    params = " ".join(f"{k}={v}" for k, v in job.trial.params.items())
    sweep.say(f"trial {number} {'resumed from its checkpoint' if '--resume' in command[2] else 'started'}: "
              f"{params}  ({job.run_dir}, log {log})")
    with open(log, "a") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent_function())
    sweep.children.add(proc)
    if sweep.stopping.is_set():  # the stop came while it was starting
        proc.terminate()
    pruned = watch(sweep, job, proc)
    sweep.children.discard(proc)
    record(sweep, job, proc.returncode, pruned, error_line(log, start))


def recover(sweep, job: Job) -> bool:
    """A trial whose driver died after pruning it, or after its run finished: record it without running."""
    if job.trial.user_attrs.get("stopped") == "pruned":
        record(sweep, job, 143, True, None)
        return True
    try:
        finished = read_json(job.run_dir / SUMMARY_FILE).get("status") == "finished"
    except (OSError, ValueError):
        finished = False
    if finished:
        record(sweep, job, 0, False, None)
    return finished


def watch(sweep, job: Job, proc: subprocess.Popen) -> bool:
    """Report each new evaluation until the trainer exits; SIGTERM it when the pruner says so."""
    pruned = False
    while True:
        done = proc.poll() is not None
        for tokens, value in evaluations(job.run_dir, sweep.spec.metric):
            if tokens in job.reported:
                continue
            job.trial.report(value, tokens)
            job.reported.add(tokens)
            if not (pruned or done or sweep.stopping.is_set()) and job.trial.should_prune():
                job.trial.set_user_attr("stopped", "pruned")
                sweep.say(f"trial {job.trial.number} pruned at {tokens:,} tokens ({sweep.spec.metric} {value:.4g}); "
                          f"stopping its run (it checkpoints)")
                proc.terminate()
                pruned = True
        if done:
            return pruned
        time.sleep(POLL_S)


def record(sweep, job: Job, exit_code: int, pruned: bool, error: str | None) -> None:
    from optuna.trial import TrialState

    number, metric = job.trial.number, sweep.spec.metric
    if sweep.stopping.is_set() and not pruned and exit_code != 0:
        sweep.say(f"trial {number} stopped (exit {exit_code}); the same command resumes it")
        return
    values = [v for _, v in evaluations(job.run_dir, metric)]
    try:
        summary = read_json(job.run_dir / SUMMARY_FILE)
    except (OSError, ValueError):
        summary = {}
    for key in ("tokens", "time_s"):
        if summary.get(key) is not None:
            job.trial.set_user_attr(key, summary[key])
    job.trial.set_user_attr("run_dir", str(job.run_dir))
    job.trial.set_user_attr("exit_code", exit_code)
    value = best_of(values, sweep.spec.goal)
    if pruned:
        job.study.tell(job.trial, state=TrialState.PRUNED)
        sweep.say(f"trial {number} pruned (best {metric} {fmt(value)})")
    elif exit_code == 0 and value is not None:
        job.study.tell(job.trial, value)
        sweep.say(f"trial {number} complete: best {metric} {value:.4g}")
    else:
        error = error or f"exit status {exit_code}" + ("" if values else ", no evaluation")
        job.trial.set_user_attr("error", error)
        job.study.tell(job.trial, state=TrialState.FAIL)
        sweep.say(f"trial {number} failed: {error}")
