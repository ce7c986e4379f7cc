"""Entry point: `accelerate launch trainer/run.py RECIPE.py [--resume[=RUN]] [--section.key=value ...]`,
or `accelerate launch trainer/run.py --resume=RUN` (the run's own config), or `--from=CHECKPOINT
[--optim.lr=...]` (a new run from that checkpoint's weights, with its run's config and any change).
`-h` lists every field.

Also runs as `python trainer/run.py ...` or `python -m trainer.run ...` (one process). Exit codes:
0 finished, 2 bad input or an unusable file (one line on stderr), 3 stopped for non-finite values,
128 + signal number when a signal stopped it (143 SIGTERM or the launcher exiting, 130 SIGINT).
"""

import sys
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
        print(f"error: {e}", file=sys.stderr)
        return TrainingStopped.exit_code
    except (ConfigError, DataError, ModelError, CheckpointError, TrackerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return summary["exit_code"]


if __name__ == "__main__":
    from trainer.runtime import use_malloc_tunables

    use_malloc_tunables()
    sys.exit(main())
