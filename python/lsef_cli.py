"""The ``lsef`` command: ``lsef demo``, ``train``, ``eval``, ``predict``, ``export``, ``bench`` and
``info``.

This is a top-level module beside the ``lsef_ext`` package, not inside it: importing anything
inside ``lsef_ext`` first runs the package's ``__init__``, which loads torch and the compiled
library (over a second). Here, building the parser, ``lsef --help`` and ``lsef --version``
import only the standard library; torch and the models load when a command runs.

A user error (a bad flag value, a missing or unreadable file or folder, an ``--out`` that holds
another run, a checkpoint that is damaged or does not fit) ends the command with one line
``lsef: error: ...`` on stderr and exit status 2; ``lsef --debug ...`` shows the traceback
instead. Any other exception is a bug and shows its traceback.
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


def _frames(text: str):
    """--frames: an integer >= 2 or 'auto'."""
    if text == "auto":
        return text
    return _integer(2)(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


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


def _need_cuda_for_fp16(amp: Optional[str], device: str) -> None:
    """--amp fp16 is refused off CUDA (TrainConfig refuses it too, less readably)."""
    if amp == "fp16" and not device.startswith("cuda"):
        raise UserError(
            f"--amp fp16 needs --device cuda (got --device {device}): float16 autocast is slow "
            "on the CPU and its GradScaler is for CUDA; on the CPU use --amp bf16"
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
        ("torch (supported)", f">= {b['torch_target']} (built with {b['torch_built']})"),
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
    _need_cuda_for_fp16(args.amp, args.device)
    if args.device == "cuda":
        _need_cuda("--device cuda")
    _writable_folder(args.out, "--out")
    from lsef_ext.demo import demo
    from lsef_ext.train import TrainConfig

    c = TrainConfig()
    _apply_threads(args, cap=work_cap(c.batch_size, c.T, max(c.D, c.d_model)))
    demo(
        out=args.out,
        quick=args.quick,
        seed=args.seed,
        device=args.device,
        bench=not args.no_bench,
        amp=args.amp,
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.resume and not args.out:
        raise UserError("--resume needs --out DIR: the folder of the run to continue")
    if args.accept_changes and not args.resume:
        raise UserError("--accept-changes applies to a resumed run only: add --resume")
    _need_cuda_for_fp16(args.amp, args.device)
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
    elif args.frames == "auto":
        raise UserError(
            "--frames auto applies to a FeatureFolder (--data); synthetic clips have "
            "a fixed length (an integer >= 4, default 16)"
        )
    elif args.frames is not None and args.frames < 4:
        raise UserError(f"--frames {args.frames}: the synthetic data needs at least 4 frames")
    if args.data is None and args.missing_frames != "error":
        raise UserError(
            "--missing-frames applies to a FeatureFolder (--data); synthetic clips have no "
            "missing frames"
        )

    from lsef_ext.data import CONDITIONS
    from lsef_ext.train import (
        RunError,
        TrainConfig,
        Trainer,
        check_run_folder,
        distributed_env,
        evaluate_conditions,
        prepare_data,
    )

    frames = args.frames if args.frames is not None else ("auto" if args.data else 16)
    cfg = TrainConfig(
        model=args.model,
        task=args.task,
        data=os.path.abspath(args.data) if args.data else None,
        n_train=args.n_train,
        n_test=args.n_test,
        T=frames,
        D=args.dim,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        rao=args.rao and args.model.startswith("lsef"),
        d_model=args.d_model,
        rank=args.rank,
        device=args.device,
        ops=args.ops,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        accept_changes=args.accept_changes,
        normalise=False if args.no_normalise else None,
        class_weights=None if args.class_weights == "none" else args.class_weights,
        patience=args.patience,
        select=args.select,
        val_fraction=args.val_fraction,
        amp=args.amp,
        missing_frames=_missing_frames(args.missing_frames),
    )
    rank, world, _ = distributed_env()
    try:  # before the data is loaded and anything trains
        nothing_to_resume = check_run_folder(cfg, write_test=rank == 0)
    except (RunError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    if nothing_to_resume and rank == 0:  # a resume of a run stopped before its first epoch
        print(nothing_to_resume, flush=True)
    try:
        train, val, meta, notes = prepare_data(cfg)
    except (ValueError, OSError) as e:
        if args.data:  # FeatureFolder's messages name the file and the line
            raise UserError(f"--data {args.data}: {e}") from e
        raise UserError(
            f"synthetic data (--n-train {cfg.n_train}, --n-test {cfg.n_test}, --frames {cfg.T}, "
            f"--dim {cfg.D}): {e}"
        ) from e
    # set once the feature width is known, before anything trains (loading is light work)
    width = max(cfg.d_model, train.x.shape[2])
    threads = _apply_threads(
        args, work_cap(cfg.batch_size, train.x.shape[1], width), quiet=rank != 0
    )
    try:
        trainer = Trainer(cfg, train, val=val, progress=not args.no_progress, meta=meta)
    except RunError as e:  # a checkpoint that cannot be read or does not fit this run
        raise UserError(str(e)) from e
    if rank == 0:
        x = train[0]
        print(
            f"lsef train: {cfg.model} on "
            f"{'FeatureFolder ' + args.data if args.data else 'SyntheticAffect'}"
            f" ({x.shape[0]} clips, T={x.shape[1]}, D={x.shape[2]}), {cfg.epochs} epochs, "
            f"{world} process(es) of {threads} thread(s), device {cfg.device}, "
            f"RAO {'on' if cfg.rao else 'off'}" + (f", autocast {cfg.amp}" if cfg.amp else ""),
            flush=True,
        )
        for note in notes + _model_notes(cfg, train, meta):
            print(f"  note: {note}", flush=True)
        if cfg.out:
            print(
                f"  run folder {cfg.out}: checkpoint.pt after every epoch, best.pt at the best "
                "val score, metrics.csv, metrics.json" + (" (resumed)" if trainer.resumed else ""),
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
            metrics = evaluate_conditions(trainer.net, cfg, CONDITIONS, device=trainer.device)
            for c, m in metrics.items():
                print(f"  test under {c}: WAR {100 * m['war']:.1f}%  UAR {100 * m['uar']:.1f}%")
        if trainer.best is not None:
            b = trainer.best
            why = f" ({b['reason']})" if b.get("reason") else ""
            print(f"  best {b['metric']} {b['score']:.4f} at epoch {b['epoch']}{why}")
        if cfg.out:
            print(
                f"checkpoint and metrics in {cfg.out}/ (checkpoint.pt, best.pt, metrics.csv, "
                "metrics.json); test it: lsef eval "
                f"{os.path.join(cfg.out, 'best.pt')}"
                + (f" --data {args.data}" if args.data else "")
            )
    if trainer.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _model_notes(cfg, train, meta) -> List[str]:
    """Remarks on settings the model cannot honour as given (printed before training)."""
    notes = []
    if cfg.model.startswith("lsef"):
        T, D = train.x.shape[1], train.x.shape[2]
        shortest = int(train.lengths.min()) if train.lengths is not None else T
        if cfg.rank > min(shortest, D):
            notes.append(
                f"--rank {cfg.rank} exceeds min(frames, channels) = min({shortest}, {D}) of the "
                f"shortest clip: LSEF uses rank {min(shortest, D)} there (a T x D clip has rank "
                "at most min(T, D))"
            )
    if train.lengths is not None:
        notes.append(
            f"clips have {int(train.lengths.min())} to {int(train.lengths.max())} frames: the "
            f"shorter ones are zero-padded to {train.x.shape[1]} and masked (padded frames "
            "change no output)"
        )
    if train.mask is not None:
        from lsef_ext.data import _valid_mask

        gone = ~train.mask & _valid_mask(train.x, train.lengths)[..., 0]  # not the padding
        notes.append(
            f"{int(gone.sum())} missing frame(s) (all NaN) in {int(gone.any(1).sum())} training "
            "clip(s): set to 0 and masked (--missing-frames nan; missing frames change no output)"
        )
    return notes


def _missing_frames(flag: Optional[str]) -> Optional[str]:
    """TrainConfig.missing_frames of a --missing-frames value ("error" is None)."""
    return None if flag in (None, "error") else flag


def _open_checkpoint(args: argparse.Namespace):
    if args.device.startswith("cuda"):
        _need_cuda(f"--device {args.device}", args.device)
    from lsef_ext.train import RunError, load_checkpoint

    try:
        return load_checkpoint(args.checkpoint, args.device, args.ops)
    except (RunError, FileNotFoundError) as e:
        raise UserError(str(e)) from e


def _checkpoint_config(ck, data: Optional[str], missing_frames: Optional[str] = None):
    """The TrainConfig of a checkpoint's run, pointed at ``data`` (a folder) where given, with
    ``missing_frames`` (a --missing-frames value; None: the run's own)."""
    import dataclasses

    from lsef_ext.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in ck.config.items() if k in names})
    if missing_frames is not None:
        cfg.missing_frames = _missing_frames(missing_frames)
    if data is not None:
        if not os.path.isdir(data):
            raise UserError(f"--data {data}: no such folder")
        cfg.data = os.path.abspath(data)
    elif cfg.data and not os.path.isdir(cfg.data):
        raise UserError(f"the checkpoint's data folder {cfg.data} is gone: pass --data FOLDER")
    return cfg


def _conditions(text: str) -> Tuple[str, ...]:
    from lsef_ext.data import CONDITIONS

    if text == "all":
        return CONDITIONS
    if text == "none":
        return ("clean",)
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in chosen if c not in CONDITIONS]
    if bad or not chosen:
        raise UserError(
            f"--corruptions {text!r}: expected all, none, or a comma-separated list of "
            f"{', '.join(CONDITIONS[1:])}"
        )
    return ("clean",) + tuple(c for c in chosen if c != "clean")


def _eval(args: argparse.Namespace) -> int:
    conditions = _conditions(args.corruptions)
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    ck = _open_checkpoint(args)  # first: a mistyped checkpoint path creates no folder
    _writable_folder(out, "--out")
    cfg = _checkpoint_config(ck, args.data, args.missing_frames)
    _apply_threads(args, cap=None)
    import json

    from lsef_ext.train import detailed_metrics, load_test_sets, predict

    where = f"FeatureFolder {cfg.data}" if cfg.data else "SyntheticAffect"
    try:
        sets = load_test_sets(cfg, conditions, meta=ck.meta, split=args.split)
    except (ValueError, OSError) as e:
        raise UserError(f"{'--data ' + cfg.data if cfg.data else 'synthetic data'}: {e}") from e
    first = sets["clean"]
    d_in = ck.model.d_in if hasattr(ck.model, "d_in") else first.x.shape[-1]
    if first.x.shape[-1] != d_in:
        raise UserError(
            f"{where} has D = {first.x.shape[-1]} feature channels; the model of "
            f"{args.checkpoint} takes {d_in}"
        )
    task = cfg.task
    names = ck.meta.get("class_names"), ck.meta.get("target_names")
    results = {}
    for c, data in sets.items():
        p = predict(ck.model, data.x, device=args.device, lengths=data.lengths, mask=data.mask)
        results[c] = detailed_metrics(p, data.t, task, *names)
    print(
        f"lsef eval: {args.checkpoint} ({cfg.model}, epoch {ck.epoch}) on {where}, split "
        f"{args.split} ({first.x.shape[0]} clips)"
    )
    if task == "classification":
        print(f"  {'condition':<16} {'WAR %':>7} {'UAR %':>7}")
        for c, m in results.items():
            print(f"  {c:<16} {100 * m['war']:7.1f} {100 * m['uar']:7.1f}")
        recall = results["clean"]["recall"]
        print(
            "  clean recall per class: "
            + ", ".join(f"{k} {'-' if v is None else f'{100 * v:.1f}%'}" for k, v in recall.items())
        )
    else:
        keys = [k for k in results["clean"] if k.startswith("ccc_")]
        print(f"  {'condition':<16} " + " ".join(f"{k:>14}" for k in keys))
        for c, m in results.items():
            print(f"  {c:<16} " + " ".join(f"{m[k]:14.4f}" for k in keys))
    os.makedirs(out, exist_ok=True)
    report = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "epoch": ck.epoch,
        "data": cfg.data or "synthetic",
        "split": args.split,
        "task": task,
        "conditions": results,
    }
    path = os.path.join(out, "eval.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)
    written = [path]
    if task == "classification":
        from lsef_ext.demo import plot_confusion

        fig = os.path.join(out, "confusion.png")
        plot_confusion(
            results["clean"]["confusion"],
            list(recall),
            fig,
            f"{cfg.model}, {args.split} split, clean: confusion (row-normalised)",
        )
        written.append(fig)
    print("wrote " + ", ".join(written))
    return 0


def _predict(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.data):
        raise UserError(f"--data {args.data}: no such folder")
    _writable_file(args.out, "--out")
    ck = _open_checkpoint(args)
    _apply_threads(args, cap=None)
    import csv

    import torch

    from lsef_ext.data import FeatureFolder, standardise
    from lsef_ext.train import predict

    meta = ck.meta
    try:
        ds = FeatureFolder(
            args.data,
            split=None if args.split == "all" else args.split,
            frames=meta.get("frames"),
            labelled=False,
            missing_frames=_missing_frames(
                args.missing_frames or ck.config.get("missing_frames") or "error"
            ),
        )
    except (ValueError, OSError) as e:
        raise UserError(f"--data {args.data}: {e}") from e
    x, lengths, mask = ds.x, ds.lengths, ds.mask
    d_in = getattr(ck.model, "d_in", x.shape[-1])
    if x.shape[-1] != d_in:
        raise UserError(
            f"--data {args.data}: clips have D = {x.shape[-1]}; the model of {args.checkpoint} "
            f"takes {d_in}"
        )
    if meta.get("norm"):
        norm = meta["norm"]
        x = standardise(x, torch.tensor(norm["mean"]), torch.tensor(norm["std"]), lengths, mask)
    full = bool((lengths == x.shape[1]).all())
    p = predict(ck.model, x, device=args.device, lengths=None if full else lengths, mask=mask)
    task = ck.config.get("task", "classification")
    if task == "classification":
        names = meta.get("class_names") or [str(i) for i in range(p.shape[-1])]
        probs = p.softmax(-1)
        header = ["clip", "predicted"] + [f"p_{n}" for n in names]
        rows = [
            [clip, names[int(q.argmax())]] + [f"{float(v):.6g}" for v in q]
            for clip, q in zip(ds.clips, probs)
        ]
    else:
        names = meta.get("target_names") or [f"t{i}" for i in range(p.shape[-1])]
        header = ["clip"] + list(names)
        rows = [[clip] + [f"{float(v):.6g}" for v in q] for clip, q in zip(ds.clips, p)]
    existed = os.path.exists(args.out)
    with open(args.out + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(args.out + ".tmp", args.out)
    print(
        f"lsef predict: {len(rows)} clips of {args.data} by {args.checkpoint}; wrote {args.out}"
        + (" (replaced)" if existed else "")
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    if not args.out.endswith(".pt2"):
        raise UserError(
            f"--out {args.out}: expected a file name ending in .pt2 (what torch.export and "
            "AOTInductor write)"
        )
    _writable_file(args.out, "--out")
    _apply_threads(args, cap=None)
    from lsef_ext.export import ExportError, export_checkpoint
    from lsef_ext.train import RunError

    existed = os.path.exists(args.out)
    try:
        r = export_checkpoint(args.checkpoint, args.out, format=args.format)
    except (RunError, FileNotFoundError, ExportError) as e:
        raise UserError(str(e)) from e
    if r.kind == "aoti":
        what = "an AOTInductor package (the graph compiled to C++ for this kind of CPU)"
        load = f"torch._inductor.aoti_load_package({r.path!r})"
    else:
        what = f"an ExportedProgram (torch.export.save), not an AOTInductor package: {r.reason}"
        load = f"torch.export.load({r.path!r}).module()"
    norm = (
        "standardised inside with the checkpoint's mean and std"
        if r.normalised
        else "used as given (the checkpoint has no normalisation)"
    )
    print(
        f"lsef export: {args.checkpoint} ({r.model}, epoch {r.epoch}) -> {r.path}"
        + (" (replaced)" if existed else "")
        + f", {what}\n"
        f"  input: float32 raw features (B, {r.frames}, {r.d_in}), any batch size B >= 1, "
        f"every clip with all {r.frames} frames; {norm}\n"
        f"  output: {r.outputs}, one row per clip\n"
        f"  checked against the eager model: max |difference| {r.max_abs_diff:.2g}\n"
        f"  load it: import torch, lsef_ext; model = {load}"
    )
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


def _amp_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--amp",
        choices=["bf16", "fp16"],
        default=None,
        help="mixed precision: the forward and loss of training and of the val/test evaluation "
        "run under torch.autocast in bfloat16 (CPU or CUDA) or float16 with a GradScaler (CUDA "
        "only: float16 autocast is slow on the CPU and GradScaler is for CUDA); the lsef ops "
        "compute in float32, and the parameters, optimizer state and checkpoints stay float32 "
        "(default: off, float32 throughout)",
    )


def _version() -> str:
    """The installed lsef_ext's version, read from its metadata (importing the package would
    load torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lsef_ext")
    except PackageNotFoundError:
        return "(lsef_ext is not installed)"


def _missing_frames_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--missing-frames",
        choices=["error", "nan"],
        default=None,
        help="a FeatureFolder's NaN features: error, or nan (a frame that is NaN in every "
        "channel is missing and masked) (default: what the checkpoint's run was trained with)",
    )


def _checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """What eval and predict share: the checkpoint, --device, --ops, --threads."""
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint written by lsef train")
    p.add_argument("--device", type=_train_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--ops", default="ext", choices=["ext", "ref"], help="the compiled kernels or lsef_ref"
    )
    _threads_flag(p)


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
    _amp_flag(d)
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
        help="class labels, or regression targets (synthetic: valence/arousal; a FeatureFolder: "
        "its labels.csv columns other than clip, label and split)",
    )
    t.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="a FeatureFolder (labels.csv + features/<clip>.npy; validated on its 'val' split, "
        "or on a share of train held out where it has none) (default: the synthetic "
        "SyntheticAffect set)",
    )
    t.add_argument("--n-train", type=_integer(1), default=2048, help="synthetic training clips")
    t.add_argument("--n-test", type=_integer(1), default=1024, help="synthetic test clips")
    t.add_argument(
        "--frames",
        type=_frames,
        default=None,
        metavar="N|auto",
        help="frames per clip. Synthetic: an integer >= 4 (default 16). FeatureFolder: longer "
        "clips are centre-cropped to N, shorter ones zero-padded and masked; auto (the default "
        "there) is the longest training clip, up to 256",
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
    rao = t.add_mutually_exclusive_group()
    rao.add_argument(
        "--rao",
        action="store_true",
        help="wrap AdamW in RAO, rank-aware gradient scaling (LSEF models; opt-in: on the "
        "synthetic set and two real data sets it changed neither accuracy nor the spread over "
        "seeds, docs/RESULTS.md)",
    )
    rao.add_argument(
        "--no-rao", action="store_true", help="plain AdamW: the default (kept for older scripts)"
    )
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
        help="folder for checkpoint.pt, best.pt, metrics.csv and metrics.json (default: nothing "
        "saved)",
    )
    runs = t.add_mutually_exclusive_group()
    runs.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint.pt (metrics.csv and metrics.json "
        "are first written again from its history). An --out that holds no run files, e.g. "
        "only the checkpoint.pt.tmp of a run stopped before its first epoch ended, has nothing "
        "to resume: the run starts from epoch 0 and says so",
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
        "--batch-size, --seed, --frames, --no-normalise, --class-weights, --select, "
        "--val-fraction, --amp, --missing-frames (synthetic data: --dim, --n-train) differ "
        "from the checkpoint's run; the new values apply from the next step. Careful: where a "
        "folder has no val split, "
        "--seed and --val-fraction choose the held-out clips, so changing them moves clips "
        "between train and val. Without it such a resume is refused",
    )
    t.add_argument(
        "--no-normalise",
        action="store_true",
        help="do not standardise each feature channel with the training clips' mean and std "
        "(on by default for a FeatureFolder; the statistics go into the checkpoint)",
    )
    t.add_argument(
        "--class-weights",
        choices=["none", "balanced"],
        default="none",
        help="balanced: weigh each class's loss by n / (K n_c), for imbalanced data",
    )
    t.add_argument(
        "--select",
        choices=["war", "uar"],
        default="war",
        help="the val metric best.pt maximises (regression: the mean CCC); an equal score is "
        "decided by the val loss (lower wins), and equal in both by the later epoch",
    )
    t.add_argument(
        "--patience",
        type=_integer(1),
        default=None,
        metavar="N",
        help="stop when the val score has not improved (nor stayed equal with a lower val "
        "loss) for N epochs (default: train all epochs)",
    )
    t.add_argument(
        "--missing-frames",
        choices=["error", "nan"],
        default="error",
        help="a FeatureFolder's NaN features: error (refused, the default), or nan: a frame "
        "that is NaN in every channel is a missing frame (set to 0, and masked: the models "
        "ignore it); a NaN in any other frame is still an error",
    )
    t.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.1,
        help="where the folder has no val split: the share of train held out as val "
        "(stratified by class, seeded by --seed)",
    )
    t.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars and no line per epoch (the history is printed at the end)",
    )
    _amp_flag(t)
    _threads_flag(t)
    t.set_defaults(fn=_train)

    e = command(
        "eval",
        "test a trained model (checkpoint.pt or best.pt) clean and under each corruption: WAR, "
        "UAR and per-class recall (or CCC per target); writes eval.json and confusion.png",
    )
    _checkpoint_flags(e)
    e.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="a FeatureFolder (default: the checkpoint's own data, synthetic or folder)",
    )
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split")
    e.add_argument(
        "--corruptions",
        default="all",
        metavar="all|none|LIST",
        help="test conditions besides clean: all, none, or a comma-separated list of "
        "frame_drop, frame_drop_known (the same dropped frames, the model told which by a frame "
        "mask), impulse, gaussian",
    )
    _missing_frames_flag(e)
    e.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for eval.json and confusion.png (default: the checkpoint's folder)",
    )
    e.set_defaults(fn=_eval)

    pr = command(
        "predict",
        "per-clip predictions of a trained model for a feature folder, labelled or not",
    )
    _checkpoint_flags(pr)
    pr.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="labels.csv (a clip column; split and labels optional) and features/<clip>.npy",
    )
    pr.add_argument(
        "--split",
        default="all",
        choices=["all", "train", "val", "test"],
        help="which clips (all: every clip listed; the others need a split column)",
    )
    pr.add_argument(
        "--out",
        default="predictions.csv",
        metavar="CSV",
        help="where to write one row per clip: class and probabilities, or target values",
    )
    _missing_frames_flag(pr)
    pr.set_defaults(fn=_predict)

    ex = command(
        "export",
        "write a trained model (checkpoint.pt or best.pt) as one .pt2 file for deployment: an "
        "AOTInductor package, or an ExportedProgram where AOTInductor cannot compile it; raw "
        "features in (the checkpoint's normalisation inside), predictions out",
    )
    ex.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint written by lsef train")
    ex.add_argument(
        "--out",
        default="model.pt2",
        metavar="PT2",
        help="the file to write (its name ends in .pt2)",
    )
    ex.add_argument(
        "--format",
        default="auto",
        choices=["auto", "aoti", "program"],
        help="aoti: an AOTInductor package (compiles C++, about a minute); program: an "
        "ExportedProgram (torch.export.save, no compiler); auto: aoti, or program where "
        "AOTInductor fails",
    )
    _threads_flag(ex)
    ex.set_defaults(fn=_export)

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
