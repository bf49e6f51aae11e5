"""Training and evaluation: metrics, the training loop behind ``lsef train`` and ``lsef demo``,
checkpoints, and DistributedDataParallel when started by ``torchrun``.

Metrics: WAR (weighted average recall = accuracy), UAR (unweighted average recall = mean of
per-class recalls), and CCC (Lin's concordance correlation coefficient) for valence/arousal.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import (
    CLASS_NAMES,
    CONDITIONS,
    CORRUPTIONS,
    MASKED_CONDITIONS,
    MISSING_FRAMES,
    FeatureFolder,
    SyntheticAffect,
    _valid_mask,
    channel_stats,
    corrupt,
    standardise,
    stratified_split,
    told_mask,
)
from .nn import LSEF, LSEFOutput, build_model

__all__ = [
    "war",
    "uar",
    "ccc",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "evaluate_conditions",
    "corrupted_average",
    "predict",
    "ClipSet",
    "prepare_data",
    "load_checkpoint",
    "detailed_metrics",
    "CHECKPOINT_FORMAT",
    "load_data",
    "load_test_sets",
    "distributed_env",
    "RunError",
    "RUN_FILES",
    "check_run_folder",
    "select_best",
    "AMP_DTYPES",
    "amp_autocast",
]


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def war(pred: Tensor, y: Tensor) -> float:
    """Weighted average recall: the accuracy of class predictions (or logits) ``pred``."""
    if pred.dim() == 2:
        pred = pred.argmax(-1)
    return float((pred == y).float().mean()) if y.numel() else float("nan")


def uar(pred: Tensor, y: Tensor, num_classes: Optional[int] = None) -> float:
    """Unweighted average recall: the mean over classes present in ``y`` of their recall."""
    if pred.dim() == 2:
        num_classes = num_classes or pred.shape[-1]
        pred = pred.argmax(-1)
    num_classes = num_classes or int(max(int(y.max()), int(pred.max())) + 1)
    recalls = []
    for c in range(num_classes):
        m = y == c
        if m.any():
            recalls.append(float((pred[m] == c).float().mean()))
    return sum(recalls) / len(recalls) if recalls else float("nan")


def ccc(pred: Tensor, target: Tensor) -> Tensor:
    """Lin's concordance correlation coefficient along dim 0, per column:
    ``2 cov(x, y) / (var x + var y + (mean x − mean y)²)`` (population moments)."""
    mx, my = pred.mean(0), target.mean(0)
    vx, vy = pred.var(0, unbiased=False), target.var(0, unbiased=False)
    cov = ((pred - mx) * (target - my)).mean(0)
    return 2 * cov / (vx + vy + (mx - my) ** 2 + 1e-12)


# --------------------------------------------------------------------------------------------
# configuration and data
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything one training run depends on (``lsef train`` flags map onto these fields)."""

    model: str = "lsef"
    task: str = "classification"
    data: Optional[str] = None  # a FeatureFolder root; None: SyntheticAffect
    n_train: int = 2048
    n_test: int = 1024
    T: Union[int, str, None] = 16  # frames; a FeatureFolder also takes "auto" (None: "auto")
    D: int = 64
    data_seed: int = 0
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-2
    seed: int = 0
    rao: bool = False  # wrap AdamW in RAO (opt-in: docs/RESULTS.md measured no gain)
    d_model: int = 64
    rank: int = 4
    device: str = "cpu"
    ops: str = "ext"
    out: Optional[str] = None  # folder for checkpoint.pt, best.pt, metrics.csv, metrics.json
    normalise: Optional[bool] = None  # per-channel standardisation (None: FeatureFolder only)
    class_weights: Optional[str] = None  # None or "balanced" (cross-entropy weights n / (K n_c))
    patience: Optional[int] = None  # stop after this many epochs without a better val score
    select: str = "war"  # the val metric best.pt maximises: "war" or "uar" (regression: CCC)
    val_fraction: float = 0.1  # of train held out as val where a FeatureFolder has no val split
    resume: bool = False  # continue the run in ``out`` (its checkpoint.pt)
    overwrite: bool = False  # start a new run in an ``out`` that holds one (else refused)
    accept_changes: bool = False  # resume although RESUME_SETTINGS differ from the checkpoint's
    # mixed precision: None (float32), "bf16" (CPU or CUDA) or "fp16" (CUDA only, GradScaler);
    # the forward and loss of training and of the val/test evaluation run under torch.autocast
    amp: Optional[str] = None
    # a FeatureFolder's missing frames: None (a NaN in the features is an error) or "nan" (a
    # frame that is NaN in every channel is missing: the models are given a frame mask)
    missing_frames: Optional[str] = None
    extra: Dict[str, object] = field(default_factory=dict)  # more LSEF keyword arguments
    rao_options: Dict[str, object] = field(default_factory=dict)  # more RAO keyword arguments


class RunError(ValueError):
    """A run that cannot start as configured: its ``out`` folder cannot be written or already
    holds a run, or its checkpoint is damaged, foreign or of differently configured training.
    The message names the folder or file and what is wrong (``lsef train`` prints it as one
    ``lsef: error:`` line)."""


# The files a run writes to cfg.out; an out folder holding any of them holds a run.
RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.json", "metrics.csv")

# Checkpoints carry this number; one without it (or with another) was written by another
# version of lsef_ext and is refused with a clear message.
CHECKPOINT_FORMAT = 2

# What a resumed run must share with its checkpoint. The first set decides the model's shape
# and kind: no resume across a change. The second set is refused unless cfg.accept_changes
# (--accept-changes); D, n_train and data_seed count only for synthetic data (a FeatureFolder's
# D is the files', and a changed one fails as a model that does not fit).
RESUME_IDENTITY = ("model", "task", "d_model", "rank", "rao")
RESUME_SETTINGS = (
    "lr",
    "weight_decay",
    "ops",
    "data",
    "batch_size",
    "seed",
    "T",
    "normalise",
    "class_weights",
    "select",
    "val_fraction",
    "amp",
    "missing_frames",
)
RESUME_SYNTHETIC = ("D", "n_train", "data_seed")
# Settings that checkpoints of format 2 written before them lack, with the value their runs had.
_SETTING_DEFAULTS: Dict[str, object] = {"amp": None, "missing_frames": None}

# --amp: the autocast dtype of each choice.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_autocast(device: Union[str, torch.device], amp: Optional[str]):
    """The context a forward runs in for ``TrainConfig.amp``: ``torch.autocast`` on the device's
    type in bfloat16 (``"bf16"``) or float16 (``"fp16"``), or no context (``None``: float32)."""
    if amp is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[amp])


def _why(e: BaseException) -> str:
    """``TypeName: first line of the message`` of an exception (and the next line where the
    first ends in a colon; at most 300 characters), or an OSError's ``strerror``."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0] + (" " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else "")
    return f"{type(e).__name__}: {text if len(text) <= 300 else text[:297] + '...'}"


def check_run_folder(cfg: TrainConfig, write_test: bool = True) -> Optional[str]:
    """Checks ``cfg.out`` before anything is trained (:class:`Trainer` calls it first):

    * without ``cfg.resume``, an ``out`` that holds a run (any of ``RUN_FILES``) is refused
      unless ``cfg.overwrite`` (its files are then replaced when the first epoch is saved);
      leftovers of an interrupted write (``checkpoint.pt.tmp`` and the like) are no run;
    * with ``cfg.resume``, ``out`` must hold ``checkpoint.pt``, except that a folder holding
      none of ``RUN_FILES`` (empty, or only ``*.tmp`` leftovers: the earlier run was stopped
      before its first epoch ended) has nothing to resume, and the run starts from epoch 0;
      a folder that does not exist (FileNotFoundError) or that holds other run files but no
      ``checkpoint.pt`` is refused, and ``cfg.overwrite`` is refused as a contradiction;
    * ``out`` must be a folder this process can create and write in (``write_test``: a
      temporary file is created and removed in ``out``, or, where ``out`` does not exist yet,
      in the folder it would be created in).

    Returns the one line to print when a resume has nothing to resume (else None). Raises
    :class:`RunError` (a ValueError) or FileNotFoundError naming the folder or file."""
    out = cfg.out
    note = None
    if not out:
        if cfg.resume:
            raise FileNotFoundError(
                "resume: no run folder to resume from: set out (--out DIR) to the folder of "
                "an earlier run"
            )
        return None
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"out folder {out} exists and is not a folder")
    if cfg.resume:
        if cfg.overwrite:
            raise RunError(
                f"resume and overwrite exclude each other: continue the run in {out} "
                "(--resume) or replace it (--overwrite)"
            )
        path = os.path.join(out, "checkpoint.pt")
        if not os.path.isdir(out):
            raise FileNotFoundError(
                f"resume: no checkpoint at {path}: the folder {out} does not exist (pass --out "
                "of an earlier run; a run stopped before its first epoch ended may have left no "
                "folder: start it without --resume)"
            )
        if not os.path.isfile(path):
            held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
            if held:
                raise RunError(
                    f"resume: no checkpoint at {path}, but {out} holds {', '.join(held)}: there "
                    "is no state to continue from; start the run again with --overwrite "
                    "(overwrite=True), which replaces those files"
                )
            note = (
                f"resume: nothing to resume in {out} (no checkpoint.pt; the earlier run stopped "
                "before its first epoch ended): starting from epoch 0"
            )
    elif not cfg.overwrite:
        held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
        if held:
            raise RunError(
                f"out folder {out} already holds a run ({', '.join(held)}): continue it with "
                "--resume, or replace it with --overwrite"
            )
    if write_test:
        # A file is created (and removed) in out, or where out would be created: nothing is
        # left behind, not even an empty folder, when the run stops before its first epoch.
        here = os.path.abspath(out)
        while not os.path.exists(here) and os.path.dirname(here) != here:
            here = os.path.dirname(here)
        if not os.path.isdir(here):
            raise RunError(f"cannot create the out folder {out}: {here} is not a folder")
        try:
            fd, probe = tempfile.mkstemp(prefix=".lsef-write-test-", dir=here)
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            if here == os.path.abspath(out):
                raise RunError(f"cannot write in the out folder {out}: {_why(e)}") from e
            raise RunError(f"cannot create the out folder {out}: {here}: {_why(e)}") from e
    return note


def _check_config(cfg: TrainConfig) -> None:
    """The numbers of a TrainConfig that the loop divides by or counts with (ValueError or
    TypeError naming the field)."""
    for name, low in (("epochs", 0), ("batch_size", 1)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"TrainConfig: {name} must be an integer, got {type(value).__name__} {value!r}"
            )
        if value < low:
            raise ValueError(f"TrainConfig: {name} must be >= {low}, got {value}")
    if cfg.patience is not None and (
        isinstance(cfg.patience, bool) or not isinstance(cfg.patience, int) or cfg.patience < 1
    ):
        raise ValueError(
            f"TrainConfig: patience must be None or an integer >= 1, got {cfg.patience!r}"
        )
    if cfg.select not in ("war", "uar"):
        raise ValueError(f"TrainConfig: select must be 'war' or 'uar', got {cfg.select!r}")
    if cfg.amp not in (None, *AMP_DTYPES):
        raise ValueError(f"TrainConfig: amp must be None, 'bf16' or 'fp16', got {cfg.amp!r}")
    if cfg.amp == "fp16" and torch.device(cfg.device).type != "cuda":
        raise ValueError(
            f"TrainConfig: amp='fp16' (--amp fp16) needs a CUDA device, got device={cfg.device!r}: "
            "float16 autocast is slow on the CPU and its GradScaler is for CUDA; on the CPU use "
            "amp='bf16' (--amp bf16)"
        )
    if cfg.class_weights not in (None, "balanced"):
        raise ValueError(
            f"TrainConfig: class_weights must be None or 'balanced', got {cfg.class_weights!r}"
        )
    if cfg.missing_frames not in MISSING_FRAMES:
        raise ValueError(
            f"TrainConfig: missing_frames must be None or 'nan', got {cfg.missing_frames!r}"
        )
    if not (isinstance(cfg.val_fraction, (int, float)) and 0 < cfg.val_fraction < 1):
        raise ValueError(f"TrainConfig: val_fraction must be in (0, 1), got {cfg.val_fraction!r}")
    for name, positive in (("lr", True), ("weight_decay", False)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"TrainConfig: {name} must be a number, got {type(value).__name__} {value!r}"
            )
        if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            raise ValueError(
                f"TrainConfig: {name} must be a finite number {'> 0' if positive else '>= 0'}, "
                f"got {value}"
            )


def _same_setting(key: str, saved, now) -> bool:
    if key == "data" and saved and now:  # one folder, however it was spelled
        return os.path.realpath(saved) == os.path.realpath(now)
    return saved == now


class ClipSet(NamedTuple):
    """One split, ready for a model: clips ``x (N, T, D)``, targets ``t`` (class indices
    ``(N,)`` or regression targets ``(N, n_targets)``), ``num_classes`` (classification; the
    number of targets for regression), ``lengths (N,)``, each clip's valid frames (None: all
    ``T``), and ``mask (N, T)`` bool, the frame mask the model is given (False at missing
    frames, or at the dropped frames of ``frame_drop_known``; None: none within the
    lengths)."""

    x: Tensor
    t: Tensor
    num_classes: int
    lengths: Optional[Tensor] = None
    mask: Optional[Tensor] = None


def _clipset(
    x: Tensor,
    t: Tensor,
    ds,
    task: str,
    lengths: Optional[Tensor],
    mask: Optional[Tensor] = None,
) -> ClipSet:
    n = getattr(ds, "num_classes", 2) if task == "classification" else t.shape[-1]
    if mask is not None and bool((mask | ~_valid_mask(x, lengths)[..., 0]).all()):
        mask = None  # no frame missing within the lengths
    if lengths is not None and bool((lengths == x.shape[1]).all()):
        lengths = None  # every clip is whole: nothing to mask
    return ClipSet(x, t, n, lengths, mask)


def _resolve_normalise(cfg: "TrainConfig") -> bool:
    return bool(cfg.data) if cfg.normalise is None else bool(cfg.normalise)


def prepare_data(cfg: "TrainConfig") -> Tuple[ClipSet, ClipSet, Dict[str, object], List[str]]:
    """``(train, val, meta, notes)`` for a training run.

    A FeatureFolder's ``val`` split is used where ``labels.csv`` has one; otherwise a stratified
    (by class), seeded (``cfg.seed``) ``cfg.val_fraction`` of ``train`` is held out as val. With
    normalisation (on by default for a FeatureFolder), every split is standardised per channel
    with the training clips' mean and std (over valid frames). Synthetic data validates on its
    own ``val`` split (``cfg.n_test`` clips).

    ``meta`` describes the data for the checkpoint (what eval and predict need to rebuild the
    inputs): ``frames``, ``class_names``, ``target_names``, ``norm`` (``{"mean", "std"}`` lists,
    or None), ``val`` (where val came from), ``val_clips`` (the names of the training clips held
    out as val, or None), ``D``. ``notes``: one-line remarks for the user (cropped clips, a
    carved val split)."""
    notes: List[str] = []
    if not cfg.data:
        train = load_data(cfg, "train")
        val = load_data(cfg, "val")
        meta = {
            "source": "synthetic",
            "frames": cfg.T,
            "D": cfg.D,
            "class_names": list(CLASS_NAMES),
            "target_names": ["valence", "arousal"],
            "norm": None,
            "val": "the synthetic val split",
        }
        return train, val, meta, notes
    frames = "auto" if cfg.T is None else cfg.T
    ds = FeatureFolder(
        cfg.data, split="train", frames=frames, task=cfg.task, missing_frames=cfg.missing_frames
    )
    if ds.cropped:
        notes.append(
            f"{ds.cropped} of {len(ds.clips)} training clips are longer than {ds.frames} frames "
            "and were centre-cropped to it (--frames)"
        )
    x, t = ds.tensors()
    lengths, mask = ds.lengths, ds.mask
    classes = getattr(ds, "class_names", None)
    targets = getattr(ds, "target_names", None)
    val_clips = None  # the training clips held out as val, where the folder has no val split
    if "val" in FeatureFolder.splits(cfg.data):
        vs = FeatureFolder(
            cfg.data,
            "val",
            frames=ds.frames,
            classes=classes,
            task=cfg.task,
            targets=targets,
            missing_frames=cfg.missing_frames,
        )
        vx, vt, vlen, vmask = vs.x, vs.tensors()[1], vs.lengths, vs.mask
        where = "the folder's val split"
    else:
        keep, held = stratified_split(
            x.shape[0], t if cfg.task == "classification" else None, cfg.val_fraction, cfg.seed
        )
        if held.numel() == 0:
            raise ValueError(
                f"{cfg.data} has no val split and too few training clips ({x.shape[0]}) to "
                "hold some out"
            )
        vx, vt, vlen = x[held], t[held], lengths[held]
        vmask = None if mask is None else mask[held]
        x, t, lengths = x[keep], t[keep], lengths[keep]
        mask = None if mask is None else mask[keep]
        val_clips = [ds.clips[i] for i in held.tolist()]
        where = (
            f"{held.numel()} training clips held out ({100 * cfg.val_fraction:g} %"
            f"{', stratified by class' if cfg.task == 'classification' else ''}, seed {cfg.seed})"
        )
        notes.append(f"labels.csv has no val split: validating on {where}")
    norm = None
    if _resolve_normalise(cfg):
        mean, std = channel_stats(x, lengths, mask)
        x, vx = standardise(x, mean, std, lengths, mask), standardise(vx, mean, std, vlen, vmask)
        norm = {"mean": mean.tolist(), "std": std.tolist()}
    meta = {
        "source": "folder",
        "frames": ds.frames,
        "D": ds.D,
        "class_names": list(classes) if classes else None,
        "target_names": list(targets) if targets else None,
        "norm": norm,
        "val": where,
        "val_clips": val_clips,
    }
    train = _clipset(x, t, ds, cfg.task, lengths, mask)
    return train, _clipset(vx, vt, ds, cfg.task, vlen, vmask), meta, notes


def load_data(
    cfg: TrainConfig,
    split: Optional[str],
    corruption: Optional[str] = None,
    severity: float = 1.0,
    meta: Optional[Dict[str, object]] = None,
) -> ClipSet:
    """One split of ``cfg.data`` or of the synthetic set, as a :class:`ClipSet`.

    ``meta`` (a checkpoint's, from :func:`prepare_data`): a FeatureFolder's clips are brought to
    its ``frames``, its class and target names fix the label order, and its ``norm`` statistics
    standardise the clips. A corruption is applied after standardisation, so its size is in
    units of the training features' spread. ``split=None`` reads every clip of a folder;
    ``split="val"`` of a run whose val clips were held out of ``train`` (``meta["val_clips"]``)
    reads those clips.

    ``corruption``: a name in ``CORRUPTIONS`` or a condition of ``MASKED_CONDITIONS``
    (``"frame_drop_known"``: the frames ``"frame_drop"`` drops, the same ones, with the
    ClipSet's ``mask`` saying which). A folder's missing frames (``cfg.missing_frames``) are
    in ``mask`` under every condition; a corruption leaves them, and padded frames, at 0."""
    if cfg.data:
        meta = meta or {}
        frames = meta.get("frames") or ("auto" if cfg.T is None else cfg.T)
        held = meta.get("val_clips") if split == "val" else None
        ds = FeatureFolder(
            cfg.data,
            split="train" if held else split,
            frames=frames,
            task=cfg.task,
            classes=meta.get("class_names"),
            targets=meta.get("target_names"),
            missing_frames=cfg.missing_frames,
        )
        if held:
            _keep_clips(ds, held, cfg.data)
        if meta.get("D") is not None and ds.D != meta["D"]:
            raise ValueError(
                f"{cfg.data} has D = {ds.D} feature channels; the model was trained on "
                f"D = {meta['D']}"
            )
        x, t = ds.tensors()
        mask = ds.mask
        norm = meta.get("norm")
        if norm:
            mean, std = torch.tensor(norm["mean"]), torch.tensor(norm["std"])
            x = standardise(x, mean, std, ds.lengths, mask)
        if corruption:
            kind = MASKED_CONDITIONS.get(corruption, corruption)
            g = torch.Generator().manual_seed(cfg.data_seed + 99)
            x, kept = corrupt(x, kind, severity, g, return_mask=True)
            x = x * _valid_mask(x, ds.lengths, mask)
            if corruption in MASKED_CONDITIONS:
                mask = told_mask(kept, mask)
        return _clipset(x, t, ds, cfg.task, ds.lengths, mask)
    n = cfg.n_train if split == "train" else cfg.n_test
    ds = SyntheticAffect(
        n,
        split=split,
        T=cfg.T,
        D=cfg.D,
        seed=cfg.data_seed,
        task=cfg.task,
        corruption=corruption,
        severity=severity,
    )
    x, t = ds.tensors()
    n = ds.num_classes if cfg.task == "classification" else t.shape[-1]
    return ClipSet(x, t, n, None, ds.mask)


def _keep_clips(ds: FeatureFolder, clips: Sequence[str], root: str) -> None:
    """Narrows a loaded FeatureFolder to ``clips`` (in their order), in place."""
    where = {c: i for i, c in enumerate(ds.clips)}
    missing = [c for c in clips if c not in where]
    if missing:
        raise ValueError(
            f"{root}: the run's val clips {missing[:3]}{' ...' if len(missing) > 3 else ''} are "
            "no longer in its train split (the folder changed since training)"
        )
    idx = torch.tensor([where[c] for c in clips])
    ds.x, ds.lengths, ds.clips = ds.x[idx], ds.lengths[idx], list(clips)
    if ds.mask is not None:
        ds.mask = ds.mask[idx]
    for name in ("y", "va"):
        if hasattr(ds, name):
            setattr(ds, name, getattr(ds, name)[idx])


def load_test_sets(
    cfg: TrainConfig,
    conditions: Sequence[str] = CONDITIONS,
    meta: Optional[Dict[str, object]] = None,
    split: str = "test",
) -> Dict[str, ClipSet]:
    """``{condition: ClipSet}``: the test split clean (``"clean"``) and under each named
    corruption or condition of ``MASKED_CONDITIONS`` (:func:`load_data`), for
    :func:`evaluate_conditions` (load once, evaluate several models)."""
    return {c: load_data(cfg, split, None if c == "clean" else c, meta=meta) for c in conditions}


def distributed_env() -> Tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` without)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def _output(out) -> Tensor:
    return out.pred if isinstance(out, LSEFOutput) else out


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _call(model: nn.Module, x: Tensor, lengths: Optional[Tensor], mask: Optional[Tensor] = None):
    if mask is not None:
        return model(x, lengths, mask=mask)
    return model(x) if lengths is None else model(x, lengths)


@torch.no_grad()
def predict(
    model: nn.Module,
    x: Tensor,
    batch_size: int = 256,
    device: str = "cpu",
    lengths: Optional[Tensor] = None,
    amp: Optional[str] = None,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """The model's outputs (logits or regression values) for all of ``x``, in eval mode, as
    float32; ``lengths``: each clip's valid frames (None: all); ``mask (N, T)``: the frame mask
    (bool, True = valid; None: every frame); ``amp``: the forward runs under
    :func:`amp_autocast` (``"bf16"`` or ``"fp16"``; None: float32)."""
    was = model.training
    model.eval()
    outs = []
    for i in range(0, x.shape[0], batch_size):
        lb = None if lengths is None else lengths[i : i + batch_size].to(device)
        mb = None if mask is None else mask[i : i + batch_size].to(device)
        with amp_autocast(device, amp):
            out = _output(_call(model, x[i : i + batch_size].to(device), lb, mb))
        outs.append(out.float().cpu())
    model.train(was)
    return torch.cat(outs) if outs else torch.empty(0)


def target_names_for(n: int) -> List[str]:
    """Default regression target names: valence and arousal for two, else t0, t1, ..."""
    return ["valence", "arousal"] if n == 2 else [f"t{i}" for i in range(n)]


def _metrics(p: Tensor, t: Tensor, task: str, target_names=None) -> Dict[str, float]:
    if task == "classification":
        return {"war": war(p, t), "uar": uar(p, t, p.shape[-1])}
    names = target_names or target_names_for(t.shape[-1])
    c = ccc(p, t.float())
    out = {f"ccc_{n}": float(v) for n, v in zip(names, c)}
    out["ccc_mean"] = float(c.mean())
    return out


def evaluate(
    model: nn.Module,
    x: Tensor,
    t: Tensor,
    task: str = "classification",
    device: str = "cpu",
    lengths: Optional[Tensor] = None,
    target_names: Optional[Sequence[str]] = None,
    loss: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    amp: Optional[str] = None,
    mask: Optional[Tensor] = None,
) -> Dict[str, float]:
    """``{"war", "uar"}`` (classification) or ``{"ccc_<target>", ..., "ccc_mean"}``
    (regression; targets named ``target_names``, default valence/arousal for two). With
    ``loss`` (a function of the outputs and ``t``), also ``"loss"``: its value on the same
    outputs (one pass over ``x``; computed in float32). ``amp``, ``mask``: as for
    :func:`predict`."""
    p = predict(model, x, device=device, lengths=lengths, amp=amp, mask=mask)
    out = _metrics(p, t, task, target_names)
    if loss is not None:
        out["loss"] = float(loss(p, t))
    return out


def detailed_metrics(
    pred: Tensor,
    t: Tensor,
    task: str,
    class_names: Optional[Sequence[str]] = None,
    target_names: Optional[Sequence[str]] = None,
) -> Dict[str, object]:
    """What ``lsef eval`` reports for one condition: WAR, UAR, per-class recall and the
    confusion matrix (rows: true class, columns: predicted), or CCC per target and their mean."""
    out: Dict[str, object] = dict(_metrics(pred, t, task, target_names))
    if task == "classification":
        K = pred.shape[-1]
        names = list(class_names) if class_names else [str(i) for i in range(K)]
        cm = torch.zeros(K, K, dtype=torch.long)
        cm.index_put_((t.long(), pred.argmax(-1)), torch.ones_like(t, dtype=torch.long), True)
        out["recall"] = {
            names[c]: (float(cm[c, c] / cm[c].sum()) if cm[c].sum() else None) for c in range(K)
        }
        out["confusion"] = cm.tolist()
        out["n"] = int(t.numel())
    return out


def evaluate_conditions(
    model: nn.Module,
    cfg: TrainConfig,
    conditions: Sequence[str] = CONDITIONS,
    test_sets: Optional[Dict[str, Tuple[Tensor, ...]]] = None,
    device: Union[str, torch.device, None] = None,
) -> Dict[str, Dict[str, float]]:
    """``{condition: evaluate(...)}``: the metrics of ``model`` on the test set of each of
    ``conditions`` (names in ``CONDITIONS``), in that order; under ``"frame_drop_known"`` the
    model is given the mask of the dropped frames (a ClipSet's ``mask``).

    A condition's test set is taken from ``test_sets`` (as :func:`load_test_sets` returns) when
    it is there, else loaded with ``load_data(cfg, "test", corruption)``; ``cfg.task`` picks the
    metrics and ``cfg.amp`` the precision of the forward (:func:`amp_autocast`; pass
    ``dataclasses.replace(cfg, amp=None)`` for float32). ``device``: where to run the model;
    default, where its parameters are."""
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    out = {}
    for c in conditions:
        data = (
            test_sets[c]
            if test_sets is not None and c in test_sets
            else load_test_sets(cfg, (c,))[c]
        )
        x, t = data[0], data[1]
        lengths = data.lengths if isinstance(data, ClipSet) else None
        mask = data.mask if isinstance(data, ClipSet) else None
        out[c] = evaluate(model, x, t, cfg.task, device, lengths, amp=cfg.amp, mask=mask)
    return out


def corrupted_average(metrics: Dict[str, Dict[str, float]], key: str = "war") -> float:
    """The mean of ``metrics[c][key]`` over the corruptions ``c`` in ``CORRUPTIONS``
    (``metrics`` as :func:`evaluate_conditions` returns). ``frame_drop_known`` is left out:
    it is frame drop again, with the model told which frames; counting it would weigh frame
    drop twice and make the average depend on whether a model can take a mask, so the average
    stays comparable with runs (and models) without it."""
    return sum(metrics[c][key] for c in CORRUPTIONS) / len(CORRUPTIONS)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _build(spec: Dict[str, object], ops: str = "ext") -> nn.Module:
    kw = dict(spec.get("kwargs") or {})
    if spec["task"] == "regression":
        kw["num_targets"] = spec["num_targets"]
    return build_model(
        spec["name"], spec["d_in"], spec["num_classes"], task=spec["task"], ops=ops, **kw
    )


def _class_weights(cfg: "TrainConfig", t: Tensor, num_classes: int) -> Optional[Tensor]:
    """Cross-entropy class weights: ``n / (K · n_c)`` for ``cfg.class_weights == "balanced"``
    (a class absent from training gets weight 0), else None."""
    if cfg.class_weights is None or cfg.task != "classification":
        return None
    if cfg.class_weights != "balanced":
        raise ValueError(
            f"TrainConfig: class_weights must be None or 'balanced', got {cfg.class_weights!r}"
        )
    counts = torch.bincount(t.long(), minlength=num_classes).double()
    w = torch.where(counts > 0, t.numel() / (num_classes * counts.clamp_min(1)), 0.0)
    return w.float()


def _check_format(state, path: str, prefix: str = "") -> None:
    if not isinstance(state, dict):
        raise RunError(f"{prefix}{path} is not a checkpoint of lsef train (not a dictionary)")
    fmt = state.get("format")
    if fmt != CHECKPOINT_FORMAT:
        was = "an older lsef_ext (no format number)" if fmt is None else f"format {fmt!r}"
        raise RunError(
            f"{prefix}{path} was written by {was}; this lsef_ext reads checkpoint format "
            f"{CHECKPOINT_FORMAT} (lsef train writes it): train the model again"
        )


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns."""

    model: nn.Module  # rebuilt, weights loaded, in eval mode
    config: Dict[str, object]  # the TrainConfig of the run, as a dictionary
    meta: Dict[str, object]  # frames, class_names, target_names, norm, D, val
    epoch: int
    best: Optional[Dict[str, object]]
    versions: Dict[str, str]


def load_checkpoint(path: str, device: str = "cpu", ops: str = "ext") -> Checkpoint:
    """Rebuilds the model of a checkpoint written by :class:`Trainer` (``checkpoint.pt`` or
    ``best.pt``) from the file alone, weights loaded (``weights_only=True``: nothing in the file
    can run code). A missing file raises FileNotFoundError; a damaged, foreign or old one
    :class:`RunError` naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise RunError(
            f"cannot read checkpoint {path} ({_why(e)}); it is damaged, or it was not written "
            "by lsef train"
        ) from e
    _check_format(state, path)
    missing = {"config", "model_spec", "meta", "model", "epoch"} - set(state)
    if missing:
        raise RunError(
            f"{path} is not a checkpoint of lsef train (missing {', '.join(sorted(missing))})"
        )
    try:
        model = _build(state["model_spec"], ops)
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise RunError(f"checkpoint {path}: cannot rebuild its model ({_why(e)})") from e
    model.to(device).eval()
    return Checkpoint(
        model,
        state["config"],
        state["meta"],
        state["epoch"],
        state.get("best"),
        state.get("versions", {}),
    )


def _loss_key(loss) -> float:
    """A val loss for comparisons: NaN (or none recorded, as in older checkpoints) as +inf, so
    that it never wins over a number."""
    return float("inf") if loss is None or loss != loss else float(loss)


def _last_gain(best: Dict[str, object]) -> int:
    """The epoch of the last strict gain (a higher score, or an equal one with a lower val
    loss): what ``patience`` counts from (older checkpoints: the best epoch)."""
    return int(best.get("gained", best["epoch"]))


def select_best(
    best: Optional[Dict[str, object]], epoch: int, metric: str, score: float, val_loss: float
) -> Optional[Dict[str, object]]:
    """The rule behind ``best.pt``: ``best`` (the record so far, or None) or, where epoch
    ``epoch`` (val ``score`` of ``metric``, val loss ``val_loss``) is to replace it, a new
    record ``{"epoch", "metric", "score", "val_loss", "reason", "gained"}``.

    A higher score wins. An equal score is decided by the val loss, lower wins (a saturated
    score, e.g. a val WAR of 100 % from the first epoch on, would otherwise keep the first,
    undertrained epoch); equal in both, the later epoch wins. A NaN score never wins, nor
    becomes the first best; a NaN val loss loses to any number. ``reason`` says which of these
    chose the epoch; ``gained`` is the epoch of the last strict gain (higher score, or equal
    with lower val loss), from which ``patience`` counts: an epoch that only ties in both
    replaces the checkpoint but does not restart the count."""
    if score != score:
        return best
    record = {"epoch": epoch, "metric": metric, "score": score, "val_loss": val_loss}
    if best is None:
        return {**record, "reason": f"first {metric}", "gained": epoch}
    if score > best["score"]:
        return {**record, "reason": f"higher {metric}", "gained": epoch}
    if score < best["score"]:
        return best
    now, was = _loss_key(val_loss), _loss_key(best.get("val_loss"))
    if now < was:
        return {**record, "reason": f"equal {metric}, lower val loss", "gained": epoch}
    if now == was:
        reason = f"equal {metric} and val loss, later epoch"
        return {**record, "reason": reason, "gained": _last_gain(best)}
    return best


class Trainer:
    """Trains one model on one data set; under torchrun, with DistributedDataParallel.

    ``fit()`` runs ``cfg.epochs`` epochs of AdamW (wrapped in :class:`lsef_ext.optim.RAO` when
    ``cfg.rao``) with a cosine learning-rate schedule, the task loss (cross-entropy, class-weighted
    with ``cfg.class_weights="balanced"``, or MSE plus ``1 − CCC``) plus the model's consistency
    regulariser (LSEF models), and records one row of metrics per epoch. ``train`` is ``(x, t,
    num_classes[, lengths[, mask]])`` (a :class:`ClipSet`), ``val`` ``(x, t[, lengths])`` or a
    ClipSet; a ClipSet's frame ``mask`` reaches the model in every training and val forward
    (``model(x, lengths, mask=mask)``). Each epoch records the val score and the val loss
    (:meth:`task_loss`), from one pass over val. With ``cfg.out`` it writes ``checkpoint.pt`` after
    every epoch, ``best.pt`` whenever the val score (``cfg.select``: WAR or UAR; mean CCC for
    regression) improves, or stays equal with a lower val loss, or stays equal with an equal val
    loss (the later epoch is kept; :func:`select_best`, whose record ``best`` says which epoch and
    why), and ``metrics.csv`` / ``metrics.json``; ``cfg.resume`` continues from ``checkpoint.pt``,
    writing the metrics files again from its history first, and starts from epoch 0 (with
    ``resumed`` False and the line ``resume_note``) where ``out`` holds no run files at all.
    ``cfg.patience``: stop once that many epochs have passed without a higher val score or an equal
    one with a lower val loss. ``cfg.amp`` (``"bf16"``, or ``"fp16"`` on CUDA with a GradScaler,
    whose state is checkpointed): the forward and loss of each step, and the val forward, run under
    :func:`amp_autocast` (see :meth:`train_step`). ``net`` is the last epoch's model; ``best.pt``
    holds the best one. ``meta`` (from :func:`prepare_data`) is saved in every checkpoint, so that
    :func:`load_checkpoint` rebuilds the model and its inputs from the file alone.

    Before anything is built, :func:`check_run_folder` checks ``cfg.out``: a folder that
    cannot be written, or that holds a run while neither ``cfg.resume`` nor ``cfg.overwrite``
    is set, raises :class:`RunError`. A resumed run must match its checkpoint in
    ``RESUME_IDENTITY`` (always) and in ``RESUME_SETTINGS`` (unless ``cfg.accept_changes``,
    when the new learning rate and weight decay take effect from the next step); a damaged or
    foreign checkpoint, or one whose tensors do not fit this model, raises :class:`RunError`
    naming the file.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        train: Tuple[Tensor, ...],
        val: Optional[Tuple[Tensor, ...]] = None,
        progress: bool = True,
        desc: Optional[str] = None,
        meta: Optional[Dict[str, object]] = None,
    ):
        from .optim import RAO

        self.cfg, self.progress, self.desc = cfg, progress, desc or cfg.model
        self.rank, self.world, local = distributed_env()
        _check_config(cfg)
        # resume_note: the line saying a resume had nothing to resume (then resumed is False)
        self.resume_note = check_run_folder(cfg, write_test=self.rank == 0)
        self.resumed = False
        self.distributed = self.world > 1
        self.device = torch.device(cfg.device)
        if self.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cuda":
                self.device = torch.device("cuda", local)
                torch.cuda.set_device(self.device)
        self.x, self.t, self.num_classes = train[0], train[1], int(train[2])
        self.lengths = train[3] if len(train) > 3 else None
        self.mask = train[4] if len(train) > 4 else None
        if val is not None:  # (x, t), (x, t, lengths) or a ClipSet (x, t, n, lengths, mask)
            vmask = val.mask if isinstance(val, ClipSet) else None
            vlen = val.lengths if isinstance(val, ClipSet) else val[2] if len(val) > 2 else None
            val = (val[0], val[1], vlen, vmask)
        self.val = val
        self.meta = dict(meta or {})
        if cfg.task == "regression":
            self.meta.setdefault("target_names", target_names_for(self.t.shape[-1]))
        self.loss_weight = _class_weights(cfg, self.t, self.num_classes)
        torch.manual_seed(cfg.seed)
        kwargs = dict(cfg.extra)
        if cfg.model.startswith("lsef"):
            kwargs.update(d_model=cfg.d_model, rank=cfg.rank)
        # everything build_model needs, saved in every checkpoint (load_checkpoint rebuilds it)
        self.model_spec = {
            "name": cfg.model,
            "d_in": int(self.x.shape[-1]),
            "num_classes": self.num_classes if cfg.task == "classification" else 2,
            "num_targets": int(self.t.shape[-1]) if cfg.task == "regression" else 2,
            "task": cfg.task,
            "kwargs": kwargs,
        }
        model = _build(self.model_spec, cfg.ops)
        self.model = model.to(self.device)
        if self.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        inner = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.opt = RAO(inner, rank=cfg.rank, ops=cfg.ops, **cfg.rao_options) if cfg.rao else inner
        self._inner = inner
        # fp16: the loss is scaled before backward and the gradients unscaled before the step
        # (which is skipped where they hold Inf or NaN); bf16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        self.steps_per_epoch = math.ceil(self.x.shape[0] / (cfg.batch_size * self.world))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            inner,
            lambda s: (
                0.5
                * (1 + math.cos(math.pi * min(s / max(cfg.epochs * self.steps_per_epoch, 1), 1.0)))
            ),
        )
        self.epoch = 0
        self.history: List[Dict[str, float]] = []
        # best.pt's record: {"epoch", "metric", "score", "val_loss", "reason", "gained"}
        self.best: Optional[Dict[str, object]] = None
        if cfg.resume and self.resume_note is None:
            self.load()

    # -- checkpoints ------------------------------------------------------------------------
    def _ckpt_path(self) -> Optional[str]:
        return os.path.join(self.cfg.out, "checkpoint.pt") if self.cfg.out else None

    def state(self) -> Dict[str, object]:
        """The checkpoint: the run (config, epoch, history, optimiser, scheduler, GradScaler
        (``--amp fp16``; else None) and RNG state, to resume it) and everything
        :func:`load_checkpoint` needs to rebuild the model alone (``model_spec``, ``meta``:
        frames, class and target names, normalisation statistics; the library and torch
        versions)."""
        from . import __version__

        return {
            "format": CHECKPOINT_FORMAT,
            "versions": {"lsef_ext": str(__version__), "torch": str(torch.__version__)},
            "config": asdict(self.cfg),
            "model_spec": self.model_spec,
            "meta": self.meta,
            "epoch": self.epoch,
            "history": self.history,
            "best": self.best,
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def save(self, name: str = "checkpoint.pt") -> None:
        if not self.cfg.out or self.rank != 0:
            return
        os.makedirs(self.cfg.out, exist_ok=True)
        path = os.path.join(self.cfg.out, name)
        tmp = path + ".tmp"
        torch.save(self.state(), tmp)
        os.replace(tmp, path)

    def load(self) -> None:
        path = self._ckpt_path()
        if path is None or not os.path.isfile(path):
            raise FileNotFoundError(
                f"resume: no checkpoint at {path} (pass --out of an earlier run)"
            )
        # weights_only: a checkpoint is data (tensors, numbers, strings, lists and dicts), and
        # unpickling anything else could run code from the file.
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:
            raise RunError(
                f"resume: cannot read checkpoint {path} ({_why(e)}); "
                "it is damaged, or it was not written by lsef train"
            ) from e
        _check_format(state, path, "resume: ")
        missing = {"config", "epoch", "history", "model", "optimizer", "scheduler", "rng"} - (
            set(state) if isinstance(state, dict) else set()
        )
        if missing:
            raise RunError(
                f"resume: {path} is not a checkpoint of lsef train (missing "
                f"{', '.join(sorted(missing))})"
            )
        saved, epoch, history = state["config"], state["epoch"], state["history"]
        if not (
            isinstance(saved, dict)
            and isinstance(epoch, int)
            and epoch >= 0
            and isinstance(history, list)
            and all(isinstance(row, dict) for row in history)
        ):
            raise RunError(
                f"resume: {path} is not a checkpoint of lsef train (its config, epoch or "
                f"history is not what lsef train writes: {type(saved).__name__}, "
                f"{type(epoch).__name__} {epoch!r}, {type(history).__name__})"
            )
        saved = {**_SETTING_DEFAULTS, **saved}
        for key in RESUME_IDENTITY:
            if saved.get(key) != getattr(self.cfg, key):
                raise RunError(
                    f"resume: checkpoint {path} has {key}={saved.get(key)!r}, this run "
                    f"has {key}={getattr(self.cfg, key)!r}"
                )
        keys = RESUME_SETTINGS + (RESUME_SYNTHETIC if not self.cfg.data else ())
        changed = [
            k for k in keys if k in saved and not _same_setting(k, saved[k], getattr(self.cfg, k))
        ]
        if changed and not self.cfg.accept_changes:
            was = ", ".join(f"{k}={saved[k]!r}" for k in changed)
            now = ", ".join(f"{k}={getattr(self.cfg, k)!r}" for k in changed)
            raise RunError(
                f"resume: checkpoint {path} was trained with {was}; this run has {now}. "
                "Resume with the checkpoint's values, or pass --accept-changes "
                "(accept_changes=True) to continue with the new ones"
            )
        try:
            _unwrap(self.model).load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):  # else a fresh scale
                self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"])
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise RunError(f"resume: checkpoint {path} does not fit this run ({_why(e)})") from e
        if changed:  # accepted: the new learning rate and weight decay apply from here on
            self.sched.base_lrs = [self.cfg.lr] * len(self._inner.param_groups)
            factor = self.sched.lr_lambdas[0](self.sched.last_epoch)
            for group in self._inner.param_groups:
                group["initial_lr"] = self.cfg.lr
                group["lr"] = self.cfg.lr * factor
                group["weight_decay"] = self.cfg.weight_decay
            self.sched._last_lr = [g["lr"] for g in self._inner.param_groups]
        self.epoch, self.history = epoch, history
        self.best = state.get("best")
        self.resumed = True
        # The metrics files are written again from the checkpoint's history at once: a write
        # cut short (an empty metrics.json) or one that missed the last epoch is mended even
        # when no epoch is left to train.
        self.write_metrics()

    def write_metrics(self) -> None:
        if not self.cfg.out or self.rank != 0 or not self.history:
            return
        os.makedirs(self.cfg.out, exist_ok=True)
        # Each file is written beside its final name and then renamed over it: a run killed
        # mid-write leaves the previous complete file, never a truncated one.
        path = os.path.join(self.cfg.out, "metrics.json")
        with open(path + ".tmp", "w") as f:
            json.dump(
                {"config": asdict(self.cfg), "best": self.best, "history": self.history},
                f,
                indent=2,
            )
        os.replace(path + ".tmp", path)
        keys = list(dict.fromkeys(k for row in self.history for k in row))  # every row's keys
        path = os.path.join(self.cfg.out, "metrics.csv")
        with open(path + ".tmp", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)
        os.replace(path + ".tmp", path)

    # -- the loop ---------------------------------------------------------------------------
    def task_loss(self, pred: Tensor, t: Tensor) -> Tensor:
        """The task's loss of outputs ``pred`` against targets ``t``: cross-entropy (with the
        run's class weights) or MSE plus ``1 − CCC``; the training loss adds the model's
        consistency regulariser, and the val loss (``val_loss``) is this alone. Outputs in
        bfloat16 or float16 (``--amp``) are taken up to float32 first: the class weights, the
        targets and CCC's moments are not rounded to the outputs' dtype."""
        if pred.dtype in (torch.bfloat16, torch.float16):
            pred = pred.float()
        if self.cfg.task == "classification":
            w = None if self.loss_weight is None else self.loss_weight.to(pred.device, pred.dtype)
            return F.cross_entropy(pred, t.to(pred.device), weight=w)
        t = t.to(pred.device, pred.dtype)
        return F.mse_loss(pred, t) + (1 - ccc(pred, t)).mean()

    def _loss(self, out, t: Tensor) -> Tensor:
        loss = self.task_loss(_output(out), t)
        model = _unwrap(self.model)
        if isinstance(model, LSEF):
            loss = loss + model.regulariser(out)
        return loss

    def train_step(
        self, xb: Tensor, tb: Tensor, lb: Optional[Tensor] = None, mb: Optional[Tensor] = None
    ) -> float:
        """One optimisation step on a batch (``lb``: its clips' valid frames; ``mb``: its frame
        mask); returns the loss.

        With ``cfg.amp`` the forward and the loss run under :func:`amp_autocast` and the
        backward outside it (PyTorch's AMP recipe); the parameters, their gradients and the
        optimizer state stay float32. ``"fp16"`` scales the loss with the GradScaler and
        unscales the gradients before the optimizer (RAO, where on, so scales true gradients)
        steps; a step whose gradients hold Inf or NaN is skipped and the scale lowered."""
        with amp_autocast(self.device, self.cfg.amp):
            loss = self._loss(_call(self.model, xb, lb, mb), tb)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)  # RAO shares the inner optimizer's param_groups
            self.scaler.step(self.opt)
            self.scaler.update()
        self.sched.step()
        return float(loss.detach())

    def fit(self) -> List[Dict[str, float]]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed * 9973 + 1)
        for _ in range(self.epoch):  # a resumed run continues the shuffling sequence
            torch.randperm(self.x.shape[0], generator=g)
        while self.epoch < cfg.epochs:
            perm = torch.randperm(self.x.shape[0], generator=g)
            if self.distributed:
                # Every rank takes the same number of steps (DDP all-reduces in every backward):
                # the permutation is wrapped around to world * steps * batch indices, as
                # DistributedSampler pads, and each rank takes a contiguous share.
                per_rank = self.steps_per_epoch * cfg.batch_size
                perm = perm[torch.arange(self.world * per_rank) % perm.numel()]
                mine = perm[self.rank * per_rank : (self.rank + 1) * per_rank]
            else:
                mine = perm
            t0, total, n = time.perf_counter(), 0.0, 0
            bar = tqdm(
                range(0, mine.numel(), cfg.batch_size),
                leave=False,
                dynamic_ncols=True,
                desc=f"{self.desc} epoch {self.epoch + 1}/{cfg.epochs}",
                disable=None if self.progress and self.rank == 0 else True,
            )
            self.model.train()
            for i in bar:
                idx = mine[i : i + cfg.batch_size]
                lb = None if self.lengths is None else self.lengths[idx].to(self.device)
                mb = None if self.mask is None else self.mask[idx].to(self.device)
                xb, tb = self.x[idx].to(self.device), self.t[idx].to(self.device)
                # mb only where there is one: a train_step overridden with the older
                # (xb, tb, lb) signature keeps working
                args = (xb, tb, lb) if mb is None else (xb, tb, lb, mb)
                loss = self.train_step(*args)
                total, n = total + loss * idx.numel(), n + idx.numel()
                bar.set_postfix(loss=f"{loss:.3f}")
            bar.close()
            self.epoch += 1
            row = {
                "epoch": self.epoch,
                "loss": total / max(n, 1),
                "seconds": time.perf_counter() - t0,
            }
            improved = False
            if self.val is not None:
                vx, vt, vlen, vmask = self.val
                scores = evaluate(
                    _unwrap(self.model),
                    vx,
                    vt,
                    cfg.task,
                    self.device,
                    vlen,
                    self.meta.get("target_names"),
                    loss=self.task_loss,
                    amp=cfg.amp,
                    mask=vmask,
                )
                row.update({f"val_{k}": v for k, v in scores.items()})
                metric = cfg.select if cfg.task == "classification" else "ccc_mean"
                best = select_best(
                    self.best, self.epoch, f"val_{metric}", scores[metric], scores["loss"]
                )
                improved = best is not self.best
                self.best = best
            self.history.append(row)
            if improved:
                self.save("best.pt")
            self.save()
            self.write_metrics()
            if self.progress and self.rank == 0:  # one line per epoch, terminal or not
                print(self._epoch_line(row) + ("  (best)" if improved else ""), flush=True)
            if (
                cfg.patience is not None
                and self.best is not None
                and self.epoch - _last_gain(self.best) >= cfg.patience
            ):
                if self.progress and self.rank == 0:
                    print(
                        f"{self.desc}: early stop after epoch {self.epoch}: no better "
                        f"{self.best['metric']} (nor an equal one with a lower val loss) for "
                        f"{cfg.patience} epochs (best: epoch {self.best['epoch']}, "
                        f"{self.best['score']:.4f})",
                        flush=True,
                    )
                self.stopped_early = True
                break
        return self.history

    stopped_early = False

    def _epoch_line(self, row: Dict[str, float]) -> str:
        parts = [f"{self.desc} epoch {row['epoch']}/{self.cfg.epochs}", f"loss {row['loss']:.4f}"]
        for key, value in row.items():
            if key.startswith("val_"):
                name = key[4:]
                if name in ("war", "uar"):
                    parts.append(f"val {name.upper()} {100 * value:.1f}%")
                else:
                    parts.append(f"val {name} {value:.4f}")
        parts.append(f"{row['seconds']:.1f} s")
        return "  ".join(parts)

    @property
    def net(self) -> nn.Module:
        """The trained model (without the DDP wrapper)."""
        return _unwrap(self.model)
