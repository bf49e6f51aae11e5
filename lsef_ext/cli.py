"""The ``lsef`` command: ``lsef info`` and ``lsef bench``."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional


def _info(args: argparse.Namespace) -> int:
    import torch

    import lsef_ext

    b = lsef_ext.build_info()
    rows = [
        ("lsef_ext", lsef_ext.__version__),
        ("python", platform.python_version()),
        ("torch (running)", torch.__version__),
        ("torch (built against)", b["torch_version"]),
        ("compiler", b["compiler"]),
        ("build type", b["build_type"]),
        ("compiled backends", ", ".join(b["backends"])),
        ("CUDA (built with)", b["cuda_version"] or "-"),
        ("CUDA architectures", b["cuda_archs"] or "-"),
        ("CUDA available", str(torch.cuda.is_available())
         + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "")),
        ("CPU capability", torch.backends.cpu.get_cpu_capability()),
        ("threads", str(torch.get_num_threads())),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from lsef_ext import bench

    devices = ("cpu", "cuda") if args.device == "all" else (args.device,)
    report = bench.run(quick=args.quick, name_filter=args.filter, devices=devices)
    if args.json:
        bench.write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsef", description="lsef_ext: fast low-rank + sparse ops for video affect analysis")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, compiled backends, CUDA architectures, threads")
    info.set_defaults(fn=_info)
    b = sub.add_parser("bench", help="time the ops against their references and plain PyTorch")
    b.add_argument("--quick", action="store_true", help="small sizes and few runs (seconds; for CI)")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b.add_argument("--filter", default="", metavar="TEXT", help="only cases whose name contains TEXT")
    b.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="which devices to benchmark (cuda cases are skipped without a GPU)")
    b.set_defaults(fn=_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
