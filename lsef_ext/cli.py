"""The ``lsef`` command: ``lsef demo``, ``lsef train``, ``lsef bench`` and ``lsef info``."""

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
        (
            "CUDA available",
            str(torch.cuda.is_available())
            + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        ),
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


def _demo(args: argparse.Namespace) -> int:
    import torch

    from lsef_ext.demo import demo

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lsef demo: --device cuda, but torch.cuda.is_available() is False")
    demo(
        out=args.out, quick=args.quick, seed=args.seed, device=args.device, bench=not args.no_bench
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from lsef_ext.data import CORRUPTIONS
    from lsef_ext.train import TrainConfig, Trainer, distributed_env, evaluate_conditions, load_data

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("lsef train: --device cuda, but torch.cuda.is_available() is False")
    cfg = TrainConfig(
        model=args.model,
        task=args.task,
        data=args.data,
        n_train=args.n_train,
        n_test=args.n_test,
        T=args.frames,
        D=args.dim,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        rao=not args.no_rao and args.model.startswith("lsef"),
        d_model=args.d_model,
        rank=args.rank,
        device=args.device,
        ops=args.ops,
        out=args.out,
        resume=args.resume,
    )
    rank, world, _ = distributed_env()
    train = load_data(cfg, "train")
    split = "val" if args.data else "test"
    val = load_data(cfg, split)[:2]
    if rank == 0:
        x = train[0]
        print(
            f"lsef train: {cfg.model} on "
            f"{'FeatureFolder ' + args.data if args.data else 'SyntheticAffect'}"
            f" ({x.shape[0]} clips, T={x.shape[1]}, D={x.shape[2]}), {cfg.epochs} epochs, "
            f"{world} process(es), device {cfg.device}, RAO {'on' if cfg.rao else 'off'}",
            flush=True,
        )
    trainer = Trainer(cfg, train, val=val, progress=not args.no_progress)
    history = trainer.fit()
    if rank == 0:
        for row in history:
            print(
                "  "
                + "  ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                )
            )
        if cfg.task == "classification" and not args.data:
            metrics = evaluate_conditions(trainer.net, cfg, CORRUPTIONS, device=trainer.device)
            for c, m in metrics.items():
                print(f"  test under {c}: WAR {100 * m['war']:.1f}%  UAR {100 * m['uar']:.1f}%")
        if cfg.out:
            print(
                f"checkpoint and metrics in {cfg.out}/ (checkpoint.pt, metrics.csv, metrics.json)"
            )
    if trainer.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsef", description="lsef_ext: fast low-rank + sparse ops for video affect analysis"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="the main job: train LSEF and baselines on the embedded data, "
        "test clean and corrupted, draw figures, time the ops",
    )
    d.add_argument(
        "--out",
        default="lsef-demo",
        help="folder for figures and results.json (default: lsef-demo)",
    )
    d.add_argument(
        "--quick",
        action="store_true",
        help="small data, few epochs, small benchmark (under a minute)",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    d.add_argument("--no-bench", action="store_true", help="skip the op speed table")
    d.set_defaults(fn=_demo)

    from lsef_ext.nn import MODEL_NAMES

    t = sub.add_parser(
        "train",
        help="train one model (synthetic data or a FeatureFolder); "
        "runs under torchrun with DistributedDataParallel",
    )
    t.add_argument("--model", default="lsef", choices=MODEL_NAMES)
    t.add_argument("--task", default="classification", choices=["classification", "regression"])
    t.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="a FeatureFolder (labels.csv + features/<clip>.npy); default: SyntheticAffect",
    )
    t.add_argument("--n-train", type=int, default=2048, help="synthetic training clips")
    t.add_argument("--n-test", type=int, default=1024, help="synthetic test clips")
    t.add_argument(
        "--frames", type=int, default=16, help="frames per clip (FeatureFolder: crop/pad to this)"
    )
    t.add_argument("--dim", type=int, default=64, help="synthetic feature channels D")
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--batch-size", type=int, default=64, help="per process")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--weight-decay", type=float, default=1e-2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-rao", action="store_true", help="plain AdamW instead of RAO(AdamW)")
    t.add_argument("--d-model", type=int, default=64)
    t.add_argument("--rank", type=int, default=4)
    t.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    t.add_argument(
        "--ops",
        default="ext",
        choices=["ext", "ref"],
        help="compiled kernels or lsef_ref references",
    )
    t.add_argument("--out", default=None, metavar="DIR", help="checkpoint and metrics folder")
    t.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(fn=_train)
    info = sub.add_parser("info", help="versions, compiled backends, CUDA architectures, threads")
    info.set_defaults(fn=_info)
    b = sub.add_parser("bench", help="time the ops against their references and plain PyTorch")
    b.add_argument(
        "--quick", action="store_true", help="small sizes and few runs (seconds; for CI)"
    )
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b.add_argument(
        "--filter", default="", metavar="TEXT", help="only cases whose name contains TEXT"
    )
    b.add_argument(
        "--device",
        choices=["cpu", "cuda", "all"],
        default="all",
        help="which devices to benchmark (cuda cases are skipped without a GPU)",
    )
    b.set_defaults(fn=_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
