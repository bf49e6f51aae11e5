"""The demo's training settings, chosen on the synthetic val split only.

For each model of ``lsef demo`` (LSEF, the mean-pool MLP, the temporal transformer),
every (learning rate, epochs) pair of the grid below is trained on the SyntheticAffect training
set with each seed and scored by its clean WAR on the ``val`` split (a split of its own, disjoint
from train and test). The pair with the best mean val WAR is the model's setting in
``lsef_ext.demo.DEMO_SETTINGS``; the test split is not read here. Writes the table between the
``demo-settings`` markers of docs/RESULTS.md. Usage::

    python benchmarks/demo_settings.py [--seeds 0 1] [--out docs/RESULTS.md]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from dataclasses import replace

import torch
from marked_block import replace_block

from lsef_ext.demo import DEMO_MODELS, LABELS
from lsef_ext.train import TrainConfig, Trainer, evaluate, load_data

LRS = (1e-3, 2e-3, 4e-3)
EPOCHS = (10, 15, 25)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default=os.path.join("docs", "RESULTS.md"))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base = TrainConfig()
    train = load_data(base, "train")
    val = load_data(base, "val")
    scores = {}
    t0 = time.perf_counter()
    for model, lr, epochs in itertools.product(DEMO_MODELS, LRS, EPOCHS):
        wars = []
        for seed in args.seeds:
            cfg = replace(base, model=model, lr=lr, epochs=epochs, seed=seed)  # RAO: off
            tr = Trainer(cfg, train, progress=False)
            tr.fit()
            wars.append(evaluate(tr.net, val.x, val.t)["war"])
        scores[model, lr, epochs] = wars
        print(f"{model:<14} lr {lr:g} epochs {epochs}: val WAR {wars}", flush=True)
    lines = [
        f"Clean val WAR % (SyntheticAffect val split, {base.n_test} clips; mean over seeds "
        f"{', '.join(map(str, args.seeds))}); **bold**: the chosen setting.",
        "",
        "| model | " + " | ".join(f"lr {lr:g}, {e} ep" for lr in LRS for e in EPOCHS) + " |",
        "|---" * (1 + len(LRS) * len(EPOCHS)) + "|",
    ]
    chosen = {}
    for model in DEMO_MODELS:
        means = {(lr, e): statistics.mean(scores[model, lr, e]) for lr in LRS for e in EPOCHS}
        best = max(means, key=lambda k: (means[k], -k[1]))  # ties: fewer epochs
        chosen[model] = best
        cells = [
            (f"**{100 * means[k]:.1f}**" if k == best else f"{100 * means[k]:.1f}")
            for k in ((lr, e) for lr in LRS for e in EPOCHS)
        ]
        lines.append(f"| {LABELS[model]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Chosen: "
        + "; ".join(f"{LABELS[m]} lr {lr:g}, {e} epochs" for m, (lr, e) in chosen.items())
        + f". Search time {time.perf_counter() - t0:.0f} s."
    )
    text = "\n".join(lines) + "\n"
    print(text)
    replace_block(args.out, "demo-settings", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
