"""LSEF, LSEF without RAO and the two baselines on real labelled multivariate sequence data.

The data sets ship inside the ``aeon`` wheel on PyPI, as ``.ts`` files with their own train and
test splits; only the files are read (aeon is never imported, so its dependencies are not
needed):

    pip install --no-deps aeon==1.6.0
    python benchmarks/real_data.py            # writes the section of docs/RESULTS.md

* JapaneseVowels (UCI; Kudo, Toyama and Shimbo 1999): 9 speakers, 12 LPC cepstrum channels,
  7-29 frames per utterance (variable length: padded and masked), 270 train / 370 test.
* BasicMotions (UEA archive): 4 activities, 6 channels (accelerometer and gyroscope), 100 frames,
  40 train / 40 test.

Protocol: ``lsef train`` as a user runs it on a folder with train/test splits only: a
stratified 20 % of train is held out as val (seeded by the run's seed), per-channel
standardisation with training statistics, up to ``--epochs`` epochs with best-on-val selection
and early stopping. The learning rate of each model is chosen from ``LRS`` by the mean val WAR
over the seeds; only then is the test split read, once, for the chosen setting (clean and under
each corruption, in units of the training features' spread). Reported: mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from marked_block import replace_block

from lsef_ext.data import CONDITIONS, CORRUPTIONS, ts_to_feature_folder
from lsef_ext.train import (
    TrainConfig,
    Trainer,
    evaluate,
    load_checkpoint,
    load_test_sets,
    prepare_data,
)

DATASETS = ("JapaneseVowels", "BasicMotions")
MODELS = {  # name: (model, RAO)
    "LSEF": ("lsef", False),
    "LSEF + RAO": ("lsef", True),
    "mean-pool MLP": ("meanpool-mlp", False),
    "temporal transformer": ("transformer", False),
}
LRS = (1e-3, 3e-3)


def aeon_data() -> str:
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("real_data.py: the aeon wheel is not installed: pip install --no-deps aeon==1.6.0")
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


def folder_for(name: str, work: str) -> str:
    src = os.path.join(aeon_data(), name)
    return ts_to_feature_folder(
        os.path.join(work, name),
        train=os.path.join(src, f"{name}_TRAIN.ts"),
        test=os.path.join(src, f"{name}_TEST.ts"),
    )


def train_one(cfg: TrainConfig):
    """Trains one run; returns (best checkpoint, val WAR of best.pt, seconds, epochs run)."""
    train, val, meta, _ = prepare_data(cfg)
    t0 = time.perf_counter()
    tr = Trainer(cfg, train, val=val, progress=False, meta=meta)
    tr.fit()
    seconds = time.perf_counter() - t0
    ck = load_checkpoint(os.path.join(cfg.out, "best.pt"))
    return ck, tr.best["score"], seconds, len(tr.history)


def mean_std(values):
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_dataset(name: str, work: str, seeds, epochs: int, patience: int, log) -> dict:
    root = folder_for(name, work)
    out = {}
    for label, (model, rao) in MODELS.items():
        runs = {}  # lr -> [(ck, val, seconds, epochs)]
        for lr in LRS:
            for seed in seeds:
                cfg = TrainConfig(
                    model=model,
                    data=root,
                    T="auto",
                    epochs=epochs,
                    patience=patience,
                    val_fraction=0.2,  # BasicMotions: 8 val clips (10 % would leave 4)
                    batch_size=32,
                    lr=lr,
                    seed=seed,
                    rao=rao,
                    out=os.path.join(work, "runs", name, f"{model}-{rao}-{lr}-{seed}"),
                )
                runs.setdefault(lr, []).append((cfg, *train_one(cfg)))
                log(f"{name} {label} lr {lr:g} seed {seed}: val WAR {runs[lr][-1][2]:.3f}")
        chosen = max(LRS, key=lambda lr: statistics.mean(r[2] for r in runs[lr]))
        tests = []
        for cfg, ck, _, _, _ in runs[chosen]:  # the test split, read once, for the chosen lr
            sets = load_test_sets(cfg, CONDITIONS, meta=ck.meta)
            tests.append(
                {
                    c: evaluate(ck.model, d.x, d.t, lengths=d.lengths, mask=d.mask)
                    for c, d in sets.items()
                }
            )
        chosen_runs = runs[chosen]
        out[label] = {
            "lr": chosen,
            "val_war": mean_std(r[2] for r in chosen_runs),
            "seconds": mean_std(r[3] for r in chosen_runs),
            "epochs": mean_std(r[4] for r in chosen_runs),
            "test": {
                c: {k: mean_std(t[c][k] for t in tests) for k in ("war", "uar")} for c in CONDITIONS
            },
            "per_seed_clean_war": [t["clean"]["war"] for t in tests],
        }
        log(f"{name} {label}: lr {chosen:g}, test clean WAR {out[label]['test']['clean']['war']}")
    return out


def _pm(pair, scale=100.0, digits=1) -> str:
    mean, std = pair
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def table(results: dict) -> str:
    lines = []
    for name, models in results.items():
        n = len(next(iter(models.values()))["per_seed_clean_war"])
        conditions = " | ".join(c.replace("_", " ") for c in CONDITIONS)
        lines += [
            f"**{name}**: test split, WAR % (mean ± std over {n} seeds)",
            "",
            f"| model | lr (on val) | val WAR | {conditions} | corrupted avg | train s | epochs |",
            "|---" * (len(CONDITIONS) + 6) + "|",
        ]
        for label, r in models.items():
            cells = " | ".join(_pm(r["test"][c]["war"]) for c in CONDITIONS)
            # frame_drop_known is frame drop again (told): not counted twice
            corrupted = statistics.mean(r["test"][c]["war"][0] for c in CORRUPTIONS)
            lines.append(
                f"| {label} | {r['lr']:g} | {_pm(r['val_war'])} | {cells} | "
                f"{100 * corrupted:.1f} | {_pm(r['seconds'], 1.0)} | {r['epochs'][0]:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--write", default=None, metavar="MD", help="replace the section of this file")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    seeds = list(range(args.seeds))
    start = time.time()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in args.datasets.split(","):
            results[name] = run_dataset(
                name, work, seeds, args.epochs, args.patience, lambda s: print(s, flush=True)
            )
    text = table(results)
    print(text)
    print(f"real_data.py: {time.time() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.write:
        replace_block(args.write, "real-data", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
