"""Ablations: short runs of a recipe with one change at a time, side by side.

    python bench/ablate.py recipes/scratch_tuned.py --tokens 1e6 \
        --variant base= --variant muon="--optim.name=muon" --variant wsd="--optim.schedule=wsd"
    make ablate        # the README's table: every change alone and together, at 1M tokens

Each variant is a real training run (`trainer/run.py`, one after the other, never two at once) over
the first `--tokens` training tokens for one epoch, so its schedule ends where it stops; the validation
perplexity is the trainer's usual fixed-mask evaluation at the end. Results go to
`runs/ablate-<tag>/<variant>/` and a table (printed, and `runs/ablate-<tag>/results.json`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The README's ablation: the seed recipe, scratch_tuned, each change alone on top of it, then together
# (recipes/scratch_fast.py is tuned+zero_init+muon(lr.005)+wsd). Names match runs/ablate-1M/results.json.
ZI, WSD = "--model.zero_init_output=true", "--optim.schedule=wsd"
DEFAULT_VARIANTS = {
    "scratch": "RECIPE=recipes/scratch.py",
    "tuned": "",
    "tuned+wsd": WSD,
    "tuned+zero_init": ZI,
    "tuned+zero_init+lr2e-3": f"{ZI} --optim.lr=2e-3",
    **{f"tuned+muon(lr.{lr[2:]})": f"--optim.name=muon --optim.muon_lr={lr}" for lr in ("0.005", "0.01", "0.02")},
    "tuned+muon(lr.005)+wsd": f"--optim.name=muon --optim.muon_lr=0.005 {WSD}",
    "tuned+zero_init+wsd": f"{ZI} {WSD}",
    **{f"tuned+zero_init+muon(lr.{lr[2:]})": f"{ZI} --optim.name=muon --optim.muon_lr={lr}" for lr in ("0.005", "0.01")},
    **{f"tuned+zero_init+muon(lr.{lr[2:]})+wsd": f"{ZI} --optim.name=muon --optim.muon_lr={lr} {WSD}"
       for lr in ("0.005", "0.01")},
    "scratch_fast+mask.15": "RECIPE=recipes/scratch_fast.py --data.mlm_probability=0.15",
    # static shapes (issue: a fixed number of masks per block, as BERT's own pipeline) against Bernoulli
    "scratch+fixed_masks": "RECIPE=recipes/scratch.py --data.mask_count=fixed",
    "scratch_fast+fixed_masks": "RECIPE=recipes/scratch_fast.py --data.mask_count=fixed",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--tokens", type=float, default=1e6, help="training tokens per run (one epoch over them)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                        help='a run: its name and overrides ("RECIPE=path" as the first word swaps the recipe)')
    parser.add_argument("--tag", default="1M")
    parser.add_argument("--keep-going", action="store_true", help="run the variants even if results exist")
    args, common = parser.parse_known_args(argv)
    variants = dict(v.split("=", 1) for v in args.variant) if args.variant else DEFAULT_VARIANTS

    root = REPO / "runs" / f"ablate-{args.tag}"
    results_path = root / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    offline = subprocess.run([sys.executable, "-m", "trainer.hub", "scratch"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    for name, overrides in variants.items():
        if name in results and not args.keep_going:
            continue
        words = shlex.split(overrides)
        recipe = words.pop(0).split("=", 1)[1] if words and words[0].startswith("RECIPE=") else args.recipe
        blocks = round(args.tokens / 128)
        run_name = name.replace(" ", "_").replace("(", "").replace(")", "")
        command = [sys.executable, "trainer/run.py", recipe, *offline, f"--data.max_train_blocks={blocks}",
                   "--train.epochs=1", "--train.eval_every=0", "--train.save_every=0", "--log.tracker=none",
                   f"--log.output_root={root}", f"--log.run_name={run_name}", *common, *words]
        shutil.rmtree(root / run_name, ignore_errors=True)
        print(f"== {name}: {shlex.join(command[2:])}", flush=True)
        if subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL).returncode != 0:
            print(f"   {name} failed", flush=True)
            continue
        summary = json.loads((root / run_name / "summary.json").read_text())
        results[name] = {"overrides": overrides, "recipe": recipe, **{k: summary[k] for k in (
            "eval/loss", "eval/perplexity", "eval/accuracy", "time_s", "train/tokens_per_s", "tokens")}}
        results_path.write_text(json.dumps(results, indent=1))
        print(f"   val perplexity {summary['eval/perplexity']:.1f}  wall {summary['time_s']:.0f} s  "
              f"{summary['train/tokens_per_s']:,.0f} tokens/s", flush=True)
    print(f"\n{'variant':40s} {'val ppl':>8s} {'loss':>7s} {'wall s':>7s} {'tok/s':>7s}")
    for name, r in results.items():
        print(f"{name:40s} {r['eval/perplexity']:8.1f} {r['eval/loss']:7.3f} {r['time_s']:7.0f} "
              f"{r['train/tokens_per_s']:7,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
