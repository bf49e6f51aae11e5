"""The LSEF ablation: full LSEF vs LSEF without each module, with RAO, and the baselines.

Every variant is trained on the same SyntheticAffect training set with three seeds (model
initialisation and batch order) and tested clean and under each corruption. Writes
``docs/RESULTS.md`` (the table, mean ± std over seeds) and ``benchmarks/ablation.json`` (every
number). Usage::

    python benchmarks/ablation.py [--seeds 0 1 2] [--out docs/RESULTS.md]

About 6 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace

import torch

from marked_block import replace_block

from lsef_ext.data import CONDITIONS
from lsef_ext.demo import LABELS, run_one, settings
from lsef_ext.train import TrainConfig, corrupted_average, load_test_sets

VARIANTS = (
    "lsef",
    "lsef-no-sem",
    "lsef-no-ddm",
    "lsef-no-cim",
    "lsef+rao",
    "meanpool-mlp",
    "transformer",
)


def config(variant: str, seed: int, base: TrainConfig) -> TrainConfig:
    model = "lsef" if variant == "lsef+rao" else variant
    return replace(base, model=model, seed=seed, rao=variant == "lsef+rao", **settings(model))


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--out", default=os.path.join("docs", "RESULTS.md"))
    p.add_argument("--json", default=os.path.join("benchmarks", "ablation.json"))
    p.add_argument(
        "--block",
        default="ablation",
        help="name of the marked block of --out to replace (e.g. 'rao' for a seed study)",
    )
    args = p.parse_args()

    base = TrainConfig()
    tests = load_test_sets(base)
    runs = {}
    t0 = time.perf_counter()
    for v in args.variants:
        runs[v] = []
        for s in args.seeds:
            r = run_one(config(v, s, base), progress=False, test_sets=tests)
            m = r["metrics"]
            runs[v].append(
                {"seed": s, "metrics": m, "params": r["params"], "seconds": r["seconds"]}
            )
            print(
                f"{v:<14} seed {s}: clean WAR {100 * m['clean']['war']:.1f}  corrupted avg WAR "
                f"{100 * corrupted_average(m):.1f}  ({r['seconds']:.0f} s)",
                flush=True,
            )

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {
                "date": stamp,
                "commit": commit,
                "config": asdict(base),
                "seeds": args.seeds,
                "runs": runs,
            },
            f,
            indent=2,
        )

    def cell(v, fn):
        a, b = mean_std([100 * fn(r["metrics"]) for r in runs[v]])
        return f"{a:.1f} ± {b:.1f}"

    tested = CONDITIONS[1:]  # the corruptions, frame drop twice (not told, told)
    lines = [
        "| variant | params | clean WAR | clean UAR | corrupted-avg WAR | corrupted-avg UAR | "
        + " | ".join(f"{c} WAR" for c in tested)
        + " |",
        "|" + "---|" * (6 + len(tested)),
    ]
    for v in args.variants:
        lines.append(
            f"| {LABELS.get(v, v)} | {runs[v][0]['params']:,} | "
            f"{cell(v, lambda m: m['clean']['war'])} | "
            f"{cell(v, lambda m: m['clean']['uar'])} | {cell(v, corrupted_average)} | "
            f"{cell(v, lambda m: corrupted_average(m, 'uar'))} | "
            + " | ".join(cell(v, lambda m, c=c: m[c]["war"]) for c in tested)
            + " |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    print(f"\n{time.perf_counter() - t0:.0f} s in all")

    command = " ".join(["python", "benchmarks/ablation.py"] + sys.argv[1:])
    block = (
        f"Produced by `{command}` on {stamp}, commit "
        f"`{commit}`, torch {torch.__version__}, {torch.get_num_threads()} threads: "
        f"SyntheticAffect (seed {base.data_seed}), {base.n_train} training clips, "
        f"{base.n_test} test clips per condition, T = {base.T}, D = {base.D}, learning rate "
        f"and epochs per model from DEMO_SETTINGS (chosen on val), seeds {args.seeds} "
        f"(initialisation and batch order). WAR / UAR in %, "
        f"mean ± sample std over seeds; models trained on clean clips only.\n\n"
        f"{table}"
    )
    replace_block(args.out, args.block, block)
    print(f"wrote {args.out} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
