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

# The README's ablation: each change alone on top of scratch_tuned, then together (scratch_fast).
DEFAULT_VARIANTS = {
    "scratch (seed recipe)": "RECIPE=recipes/scratch.py",
    "scratch_tuned": "",
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
            "final/eval_loss", "final/eval_perplexity", "final/eval_accuracy", "wall_time_s", "train/tokens_per_s",
            "tokens_seen")}}
        results_path.write_text(json.dumps(results, indent=1))
        print(f"   val perplexity {summary['final/eval_perplexity']:.1f}  wall {summary['wall_time_s']:.0f} s  "
              f"{summary['train/tokens_per_s']:,.0f} tokens/s", flush=True)
    print(f"\n{'variant':40s} {'val ppl':>8s} {'loss':>7s} {'wall s':>7s} {'tok/s':>7s}")
    for name, r in results.items():
        print(f"{name:40s} {r['final/eval_perplexity']:8.1f} {r['final/eval_loss']:7.3f} {r['wall_time_s']:7.0f} "
              f"{r['train/tokens_per_s']:7,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
