"""``lsef demo``: train LSEF and the baselines on the embedded data, test them clean and under
every corruption, draw figures, and time the ops. Also the experiment runner the ablation script
(``benchmarks/ablation.py``) uses."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Dict, Optional, Sequence

import torch

from .data import CONDITIONS  # also lsef_ext.demo.CONDITIONS, as before
from .train import (
    TrainConfig,
    Trainer,
    corrupted_average,
    evaluate_conditions,
    load_data,
    load_test_sets,
)

DEMO_MODELS = ("lsef", "meanpool-mlp", "transformer")
# Each model's learning rate and epochs, chosen on the val split of SyntheticAffect by
# benchmarks/demo_settings.py (the grid and the val scores are in docs/RESULTS.md); the LSEF
# ablation variants use LSEF's. The test split played no part in choosing them.
DEMO_SETTINGS = {
    "lsef": {"lr": 2e-3, "epochs": 25},
    "meanpool-mlp": {"lr": 4e-3, "epochs": 25},
    "transformer": {"lr": 2e-3, "epochs": 15},
}


def settings(model: str) -> Dict[str, object]:
    """The demo's training settings for ``model`` (LSEF's for the LSEF variants)."""
    return DEMO_SETTINGS["lsef" if model.startswith("lsef") else model]


LABELS = {
    "lsef": "LSEF",
    "meanpool-mlp": "mean-pool MLP",
    "transformer": "temporal transformer",
    "lsef-no-sem": "LSEF w/o SEM",
    "lsef-no-ddm": "LSEF w/o DDM",
    "lsef-no-cim": "LSEF w/o CIM",
    "lsef+rao": "LSEF + RAO",
}


def run_one(cfg: TrainConfig, progress: bool = True, test_sets=None) -> Dict[str, object]:
    """Trains ``cfg.model`` and evaluates it clean and under each corruption.

    Returns ``{"metrics": {condition: {"war", "uar"}}, "history", "seconds", "params", "trainer"}``
    (``metrics`` from :func:`lsef_ext.train.evaluate_conditions`). ``test_sets``: as
    :func:`lsef_ext.train.load_test_sets` returns (default: loaded for ``cfg``). The per-epoch
    scores in ``history`` are on the val split; the test sets are read once, after training.
    """
    train = load_data(cfg, "train")
    test_sets = test_sets or load_test_sets(cfg)
    t0 = time.perf_counter()
    trainer = Trainer(
        cfg,
        train,
        val=load_data(cfg, "val"),
        progress=progress,
        desc=LABELS.get(cfg.model, cfg.model) + f" seed {cfg.seed}",
    )
    history = trainer.fit()
    seconds = time.perf_counter() - t0
    metrics = evaluate_conditions(trainer.net, cfg, tuple(test_sets), test_sets)
    return {
        "metrics": metrics,
        "history": history,
        "seconds": seconds,
        "params": sum(p.numel() for p in trainer.net.parameters()),
        "trainer": trainer,
    }


def results_table(results: Dict[str, Dict[str, object]]) -> str:
    """A Markdown table: WAR / UAR (%) per model and condition, and the corrupted average."""
    head = (
        "| model | params | "
        + " | ".join(f"{c} WAR / UAR" for c in CONDITIONS)
        + " | corrupted avg WAR / UAR |"
    )
    lines = [head, "|" + "---|" * (len(CONDITIONS) + 3)]
    for name, r in results.items():
        m = r["metrics"]
        cells = [f"{100 * m[c]['war']:.1f} / {100 * m[c]['uar']:.1f}" for c in CONDITIONS]
        avg = f"{100 * corrupted_average(m):.1f} / {100 * corrupted_average(m, 'uar'):.1f}"
        lines.append(
            f"| {LABELS.get(name, name)} | {r['params']:,} | " + " | ".join(cells) + f" | {avg} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_decomposition(
    model, clips: Dict[str, torch.Tensor], path: str, channels: int = 48
) -> None:
    """Heatmaps over time of a clip's X and of the L and S the trained LSEF finds in it, for the
    clean clip and its corrupted versions (one row each). X and L share one symmetric colour
    scale per row (so L reads as a part of X); S has its own, so that the small transient events
    of a clean clip stay visible beside the large corruption spikes of the others."""
    plt = _plt()
    fig, axes = plt.subplots(len(clips), 3, figsize=(12, 2.4 * len(clips)), squeeze=False)
    model.eval()
    with torch.no_grad():
        for row, (name, x) in enumerate(clips.items()):
            out = model(x[None])
            parts = {
                "X (input)": x,
                "L (stable, low-rank)": out.L[0],
                "S (transient, sparse)": out.S[0],
            }
            scale_xl = float(x[:, :channels].abs().max()) or 1.0
            scale_s = float(out.S[0][:, :channels].abs().max()) or 1.0
            for col, (title, a) in enumerate(parts.items()):
                ax = axes[row, col]
                vmax = scale_s if col == 2 else scale_xl
                im = ax.imshow(
                    a[:, :channels].T.numpy(),
                    aspect="auto",
                    cmap="RdBu_r",
                    vmin=-vmax,
                    vmax=vmax,
                    interpolation="nearest",
                )
                ax.set_title(f"{title}" if row == 0 else "", fontsize=9)
                ax.set_ylabel(f"{name}\nchannel" if col == 0 else "", fontsize=8)
                ax.set_xlabel("frame" if row == len(clips) - 1 else "", fontsize=8)
                ax.tick_params(labelsize=7)
                if col >= 1:  # one colour bar for X and L, one for S
                    bar = fig.colorbar(
                        im, ax=axes[row, :2].tolist() if col == 1 else ax, fraction=0.03, pad=0.01
                    )
                    bar.set_label("value of X, L" if col == 1 else "value of S", fontsize=7)
                    bar.ax.tick_params(labelsize=6)
    fig.suptitle(
        "One test clip and its LSEF decomposition X ≈ L + S (first channels; S on its own scale)",
        fontsize=10,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _legend_below(fig, ax, n: int) -> None:
    """The legend in a row under the axes, where it cannot cover data."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=n, fontsize=8, frameon=False)


def plot_training(results: Dict[str, Dict[str, object]], path: str) -> None:
    """Training loss and clean validation WAR per epoch, one line per model."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, r in results.items():
        h = r["history"]
        ep = [row["epoch"] for row in h]
        a.plot(ep, [row["loss"] for row in h], marker="o", ms=3, label=LABELS.get(name, name))
        b.plot(
            ep, [100 * row["val_war"] for row in h], marker="o", ms=3, label=LABELS.get(name, name)
        )
    a.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Training loss per epoch")
    b.set(xlabel="epoch", ylabel="WAR (%)", title="Clean val WAR per epoch")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    _legend_below(fig, a, len(results))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_robustness(results: Dict[str, Dict[str, object]], path: str) -> None:
    """Grouped bars: WAR per condition, one bar per model, on an axis that starts near the
    lowest bar so that the differences between models show."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    n = len(results)
    width = 0.8 / n
    lowest = 100.0
    for i, (name, r) in enumerate(results.items()):
        vals = [100 * r["metrics"][c]["war"] for c in CONDITIONS]
        lowest = min([lowest] + vals)
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(CONDITIONS))]
        bars = ax.bar(xs, vals, width, label=LABELS.get(name, name))
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(CONDITIONS)), [c.replace("_", " ") for c in CONDITIONS])
    bottom = max(0.0, 10 * (lowest // 10) - 10)
    ax.set(
        ylabel="WAR (%)",
        title="Test accuracy (WAR), clean and under test-time corruptions never seen in training",
        ylim=(bottom, 102),
    )
    ax.title.set_fontsize(10)
    ax.grid(axis="y", alpha=0.3)
    _legend_below(fig, ax, n)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(confusion, class_names, path: str, title: str) -> None:
    """A confusion matrix (rows: true class, columns: predicted), each row normalised to the
    share of its clips, with the count and share in every cell and a labelled colour bar."""
    plt = _plt()
    cm = torch.tensor(confusion, dtype=torch.float64)
    share = cm / cm.sum(1, keepdim=True).clamp_min(1)
    K = cm.shape[0]
    size = max(4.0, 0.6 * K + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(K):
        for j in range(K):
            if cm[i, j] or i == j:
                ax.text(
                    j,
                    i,
                    f"{int(cm[i, j])}\n{100 * share[i, j]:.0f}%",
                    ha="center",
                    va="center",
                    fontsize=7 if K > 8 else 8,
                    color="white" if share[i, j] > 0.55 else "black",
                )
    ax.set_xticks(range(K), class_names, rotation=45, ha="right")
    ax.set_yticks(range(K), class_names)
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class's clips")
    fig.tight_layout()
    fig.savefig(path + ".tmp", dpi=110, format="png")  # then renamed: never a half-written file
    os.replace(path + ".tmp", path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------------------------


def demo(
    out: str = "lsef-demo",
    quick: bool = False,
    seed: int = 0,
    device: str = "cpu",
    bench: bool = True,
    models: Sequence[str] = DEMO_MODELS,
    amp: Optional[str] = None,
) -> Dict[str, object]:
    """Runs the demo; returns the results and writes figures and ``results.json`` to ``out``.
    ``amp``: ``TrainConfig.amp`` of every model (``"bf16"``, ``"fp16"`` on CUDA, None)."""
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    base = TrainConfig(seed=seed, device=device, amp=amp)
    if quick:
        base = replace(base, n_train=1024, n_test=512, epochs=8)
    print(
        f"lsef demo: SyntheticAffect, {base.n_train} training clips, {base.n_test} test clips per "
        f"condition, T={base.T}, D={base.D}, 7 classes; "
        + (
            f"{base.epochs} epochs per model"
            if quick
            else "epochs and learning rate per model as chosen on val ("
            + ", ".join(f"{m} {settings(m)['epochs']} @ {settings(m)['lr']:g}" for m in models)
            + ")"
        )
        + f" on {device}"
        + (f", {torch.get_num_threads()} thread(s)" if device == "cpu" else "")
        + (f", autocast {amp}" if amp else "")
        + (" (--quick)" if quick else "")
        + f"; figures and results.json go to {out}{os.sep}",
        flush=True,
    )
    test_sets = load_test_sets(base)
    results: Dict[str, Dict[str, object]] = {}
    for name in models:
        # RAO off: opt-in (docs/RESULTS.md); --quick keeps its own short schedule
        cfg = replace(base, model=name, **(settings(name) if not quick else {}))
        results[name] = run_one(cfg, progress=True, test_sets=test_sets)
        m = results[name]["metrics"]
        print(
            f"  {LABELS.get(name, name):<22} {results[name]['seconds']:5.1f} s   clean WAR "
            f"{100 * m['clean']['war']:.1f}%   corrupted avg WAR {100 * corrupted_average(m):.1f}%",
            flush=True,
        )

    print(
        "\nWAR / UAR (%) on the test set, clean and under each corruption "
        "(models trained on clean clips):\n"
    )
    print(results_table(results))

    paths = {}
    if "lsef" in results:
        net = results["lsef"]["trainer"].net.cpu()
        i = 0
        clips = {c: test_sets[c][0][i] for c in CONDITIONS}
        paths["decomposition"] = os.path.join(out, "decomposition.png")
        plot_decomposition(net, clips, paths["decomposition"])
    paths["training"] = os.path.join(out, "training.png")
    plot_training(results, paths["training"])
    paths["robustness"] = os.path.join(out, "robustness.png")
    plot_robustness(results, paths["robustness"])
    summary = {name: {k: v for k, v in r.items() if k != "trainer"} for name, r in results.items()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {
                "config": {"quick": quick, "seed": seed, "device": device, "amp": amp},
                "results": summary,
            },
            f,
            indent=2,
        )
    print(
        "\nfigures: "
        + ", ".join(paths.values())
        + f"; numbers: {os.path.join(out, 'results.json')}"
    )

    if bench:
        from . import bench as bench_mod

        print(
            "\nop speed (lsef_ext kernels vs the lsef_ref references and plain PyTorch"
            + (", small sizes" if quick else "")
            + "):\n",
            flush=True,
        )
        bench_mod.run(quick=quick, devices=("cpu",))
    print(f"\nlsef demo finished in {time.perf_counter() - t_start:.0f} s")
    return {"results": results, "figures": paths}
