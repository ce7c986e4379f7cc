"""`python -m trainer.launch [accelerate launch options] trainer/run.py ...`: `accelerate launch` with the
trainer's exit status and stop signals kept, also as a container's entrypoint (PID 1).

It runs Accelerate's own launch code in this process (same options, config files and environment), and
changes what Accelerate 1.15's launcher gets wrong for a scheduler:

- exit status: the trainer's own (0, 2 bad input, 3 non-finite stop, 128 + signal), with no launcher
  traceback; `accelerate launch` exits 1 with a CalledProcessError or ChildFailedError traceback.
- stop signals: each SIGTERM, SIGINT or SIGUSR1 this process receives is forwarded once to every trainer
  process, and the launcher waits for them to finish their checkpoint, however long it takes.
  `accelerate launch` dies at once with one process (the trainer saves on, an orphan), and torchrun, with
  several, SIGKILLs the ranks 30 s after forwarding, or as soon as one rank has exited.
- the one-process trainer runs in its own session, as torchrun runs ranks: a terminal's Ctrl-C reaches the
  launcher only, which forwards it once (reaching both, it would count as the trainer's second Ctrl-C).
- as PID 1 the kernel delivers only the signals a process handles, and when PID 1 exits every process of
  the container is killed: PID 1 forks the launcher, forwards signals to it, reaps orphans, and exits with
  the launcher's status once it is done.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `trainer` package importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from trainer.runtime import LAUNCH_ENV, STOP_SIGNALS, shell_command  # noqa: E402

INIT_FORWARDED = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGQUIT)


class Interrupted(Exception):
    """A stop signal arrived before any trainer process was started."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.getpid() == 1:
        return run_as_init(argv)
    return launch(argv)


def launch(argv: list[str]) -> int:
    try:
        with Forwarder().installed():
            return run_launcher(argv)
    except Interrupted as e:
        return 128 + e.signum


def run_launcher(argv: list[str]) -> int:
    """Accelerate's `launch_command`, its failures turned into the trainer's exit status."""
    from accelerate.commands import launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = accelerate_launch.launch_command_parser()
    parser.prog = "python -m trainer.launch"
    args = parser.parse_args(argv)
    os.environ[LAUNCH_ENV] = typed_launch(args.training_script_args)
    args.signals_to_handle = "SIGHUP,SIGQUIT"  # torchrun's own handling; SIGTERM, SIGINT, SIGUSR1 are ours
    quiet_torchrun()
    try:
        with one_process_in_its_own_session(accelerate_launch):
            accelerate_launch.launch_command(args)
        return 0
    except ChildFailedError as e:  # several processes (torchrun): the first to fail says why
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:  # killed by a signal it did not handle (out of memory: SIGKILL)
            print(f"error: process {rank} (pid {failure.pid}) was killed by {failure.signal_name()}", file=sys.stderr)
        return exit_status(failure.exitcode)
    except subprocess.CalledProcessError as e:  # one process, or DeepSpeed's multi-node runner
        return exit_status(e.returncode)
    except SignalException as e:  # SIGHUP or SIGQUIT: torchrun passed it on and stopped the ranks
        return 128 + int(e.sigval)
    except (ValueError, OSError, ImportError) as e:  # Accelerate's checks of the options and config file
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2


def exit_status(returncode: int) -> int:
    """A shell's exit status for a child's return code (-N: killed by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def typed_launch(script_args: list[str]) -> str:
    """This launch as the user typed it, up to the training script: the trainer's resume command repeats it."""
    return shell_command(sys.orig_argv[:len(sys.orig_argv) - len(script_args)], dict(os.environ))


def quiet_torchrun() -> None:
    """torchrun logs each rank's non-zero exit and each signal it sends as an error; the trainer's own line (or
    the one printed here for a rank killed by a signal) says it. LOGLEVEL=INFO shows them again."""
    import torch.distributed.run  # noqa: F401  (imports the elastic modules, which set their loggers' levels)

    if "LOGLEVEL" not in os.environ:
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.CRITICAL)


@contextmanager
def one_process_in_its_own_session(accelerate_launch):
    """Accelerate's one-process launcher, with the trainer in a session of its own (the only change)."""
    from accelerate.utils import prepare_simple_launcher_cmd_env

    def simple_launcher(args):
        cmd, env = prepare_simple_launcher_cmd_env(args)
        process = subprocess.Popen(cmd, env=env, start_new_session=True)
        if process.wait():
            raise subprocess.CalledProcessError(process.returncode, cmd)

    original, accelerate_launch.simple_launcher = accelerate_launch.simple_launcher, simple_launcher
    try:
        yield
    finally:
        accelerate_launch.simple_launcher = original


class Forwarder:
    """Forwards each stop signal this process receives once to every trainer process (its children), then
    holds the launcher until they have all exited. torchrun, whose loop this handler interrupts, would
    otherwise SIGTERM the ranks still saving as soon as one has exited, which a rank already stopping
    takes as a second signal: stop at once."""

    def __init__(self):
        self.previous = {}

    @contextmanager
    def installed(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)

    def handle(self, signum, frame) -> None:
        import psutil

        workers = psutil.Process().children()
        if not workers:
            raise Interrupted(signum)
        for worker in workers:
            try:
                os.kill(worker.pid, signum)
            except ProcessLookupError:
                pass
        wait_for_exit([w.pid for w in workers])


def wait_for_exit(pids: list[int], poll_s: float = 0.1) -> None:
    """Until every process has exited, or one has crashed (a traceback's exit 1, or killed by a signal:
    then the rest are left to torchrun to stop). Exited processes are not reaped: their launcher reads
    their status. A signal meanwhile re-enters the handler, which forwards it too."""
    running = set(pids)
    while running:
        for pid in list(running):
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # already reaped
                info = None
                running.discard(pid)
                continue
            if info is None:
                continue
            running.discard(pid)
            if info.si_code != os.CLD_EXITED or info.si_status == 1:
                return
        if running:
            time.sleep(poll_s)


def run_as_init(argv: list[str]) -> int:
    """PID 1 of a container (or of `unshare --pid --fork`): fork the launcher, forward signals to it, reap
    every process that ends (orphans are re-parented to PID 1), and exit with the launcher's status."""
    signal.pthread_sigmask(signal.SIG_BLOCK, INIT_FORWARDED)  # none lost between the fork and the handlers
    launcher = os.fork()
    if launcher == 0:
        os.setsid()  # a terminal's Ctrl-C then reaches PID 1 only, which forwards it once
        signal.pthread_sigmask(signal.SIG_UNBLOCK, INIT_FORWARDED)
        code = 1
        try:
            code = launch(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    for sig in INIT_FORWARDED:
        signal.signal(sig, lambda signum, frame: os.kill(launcher, signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, INIT_FORWARDED)
    while True:
        pid, status = os.wait()
        if pid == launcher:
            return exit_status(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    sys.exit(main())
