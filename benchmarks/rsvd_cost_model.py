"""The CPU rsvd's cost model: time every path on a grid of shapes, fit each path's coefficients,
write them into the kernel (docs/DESIGN.md §6, "Choosing the path").

Each path (``csrc/rsvd/cost_model.h``: fused, jacobi, blas, lapack, exact) is forced in turn with
``LSEF_RSVD_PATH`` (read at every call) on float32 and float64 matrices ``(batch, p, q)``, one
thread, interleaved: for every shape the paths are timed in rounds (fused, blas, lapack, ...,
fused, blas, ...), each path getting the median of its rounds. The time per matrix is then
modelled as a non-negative combination of the path's operation counts (``cost_features`` in
cost_model.h, mirrored by :func:`features` here), fitted by non-negative least squares on
relative error, per dtype and path. Writes

* ``csrc/rsvd/cost_model_coef.h``: the coefficients the kernel reads, and each path's fixed
  cost of a call (rebuild to use them);
* ``benchmarks/rsvd_cost_model.json``: every timing, the fit, the machine and its load (the
  fused path's time is that of a lone matrix, its worse case, where the batch's is lower:
  ``batch_seconds``);
* ``docs/figures/rsvd_cost_model.png``: measured against modelled time per path, and the path
  the model picks over (short side, sketch width) for three aspect ratios;
* the table between the ``rsvd-cost-model`` markers of docs/RESULTS.md.

Usage::

    python benchmarks/rsvd_cost_model.py [--rounds 2] [--replot]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from marked_block import replace_block
from scipy.optimize import nnls

from lsef_ext import bench, ops

PATHS = ops.RSVD_PATHS  # fused, jacobi, blas, lapack, exact: cost_model.h's order
MODELS = (*PATHS, "fused_lone")  # the fused path once more, for a lone matrix
EXACT = ("jacobi", "exact")  # their cost does not depend on the sketch width
SIDES = (8, 16, 32, 64, 128, 192, 256, 384, 512)
ASPECTS = (1, 2, 4)
WIDTHS = (9, 12, 24, 40, 72, 136)  # l = k + 8 for k = 1, 4, 16, 32, 64, 128
N_ITER = 2
TARGET_S = 0.02  # a timed call covers about this much work (the batch is sized to it)
MAX_BATCH = 64


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def features(path: str, p: float, q: float, l: float, n_iter: float) -> list:
    """cost_model.h's cost_features (the same counts, the same order): a constant, the path's
    own three counts, then p q, p^2, l^2 (l^3 on the exact paths) and p^3."""
    if path in ("fused", "fused_lone"):
        own = [
            p * p * q / 2 + 2 * p * q * l,
            (2 * n_iter + 1) * p * l * l + n_iter * p * p * l + 2 * q * l * l,
            l**3,
        ]
    elif path in EXACT:
        own = [q * p * p, p**3, 0.0]
    else:
        own = [(2 * n_iter + 2) * p * q * l, (n_iter + 1) * (p + q) * l * l + 2 * q * l * l, l**3]
    return [1.0, *own, p * q, p * p, l**3 if path in EXACT else l * l, p**3]


def widths(p: int) -> list:
    """Sketch widths l < p measured for short side p: the sweep's, p / 2, and p - 2 up to
    p = 128 (beyond, the sketching paths at l ~ p take seconds a call and lose by far)."""
    near_full = (p - 2,) if p <= 128 else ()
    return sorted({l for l in (*WIDTHS, p // 2, *near_full) if 2 <= l < p})


def time_one(A: torch.Tensor, k: int, path: str, runs: int = 3) -> float:
    """Median seconds of rsvd(A, k) on `path` (one warm-up call, then `runs` at least)."""
    os.environ["LSEF_RSVD_PATH"] = path
    return bench.time_median(
        lambda: ops.rsvd(A, k, 8, N_ITER), "cpu", warmup=1, min_runs=runs, min_seconds=0.05
    )


def call_overheads(dtype: torch.dtype) -> dict:
    """Seconds a call costs on each path beyond its matrices' work: one matrix too small to
    matter (randomized: 4 x 64, k = 1, l = 2; exact: 2 x 2), the fastest of 3 medians."""
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(1, 4, 64, generator=gen, dtype=dtype)
    tiny = torch.randn(1, 2, 2, generator=gen, dtype=dtype)
    out = {}
    for path in PATHS:
        A, k, oversample = (tiny, 2, 0) if path in EXACT else (wide, 1, 1)
        os.environ["LSEF_RSVD_PATH"] = path
        out[path] = min(
            bench.time_median(lambda: ops.rsvd(A, k, oversample, N_ITER), "cpu", 3, 50, 0.05)
            for _ in range(3)
        )
    return out


def row(dtype, path, p, q, l, k, batch, seconds) -> dict:
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "path": path,
        "p": p,
        "q": q,
        "l": l,
        "k": k,
        "batch": batch,
        "seconds": seconds,
    }


def measure(dtype: torch.dtype, rounds: int) -> list:
    rows = []
    gen = torch.Generator().manual_seed(0)
    # the cost of a call (argument checks, dispatch, outputs): a 2 x 2 matrix, batch 1
    tiny = torch.randn(1, 2, 2, generator=gen, dtype=dtype)
    overhead = min(time_one(tiny, 1, "fused", 20) for _ in range(3))
    for p in SIDES:
        for aspect in ASPECTS:
            q = p * aspect
            # (l, paths): the randomized widths on the sketching paths, then the exact ones once
            jobs = [(l, ("fused", "blas", "lapack")) for l in widths(p)] + [(p, EXACT)]
            for l, paths in jobs:
                k = max(1, l - 8) if l < p else p
                A1 = torch.randn(1, p, q, generator=gen, dtype=dtype)
                probe = max(time_one(A1, k, path, runs=1) for path in paths)
                batch = int(min(MAX_BATCH, max(1, TARGET_S / max(probe, 1e-6))))
                slow = probe > 0.2  # one timed run a round, one round
                A = torch.randn(batch, p, q, generator=gen, dtype=dtype)
                times = {path: [] for path in paths}
                for _ in range(1 if slow else rounds):
                    for path in paths:
                        times[path].append(time_one(A, k, path, 1 if slow else 3) / batch)
                # The fused path's vector lanes factor 8 matrices at once, so a lone matrix
                # costs it more than one of a full group (3x at 192 x 768, l = 96): it is
                # timed both ways, as "fused" (a batch of at least 8, per matrix) and
                # "fused_lone" (one matrix, less the cost of a call).
                extra = {}
                if "fused" in paths:
                    group = A if batch >= 8 else torch.randn(8, p, q, generator=gen, dtype=dtype)
                    runs = 1 if slow else 3
                    if batch < 8:
                        times["fused"] = [time_one(group, k, "fused", runs) / 8]
                    alone = A[:1].contiguous()
                    extra["fused_lone"] = max(time_one(alone, k, "fused", runs) - overhead, 1e-7)
                for path in paths:
                    rows.append(
                        row(
                            dtype,
                            path,
                            p,
                            q,
                            l,
                            k,
                            max(batch, 8) if path == "fused" else batch,
                            statistics.median(times[path]),
                        )
                    )
                for path, seconds in extra.items():
                    rows.append(row(dtype, path, p, q, l, k, 1, seconds))
                print(
                    f"{rows[-1]['dtype']} p {p:>3} q {q:>4} l {l:>3} batch {batch:>2}: "
                    + "  ".join(
                        f"{r['path']} {1e3 * r['seconds']:.4f} ms"
                        for r in rows[-len(paths) - len(extra) :]
                    ),
                    flush=True,
                )
    return rows


def fit(rows: list) -> dict:
    """{dtype: {path: coefficients}}: NNLS on relative error of each path's rows."""
    coef = {}
    for dtype in ("float32", "float64"):
        coef[dtype] = {}
        for path in MODELS:
            sel = [r for r in rows if r["dtype"] == dtype and r["path"] == path]
            if not sel:
                raise SystemExit(f"no timings for {dtype} {path}")
            F = np.array(
                [
                    features(path, r["p"], r["q"], r["l"], N_ITER if r["l"] < r["p"] else 0)
                    for r in sel
                ]
            )
            t = np.array([r["seconds"] for r in sel])
            # rows weighted by 1/t (relative error); the lone fused rows, whose time less the
            # call's can be next to nothing for tiny shapes, relative to the larger of theirs
            # and the full-group time of the same shape
            w = t.copy()
            if path == "fused_lone":
                full = {
                    (r["p"], r["q"], r["l"]): r["seconds"]
                    for r in rows
                    if r["dtype"] == dtype and r["path"] == "fused"
                }
                w = np.maximum(t, [full[(r["p"], r["q"], r["l"])] for r in sel])
            scale = F.max(axis=0)  # columns scaled for conditioning
            scale[scale == 0] = 1.0
            x, _ = nnls((F / scale) / w[:, None], t / w)
            coef[dtype][path] = list(x / scale)
    return coef


def modelled(coef: dict, row: dict) -> float:
    l_eff, n_iter = (row["p"], 0) if row["path"] in EXACT else (row["l"], N_ITER)
    f = features(row["path"], row["p"], row["q"], l_eff, n_iter)
    return float(np.dot(coef[row["dtype"]][row["path"]], f))


def write_header(coef: dict, path: str, meta: dict) -> None:
    lines = [
        "// Generated by benchmarks/rsvd_cost_model.py: do not edit by hand (docs/DESIGN.md §6).",
        f"// Fitted {meta['date']} on {meta['cpu']}, one thread, torch {meta['torch']}.",
        "// kCostCoef[dtype: float32, float64][path: fused, jacobi, blas, lapack, exact, and the",
        "// fused path for a lone matrix][feature]: seconds per count of cost_model.h's",
        "// cost_features.",
        "#pragma once",
        "",
        "namespace lsef {",
        "namespace rsvd {",
        "",
        "constexpr double kCostCoef[2][kModels][kFeatures] = {",
    ]
    for dtype in ("float32", "float64"):
        lines.append("    {")
        for p in MODELS:
            lines.append(
                "        {" + ", ".join(f"{c:.6e}" for c in coef[dtype][p]) + "},  // " + p
            )
        lines.append("    },")
    lines += [
        "};",
        "",
        "// kCallOverhead[dtype][path]: seconds a call costs beyond its matrices' work.",
        "constexpr double kCallOverhead[2][kPaths] = {",
    ]
    for dtype in ("float32", "float64"):
        lines.append("    {" + ", ".join(f"{meta['overhead'][dtype][p]:.6e}" for p in PATHS) + "},")
    lines += ["};", "", "}  // namespace rsvd", "}  // namespace lsef", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    formatter = shutil.which("clang-format")  # the project's style (.clang-format), as CI checks
    if formatter:
        subprocess.run([formatter, "-i", path], check=True)


def fused_cost(full: float, lone: float, group: int) -> float:
    """cost_model.h's fused_per_matrix: the fused path's cost per matrix when each thread's
    share of the batch fills `group` of the 8 lanes (idle lanes cost as much as busy ones)."""
    g = min(max(group, 1), 8)
    return full + (lone - full) * (8 / g - 1) / 7


def choose(coef: dict, dtype: str, p: int, q: int, l: int, group: int = 8) -> str:
    """cost_model.h's choose_path, on these coefficients, for a large batch (its per-call
    overheads, kCallOverhead, spread to nothing): exact or randomized by the matrix alone (the
    fused path at a full group of lanes), then among the sketching paths with the fused path's
    cost for `group` matrices per thread."""

    def cost(path: str) -> float:
        return modelled(coef, {"dtype": dtype, "path": path, "p": p, "q": q, "l": l})

    exact = min(EXACT, key=cost)
    if l >= p:
        return exact
    sketching = {"fused": cost("fused"), "blas": cost("blas"), "lapack": cost("lapack")}
    if cost(exact) < min(sketching.values()):
        return exact
    sketching["fused"] = fused_cost(sketching["fused"], cost("fused_lone"), group)
    return min(sketching, key=sketching.get)


def plot(rows: list, coef: dict, figure: str, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(
        zip(MODELS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:cyan"))
    )
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.8))
    ax = axes[0]
    for path in MODELS:
        sel = [r for r in rows if r["path"] == path and r["dtype"] == "float32"]
        ax.loglog(
            [1e3 * modelled(coef, r) for r in sel],
            [1e3 * r["seconds"] for r in sel],
            "o",
            ms=3,
            color=colors[path],
            label=path,
        )
    lim = [1e-3, 1e4]
    ax.loglog(lim, lim, "k:", lw=1)
    ax.set_xlabel("modelled ms per matrix")
    ax.set_ylabel("measured ms per matrix")
    ax.set_title("float32: measured against modelled")
    ax.legend(fontsize=8)
    sides = np.array(SIDES)
    for ax, aspect in zip(axes[1:], ASPECTS):
        for i, p in enumerate(sides):
            for l in sorted({int(round(x)) for x in np.linspace(2, p, 16)}):
                path = choose(coef, "float32", p, p * aspect, l)
                ax.plot(i, l / p, "s", ms=5, color=colors[path])
        ax.set_xticks(range(len(sides)), [str(s) for s in sides])
        ax.set_xlabel("short side p")
        ax.set_ylabel("sketch width l / p (1: exact)")
        ax.set_title(f"path chosen, float32, long side {aspect}p (full lane groups)")
    handles = [plt.Line2D([], [], marker="s", ls="", color=colors[p], label=p) for p in PATHS]
    axes[-1].legend(handles=handles, fontsize=8, loc="lower right")
    fig.suptitle(f"rsvd CPU cost model ({meta['cpu']}, one thread, {meta['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(figure, dpi=110)


def table(rows: list, coef: dict, meta: dict) -> str:
    out = [
        f"Fitted {meta['date']} on {meta['cpu']}, one thread, torch {meta['torch']}, "
        f"{meta['rounds']} interleaved rounds, {meta['seconds']} s. Load before: "
        f"`{meta['load_before']}`; after: `{meta['load_after']}`.",
        "",
        "| dtype | path | shapes | median abs. relative error of the model | worst |",
        "|---|---|---:|---:|---:|",
    ]
    for dtype in ("float32", "float64"):
        for path in MODELS:
            sel = [r for r in rows if r["dtype"] == dtype and r["path"] == path]
            err = [abs(modelled(coef, r) / r["seconds"] - 1) for r in sel]
            if path == "fused_lone":  # relative to the larger of it and the full-group time
                full = {
                    (r["p"], r["q"], r["l"]): r["seconds"]
                    for r in rows
                    if r["dtype"] == dtype and r["path"] == "fused"
                }
                err = [
                    abs(modelled(coef, r) - r["seconds"])
                    / max(r["seconds"], full[(r["p"], r["q"], r["l"])])
                    for r in sel
                ]
            out.append(
                f"| {dtype} | {path} | {len(sel)} | {statistics.median(err):.2f} | {max(err):.2f} |"
            )
    # how often the model's pick is the measured fastest, and what a wrong pick costs
    # how often the model's pick is the measured fastest path, and what a wrong pick costs, for
    # full lane groups (the fused time of a batch of 8) and for a lone matrix (fused alone)
    groups = {}
    for r in rows:
        groups.setdefault((r["dtype"], r["p"], r["q"], r["l"]), {})[r["path"]] = r["seconds"]
    exact = {(d, p, q): g for (d, p, q, l), g in groups.items() if l == p}
    for group, label in ((8, "full lane groups (8 matrices a thread)"), (1, "a lone matrix")):
        picks, regret = 0, []
        for (d, p, q, l), g in groups.items():
            cand = dict(g) if l == p else {**g, **exact.get((d, p, q), {})}
            if "fused_lone" in cand:
                lone = cand.pop("fused_lone")
                if group == 1:
                    cand["fused"] = lone
            best = min(cand.values())
            chosen = choose(coef, d, p, q, l, group)
            picks += cand[chosen] == best
            regret.append(cand[chosen] / best)
        out += [
            "",
            f"For {label}: the model's pick is the measured fastest path at {picks} of "
            f"{len(regret)} measured shapes; its time over the fastest: median "
            f"{statistics.median(regret):.2f}x, worst {max(regret):.2f}x.",
        ]
    return "\n".join(out)


def main() -> int:
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # paths: repo root
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=os.path.join("benchmarks", "rsvd_cost_model.json"))
    ap.add_argument("--header", default=os.path.join("csrc", "rsvd", "cost_model_coef.h"))
    ap.add_argument("--figure", default=os.path.join("docs", "figures", "rsvd_cost_model.png"))
    ap.add_argument("--results", default=os.path.join("docs", "RESULTS.md"))
    ap.add_argument("--replot", action="store_true", help="refit and redraw from --json")
    ap.add_argument(
        "--overheads-only",
        action="store_true",
        help="measure the per-call overheads again, keep --json's timings",
    )
    args = ap.parse_args()
    if args.replot or args.overheads_only:
        with open(args.json, encoding="utf-8") as f:
            saved = json.load(f)
        rows, meta = saved["rows"], saved["meta"]
        if args.overheads_only:
            torch.set_num_threads(1)
            meta["overhead"] = {
                str(d).replace("torch.", ""): call_overheads(d)
                for d in (torch.float32, torch.float64)
            }
            meta["overhead_measured"] = (
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load `{uptime()}`"
            )
            os.environ.pop("LSEF_RSVD_PATH", None)
    else:
        torch.set_num_threads(1)
        saved_env = os.environ.get("LSEF_RSVD_PATH")
        meta = {"load_before": uptime()}
        t0 = time.perf_counter()
        try:
            rows = measure(torch.float32, args.rounds) + measure(torch.float64, args.rounds)
            meta["overhead"] = {
                str(d).replace("torch.", ""): call_overheads(d)
                for d in (torch.float32, torch.float64)
            }
        finally:
            if saved_env is None:
                os.environ.pop("LSEF_RSVD_PATH", None)
            else:
                os.environ["LSEF_RSVD_PATH"] = saved_env
        meta.update(
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            cpu=bench._cpu_name(),
            torch=torch.__version__,
            rounds=args.rounds,
            seconds=round(time.perf_counter() - t0, 1),
            load_after=uptime(),
        )
    coef = fit(rows)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "coef": coef, "rows": rows}, f, indent=1)
    write_header(coef, args.header, meta)
    plot(rows, coef, args.figure, meta)
    text = table(rows, coef, meta)
    replace_block(args.results, "rsvd-cost-model", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
