"""Where the CPU rsvd should switch from the fused path to the BLAS path.

For every short side ``p`` (8 ... 512), batch size and rank setting below, float32 matrices
``(batch, p, 512)``, and a few ``(8, p, 2048)``, are factored by ``lsef_ext.ops.rsvd`` on each
CPU path, forced through ``LSEF_RSVD_FUSED_MAX_SIDE`` (read at every call): a huge value sends
every shape down the fused path, 0 every shape down the BLAS path. The two are timed
interleaved, in rounds (fused, BLAS, fused, BLAS, ...), and each gets the median of its rounds'
medians, so a change of load during the sweep hits both. Shapes with ``l = k + oversample >= p``
take the exact path on both settings and are skipped, and so is batch 256 past ``p = 128``.

Writes ``benchmarks/rsvd_crossover.json`` (every timing, the machine, its load before and after),
``docs/figures/rsvd_crossover.png`` (BLAS time / fused time against ``p``: above 1 the fused path
is faster) and the table between the ``rsvd-crossover`` markers of docs/RESULTS.md. Usage::

    python benchmarks/rsvd_crossover.py [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

import torch
from marked_block import replace_block

from lsef_ext import bench, ops

SIDES = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
BATCHES = (8, 64, 256)
BIG_SIDE = 128  # past it, batch 256 is left out (a (256, 512, 512) batch is 268 MB)
RANKS = ((2, 4), (4, 8), (16, 8))  # (k, oversample): l = 6, 12, 24
LONG = 512
LONG_Q, LONG_SIDES = 2048, (32, 64, 128, 192, 256, 384)  # the extra series: batch 8, k 4, l 12
FUSED, BLAS = "1000000", "0"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def time_path(A: torch.Tensor, k: int, oversample: int, side: str) -> float:
    os.environ["LSEF_RSVD_FUSED_MAX_SIDE"] = side
    return bench.time_median(
        lambda: ops.rsvd(A, k, oversample), "cpu", warmup=1, min_runs=3, min_seconds=0.1
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=os.path.join("benchmarks", "rsvd_crossover.json"))
    ap.add_argument("--figure", default=os.path.join("docs", "figures", "rsvd_crossover.png"))
    ap.add_argument("--results", default=os.path.join("docs", "RESULTS.md"))
    ap.add_argument(
        "--replot", action="store_true", help="redraw the figure and table from --json, no timing"
    )
    args = ap.parse_args()
    if args.replot:
        with open(args.json, encoding="utf-8") as f:
            saved_run = json.load(f)
        return report(saved_run["rows"], saved_run["meta"], args)
    torch.set_num_threads(args.threads)
    saved = os.environ.get("LSEF_RSVD_FUSED_MAX_SIDE")
    load_before = uptime()
    t_start = time.perf_counter()
    rows = []
    try:
        for q, k, oversample, batch, p in configs():
            A = torch.randn(batch, p, q, generator=torch.Generator().manual_seed(p))
            fused, blas = [], []
            for _ in range(args.rounds):
                fused.append(time_path(A, k, oversample, FUSED))
                blas.append(time_path(A, k, oversample, BLAS))
            row = {
                "k": k,
                "oversample": oversample,
                "batch": batch,
                "p": p,
                "q": q,
                "fused_ms": 1e3 * statistics.median(fused),
                "blas_ms": 1e3 * statistics.median(blas),
            }
            rows.append(row)
            print(
                f"q {q:>4} k {k:>2} l {k + oversample:>2} batch {batch:>3} p {p:>3}: fused "
                f"{row['fused_ms']:8.3f} ms  BLAS {row['blas_ms']:8.3f} ms  "
                f"BLAS/fused {row['blas_ms'] / row['fused_ms']:5.2f}",
                flush=True,
            )
    finally:
        if saved is None:
            os.environ.pop("LSEF_RSVD_FUSED_MAX_SIDE", None)
        else:
            os.environ["LSEF_RSVD_FUSED_MAX_SIDE"] = saved
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": bench._cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "rounds": args.rounds,
        "seconds": round(time.perf_counter() - t_start, 1),
        "load_before": load_before,
        "load_after": uptime(),
    }
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return report(rows, meta, args)


def report(rows, meta, args) -> int:
    switch = choose_switch(rows)
    plot(rows, switch, args.figure, meta)
    replace_block(args.results, "rsvd-crossover", table(rows, switch, meta))
    print(f"fused path faster up to p = {switch} in every batch and rank setting measured")
    return 0


def configs():
    """(q, k, oversample, batch, p) of every measurement: the main grid at q = LONG, then a
    longer side (fewer settings), where a wide matrix outgrows the L2 cache sooner."""
    for k, oversample in RANKS:
        for batch in BATCHES:
            for p in SIDES:
                if k + oversample < p and not (p > BIG_SIDE and batch > 64):
                    yield LONG, k, oversample, batch, p
    for p in LONG_SIDES:
        yield LONG_Q, 4, 8, 8, p


def choose_switch(rows) -> int:
    """The largest short side up to which the fused path is at least as fast as the BLAS path
    in every measured batch and rank setting (the switch point: fused for p <= it)."""
    best = 0
    for p in sorted({r["p"] for r in rows}):
        if all(r["fused_ms"] <= r["blas_ms"] for r in rows if r["p"] == p):
            best = p
        else:
            break
    return best


def plot(rows, switch: int, path: str, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RANKS), figsize=(4.2 * len(RANKS), 3.8), sharey=True)
    for ax, (k, oversample) in zip(axes, RANKS):
        series = [(LONG, batch, marker, "-") for batch, marker in zip(BATCHES, "osD")]
        series.append((LONG_Q, 8, "^", ":"))
        for q, batch, marker, style in series:
            pts = [r for r in rows if r["k"] == k and r["batch"] == batch and r["q"] == q]
            if pts:
                ax.plot(
                    [r["p"] for r in pts],
                    [r["blas_ms"] / r["fused_ms"] for r in pts],
                    marker=marker,
                    ls=style,
                    label=f"batch {batch}, q {q}",
                )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axvline(switch, color="k", ls="--", lw=0.8, label=f"switch: p <= {switch} fused")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ticks = (8, 16, 32, 64, 128, 256, 512)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_yticks((0.5, 1, 2, 4, 8))
        ax.set_yticklabels(("0.5", "1", "2", "4", "8"))
        ax.minorticks_off()
        ax.set_title(f"k = {k}, l = {k + oversample}")
        ax.set_xlabel("short side p")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("BLAS time / fused time\n(> 1: fused path faster)")
    axes[1].legend(fontsize=8)
    fig.suptitle(
        f"CPU rsvd, float32: fused vs BLAS path ({meta['threads']} threads, {meta['date']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows, switch: int, meta) -> str:
    lines = [
        f"BLAS-path time / fused-path time for float32 `(batch, p, q)`, median of "
        f"{meta['rounds']} interleaved rounds ({meta['cpu']}, {meta['threads']} threads, "
        f"torch {meta['torch']}, {meta['date']}; load before: `{meta['load_before']}`, after: "
        f"`{meta['load_after']}`). Above 1 the fused path is faster; `-`: exact path (l >= p) "
        f"or not measured (batch 256 past p = {BIG_SIDE}). "
        f"Switch point chosen from it: fused for p <= {switch}.",
        "",
        "| q | k, l | batch | " + " | ".join(f"p {p}" for p in SIDES) + " |",
        "|---|---|---" + "|---" * len(SIDES) + "|",
    ]
    keys = sorted({(x["q"], x["k"], x["oversample"], x["batch"]) for x in rows})
    for q, k, oversample, batch in keys:
        cells = []
        for p in SIDES:
            r = [x for x in rows if (x["q"], x["k"], x["batch"], x["p"]) == (q, k, batch, p)]
            cells.append(f"{r[0]['blas_ms'] / r[0]['fused_ms']:.2f}" if r else "-")
        lines.append(f"| {q} | {k}, {k + oversample} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
