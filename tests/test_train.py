"""End-to-end training runs of a tiny model, in process."""

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from test_faults import user_shell_env
from trainer.checkpoint import CheckpointError, list_checkpoints, read_state
from trainer.config import ConfigError, ModelConfig
from trainer.model import build_model
from trainer.loop import TrainingStopped, train
from trainer.tracking import read_jsonl


def records(run_dir, prefix):
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if f"{prefix}/loss" in r]


def test_short_run_learns_and_saves_a_loadable_model(make_config):
    cfg = make_config(train={"eval_every": 10, "epochs": 3}, log={"run_name": "learn"})
    summary = train(cfg)
    run_dir = Path(cfg.log.output_root) / "learn"
    evals = records(run_dir, "eval")
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.5  # eval loss falls
    assert summary["eval/loss"] == pytest.approx(evals[-1]["eval/loss"])
    assert summary["eval/perplexity"] == pytest.approx(math.exp(summary["eval/loss"]))
    train_records = records(run_dir, "train")
    assert [r["step"] for r in train_records] == list(range(1, summary["step"] + 1))
    for key in ("train/lr", "train/grad_norm", "train/perplexity", "train/accuracy", "train/top5_accuracy",
                "train/tokens_per_s", "train/mfu", "train/peak_memory_gib", "epoch", "tokens", "time_s"):
        assert key in train_records[-1]
    lrs = [r["train/lr"] for r in train_records]  # 10% linear warmup, then linear decay to 0
    peak = lrs.index(max(lrs))
    assert peak == round(0.1 * summary["step"]) - 1 and lrs[-1] == 0.0
    assert json.loads((run_dir / "summary.json").read_text())["step"] == summary["step"]

    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(run_dir / "model"))
    predictions = fill("the big cat [MASK] a dog .")
    assert len(predictions) == 5 and all(p["token_str"] for p in predictions)
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"]
    samples = json.loads((run_dir / "samples_fill_mask.json").read_text())
    assert samples["rows"][0][0] == cfg.log.probes[0]

    from huggingface_hub import ModelCard  # the model card: HF metadata, then what the run was and did

    card = ModelCard.load(run_dir / "model" / "README.md")
    assert card.data.pipeline_tag == "fill-mask" and card.data.library_name == "transformers"
    (perplexity,) = [r for r in card.data.eval_results if r.metric_type == "perplexity"]
    assert perplexity.metric_value == pytest.approx(summary["eval/perplexity"])
    for text in (f"{summary['parameters']:,} parameters", "2 layers, hidden size 32", samples["rows"][0][1],
                 f"| tokens seen | {summary['tokens']:,} |", "recipe\n`tiny`"):
        assert text in card.text, text


def test_muon_runs_log_and_record_both_learning_rates_and_the_epochs_done(make_config):
    """Muon's rate is logged beside AdamW's, and the summary and model card say what ran: both peak
    rates, and the steps and epochs done (a run stopped by max_steps, not the epochs planned)."""
    cfg = make_config(optim={"name": "muon", "lr": 1e-3, "muon_lr": 0.005}, train={"epochs": 3, "max_steps": 6},
                      log={"run_name": "muon"})
    summary = train(cfg)
    run_dir = Path(cfg.log.output_root) / "muon"
    logged = records(run_dir, "train")
    assert len(logged) == 6 and all(r["train/lr"] > 0 and r["train/lr_muon"] == pytest.approx(5 * r["train/lr"]) for r in logged)
    assert summary["peak_lr/adamw"] == 1e-3 and summary["peak_lr/muon"] == 0.005
    assert summary["step"] == 6 and summary["epoch"] == pytest.approx(6 / 26)
    card = (run_dir / "model" / "README.md").read_text()
    for text in ("Muon (peak lr 0.005, momentum 0.95) on the encoder's and head's 2-D weight matrices, AdamW (peak lr "
                 "0.001,", "trained 0.23 epochs,\n6 optimizer steps, 1,536 tokens (3 epochs planned, at most 6 steps)",
                 "| peak lr, Muon | 0.005 |"):
        assert text in card, text


def test_wandb_offline_run_is_written(make_config, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_config(train={"epochs": 1, "max_steps": 3}, log={"tracker": "wandb", "run_name": "wb"})
    train(cfg)
    offline_runs = list((Path(cfg.log.output_root) / "wandb").glob("offline-run-*"))  # all runs side by side
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("*.wandb")) and offline_runs[0].name.endswith("-wb")


def test_tensorboard_tracker_writes_events(make_config):
    cfg = make_config(train={"epochs": 1, "max_steps": 2}, log={"tracker": "tensorboard", "run_name": "tb"})
    train(cfg)
    assert list((Path(cfg.log.output_root) / "tb").rglob("events.out.tfevents*"))


def final_params(run_dir):
    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_mid_epoch_is_exact(make_config, tmp_path, optimizer):
    # Dropout on, so the per-step RNG reseeding is exercised too.
    model, optim = {"dropout": 0.1}, {"name": optimizer, "muon_lr": 0.01}
    straight = make_config(model=model, optim=optim, train={"max_steps": 14}, log={"run_name": "straight"})
    train(straight)
    first = make_config(model=model, optim=optim, train={"max_steps": 5, "save_every": 5}, log={"run_name": "split"})
    train(first)
    split_dir = Path(first.log.output_root) / "split"
    assert read_state(list_checkpoints(split_dir)[-1]).batches_in_epoch == 5  # mid-epoch
    second = make_config(model=model, optim=optim, train={"max_steps": 14}, log={"run_name": "split"})
    train(second, resume=str(split_dir))

    a, b = records(Path(straight.log.output_root) / "straight", "train"), records(split_dir, "train")
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 15))
    max_loss_diff = max(abs(x["train/loss"] - y["train/loss"]) for x, y in zip(a, b))
    pa, pb = final_params(Path(straight.log.output_root) / "straight"), final_params(split_dir)
    max_param_diff = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    print(f"resume equivalence: max |loss diff| {max_loss_diff:.2e}, max |param diff| {max_param_diff:.2e}")
    assert max_loss_diff < 1e-5 and max_param_diff < 1e-6


def test_resume_latest_and_errors(make_config, tmp_path):
    cfg = make_config(train={"max_steps": 4, "save_every": 2}, log={"run_name": None})
    train(cfg)
    cfg.train.max_steps = 6
    summary = train(cfg, resume="latest")
    assert summary["step"] == 6
    with pytest.raises(CheckpointError, match="not a checkpoint, nor a run directory"):
        train(cfg, resume=str(tmp_path / "nothing"))
    run_dir = Path(summary["model_dir"]).parent
    bigger = make_config(model={"hidden_size": 48}, train={"max_steps": 8})
    with pytest.raises(ConfigError, match="--resume cannot change .*model.hidden_size: run 32, now 48"):
        train(bigger, resume=str(run_dir))
    latest = list_checkpoints(run_dir)[-1]
    (latest / "model.safetensors").write_bytes(b"garbage")
    cfg.train.max_steps = 8
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        train(cfg, resume=str(latest))


def test_checkpoints_keep_last_k_plus_best(make_config):
    cfg = make_config(train={"save_every": 2, "eval_every": 3, "keep_last": 2, "max_steps": 14},
                      log={"run_name": "keep"})
    train(cfg)
    run_dir = Path(cfg.log.output_root) / "keep"
    kept = list_checkpoints(run_dir)
    steps = [read_state(p).step for p in kept]
    evaluated = {r["step"]: r["eval/loss"] for r in records(run_dir, "eval")}
    best_step = min(evaluated, key=evaluated.get)
    assert steps[-2:] == [12, 14] and best_step in steps and len(kept) <= 3
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("fused", [True, False])  # skipped on the device / checked on the host
def test_nonfinite_loss_is_skipped_or_stops(make_config, monkeypatch, capsys, fused):
    from trainer.model import SparseMLM

    calls = {"n": 0}
    forward = SparseMLM.forward

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        token_loss, correct = forward(self, *args, **kwargs)
        return (token_loss * float("nan") if calls["n"] == 4 else token_loss), correct

    clean = make_config(train={"max_steps": 3}, optim={"fused": fused}, log={"run_name": "clean"})
    train(clean)
    monkeypatch.setattr(SparseMLM, "forward", poisoned)
    cfg = make_config(train={"max_steps": 4, "on_nonfinite": "skip"}, optim={"fused": fused}, log={"run_name": "skip"})
    summary = train(cfg)
    assert summary["step"] == 4 and "steps 4-4: 1 with a non-finite loss or gradient norm, update skipped" in capsys.readouterr().out
    root = Path(cfg.log.output_root)
    skipped_last, three_steps = final_params(root / "skip"), final_params(root / "clean")
    assert all(torch.equal(skipped_last[k], three_steps[k]) for k in three_steps)  # step 4 changed nothing
    assert [r["step"] for r in records(root / "skip", "train")] == [1, 2, 3]  # no train record for a skipped-only interval

    calls["n"] = 0
    cfg = make_config(train={"max_steps": 6, "save_every": 2, "on_nonfinite": "stop"}, optim={"fused": fused},
                      log={"run_name": "stop"})
    with pytest.raises(TrainingStopped, match="non-finite loss or gradient norm"):
        train(cfg)
    kept = list_checkpoints(Path(cfg.log.output_root) / "stop")
    assert [read_state(p).step for p in kept] == [2]  # the good checkpoint is intact


@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_guard_skips_exactly_the_bad_updates_and_counts_runs(fused):
    from trainer.step import NonFiniteGuard

    guarded, reference = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([guarded], lr=0.1, fused=fused)
    reference_optimizer = torch.optim.AdamW([reference], lr=0.1, fused=fused)
    from accelerate import Accelerator

    guard = NonFiniteGuard(Accelerator(cpu=True), optimizer)
    assert guard.mode == ("device" if fused else "host")
    reads = []
    for grad in [1.0, "nan", "nan", "read", "nan", 2.0, "inf", "read"]:
        if grad == "read":
            reads.append(guard.read())
            continue
        guarded.grad = torch.full((3,), float(grad))
        updated = guard.step(optimizer, guarded.grad.norm(), torch.tensor(1.0))
        assert updated.item() == float(math.isfinite(float(grad)))
        if math.isfinite(float(grad)):  # the reference optimizer only ever sees the good steps
            reference.grad = guarded.grad.clone()
            reference_optimizer.step()
        assert torch.equal(guarded, reference)
    assert torch.equal(optimizer.state[guarded]["step"], reference_optimizer.state[reference]["step"])
    assert reads == [(2, 2, 2), (2, 3, 1)]  # (skipped, longest run, current run); a run spans reads
    assert not hasattr(optimizer, "found_inf")


def test_training_steps_read_nothing_back_from_the_device(make_config, monkeypatch):
    """Host syncs happen at logging steps only: more steps between two log lines, no more reads."""
    reads = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
        def counted(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            reads["n"] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads_in_run(steps: int) -> int:
        before = reads["n"]
        train(make_config(train={"max_steps": steps, "log_every": 100}, log={"run_name": f"steps{steps}"}))
        return reads["n"] - before

    few, many = reads_in_run(3), reads_in_run(9)
    assert few > 0 and many == few  # the counter sees the log step, the evaluation and the save; nothing per step


def test_fp16_on_cpu_and_unwritable_output_are_refused(make_config, tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train(make_config(train={"mixed_precision": "fp16"}))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="cannot write to output directory"):
        train(make_config(log={"output_root": str(tmp_path / "a_file" / "runs")}))


def test_bf16_autocast_trains_on_cpu(make_config):
    summary = train(make_config(train={"mixed_precision": "bf16", "max_steps": 4, "epochs": 1}))
    assert math.isfinite(summary["eval/loss"])


def test_gradient_accumulation_equals_a_bigger_batch(make_config):
    big = make_config(train={"batch_size": 8, "max_steps": 6}, log={"run_name": "b8"})
    accumulated = make_config(train={"batch_size": 4, "grad_accum": 2, "max_steps": 6}, log={"run_name": "b4x2"})
    train(big)
    train(accumulated)
    root = Path(big.log.output_root)
    a, b = records(root / "b8", "train"), records(root / "b4x2", "train")
    assert max(abs(x["train/loss"] - y["train/loss"]) for x, y in zip(a, b)) < 1e-6
    pa, pb = final_params(root / "b8"), final_params(root / "b4x2")
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-6


def test_entry_point_reports_bad_input_in_one_line(make_config, tmp_path, capsys):
    from trainer.run import main

    recipe = tmp_path / "recipe.py"
    from conftest import write_recipe

    write_recipe(recipe, make_config())
    cases = {
        (str(tmp_path / "missing.py"),): "recipe file not found",
        (str(recipe), "--optim.lr=abc"): "bad value for optim.lr",
        (str(recipe), "--data.dataset=" + str(tmp_path / "nowhere")): "data not found: ",
        (str(recipe), "--data.block_size=128"): "exceeds model.max_position_embeddings=64",
        (str(recipe), "--resume=" + str(tmp_path)): "not a checkpoint, nor a run directory",
    }
    for argv, message in cases.items():
        assert main(list(argv)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err


def test_requested_tracker_that_is_not_installed_is_an_error(make_config, monkeypatch):
    import importlib.util

    from trainer.tracking import TrackerError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(TrackerError, match="tensorboard package is not installed"):
        train(make_config(log={"tracker": "tensorboard"}))


def test_checkpoints_evaluated_nan_are_not_kept_as_the_newest(make_config, monkeypatch):
    """A NaN evaluation means diverged weights: those checkpoints are dropped, the newest sane ones kept."""
    import trainer.loop

    losses = iter([3.0, 2.0, 2.5, float("nan"), float("inf")])  # evaluations at steps 2, 4, ..., 10
    real = trainer.loop.evaluate_mlm
    monkeypatch.setattr(trainer.loop, "evaluate_mlm", lambda *a, **k: {**real(*a, **k), "eval/loss": next(losses)})
    cfg = make_config(train={"save_every": 2, "eval_every": 2, "keep_last": 2, "max_steps": 10}, log={"run_name": "nan"})
    train(cfg)
    assert [read_state(p).step for p in list_checkpoints(Path(cfg.log.output_root) / "nan")] == [4, 6]


def test_the_best_checkpoint_survives_when_eval_loss_rises(make_config, monkeypatch):
    """keep_last=1, and the eval loss is lowest at step 4 of 12: step-4 stays beside the newest."""
    import trainer.loop

    losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])  # evaluations at steps 2, 4, ..., 12
    real = trainer.loop.evaluate_mlm

    def scripted(*args, **kwargs):
        metrics = real(*args, **kwargs)
        return {**metrics, "eval/loss": next(losses)}

    monkeypatch.setattr(trainer.loop, "evaluate_mlm", scripted)
    cfg = make_config(train={"save_every": 2, "eval_every": 2, "keep_last": 1, "max_steps": 12}, log={"run_name": "best"})
    train(cfg)
    run_dir = Path(cfg.log.output_root) / "best"
    assert [read_state(p).step for p in list_checkpoints(run_dir)] == [4, 12]


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_bf16_autocast_is_really_on(make_config, monkeypatch, precision, dtype):
    from trainer.model import SparseMLM

    dtypes = []
    forward = SparseMLM.forward

    def spy(self, input_ids, mlm_positions, mlm_labels):
        hidden = self.mlm.bert.encoder.layer[0].attention.self.query(self.mlm.bert.embeddings(input_ids=input_ids))
        dtypes.append(hidden.dtype)
        return forward(self, input_ids, mlm_positions, mlm_labels)

    monkeypatch.setattr(SparseMLM, "forward", spy)
    summary = train(make_config(train={"mixed_precision": precision, "max_steps": 2, "epochs": 1}))
    assert set(dtypes) == {dtype} and math.isfinite(summary["eval/loss"])


def test_tensorboard_receives_the_same_numbers_as_metrics_jsonl(make_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(train={"max_steps": 4, "eval_every": 2}, log={"tracker": ["tensorboard"], "run_name": "tb2"})
    train(cfg)
    run_dir = Path(cfg.log.output_root) / "tb2"
    scalars = EventAccumulator(str(run_dir / cfg.log.project)).Reload()  # Accelerate: <project_dir>/<project>
    for metric in ("train/loss", "eval/loss", "train/lr"):
        logged = [(r["step"], r[metric]) for r in read_jsonl(run_dir / "metrics.jsonl") if metric in r]
        seen = [(e.step, e.value) for e in scalars.Scalars(metric)]
        assert [s for s, _ in seen] == [s for s, _ in logged] and len(logged) >= 2
        assert [v for _, v in seen] == pytest.approx([v for _, v in logged], rel=1e-6)


def test_eval_masks_do_not_depend_on_the_training_mask_rate(make_config):
    first = [make_config(data={"mlm_probability": p}, train={"eval_at_start": True, "max_steps": 1},
                         log={"run_name": f"p{p}"}) for p in (0.15, 0.6)]
    starts = []
    for cfg in first:
        train(cfg)
        starts.append(records(Path(cfg.log.output_root) / cfg.log.run_name, "eval")[0])
    assert starts[0]["step"] == starts[1]["step"] == 0
    assert starts[0]["eval/masked_tokens"] == starts[1]["eval/masked_tokens"]
    assert starts[0]["eval/loss"] == starts[1]["eval/loss"]  # same weights, same masked positions and inputs


def test_a_diverged_run_names_the_best_checkpoint_and_never_saves_a_broken_model(make_config, monkeypatch, capsys,
                                                                                 tmp_path):
    from trainer.model import SparseMLM

    forward, calls = SparseMLM.forward, {"n": 0}

    def diverging(self, *args, **kwargs):  # finite for 5 steps, then NaN for good
        calls["n"] += 1
        token_loss, correct = forward(self, *args, **kwargs)
        return (token_loss * float("nan") if calls["n"] > 5 else token_loss), correct

    monkeypatch.setattr(SparseMLM, "forward", diverging)
    cfg = make_config(train={"max_steps": 40, "save_every": 2, "eval_every": 2, "log_every": 2, "max_nonfinite_skips": 3},
                      log={"run_name": "diverged"})
    from conftest import write_recipe
    from trainer.run import main

    assert main([str(write_recipe(tmp_path / "diverging.py", cfg))]) == 3  # not 0, not a bad-input 2
    stopped = capsys.readouterr().err
    run_dir = Path(cfg.log.output_root) / "diverged"
    best = min(records(run_dir, "eval"), key=lambda r: r["eval/loss"])["step"]
    checkpoint = run_dir / "checkpoints" / f"step-{best:06d}"
    assert f"the best checkpoint is {checkpoint} (eval loss" in stopped
    command = stopped.strip().split("with lower learning rates in a new run: ")[1]
    assert command == f"accelerate launch trainer/run.py --from={checkpoint} --optim.lr=0.0003"  # a tenth
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"

    # Typed as printed (a new process: the fault above was this process's): the weights of that
    # checkpoint, a fresh optimizer at a tenth of the rate, recorded in the new run's config and model card.
    result = subprocess.run(["bash", "-c", command], cwd=REPO, env=user_shell_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (new_run,) = [p for p in run_dir.parent.iterdir() if p.name != "diverged"]
    config = json.loads((new_run / "config.json").read_text())
    assert config["model"]["init_from"] == str(checkpoint.resolve()) and config["optim"]["lr"] == 0.0003
    assert f"model BertForMaskedLM  0.02M parameters  2 layers, hidden 32  (from scratch), weights of {checkpoint.resolve()}" \
        in result.stdout
    card = (new_run / "model" / "README.md").read_text()
    assert f"from the weights of the checkpoint `{checkpoint.resolve()}`" in card and "AdamW (peak lr 0.0003," in card
    started, _ = build_model(ModelConfig(**config["model"]), 34)  # what the new run started from
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.equal(started.state_dict()[k.removeprefix("mlm.")], v) for k, v in saved.items())
    shutil.rmtree(run_dir)  # the new run stands alone: it resumes from its own checkpoints
    resumed = subprocess.run(["bash", "-c", f"accelerate launch trainer/run.py --resume={new_run} --train.max_steps=44"],
                             cwd=REPO, env=user_shell_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]

    calls["n"] = 0
    monkeypatch.setattr("trainer.loop.parameters_finite", lambda accelerator, model: calls["n"] < 3)  # broken from step 3
    cfg = make_config(train={"max_steps": 4, "save_every": 2}, log={"run_name": "broken"})
    with pytest.raises(TrainingStopped, match="parameters are not finite at step 4: the model is NOT saved"):
        train(cfg)
    assert "parameters are not finite at step 4: checkpoint NOT written" in capsys.readouterr().out
    broken = Path(cfg.log.output_root) / "broken"
    assert [read_state(p).step for p in list_checkpoints(broken)] == [2] and not (broken / "model").exists()
