"""Turns the JSON of ``lsef bench --json PATH`` into the Markdown table used in README.md and
benchmarks/RESULTS.md. Usage: ``python benchmarks/to_markdown.py PATH [--commit SHA]``."""

from __future__ import annotations

import argparse
import json
import sys


def table(report: dict, commit: str = "") -> str:
    m = report["machine"]
    bw = ", ".join(f"{d} {v:.1f} GB/s" for d, v in report["copy_bandwidth_GBps"].items())
    lines = [
        f"Measured with `lsef bench` on {m['date']}: "
        + (
            f"{m['gpu']}, "
            if m.get("gpu") and any(r["device"] == "cuda" for r in report["rows"])
            else ""
        )
        + f"{m['processor']}, {m['threads']} threads, torch "
        f"{m['torch']}, copy bandwidth {bw}"
        + (f", commit `{commit}`" if commit else "")
        + ". Speedup = "
        "the variant's median time / lsef_ext's, both measured in the same run "
        "(median of ≥ 15 calls and ≥ 1 s after 5 warm-up calls).",
        "",
        "| case | dev | variant | median ms | lsef_ext speedup | target | note |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for r in report["rows"]:
        target = r.get("target")
        if r["variant"] == "memory floor":
            judged = (
                "" if target is None else f"≤ {target:g} " + ("met" if r["met"] else "**missed**")
            )
            lines.append(
                f"| {r['case']} | {r['device']} | memory floor (copy bandwidth) | "
                f"{r['median_ms']:.3f} | "
                f"ext/floor **{r['floor_ratio']:.2f}** | {judged} | |"
            )
            continue
        judged = "" if target is None else f"≥ {target:g} " + ("met" if r["met"] else "**missed**")
        lines.append(
            f"| {r['case']} | {r['device']} | {r['variant']} | {r['median_ms']:.3f} | "
            f"{r['speedup']:.2f}x | {judged} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--commit", default="")
    a = p.parse_args()
    with open(a.json) as f:
        print(table(json.load(f), a.commit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
