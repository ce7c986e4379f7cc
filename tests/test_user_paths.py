"""The README's commands, typed as a new user types them: in a subprocess, with no WANDB_* variable
and an empty HOME (so no W&B login is found), on the real recipes and the offline data in ../shared."""

import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
TINY = "--train.max_steps=4 --data.max_train_blocks=64 --data.max_eval_blocks=8 --train.eval_every=0"


@pytest.fixture(scope="module")
def user_env(tmp_path_factory) -> dict:
    """A new user's environment: no W&B variables, an empty HOME (no ~/.netrc, no W&B settings)."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1")
    return env


def run_dir_of(output_root: Path) -> Path:
    (run,) = [p for p in output_root.iterdir() if p.is_dir() and p.name != "wandb"]
    return run


def test_make_scratch_without_a_wandb_login(user_env, tmp_path):
    out = tmp_path / "runs"
    result = subprocess.run(["make", "scratch", f"ARGS={TINY} --log.output_root={out}"], cwd=REPO, env=user_env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = run_dir_of(out)
    assert "W&B offline (no API key)" in result.stdout and f"wandb sync {out}/wandb/offline-run-*-{run.name}" in result.stdout
    assert len(list((out / "wandb").glob(f"offline-run-*-{run.name}/*.wandb"))) == 1
    for name in ("metrics.jsonl", "summary.json", "model/config.json", "model/model.safetensors"):
        assert (run / name).is_file(), name
