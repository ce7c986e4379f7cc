"""Entry point: `accelerate launch trainer/run.py RECIPE.py [--resume[=PATH]] [--section.key=value ...]`.

Also runs as `python trainer/run.py ...` or `python -m trainer.run ...` (one process).
"""

import os
import sys
from pathlib import Path

# glibc returns large freed blocks to the OS and maps new ones, so each step's fresh 31 MB
# embedding gradient page-faults again (slow on VMs). Keeping freed memory in the heap is up to
# 2x faster on CPU; tunables are read at process start, hence the re-exec. TRAINER_MALLOC_TUNING=0 skips it.
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
if (__name__ == "__main__" and sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ
        and os.environ.get("TRAINER_MALLOC_TUNING", "1") != "0"):
    os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])

if __package__ in (None, ""):
    # Launched as a file: make the `trainer` package importable, and keep trainer/ itself off
    # sys.path so that trainer/evaluate.py cannot shadow the `evaluate` library.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)


def main(argv: list[str] | None = None) -> int:
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError, build_config
    from trainer.data import DataError
    from trainer.loop import TrainingStopped, train
    from trainer.model import ModelError
    from trainer.tracking import TrackerError

    argv = sys.argv[1:] if argv is None else argv
    try:
        config, cli = build_config(argv)
        train(config, resume=cli.resume, recipe=cli.recipe)
    except (ConfigError, DataError, ModelError, CheckpointError, TrackerError, TrainingStopped) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
