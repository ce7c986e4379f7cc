"""Faults and bad input, injected for real: a full filesystem, a kill during a save, broken files, and
the one-line errors (exit 2) that each must give instead of a traceback."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env, write_recipe
from trainer.checkpoint import read_state
from trainer.rundir import STATE_FILE, list_checkpoints, read_jsonl
from trainer.run import main

pytestmark = pytest.mark.slow


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 6 MiB tmpfs (root only: mount needs it)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount_point)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(filesystem: Path, leave_bytes: int) -> Path:
    """Fill the filesystem with a ballast file, leaving about `leave_bytes` free."""
    ballast = filesystem / "ballast"
    free = shutil.disk_usage(filesystem).free - leave_bytes
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(free, 0))
    return ballast


def test_full_disk_while_saving_keeps_checkpoints_training_and_resume(make_config, small_filesystem, tmp_path, capsys):
    cfg = make_config(train={"max_steps": 2, "save_every": 2}, log={"output_root": str(small_filesystem), "run_name": "full"})
    recipe = write_recipe(tmp_path / "recipe.py", cfg)
    run_dir = small_filesystem / "full"
    assert main([str(recipe)]) == 0  # a checkpoint at step 2 and a model
    first_model = (run_dir / "model" / "model.safetensors").read_bytes()
    ballast = fill(small_filesystem, leave_bytes=24 * 1024)  # room for log lines, not for a checkpoint

    code, out, err = run_main([recipe, f"--resume={run_dir}", "--train.max_steps=6", "--train.save_every=2"], capsys)
    assert code == 2
    warnings = [line for line in out.splitlines() if "NOT saved" in line]
    assert [w.split("NOT saved")[0] for w in warnings] == ["warning: checkpoint at step 4 ", "warning: checkpoint at step 6 "]
    assert all("No space left on device" in w for w in warnings)  # training went on past the failed save
    error = one_line_error(err)
    assert f"cannot save the model to {run_dir}/model (" in error and "No space left on device" in error
    assert "(the model saved before is kept): it needs ~" in error
    assert f"the checkpoints are intact: free some space, then accelerate launch trainer/run.py --resume={run_dir}" in error
    assert [read_state(p).step for p in list_checkpoints(run_dir)] == [2]  # the good checkpoint is intact
    assert not list((run_dir / "checkpoints").glob(".tmp-*")) and not list(small_filesystem.glob("full/.tmp-*"))
    assert (run_dir / "model" / "model.safetensors").read_bytes() == first_model  # the failed save kept the earlier model
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r][:2] == [1, 2]

    ballast.unlink()  # free the space, then resume as the error says
    assert main([f"--resume={run_dir}"]) == 0
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r] == list(range(1, 7))
    assert (run_dir / "model" / "model.safetensors").read_bytes() != first_model
    assert_estimate_fits(error, run_dir / "model")


def needed_bytes(error: str) -> float:
    """The space the error line says the model needs ("~88 KiB", "~41.7 MiB")."""
    number, unit = re.search(r"it needs ~([\d.]+) (KiB|MiB)", error).groups()
    return float(number) * {"KiB": 2**10, "MiB": 2**20}[unit]


def assert_estimate_fits(error: str, model_dir: Path) -> None:
    """The estimate counts what a save really writes: never less, and not much more."""
    written = sum(p.stat().st_size for p in model_dir.iterdir())
    assert written <= needed_bytes(error) <= written + 32 * 1024, (error, written)


def test_the_space_estimate_is_what_a_save_writes(tmp_path):
    """At the scratch recipe's size (BERT's vocabulary: the tied 30,522 x 256 embedding is most of the
    bytes, stored once), counted before saving, against the files a save then writes."""
    from transformers import BertConfig, BertForMaskedLM

    from conftest import write_tokenizer
    from trainer.data import load_tokenizer
    from trainer.export import model_bytes, write_model_dir

    tokenizer = load_tokenizer(str(write_tokenizer(tmp_path / "tokenizer", extra_words=30522 - 34)))
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=3,
                                       num_attention_heads=4, intermediate_size=1024))
    state_dict = model.state_dict()
    needed = model_bytes(state_dict, tokenizer)
    write_model_dir(model, state_dict, tokenizer, tmp_path / "model", max_length=128)
    written = sum(p.stat().st_size for p in (tmp_path / "model").iterdir())
    assert written <= needed <= written * 1.01, (needed, written)


def test_a_disk_full_from_the_first_save_prints_a_command_that_works(make_config, small_filesystem, tmp_path, capsys):
    """No checkpoint ever fits, then neither does the model: the steps are lost, and the command printed
    (a resume needs a checkpoint: a new run with the run's config) works once space is freed."""
    cfg = make_config(train={"max_steps": 6, "save_every": 2}, log={"output_root": str(small_filesystem), "run_name": "nofit"})
    recipe = write_recipe(tmp_path / "recipe.py", cfg)
    ballast = fill(small_filesystem, leave_bytes=48 * 1024)
    code, out, err = run_main([recipe], capsys)
    run_dir = small_filesystem / "nofit"
    error = one_line_error(err)
    assert code == 2 and not list_checkpoints(run_dir) and "intact" not in error
    assert f"cannot save the model to {run_dir}/model (" in error and "No space left on device" in error
    assert "no checkpoint was saved either, so the 6 steps are lost: free some space" in error
    command = error.split("start again with the run's config: ")[1]
    assert command == f"accelerate launch trainer/run.py --from={run_dir}"

    ballast.unlink()
    result = subprocess.run(["bash", "-c", command], cwd=REPO, env=user_shell_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (new_run,) = [p for p in small_filesystem.iterdir() if p.name not in ("nofit", "lost+found")]
    assert json.loads((new_run / "summary.json").read_text())["step"] == 6
    old_config, new_config = (json.loads((d / "config.json").read_text()) for d in (run_dir, new_run))
    assert new_config["command"] == ["trainer/run.py", f"--from={run_dir}"]
    assert {k: v for k, v in new_config.items() if k not in ("run_id", "command", "log")} == \
        {k: v for k, v in old_config.items() if k not in ("run_id", "command", "log")}
    assert_estimate_fits(error, new_run / "model")  # the same model, saved this time


def user_shell_env() -> dict:
    """As after `source .venv/bin/activate`: the installed `accelerate` first on PATH."""
    env = subprocess_env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def test_a_diverging_learning_rate_prints_a_new_run_that_trains(make_config, tmp_path, capsys):
    """`--optim.lr=1e3` diverges; --resume would keep that rate (refused), so the trainer prints a new run
    with the recipe's own rate, which trains to the end when typed as printed."""
    cfg = make_config(train={"max_steps": 30, "save_every": 2, "eval_every": 2, "log_every": 2},
                      log={"run_name": "diverged"})
    recipe = write_recipe(tmp_path / "recipe.py", cfg)
    code, _, err = run_main([recipe, "--optim.lr=1e3"], capsys)
    run_dir = Path(cfg.log.output_root) / "diverged"
    error = one_line_error(err)
    assert code == 3 and "non-finite loss or gradient norm" in error
    summary = json.loads((run_dir / "summary.json").read_text())  # written on a divergence stop too
    assert summary["status"] == "diverged" and summary["exit_code"] == 3 and summary["model_dir"] is None
    assert summary["step"] < 30 and summary["peak_lr/adamw"] == 1e3
    assert "no checkpoint beats an untrained model" in error  # every evaluation was above ln(vocabulary)
    command = error.split("start again with lower learning rates: ")[1]
    assert command == f"accelerate launch trainer/run.py --from={run_dir} --optim.lr=0.003"  # the recipe's rate

    result = subprocess.run(["bash", "-c", command], cwd=REPO, env=user_shell_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (new_run,) = [p for p in run_dir.parent.iterdir() if p != run_dir]
    config, summary = (json.loads((new_run / name).read_text()) for name in ("config.json", "summary.json"))
    assert config["optim"]["lr"] == 0.003 and summary["status"] == "finished" and summary["step"] == 30
    assert "Optimizer: AdamW (peak lr 0.003," in (new_run / "model" / "README.md").read_text()


def test_a_kill_during_a_save_leaves_only_complete_checkpoints(make_config, tmp_path):
    """kill -9 timed to land while `.tmp-step-*` exists; the next start removes it and resumes."""
    cfg = make_config(model={"hidden_size": 128, "intermediate_size": 512, "num_heads": 2},
                      train={"epochs": 200, "save_every": 1, "keep_last": 1}, log={"run_name": "killed"})
    run_dir = Path(cfg.log.output_root) / "killed"
    recipe = write_recipe(tmp_path / "recipe.py", cfg)
    for attempt in range(5):
        process = subprocess.Popen([sys.executable, "trainer/run.py", str(recipe)] +
                                   ([f"--resume={run_dir}"] if list_checkpoints(run_dir) else []),
                                   cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120

        def saving() -> bool:  # a save in progress, after at least one complete checkpoint
            return bool(list_checkpoints(run_dir) and list((run_dir / "checkpoints").glob(".tmp-*")))

        while not saving() and time.time() < deadline and process.poll() is None:
            time.sleep(0.001)
        process.kill()
        process.wait()
        if saving():
            break
    else:
        pytest.fail("never caught a save in progress")
    assert all((p / STATE_FILE).is_file() for p in (run_dir / "checkpoints").glob("step-*"))
    last = read_state(list_checkpoints(run_dir)[-1]).step

    from trainer.loop import train

    cfg.train.max_steps = last + 2
    summary = train(cfg, resume=str(run_dir))
    assert summary["step"] == last + 2 and not list((run_dir / "checkpoints").glob(".tmp-*"))


# --------------------------------------------------------------------------- bad input: one line, exit 2


def test_bad_inputs_are_one_line_errors(make_config, tmp_path, tiny_corpus_dir, capsys):
    cfg = make_config(train={"max_steps": 2, "save_every": 2}, log={"run_name": "good"})
    recipe = write_recipe(tmp_path / "recipe.py", cfg)
    root = Path(cfg.log.output_root)
    assert main([str(recipe)]) == 0
    good = root / "good"
    latin1 = tmp_path / "latin1"
    shutil.copytree(tiny_corpus_dir, latin1)
    (latin1 / "wiki.train.raw").write_bytes((tiny_corpus_dir / "wiki.train.raw").read_bytes() + "café\n".encode("latin1"))
    state = json.loads((good / "checkpoints" / "step-000002" / STATE_FILE).read_text())
    empty_state, string_step, two_procs = tmp_path / "empty", tmp_path / "string", tmp_path / "two"
    for broken, content in ((empty_state, {}), (string_step, {**state, "step": "200"}), (two_procs, {**state, "processes": 2})):
        shutil.copytree(good, broken)
        (broken / "checkpoints" / "step-000002" / STATE_FILE).write_text(json.dumps(content))

    cases = [
        ([recipe, f"--data.dataset={latin1}", "--log.run_name=x1"], "wiki.train.raw is not UTF-8 text (byte b'\\xe9'"),
        ([recipe, "--data.block_size=60000", "--model.max_position_embeddings=60000", "--log.run_name=x2"],
         "data.block_size=60000: attention over 8 blocks x 2 heads x 60000^2 positions x 2 layers needs"),
        ([recipe, "--log.run_name=good"], f"run directory {good} already exists: continue it with --resume={good}"),
        ([f"--resume={good}"], f"run {good.resolve()} is already at step 2 of 2: nothing to train"),
        ([f"--resume={good}", "--optim.lr=0.1", "--train.batch_size=4"], "--resume cannot change what the run trains "
         "on or how (optim.lr: run 0.003, now 0.1; train.batch_size: run 8, now 4)"),
        ([f"--resume={empty_state}", "--train.max_steps=4"], "trainer_state.json ValueError: missing ['step', 'epoch'"),
        ([f"--resume={string_step}", "--train.max_steps=4"], "trainer_state.json ValueError: step='200' is not an integer"),
        ([f"--resume={two_procs}", "--train.max_steps=4"], "was trained with 2 process(es), this launch has 1: resume "
                                                          "with --num_processes 2"),
        ([f"--from={tmp_path / 'nothing'}"], f"--from={tmp_path / 'nothing'}: not a checkpoint, nor a run directory with "
                                             f"config.json"),
        ([recipe, f"--from={good}"], "--from starts a new run with the config stored in that run: give it without a "
                                     "recipe and without --resume"),
        ([f"--from={good}/checkpoints/step-000002", "--model.hidden_size=64"], "its weights do not fit this model"),
    ]
    for argv, expected in cases:
        code, _, err = run_main(argv, capsys)
        assert code == 2 and expected in one_line_error(err), (argv, err)
    assert sorted(p.name for p in root.iterdir()) == ["good"]  # failed runs leave no directory behind


def test_bare_resume_finds_runs_by_recipe_not_by_directory_name(make_config, tmp_path, capsys):
    cfg = make_config(train={"max_steps": 2, "save_every": 2}, log={"run_name": "my-experiment"})
    recipe = write_recipe(tmp_path / "recipe.py", cfg)
    assert main([str(recipe)]) == 0
    assert main([str(recipe), "--resume", "--train.max_steps=4"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((Path(cfg.log.output_root) / "my-experiment" / "summary.json").read_text())["step"] == 4


def test_resume_restores_the_runs_own_config(make_config, tmp_path, capsys):
    cfg = make_config(train={"max_steps": 2, "save_every": 2}, log={"run_name": "lr"})
    recipe = write_recipe(tmp_path / "recipe.py", cfg)
    run_dir = Path(cfg.log.output_root) / "lr"
    assert main([str(recipe), "--optim.lr=0.002", "--optim.schedule=constant"]) == 0
    # Without the overrides and without the recipe: the stored config (lr 0.002, constant) continues,
    # with the accepted changes (steps, intervals, logging).
    assert main([f"--resume={run_dir}", "--train.max_steps=4", "--train.log_every=2", "--train.eval_every=3"]) == 0
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r for r in records if "train/lr" in r][-1]["train/lr"] == pytest.approx(0.002 * 4 / 5)  # lr 0.002, constant after 5 warmup steps
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 4]


def test_two_runs_started_in_the_same_second_get_two_directories(tmp_path):
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from trainer.rundir import create_run_dir; "
            "time.sleep(max(0.0, float(sys.argv[3]) - time.time())); print(create_run_dir(sys.argv[2], None, 'x'))")
    start = time.time() + 2.0  # both processes call mkdir at the same instant
    processes = [subprocess.Popen([sys.executable, "-c", code, str(REPO), str(tmp_path), str(start)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
    made = {p.communicate(timeout=60)[0].strip() for p in processes}
    assert len(made) == 2 and all(Path(d).is_dir() for d in made)
    assert len({Path(d).name.removesuffix("-2") for d in made}) == 1  # same second, the second one suffixed


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(make_config, tmp_path, capsys):
    cfg = make_config(train={"max_steps": 6, "save_every": 2, "keep_last": 5}, log={"run_name": "branch"})
    recipe = write_recipe(tmp_path / "recipe.py", cfg)
    run_dir = Path(cfg.log.output_root) / "branch"
    assert main([str(recipe)]) == 0
    state_file = run_dir / "checkpoints" / "step-000002" / STATE_FILE  # a refused resume touches nothing
    state_file.write_text(json.dumps({**json.loads(good := state_file.read_text()), "processes": 2}))
    assert main([f"--resume={run_dir}/checkpoints/step-000002", "--train.max_steps=8"]) == 2
    assert [read_state(p).step for p in list_checkpoints(run_dir)] == [2, 4, 6]
    state_file.write_text(good)
    assert main([f"--resume={run_dir}/checkpoints/step-000002", "--train.max_steps=8"]) == 0
    assert "step-000004 moved to" in capsys.readouterr().out
    assert [read_state(p).step for p in list_checkpoints(run_dir)] == [2, 4, 6, 8]  # the new branch's
    assert sorted(p.name for p in (run_dir / "checkpoints" / "abandoned").iterdir()) == ["step-000004", "step-000006"]
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 9))  # the metrics history is the new branch's too


def test_a_run_killed_between_its_last_checkpoint_and_its_model_only_saves_the_model(make_config, tmp_path):
    cfg = make_config(train={"max_steps": 4, "save_every": 2}, log={"run_name": "almost"})
    recipe = write_recipe(tmp_path / "recipe.py", cfg)
    run_dir = Path(cfg.log.output_root) / "almost"
    assert main([str(recipe)]) == 0
    shutil.rmtree(run_dir / "model")  # what a kill after the step-4 checkpoint leaves: no model, no summary
    (run_dir / "summary.json").unlink()
    records_before = read_jsonl(run_dir / "metrics.jsonl")
    assert main([f"--resume={run_dir}"]) == 0
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 4
    assert [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r] == \
        [r for r in records_before if "train/loss" in r]  # nothing trained again
