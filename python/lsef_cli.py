"""The ``lsef`` command: ``lsef demo``, ``lsef train``, ``lsef bench`` and ``lsef info``.

This is a top-level module beside the ``lsef_ext`` package, not inside it: importing anything
inside ``lsef_ext`` first runs the package's ``__init__``, which loads torch and the compiled
library (over a second). Here, building the parser, ``lsef --help`` and ``lsef --version``
import only the standard library; torch and the models load when a command runs. A user error (a bad flag value, a missing or unreadable file or folder, an
``--out`` that holds another run, a checkpoint that is damaged or does not fit) ends the
command with one line ``lsef: error: ...`` on stderr and exit status 2; ``lsef --debug ...``
shows the traceback instead. Any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import sys
import tempfile
from typing import Callable, List, Optional, Tuple


class UserError(Exception):
    """A mistake in what was asked for: ``main`` prints ``lsef: error: <message>`` and returns 2.
    The message names the flag, file or folder at fault and what was expected."""


# lsef_ext.nn.MODEL_NAMES, repeated so that building the parser does not import torch
# (tests/test_cli_errors.py checks that the two agree).
MODEL_NAMES = ("lsef", "lsef-no-sem", "lsef-no-ddm", "lsef-no-cim", "meanpool-mlp", "transformer")

# Threads: below about this many activation elements of a batch (batch x frames x width) per
# thread, another OpenMP thread costs more in start-up and synchronisation than it computes.
WORK_PER_THREAD = 16384


# --------------------------------------------------------------------------------------------
# flag values
# --------------------------------------------------------------------------------------------


def _integer(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""
    want = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {want}, got {value}")
        return value

    return integer


def _number(low: float, strict: bool) -> Callable[[str], float]:
    """An argparse type: a finite number > low (``strict``) or >= low."""
    want = f"a finite number {'>' if strict else '>='} {low:g}"

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text}")
        return value

    return number


def _train_device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _need_cuda(flag: str, device: str = "cuda") -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"{flag}: no CUDA device is available (torch.cuda.is_available() is False); "
            "use --device cpu"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UserError(
            f"{flag}: there is no CUDA device {index}; this machine has "
            f"{torch.cuda.device_count()} (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def _writable_folder(path: str, flag: str) -> None:
    """Creates folder ``path`` if needed and checks that a file can be written in it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create the folder: {_why(e)}") from e
    _probe(path, f"{flag} {path}")


def _writable_file(path: str, flag: str) -> None:
    """Checks that file ``path`` can be written (its folder exists and takes a new file)."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder; expected the path of a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist")
    _probe(folder, f"{flag} {path}")


def _probe(folder: str, what: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".lsef-write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{what}: cannot write in {folder}: {_why(e)}") from e


# --------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; os.cpu_count() without one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def work_cap(batch: int, frames: int, width: int) -> int:
    """The most threads that a batch of ``batch x frames x width`` activations keeps busy."""
    return max(1, batch * frames * width // WORK_PER_THREAD)


def choose_threads(
    requested: Optional[int],
    cap: Optional[int],
    cores: int,
    load: Optional[float],
    env: Optional[str] = None,
    processes: int = 1,
) -> Tuple[int, Optional[str]]:
    """``(threads, note)``: ``requested`` (``--threads``) when given, else a valid
    ``OMP_NUM_THREADS`` (``env``), else the ``cores`` shared among ``processes`` processes of
    this run and capped at ``cap`` (work too small to gain from more); when the ``load``
    average already exceeds ``cores``, half of that (at least 1) and a one-line ``note``."""
    if requested is not None:
        return requested, None
    if env is not None and env.strip().isdigit() and int(env) >= 1:
        return int(env), None
    n = max(1, cores // max(1, processes))
    if cap is not None:
        n = min(n, cap)
    if load is not None and load > cores:
        fewer = max(1, n // 2)
        return fewer, (
            f"the load average ({load:.1f}) exceeds the {cores} usable cores: using "
            f"{fewer} thread{'s' if fewer > 1 else ''} (--threads N to choose)"
        )
    return n, None


def _processes_on_this_machine() -> int:
    """The processes of this run that share this machine (torchrun's LOCAL_WORLD_SIZE)."""
    text = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(text) if text.isdigit() and int(text) >= 1 else 1


def _apply_threads(args: argparse.Namespace, cap: Optional[int], quiet: bool = False) -> int:
    """Chooses the thread count (:func:`choose_threads`) and sets it before heavy work."""
    import torch

    n, note = choose_threads(
        args.threads,
        cap,
        usable_cores(),
        _load_average(),
        os.environ.get("OMP_NUM_THREADS"),
        _processes_on_this_machine(),
    )
    if note and not quiet:
        print(f"lsef: {note}", file=sys.stderr, flush=True)
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


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
    import torch

    if args.device == "cuda":
        _need_cuda("--device cuda")
    if args.json:
        _writable_file(args.json, "--json")
    from lsef_ext import bench

    devices = ("cpu", "cuda") if args.device == "all" else (args.device,)
    chosen = [c for c in bench.CASES if args.filter in c.name and c.device in devices]
    if not chosen:
        names = sorted({c.name for c in bench.CASES if c.device in devices})
        raise UserError(
            f"--filter {args.filter!r} matches no case name on {'/'.join(devices)}; "
            f"the names: {'; '.join(names)}"
        )
    if args.device == "all" and not torch.cuda.is_available():
        print("lsef bench: no CUDA device here: CPU cases only", flush=True)
    _apply_threads(args, cap=work_cap(64, 16, 64) if args.quick else None)
    report = bench.run(quick=args.quick, name_filter=args.filter, devices=devices)
    if args.json:
        bench.write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.device == "cuda":
        _need_cuda("--device cuda")
    _writable_folder(args.out, "--out")
    from lsef_ext.demo import demo
    from lsef_ext.train import TrainConfig

    c = TrainConfig()
    _apply_threads(args, cap=work_cap(c.batch_size, c.T, max(c.D, c.d_model)))
    demo(
        out=args.out, quick=args.quick, seed=args.seed, device=args.device, bench=not args.no_bench
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.resume and not args.out:
        raise UserError("--resume needs --out DIR: the folder of the run to continue")
    if args.accept_changes and not args.resume:
        raise UserError("--accept-changes applies to a resumed run only: add --resume")
    if args.device.startswith("cuda"):
        _need_cuda(f"--device {args.device}", args.device)
    if args.data is not None:
        if not os.path.exists(args.data):
            raise UserError(f"--data {args.data}: no such folder")
        if not os.path.isdir(args.data):
            raise UserError(
                f"--data {args.data}: is not a folder (expected a FeatureFolder: labels.csv "
                "and features/<clip>.npy)"
            )
    elif args.frames < 4:
        raise UserError(f"--frames {args.frames}: the synthetic data needs at least 4 frames")

    from lsef_ext.data import CORRUPTIONS
    from lsef_ext.train import (
        RunError,
        TrainConfig,
        Trainer,
        check_run_folder,
        distributed_env,
        evaluate_conditions,
        load_data,
    )

    cfg = TrainConfig(
        model=args.model,
        task=args.task,
        data=os.path.abspath(args.data) if args.data else None,
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
        overwrite=args.overwrite,
        accept_changes=args.accept_changes,
    )
    rank, world, _ = distributed_env()
    try:  # before the data is loaded and anything trains
        check_run_folder(cfg, write_test=rank == 0)
    except (RunError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    split = "val" if args.data else "test"
    try:
        train = load_data(cfg, "train")
        val = load_data(cfg, split)[:2]
    except (ValueError, OSError) as e:
        if args.data:  # FeatureFolder's messages name the file and the line
            raise UserError(f"--data {args.data}: {e}") from e
        raise UserError(
            f"synthetic data (--n-train {cfg.n_train}, --n-test {cfg.n_test}, --frames {cfg.T}, "
            f"--dim {cfg.D}): {e}"
        ) from e
    # set once the feature width is known, before anything trains (loading is light work)
    width = max(cfg.d_model, train[0].shape[2])
    threads = _apply_threads(args, work_cap(cfg.batch_size, cfg.T, width), quiet=rank != 0)
    try:
        trainer = Trainer(cfg, train, val=val, progress=not args.no_progress)
    except RunError as e:  # a checkpoint that cannot be read or does not fit this run
        raise UserError(str(e)) from e
    if rank == 0:
        x = train[0]
        print(
            f"lsef train: {cfg.model} on "
            f"{'FeatureFolder ' + args.data if args.data else 'SyntheticAffect'}"
            f" ({x.shape[0]} clips, T={x.shape[1]}, D={x.shape[2]}), {cfg.epochs} epochs, "
            f"{world} process(es) of {threads} thread(s), device {cfg.device}, "
            f"RAO {'on' if cfg.rao else 'off'}",
            flush=True,
        )
        if cfg.out:
            print(
                f"  run folder {cfg.out}: checkpoint.pt after every epoch, metrics.csv, "
                "metrics.json" + (" (resumed)" if cfg.resume else ""),
                flush=True,
            )
        else:
            print("  no --out: nothing is saved (--out DIR keeps the checkpoint and metrics)")
    if rank == 0 and trainer.epoch >= cfg.epochs:
        print(f"  the run already has {trainer.epoch} epochs (--epochs {cfg.epochs}): none to add")
    history = trainer.fit()
    if rank == 0:
        for row in history if args.no_progress else ():  # else printed as each epoch ended
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


# --------------------------------------------------------------------------------------------
# the parser
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line (``lsef: error: ...``) with where to find help."""

    def error(self, message: str):
        self.exit(2, f"lsef: error: {message} (see '{self.prog} --help')\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help says it already or there is
    no value to show (an on/off switch, or a default of None that the help describes)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
        ):
            return text
        return text + " (default: %(default)s)"


def _threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=_integer(1),
        default=None,
        metavar="N",
        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the cores this "
        "process may use, capped where the work is too small to gain, and halved when the load "
        "average exceeds the cores)",
    )


def _version() -> str:
    """The installed lsef_ext's version, read from its metadata (importing the package would
    load torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lsef_ext")
    except PackageNotFoundError:
        return "(lsef_ext is not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The ``lsef`` parser; building it imports nothing beyond the standard library."""

    # --debug goes before or after the command; SUPPRESS: a subcommand's parser, which does not
    # see it, must not reset it to a default
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the Python traceback of an error instead of one line",
    )
    parser = _Parser(
        prog="lsef",
        description="lsef_ext: fast low-rank + sparse ops for video affect analysis",
        formatter_class=_Formatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"lsef {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=help, formatter_class=_Formatter, parents=[common]
        )

    d = command(
        "demo",
        "the main job: train LSEF and baselines on the embedded data, test them clean and "
        "corrupted, draw figures, time the ops",
    )
    d.add_argument(
        "--out", default="lsef-demo", metavar="DIR", help="folder for the figures and results.json"
    )
    d.add_argument(
        "--quick", action="store_true", help="small data, few epochs, small benchmark (minutes)"
    )
    d.add_argument("--seed", type=_integer(0, 2**32 - 1), default=0, help="random seed")
    d.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    d.add_argument("--no-bench", action="store_true", help="skip the op speed table")
    _threads_flag(d)
    d.set_defaults(fn=_demo)

    t = command(
        "train",
        "train one model (synthetic data or a FeatureFolder); runs under torchrun with "
        "DistributedDataParallel",
    )
    t.add_argument("--model", default="lsef", choices=MODEL_NAMES, help="which model")
    t.add_argument(
        "--task",
        default="classification",
        choices=["classification", "regression"],
        help="class labels, or valence/arousal",
    )
    t.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="a FeatureFolder (labels.csv + features/<clip>.npy; validated on its 'val' split) "
        "(default: the synthetic SyntheticAffect set)",
    )
    t.add_argument("--n-train", type=_integer(1), default=2048, help="synthetic training clips")
    t.add_argument("--n-test", type=_integer(1), default=1024, help="synthetic test clips")
    t.add_argument(
        "--frames",
        type=_integer(2),
        default=16,
        help="frames per clip (synthetic: at least 4; FeatureFolder: crop/pad to this)",
    )
    t.add_argument("--dim", type=_integer(1), default=64, help="synthetic feature channels D")
    t.add_argument(
        "--epochs",
        type=_integer(1),
        default=15,
        help="epochs in all (a resumed run trains up to this many)",
    )
    t.add_argument("--batch-size", type=_integer(1), default=64, help="clips per batch and process")
    t.add_argument("--lr", type=_number(0, strict=True), default=2e-3, help="AdamW learning rate")
    t.add_argument(
        "--weight-decay", type=_number(0, strict=False), default=1e-2, help="AdamW weight decay"
    )
    t.add_argument("--seed", type=_integer(0, 2**32 - 1), default=0, help="random seed")
    t.add_argument("--no-rao", action="store_true", help="plain AdamW instead of RAO(AdamW)")
    t.add_argument("--d-model", type=_integer(1), default=64, help="LSEF embedding width")
    t.add_argument("--rank", type=_integer(1), default=4, help="LSEF and RAO rank")
    t.add_argument(
        "--device",
        type=_train_device,
        default="cpu",
        help="cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)",
    )
    t.add_argument(
        "--ops",
        default="ext",
        choices=["ext", "ref"],
        help="the compiled kernels or the lsef_ref references",
    )
    t.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for checkpoint.pt, metrics.csv and metrics.json (default: nothing saved)",
    )
    runs = t.add_mutually_exclusive_group()
    runs.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (from its checkpoint.pt)",
    )
    runs.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out that holds one (its files are replaced when the "
        "first epoch is saved); without it such an --out is refused",
    )
    t.add_argument(
        "--accept-changes",
        action="store_true",
        help="with --resume: continue although --lr, --weight-decay, --ops, --data, "
        "--batch-size, --seed, --frames (synthetic data: --dim, --n-train) differ from the "
        "checkpoint's run; the new values apply from the next step. Without it such a resume "
        "is refused",
    )
    t.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars and no line per epoch (the history is printed at the end)",
    )
    _threads_flag(t)
    t.set_defaults(fn=_train)

    info = command("info", "versions, compiled backends, CUDA architectures, threads")
    info.set_defaults(fn=_info)

    b = command("bench", "time the ops against their references and plain PyTorch")
    b.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and few runs, to exercise the harness (for CI); labels show the sizes",
    )
    b.add_argument(
        "--json",
        metavar="PATH",
        help="also write the results to this JSON file (default: printed only)",
    )
    b.add_argument(
        "--filter",
        default="",
        metavar="TEXT",
        help="only cases whose name contains TEXT (default: all cases)",
    )
    b.add_argument(
        "--device",
        choices=["cpu", "cuda", "all"],
        default="all",
        help="which devices to time; 'all' skips CUDA without a GPU, 'cuda' refuses",
    )
    _threads_flag(b)
    b.set_defaults(fn=_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Runs ``lsef`` with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    debug = getattr(args, "debug", False)
    try:
        return args.fn(args)
    except UserError as e:
        if debug:
            raise
        print(f"lsef: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("lsef: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
