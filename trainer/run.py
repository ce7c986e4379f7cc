"""Entry point: `accelerate launch trainer/run.py RECIPE.py [--resume[=RUN]] [--section.key=value ...]`,
or `accelerate launch trainer/run.py --resume=RUN` (the run's own config), or `--from=CHECKPOINT
[--optim.lr=...]` (a new run from that checkpoint's weights, with its run's config and any change).
`-h` lists every field.

Also runs as `python trainer/run.py ...` or `python -m trainer.run ...` (one process). Exit codes:
0 finished, 2 bad input or an unusable file (one line on stderr), 3 stopped for non-finite values,
128 + signal number when a signal stopped it (143 SIGTERM or the launcher exiting, 130 SIGINT).
"""

import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # Launched as a file: make the `trainer` package importable, and keep trainer/ itself off
    # sys.path so that trainer/evaluate.py cannot shadow the `evaluate` library.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)


def main(argv: list[str] | None = None) -> int:
    from trainer.config import ConfigError, HelpRequested, build_config, parse_command_line, print_help
    from trainer.data import DataError
    from trainer.loop import TrainingStopped, train
    from trainer.model import ModelError
    from trainer.rundir import CheckpointError, resume_config, start_from_config
    from trainer.tracking import TrackerError

    argv = sys.argv[1:] if argv is None else argv
    command = ["trainer/run.py", *argv]
    try:
        cli = parse_command_line(argv)
        if cli.resume is not None:
            config, checkpoint = resume_config(cli)
            summary = train(config, resume=str(checkpoint), recipe=cli.recipe, command=command)
        elif cli.start_from is not None:
            config, recipe = start_from_config(cli)
            summary = train(config, recipe=recipe, command=command)
        else:
            config, _ = build_config(argv)
            summary = train(config, recipe=cli.recipe, command=command)
    except HelpRequested:
        print_help()
        return 0
    except TrainingStopped as e:
        report(e)
        return TrainingStopped.exit_code
    except (ConfigError, DataError, ModelError, CheckpointError, TrackerError) as e:
        report(e)
        return 2
    return summary["exit_code"]


OTHER_PROCESS_REPORT_DELAY_S = 5.0


def report(error: Exception) -> None:
    """One line on stderr. The processes of one launch mostly meet the same error (same command line, config
    and files), so a machine's first process prints it; the others first give the launcher time to stop them
    (torchrun stops the rest once one has exited) and print theirs only if it did not: an error of their own."""
    if int(os.environ.get("LOCAL_RANK", "0")) > 0:
        time.sleep(OTHER_PROCESS_REPORT_DELAY_S)
    print(f"error: {error}", file=sys.stderr)


if __name__ == "__main__":
    from trainer.runtime import use_malloc_tunables

    use_malloc_tunables()
    sys.exit(main())
