"""No performance cliff: lsef ``rsvd`` and ``lowrank`` (forward + backward) against the faster of
PyTorch's two choices on every shape of a wide grid (issue 34; docs/DESIGN.md §6).

The grid: batch 1, 8, 64, 256; short side 8 ... 512; long side 1, 2 and 4 times the short side
(at most 2048); k in {1, 4, 16, 64, short - 8, short} where valid; float32, ``oversample = 8``,
``n_iter = 2``; wide matrices (``(batch, short, long)``). The contenders, per cell:

* ``rsvd``: lsef ``rsvd(A, k)`` against ``torch.linalg.svd(A, full_matrices=False)`` (truncated
  to k: the same cost for every k) and ``torch.svd_lowrank(A, q=l, niter=2)`` (``l = min(k + 8,
  short)``, the same sketch as ours);
* ``lowrank``: lsef ``lowrank(A, k)`` with a backward of a random cotangent, against
  ``U[..., :k] S[:k] Vh[:k]`` of each of the two, backward by autograd through it.

Each shape's contenders are timed interleaved, in rounds (every contender once per round), each
getting the median over its rounds, at one thread and at all threads (``torch.get_num_threads()``
at start, or ``--threads``). A cell whose most expensive call would pass ``--budget`` seconds is
*sampled*: every contender runs on the same first ``b`` matrices of the batch (as many as fit
the budget, at least one per thread), and the time is scaled by ``batch / b``; a call above a
tenth of the budget is timed once per contender and round (the probe warmed the code), cheaper
ones get a median of at least 3 calls a round; each contender gets the median over
``--rounds`` interleaved rounds. The ratio of a cell is the best
alternative's time over ours (above 1: lsef is faster).

Writes ``benchmarks/rsvd_sweep.json`` (every timing, the path lsef took, the machine and its
load), ``docs/figures/rsvd_sweep.png`` (heat maps of the ratio) and the table between the
``rsvd-sweep`` markers of docs/RESULTS.md. Usage::

    python benchmarks/rsvd_sweep.py [--threads N] [--budget 0.25] [--replot]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
from marked_block import replace_block

from lsef_ext import bench, ops

BATCHES = (1, 8, 64, 256)
SHORTS = (8, 16, 32, 64, 128, 256, 512)
ASPECTS = (1, 2, 4)
MAX_LONG = 2048
OVERSAMPLE, N_ITER = 8, 2


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def ranks(short: int) -> list:
    return sorted({k for k in (1, 4, 16, 64, short - 8, short) if 1 <= k <= short})


def shapes():
    for short in SHORTS:
        for aspect in ASPECTS:
            if short * aspect <= MAX_LONG:
                yield short, short * aspect


def once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def contenders(A: torch.Tensor, k: int, G: torch.Tensor) -> dict:
    """The calls of one cell, by name (lsef first)."""
    short = min(A.shape[-2:])
    l = min(k + OVERSAMPLE, short)

    def lsef_lowrank():
        X = A.detach().requires_grad_()
        ops.lowrank(X, k).backward(G)

    def svd_lowrank_grad():
        X = A.detach().requires_grad_()
        U, S, V = torch.svd_lowrank(X, q=l, niter=N_ITER)
        ((U[..., :k] * S[..., None, :k]) @ V[..., :k].mT).backward(G)

    def lowrank_rsvd():
        return torch.svd_lowrank(A, q=l, niter=N_ITER)

    return {
        "rsvd": {"lsef": lambda: ops.rsvd(A, k), "svd_lowrank": lowrank_rsvd},
        "lowrank": {"lsef": lsef_lowrank, "svd_lowrank": svd_lowrank_grad},
    }


def svd_contenders(A: torch.Tensor, G_of_k) -> dict:
    """torch.linalg.svd, and its truncation's backward (per k: the cotangent's shape is A's, the
    truncation changes which factors it flows into, not the cost; timed at the largest k)."""

    def svd():
        return torch.linalg.svd(A, full_matrices=False)

    def svd_grad(k):
        def run():
            X = A.detach().requires_grad_()
            U, S, Vh = torch.linalg.svd(X, full_matrices=False)
            ((U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]).backward(G_of_k)

        return run

    return svd, svd_grad


def time_shape(batch: int, short: int, long: int, threads: int, budget: float, rounds: int):
    """Rows (one per k and op) for one shape at `threads`."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(short * 7 + long + batch)
    full = torch.randn(batch, short, long, generator=gen)
    G_full = torch.randn(batch, short, long, generator=gen)
    ks = ranks(short)
    # Probe: one matrix's svd with autograd (the most expensive call of small-k cells), lsef's
    # largest-k lowrank, both warm.
    probe_A, probe_G = full[:1], G_full[:1]
    svd, svd_grad = svd_contenders(probe_A, probe_G)
    svd_grad(ks[-1])()
    per_matrix = once(svd_grad(ks[-1]))
    c = contenders(probe_A, ks[-1], probe_G)
    c["lowrank"]["lsef"]()
    per_matrix = max(per_matrix, once(c["lowrank"]["lsef"]))
    b = batch
    if per_matrix * batch > budget:
        b = min(batch, max(threads, int(budget / per_matrix)))
    A, G = full[:b].contiguous(), G_full[:b].contiguous()
    svd, svd_grad = svd_contenders(A, G)
    calls = {("svd", None): svd, ("svd_grad", None): svd_grad(ks[-1])}
    for k in ks:
        for op, named in contenders(A, k, G).items():
            for name, fn in named.items():
                calls[(f"{op}:{name}", k)] = fn
    heavy = per_matrix * b > budget / 10  # one timed call a round (the probe warmed the code)
    times = {key: [] for key in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            if heavy:
                times[key].append(once(fn))
            else:
                times[key].append(
                    bench.time_median(fn, "cpu", warmup=1, min_runs=3, min_seconds=0.02)
                )
    med = {key: statistics.median(v) * batch / b for key, v in times.items()}
    rows = []
    for k in ks:
        l = min(k + OVERSAMPLE, short)
        path = ops.rsvd_path(short, long, k, OVERSAMPLE, N_ITER, torch.float32, batch)
        for op, svd_key in (("rsvd", "svd"), ("lowrank", "svd_grad")):
            ours = med[(f"{op}:lsef", k)]
            alt = {"linalg.svd": med[(svd_key, None)], "svd_lowrank": med[(f"{op}:svd_lowrank", k)]}
            best = min(alt, key=alt.get)
            rows.append(
                {
                    "op": op,
                    "threads": threads,
                    "batch": batch,
                    "short": short,
                    "long": long,
                    "k": k,
                    "l": l,
                    "path": path,
                    "sampled": b,
                    "lsef_s": ours,
                    "linalg_svd_s": alt["linalg.svd"],
                    "svd_lowrank_s": alt["svd_lowrank"],
                    "best": best,
                    "ratio": alt[best] / ours,
                }
            )
    return rows


def geomean(xs) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else float("nan")


def plot(rows: list, figure: str, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt
    import numpy as np

    shape_list = list(shapes())
    kslots = ("1", "4", "16", "64", "s-8", "s")
    threads = sorted({r["threads"] for r in rows})
    ops_ = ("rsvd", "lowrank")
    fig, axes = plt.subplots(
        len(ops_), len(threads), figsize=(9 * len(threads), 8 * len(ops_)), squeeze=False
    )
    norm = mcolors.LogNorm(vmin=0.25, vmax=16)
    for i, op in enumerate(ops_):
        for j, t in enumerate(threads):
            ax = axes[i][j]
            grid = np.full((len(shape_list), len(BATCHES) * len(kslots)), np.nan)
            for r in rows:
                if r["op"] != op or r["threads"] != t:
                    continue
                y = shape_list.index((r["short"], r["long"]))
                s = r["short"]
                slot = {1: 0, 4: 1, 16: 2, 64: 3, s - 8: 4, s: 5}[r["k"]]
                if r["k"] == s:
                    slot = 5
                x = BATCHES.index(r["batch"]) * len(kslots) + slot
                grid[y, x] = r["ratio"]
            im = ax.imshow(grid, cmap="RdBu", norm=norm, aspect="auto")
            for (y, x), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(
                        x,
                        y,
                        f"{v:.1f}" if v < 10 else f"{v:.0f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="black" if 0.5 < v < 6 else "white",
                    )
            ax.set_yticks(range(len(shape_list)), [f"{s} x {q}" for s, q in shape_list], fontsize=7)
            ax.set_xticks(range(grid.shape[1]), list(kslots) * len(BATCHES), fontsize=6)
            for bi, bsz in enumerate(BATCHES):
                ax.text(bi * len(kslots) + 2.5, -0.9, f"batch {bsz}", ha="center", fontsize=8)
                if bi:
                    ax.axvline(bi * len(kslots) - 0.5, color="k", lw=0.8)
            sel = [r["ratio"] for r in rows if r["op"] == op and r["threads"] == t]
            ax.set_title(
                f"{op}{' + backward' if op == 'lowrank' else ''}, {t} thread{'s' * (t > 1)}: "
                f"geomean {geomean(sel):.2f}x, min {min(sel):.2f}x, "
                f"{sum(x < 0.9 for x in sel)} of {len(sel)} below 0.9x",
                fontsize=9,
                pad=20,
            )
            ax.set_xlabel("k (s = short side)")
            ax.set_ylabel("short x long")
            fig.colorbar(im, ax=ax, fraction=0.03, label="best of PyTorch's time / lsef's")
    fig.suptitle(
        f"lsef against the faster of torch.linalg.svd and torch.svd_lowrank, float32 "
        f"({meta['cpu']}, {meta['date']})",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(figure, dpi=100)


def table(rows: list, meta: dict) -> str:
    out = [
        f"Run {meta['date']} on {meta['cpu']}, torch {meta['torch']}, budget "
        f"{meta['budget']} s per call, {meta['seconds']} s. Load before: `{meta['load_before']}`; "
        f"after: `{meta['load_after']}`. Ratio: the faster of `torch.linalg.svd` and "
        "`torch.svd_lowrank` over lsef (above 1: lsef faster).",
        "",
        "| op | threads | cells | geomean | min | cells < 0.9x | sampled cells |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    groups = sorted({(r["op"], r["threads"]) for r in rows})
    for op, t in groups:
        sel = [r for r in rows if r["op"] == op and r["threads"] == t]
        ratios = [r["ratio"] for r in sel]
        out.append(
            f"| {op} | {t} | {len(sel)} | {geomean(ratios):.2f}x | {min(ratios):.2f}x | "
            f"{sum(x < 0.9 for x in ratios)} | {sum(r['sampled'] < r['batch'] for r in sel)} |"
        )
    misses = sorted((r for r in rows if r["ratio"] < 0.9), key=lambda r: r["ratio"])
    if misses:
        out += [
            "",
            "Cells below 0.9x:",
            "",
            "| op | threads | batch | short x long | k | lsef path | lsef ms | best | its ms | "
            "ratio |",
            "|---|---:|---:|---|---:|---|---:|---|---:|---:|",
        ]
        for r in misses:
            best_s = r["linalg_svd_s"] if r["best"] == "linalg.svd" else r["svd_lowrank_s"]
            out.append(
                f"| {r['op']} | {r['threads']} | {r['batch']} | {r['short']} x {r['long']} | "
                f"{r['k']} | {r['path']} | {1e3 * r['lsef_s']:.2f} | {r['best']} | "
                f"{1e3 * best_s:.2f} | {r['ratio']:.2f} |"
            )
    return "\n".join(out)


def main() -> int:
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # paths: repo root
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="the 'all threads' setting (one thread is always run too)",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=0.25,
        help="seconds a call may take before its cell is sampled",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=os.path.join("benchmarks", "rsvd_sweep.json"))
    ap.add_argument("--figure", default=os.path.join("docs", "figures", "rsvd_sweep.png"))
    ap.add_argument("--results", default=os.path.join("docs", "RESULTS.md"))
    ap.add_argument("--replot", action="store_true", help="redraw from --json, no timing")
    args = ap.parse_args()
    if args.replot:
        with open(args.json, encoding="utf-8") as f:
            saved = json.load(f)
        rows, meta = saved["rows"], saved["meta"]
    else:
        if os.environ.get("LSEF_RSVD_PATH", "auto") not in ("", "auto"):
            raise SystemExit("rsvd_sweep: unset LSEF_RSVD_PATH (the sweep measures the default)")
        meta = {"load_before": uptime(), "budget": args.budget}
        t0 = time.perf_counter()
        rows = []
        thread_settings = sorted({1, args.threads})
        for batch in BATCHES:
            for short, long in shapes():
                for t in thread_settings:
                    new = time_shape(batch, short, long, t, args.budget, args.rounds)
                    rows += new
                    print(
                        f"threads {t} batch {batch:>3} {short:>3} x {long:>4} (sampled "
                        f"{new[0]['sampled']}): "
                        + " ".join(f"{r['op'][0]}{r['k']}:{r['ratio']:.2f}" for r in new),
                        flush=True,
                    )
        meta.update(
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            cpu=bench._cpu_name(),
            torch=torch.__version__,
            threads=thread_settings,
            seconds=round(time.perf_counter() - t0, 1),
            load_after=uptime(),
        )
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    plot(rows, args.figure, meta)
    text = table(rows, meta)
    replace_block(args.results, "rsvd-sweep", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
