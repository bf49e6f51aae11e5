"""Data for LSEF: an embedded synthetic data set and a loader for real pre-extracted features.

``SyntheticAffect`` generates clips ``X (T, D)`` the way LSEF models video affect
(docs/DESIGN.md §11):

    X = tone_c + nuisance + events_c + noise

* ``tone_c``: a class-specific **low-rank** part. Each class owns one of ``N_TONES`` tone
  subspaces (``TONE_RANK`` orthonormal directions in feature space); a clip mixes them with
  coefficients that drift slowly over time (a smooth random walk), so its rank is ``TONE_RANK``.
* ``nuisance``: a second low-rank part that carries no label (who the subject is, lighting): a
  random mix of ``NUISANCE_RANK`` directions shared by all classes, constant plus a slow drift.
* ``events_c``: class-specific **sparse** transients. Each class owns one of ``N_EVENTS`` event
  patterns, a set of ``EVENT_CHANNELS`` channels with fixed signs; a clip holds one or two
  events of that pattern, each lasting two frames (an onset frame and a weaker decay frame).
* ``noise``: i.i.d. Gaussian.

A class is a (tone, event) pair and no two classes share both, while several share one: the
tone alone or the event alone cannot tell all classes apart (``CLASS_PAIRS``). Valence and
arousal targets (for regression) are the class's position on Russell's circumplex scaled by the
clip's event intensity.

Test-time corruptions (``corrupt``): ``frame_drop`` (frames zeroed, as a failed face detection
leaves them), ``impulse`` (a fraction of entries replaced by large spikes) and ``gaussian``
(extra i.i.d. noise). The test condition ``frame_drop_known`` drops the same frames and tells
the model which (a frame mask, ``mask``); ``frame_drop`` does not.

``FeatureFolder`` reads real pre-extracted features (DFEW/FERV39k-style): see its docstring.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .ops import _check_int, _check_number, _check_tensor

__all__ = [
    "CLASS_NAMES",
    "CLASS_PAIRS",
    "CORRUPTIONS",
    "MASKED_CONDITIONS",
    "CONDITIONS",
    "MISSING_FRAMES",
    "SyntheticAffect",
    "FeatureFolder",
    "AUTO_FRAMES_CAP",
    "corrupt",
    "told_mask",
    "channel_stats",
    "standardise",
    "stratified_split",
    "read_ts",
    "ts_to_feature_folder",
    "background_video",
]

CLASS_NAMES = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
N_TONES, TONE_RANK = 4, 2
N_EVENTS, EVENT_CHANNELS = 3, 6
NUISANCE_RANK = 3
# Magnitudes, relative to a feature scale of 1 per entry: the class tone is weak next to the
# nuisance tone, and an event is a few noise standard deviations high on its channels.
TONE_GAIN, NUISANCE_GAIN, EVENT_GAIN, NOISE = 0.6, 2.0, 1.2, 0.5
# (tone, event) of each class: unique pairs, each tone and each event shared by several classes.
CLASS_PAIRS = ((0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 0), (3, 1))
# Russell's circumplex, (valence, arousal) per class, in [-1, 1].
_CIRCUMPLEX = (
    (0.8, 0.5),
    (-0.7, -0.4),
    (0.0, 0.0),
    (-0.6, 0.8),
    (0.3, 0.9),
    (-0.7, 0.3),
    (-0.6, 0.7),
)
CORRUPTIONS = ("frame_drop", "impulse", "gaussian")
# Test conditions that apply a corruption and tell the model which frames it dropped (the
# frame mask): frame drop is tested twice, the model told (here) and not told ("frame_drop").
# Not a corruption of its own: the corrupted average (lsef_ext.train) leaves it out.
MASKED_CONDITIONS = {"frame_drop_known": "frame_drop"}
# The test conditions: the clean test set and each corruption of it, frame drop twice.
CONDITIONS = ("clean", "frame_drop", "frame_drop_known", "impulse", "gaussian")
# FeatureFolder's missing_frames: None (a NaN anywhere is an error) or "nan" (a frame that is
# NaN in every channel is a missing frame).
MISSING_FRAMES = (None, "nan")
_SPLIT_OFFSETS = {"train": 1, "val": 2, "test": 3}
# frames="auto": the longest clip's length, up to this many frames.
AUTO_FRAMES_CAP = 256


@dataclass(frozen=True)
class _World:
    """The fixed prototypes shared by every split of one ``seed``."""

    tones: Tensor  # (N_TONES, TONE_RANK, D), orthonormal rows per tone
    events: Tensor  # (N_EVENTS, D), sparse sign patterns
    nuisance: Tensor  # (NUISANCE_RANK, D), orthonormal rows


def _world(D: int, seed: int) -> _World:
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    need = N_TONES * TONE_RANK + NUISANCE_RANK
    if D < need or D < N_EVENTS * EVENT_CHANNELS:
        raise ValueError(
            f"SyntheticAffect: D must be >= {max(need, N_EVENTS * EVENT_CHANNELS)}, got {D}"
        )
    # One orthonormal frame for all tone and nuisance directions: they are mutually orthogonal.
    Q = torch.linalg.qr(torch.randn(D, need, generator=g, dtype=torch.float64))[0].T
    tones = Q[: N_TONES * TONE_RANK].reshape(N_TONES, TONE_RANK, D)
    nuisance = Q[N_TONES * TONE_RANK :]
    perm = torch.randperm(D, generator=g)
    events = torch.zeros(N_EVENTS, D, dtype=torch.float64)
    for e in range(N_EVENTS):  # disjoint channel sets
        ch = perm[e * EVENT_CHANNELS : (e + 1) * EVENT_CHANNELS]
        events[e, ch] = torch.where(
            torch.rand(EVENT_CHANNELS, generator=g) < 0.5, -1.0, 1.0
        ).double()
    return _World(tones.float(), events.float(), nuisance.float())


def _smooth_walk(n: int, T: int, r: int, step: float, g: torch.Generator) -> Tensor:
    """(n, T, r) random walks started at 0, normalised to unit step std."""
    return torch.cumsum(torch.randn(n, T, r, generator=g), dim=1) * step


def background_video(
    frames: int = 400,
    height: int = 24,
    width: int = 32,
    seed: int = 0,
    noise: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> Tuple[Tensor, Tensor, Tensor]:
    """A surveillance-style grey-level video, robust PCA's classic task (Candes, Li, Ma &
    Wright 2011, Sec. 4.1): a static scene under slowly changing light (rank 3: three fixed
    patterns, each with its own slow gain over time) and, on top, a bright 4 x 4 object moving
    along a wavy path and a dark 3 x 3 one that moves down the left of the frame in every other
    spell of 50 frames; plus, with ``noise``, Gaussian noise of that standard deviation.

    Returns ``(X, L, S)``, each ``(frames, height * width)`` (a frame per row): the video, its
    background and its foreground, ``X = L + S`` (+ the noise)."""
    _check_int("background_video", "frames", frames, 1)
    _check_int("background_video", "height", height, 4)
    _check_int("background_video", "width", width, 5)
    _check_number("background_video", "noise", noise)
    if not (noise >= 0 and math.isfinite(noise)):
        raise ValueError(f"background_video: noise must be a finite number >= 0, got {noise}")
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.linspace(0, 1, height, dtype=torch.float64),
        torch.linspace(0, 1, width, dtype=torch.float64),
        indexing="ij",
    )
    phase = 6.283 * torch.rand(3, generator=g, dtype=torch.float64)
    patterns = torch.stack(
        [
            0.5 + 0.3 * torch.sin(3 * xx + phase[0]) * torch.cos(2 * yy + phase[1]),
            xx * yy,
            0.2 * torch.rand(height, width, generator=g, dtype=torch.float64),
        ]
    ).flatten(1)
    t = torch.arange(frames, dtype=torch.float64)
    light = 1 + 0.2 * torch.sin(t / 40 + phase[2])
    gains = torch.stack([light, 0.3 * torch.cos(t / 25), 0.5 + 0.1 * torch.sin(t / 60)], dim=1)
    L = gains @ patterns
    F = torch.zeros(frames, height, width, dtype=torch.float64)
    for i in range(frames):
        x = int(i * 0.7) % (width - 4)
        y = int(height / 2 + (height / 3) * math.sin(i / 15)) % (height - 4)
        F[i, y : y + 4, x : x + 4] = 0.8
        if (i // 50) % 2 == 1:
            r = (i // 3) % (height - 3)
            F[i, r : r + 3, 2:5] = -0.6
    S = F.flatten(1)
    X = L + S
    if noise:
        X = X + noise * torch.randn(X.shape, generator=g, dtype=torch.float64)
    return X.to(dtype), L.to(dtype), S.to(dtype)


def corrupt(
    x: Tensor,
    kind: Optional[str],
    severity: float = 1.0,
    generator: Optional[torch.Generator] = None,
    return_mask: bool = False,
):
    """A corrupted copy of clips ``x (*, T, D)``.

    ``frame_drop``: each frame zeroed with probability ``0.3·severity``. ``impulse``: a fraction
    ``0.05·severity`` of entries replaced by ``±4`` (several times the clean features' RMS).
    ``gaussian``: i.i.d. noise of standard deviation ``0.6·severity`` added. ``None``: a copy.

    ``return_mask``: returns ``(copy, kept)`` with ``kept (*, T)`` bool, False at the frames
    ``frame_drop`` dropped (all True for the other kinds); the copy and the random draws are
    those without it.

    Raises:
        TypeError: ``x`` not a floating-point tensor; ``severity`` not a number.
        ValueError: ``x`` with fewer than 2 dimensions; an unknown ``kind``; ``severity``
            negative or not finite.
    """
    _check_tensor("corrupt", "x", x)
    if not x.dtype.is_floating_point:
        raise TypeError(f"corrupt: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"corrupt: x must have shape (*, T, D), got {tuple(x.shape)}")
    kept = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device) if return_mask else None
    if kind is None or kind == "clean":
        return (x.clone(), kept) if return_mask else x.clone()
    if kind not in CORRUPTIONS:
        raise ValueError(f"corrupt: kind must be one of {CORRUPTIONS} or None, got {kind!r}")
    _check_number("corrupt", "severity", severity)
    if severity < 0:
        raise ValueError(f"corrupt: severity must be >= 0, got {severity}")
    if not math.isfinite(severity):
        raise ValueError(f"corrupt: severity must be finite, got {severity}")
    g = generator
    if kind == "frame_drop":
        keep = torch.rand(*x.shape[:-1], 1, generator=g) >= min(0.3 * severity, 1.0)
        y = x * keep.to(x.dtype)
        return (y, keep[..., 0].to(x.device)) if return_mask else y
    if kind == "impulse":
        hit = torch.rand(x.shape, generator=g) < min(0.05 * severity, 1.0)
        sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -4.0, 4.0).to(x.dtype)
        y = torch.where(hit, sign, x)
    else:
        y = x + 0.6 * severity * torch.randn(x.shape, generator=g, dtype=x.dtype)
    return (y, kept) if return_mask else y


def told_mask(kept: Tensor, base: Optional[Tensor] = None) -> Tensor:
    """The frame mask a model is given under a condition of ``MASKED_CONDITIONS``: the frames
    kept by the corruption (``kept (N, T)`` bool, as :func:`corrupt` returns it) and valid in
    ``base`` (the data's own mask, e.g. FeatureFolder's missing frames; None: all valid). A
    clip that would be left without a valid frame (every one dropped) keeps ``base``'s row
    (all True without one): there is nothing to tell, and the model sees what it sees under
    ``frame_drop``."""
    base = torch.ones_like(kept) if base is None else base
    both = kept & base
    return torch.where(both.any(-1, keepdim=True), both, base)


class _Clips(Dataset):
    """Clips ``x (N, T, D)`` with class labels ``y`` or valence/arousal ``va``, per ``task``, and
    ``mask``: None (every frame valid) or ``(N, T)`` bool, the frame mask to give the model
    (False at missing or known-dropped frames, which hold 0)."""

    x: Tensor
    task: str
    mask: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], (self.y[i] if self.task == "classification" else self.va[i])

    def tensors(self) -> Tuple[Tensor, Tensor]:
        """All clips and targets at once: ``(x, y)`` or ``(x, va)``."""
        return self.x, (self.y if self.task == "classification" else self.va)


class SyntheticAffect(_Clips):
    """Seeded synthetic video-affect clips with planted low-rank tone and sparse transients.

    Args:
        n_clips: number of clips.
        split: ``"train"``, ``"val"`` or ``"test"``; splits of one ``seed`` share the class
            prototypes and draw disjoint clips.
        T, D: frames per clip and feature channels.
        seed: seeds the prototypes and the clips; equal arguments give identical data.
        noise: standard deviation of the clean i.i.d. noise.
        corruption, severity: a test-time corruption applied to every clip (see :func:`corrupt`),
            or a test condition of ``MASKED_CONDITIONS`` (``"frame_drop_known"``: the frames
            ``"frame_drop"`` drops, the same ones, and ``mask`` saying which).
        task: ``"classification"`` (items are ``(x, label)``) or ``"regression"`` (items are
            ``(x, [valence, arousal])``).

    Attributes: ``x (N, T, D)``, ``y (N,)`` class indices, ``va (N, 2)``, the planted parts
    ``low_rank (N, T, D)`` (tone + nuisance) and ``sparse (N, T, D)`` (events) of the clean
    clips, and ``mask``: ``(N, T)`` bool, False at the dropped frames, for a condition of
    ``MASKED_CONDITIONS``; else None (the model is not told).
    """

    num_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES

    def __init__(
        self,
        n_clips: int = 2048,
        split: str = "train",
        T: int = 16,
        D: int = 64,
        seed: int = 0,
        noise: float = NOISE,
        corruption: Optional[str] = None,
        severity: float = 1.0,
        task: str = "classification",
    ):
        if split not in _SPLIT_OFFSETS:
            raise ValueError(
                f"SyntheticAffect: split must be one of {tuple(_SPLIT_OFFSETS)}, got {split!r}"
            )
        if task not in ("classification", "regression"):
            raise ValueError(
                f"SyntheticAffect: task must be 'classification' or 'regression', got {task!r}"
            )
        for name, value in (("n_clips", n_clips), ("T", T), ("D", D), ("seed", seed)):
            _check_int("SyntheticAffect", name, value)
        if n_clips < 1 or T < 4:
            raise ValueError(
                f"SyntheticAffect: need n_clips >= 1 and T >= 4, got n_clips={n_clips}, T={T}"
            )
        _check_number("SyntheticAffect", "noise", noise)
        if not (noise >= 0 and math.isfinite(noise)):
            raise ValueError(f"SyntheticAffect: noise must be a finite number >= 0, got {noise}")
        self.T, self.D, self.task, self.split = T, D, task, split
        world = _world(D, seed)
        g = torch.Generator().manual_seed(seed * 1_000_003 + _SPLIT_OFFSETS[split])
        N = n_clips
        y = torch.randint(0, self.num_classes, (N,), generator=g)
        pairs = torch.tensor(CLASS_PAIRS)
        tone_id, event_id = pairs[y, 0], pairs[y, 1]

        # Low-rank tone: constant mix (norm ~1.2) plus a slow drift, over the class's subspace.
        coef = torch.randn(N, 1, TONE_RANK, generator=g)
        coef = (
            coef
            / coef.norm(dim=-1, keepdim=True)
            * TONE_GAIN
            * (0.8 + 0.4 * torch.rand(N, 1, 1, generator=g))
        )
        coef = coef * math.sqrt(D / 4) + _smooth_walk(N, T, TONE_RANK, 0.15 * math.sqrt(D / 4), g)
        tone = torch.einsum("ntr,nrd->ntd", coef, world.tones[tone_id])
        # Nuisance: same construction over the shared nuisance subspace, larger.
        ncoef = torch.randn(N, 1, NUISANCE_RANK, generator=g) * NUISANCE_GAIN * math.sqrt(D / 4)
        ncoef = ncoef + _smooth_walk(N, T, NUISANCE_RANK, 0.15 * math.sqrt(D / 4), g)
        nuisance = ncoef @ world.nuisance
        # Sparse events: one or two per clip, an onset frame and a decay frame at half height.
        amp = EVENT_GAIN * (0.75 + 0.5 * torch.rand(N, generator=g))  # intensity
        n_ev = 1 + (torch.rand(N, generator=g) < 0.5).long()
        times = torch.zeros(N, T)
        t0 = torch.randint(0, T - 1, (N, 2), generator=g)
        rows = torch.arange(N)
        for j in range(2):
            on = (j < n_ev).float()
            times[rows, t0[:, j]] += on
            times[rows, t0[:, j] + 1] += 0.5 * on
        events = (amp[:, None, None] * times[:, :, None]) * world.events[event_id][:, None, :]
        clean_noise = noise * torch.randn(N, T, D, generator=g)

        self.low_rank = tone + nuisance
        self.sparse = events
        x = self.low_rank + self.sparse + clean_noise
        self.corruption, self.severity = corruption, severity
        self.x = x
        if corruption:
            kind = MASKED_CONDITIONS.get(corruption, corruption)
            self.x, kept = corrupt(x, kind, severity, g, return_mask=True)
            self.mask = told_mask(kept) if corruption in MASKED_CONDITIONS else None
        self.y = y
        circ = torch.tensor(_CIRCUMPLEX)
        intensity = (amp / EVENT_GAIN)[:, None]  # in [0.75, 1.25)
        self.va = (circ[y] * intensity).clamp(-1, 1)


class FeatureFolder(_Clips):
    """Pre-extracted clip features in a folder (e.g. DFEW or FERV39k features from any backbone).

    Layout::

        root/
          labels.csv          # header: clip,label,split   or   clip,<target>,...,split
          features/<clip>.npy # one float array of shape (T, D) per clip

    ``label`` is a class name or an integer index; ``split`` is ``train``, ``val`` or ``test``.
    Class names are mapped to indices in the order given by ``classes`` (default: sorted names,
    or the integers themselves). For ``task="regression"`` the targets are the columns named in
    ``targets`` (default: every column but ``clip``, ``split`` and ``label``, in file order, e.g.
    ``valence,arousal``), any number of them, each a finite number.

    ``split=None`` reads every clip; ``labelled=False`` reads clips without targets (only the
    ``clip`` column is needed; ``y``/``targets`` are then absent), as ``lsef predict`` does.

    Lengths: ``frames=None`` requires every clip to have the same length; ``frames=T`` brings
    every clip to ``T`` frames: longer clips are centre-cropped (``cropped`` counts them),
    shorter ones are zero-padded at the end; ``frames="auto"`` is the longest clip's length, up to
    ``AUTO_FRAMES_CAP``. ``lengths (N,)`` holds each clip's valid frames (after cropping): the
    models take it (``model(x, lengths)``) so that padded frames change no output.

    Missing frames: ``missing_frames=None`` (the default) refuses a NaN anywhere, as below.
    ``missing_frames="nan"`` reads a frame (row) that is NaN in every channel as a missing
    frame (e.g. where face detection failed): its values become 0 and ``mask (N, T)`` (bool)
    is False there, and at padded frames; the models take it (``model(x, lengths, mask=mask)``)
    so that missing frames change no output. A NaN in a frame that is not all NaN, and any
    Inf, stay errors, and so does a clip with no frame left that is not missing (after
    cropping). ``mask`` is None where no clip has a missing frame (after cropping).

    ``labels.csv`` is read as UTF-8 (a byte-order mark is allowed). A clip name is a path
    relative to ``features/`` without ``.npy`` (``subject1/clip3`` is fine); a name that is
    empty, absolute or leads out of ``features/`` (``../x``) is refused. Each feature file is
    checked once, when the folder is loaded: it must be a ``.npy`` array (read without pickle)
    of real numbers (integer or floating; complex is refused rather than having its imaginary
    part dropped), 2-D with ``T, D >= 1``, and finite after conversion to float32 (NaN, Inf, or
    a value beyond float32's range is refused).

    Errors name the file (and the ``labels.csv`` line where one is at fault) and what was
    expected: a missing or unreadable ``labels.csv`` or feature file, a missing column or
    field, a bad clip name, an array that is not 2-D or whose ``D`` differs from the first
    clip's, a non-real or non-finite array (beyond the missing frames that ``missing_frames``
    allows), an unknown split, a label not in ``classes``, or a target that is not a finite
    number. Wrong argument types raise TypeError; an unknown ``missing_frames`` ValueError.
    """

    def __init__(
        self,
        root: str,
        split: Optional[str] = "train",
        frames: Union[int, str, None] = None,
        classes: Optional[Sequence[str]] = None,
        task: str = "classification",
        targets: Optional[Sequence[str]] = None,
        labelled: bool = True,
        missing_frames: Optional[str] = None,
    ):
        if task not in ("classification", "regression"):
            raise ValueError(
                f"FeatureFolder: task must be 'classification' or 'regression', got {task!r}"
            )
        if missing_frames not in MISSING_FRAMES:
            raise ValueError(
                f"FeatureFolder: missing_frames must be None (a NaN is an error) or 'nan' (a "
                f"frame that is all NaN is missing), got {missing_frames!r}"
            )
        if split is not None and split not in _SPLIT_OFFSETS:
            raise ValueError(
                f"FeatureFolder: split must be one of {tuple(_SPLIT_OFFSETS)} or None, got "
                f"{split!r}"
            )
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(
                f"FeatureFolder: root must be a path (str or os.PathLike), got "
                f"{type(root).__name__}"
            )
        if frames is not None and frames != "auto":
            _check_int("FeatureFolder", "frames", frames, 1)
        for name, names in (("classes", classes), ("targets", targets)):
            if names is None:
                continue
            if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
                raise TypeError(
                    f"FeatureFolder: {name} must be a sequence of names, got "
                    f"{type(names).__name__} {names!r}"
                )
            listed = [str(c) for c in names]
            if len(set(listed)) != len(listed):
                twice = sorted({c for c in listed if listed.count(c) > 1})
                raise ValueError(f"FeatureFolder: {name} lists {twice} more than once")
            if not listed:
                raise ValueError(f"FeatureFolder: {name} is empty")
        csv_path = os.path.join(root, "labels.csv")
        if not os.path.isfile(csv_path):
            raise FileNotFoundError(
                f"FeatureFolder: {csv_path} not found (expected a labels CSV with "
                "columns clip,label,split or clip,<target>,...,split)"
            )
        rows, columns = _read_labels(csv_path)
        if labelled and task == "regression":
            if targets is None:
                targets = [c for c in columns if c not in ("clip", "split", "label")]
                if not targets:
                    raise ValueError(
                        f"FeatureFolder: {csv_path} has no target columns (columns: {columns}); "
                        "regression needs clip,<target>,...,split"
                    )
            self.target_names = tuple(str(c) for c in targets)
        need = ["clip"]
        if labelled:
            need += ["split"] + (["label"] if task == "classification" else list(self.target_names))
        elif split is not None:
            need += ["split"]
        missing = [c for c in need if c not in columns]
        if missing:
            raise ValueError(
                f"FeatureFolder: {csv_path} lacks column(s) {missing}; it has {columns}"
            )
        features = os.path.join(root, "features")
        for i, r in enumerate(rows):
            if any(r[c] is None for c in columns) or None in r:  # too few or too many fields
                got = sum(v is not None for k, v in r.items() if k is not None)
                raise ValueError(
                    f"FeatureFolder: {csv_path} line {i + 2}: has "
                    f"{got + len(r.get(None, ()))} fields, expected {len(columns)} "
                    f"({','.join(columns)})"
                )
            _check_clip_name(r["clip"], features, f"{csv_path} line {i + 2}")
            if "split" in columns and r["split"] not in _SPLIT_OFFSETS:
                raise ValueError(
                    f"FeatureFolder: {csv_path} line {i + 2}: unknown split {r['split']!r} "
                    f"(expected one of {tuple(_SPLIT_OFFSETS)})"
                )
        self.task, self.split, self.labelled = task, split, labelled
        if labelled and task == "classification":
            names = [r["label"] for r in rows]
            if classes is None:
                classes = (
                    sorted(set(names), key=int)
                    if all(n.lstrip("-").isdigit() for n in names)
                    else sorted(set(names))
                )
            self.class_names = tuple(str(c) for c in classes)
            index = {c: i for i, c in enumerate(self.class_names)}
            for i, r in enumerate(rows):
                if r["label"] not in index:
                    raise ValueError(
                        f"FeatureFolder: {csv_path} line {i + 2}: label {r['label']!r} "
                        f"is not one of the classes {list(self.class_names)}"
                    )
            self.num_classes = len(self.class_names)
        if split is not None:
            rows = [r for r in rows if r["split"] == split]
        if not rows:
            where = f"in split {split!r}" if split is not None else "listed"
            raise ValueError(f"FeatureFolder: {csv_path} has no clips {where}")
        xs, missing, D = [], [], None
        for r in rows:
            path = os.path.join(features, r["clip"] + ".npy")
            a, gone = _load_features(path, r["clip"], missing_frames)
            missing.append(gone)
            if D is None:
                D = a.shape[1]
            elif a.shape[1] != D:
                raise ValueError(
                    f"FeatureFolder: {path} has D = {a.shape[1]}, but the first clip has D = {D}"
                )
            xs.append(torch.from_numpy(a))
        lengths = [a.shape[0] for a in xs]
        if frames is None and len(set(lengths)) > 1:
            raise ValueError(
                f"FeatureFolder: clips have different lengths {sorted(set(lengths))}; pass "
                "frames=T (crop or pad them to T frames) or frames='auto'"
            )
        if frames is None:
            frames = lengths[0]
        elif frames == "auto":
            frames = min(max(lengths), AUTO_FRAMES_CAP)
        self.frames = frames
        self.cropped = sum(n > frames for n in lengths)
        self.lengths = torch.tensor([min(n, frames) for n in lengths])
        self.x = torch.stack([_fit_frames(a, frames) for a in xs])
        self.mask = None
        if any(gone is not None for gone in missing):
            valid = [
                _fit_frames(torch.ones(n, 1, dtype=torch.bool), frames)[:, 0]
                if gone is None
                else _fit_frames(torch.from_numpy(~gone)[:, None], frames)[:, 0]
                for n, gone in zip(lengths, missing)
            ]
            mask = torch.stack(valid)
            empty = torch.nonzero(~mask.any(1)).flatten().tolist()
            if empty:
                i = empty[0]
                raise ValueError(
                    f"FeatureFolder: {os.path.join(features, rows[i]['clip'] + '.npy')}: all "
                    f"{int(self.lengths[i])} of its frames (after cropping to {frames}) are "
                    "missing (all NaN); a clip needs one frame that is not: drop the clip"
                )
            if not (mask | ~_valid_mask(self.x, self.lengths)[..., 0]).all():
                self.mask = mask  # else every missing frame was cropped away
        self.T, self.D = self.x.shape[1:]
        self.clips = [r["clip"] for r in rows]
        if not labelled:
            return
        if task == "classification":
            self.y = torch.tensor([index[r["label"]] for r in rows])
        else:
            values = []
            for r in rows:
                try:
                    v = tuple(float(r[c]) for c in self.target_names)
                except ValueError as e:
                    raise ValueError(
                        f"FeatureFolder: {csv_path}: clip {r['clip']!r}: targets "
                        f"{list(self.target_names)} must be numbers ({e})"
                    ) from None
                if not all(map(math.isfinite, v)):
                    raise ValueError(
                        f"FeatureFolder: {csv_path}: clip {r['clip']!r}: targets "
                        f"{list(self.target_names)} must be finite numbers, got "
                        f"{[r[c] for c in self.target_names]}"
                    )
                values.append(v)
            self.va = torch.tensor(values)

    @staticmethod
    def splits(root: str) -> Tuple[str, ...]:
        """The splits ``root/labels.csv`` lists clips in (sorted; empty without a split column)."""
        rows, columns = _read_labels(os.path.join(root, "labels.csv"))
        return tuple(sorted({r["split"] for r in rows})) if "split" in columns else ()


def _read_labels(csv_path: str):
    """``(rows, columns)`` of a labels CSV, read as UTF-8 (with or without a byte-order mark);
    a file that is not UTF-8 text or not CSV is a ValueError naming it."""
    with open(csv_path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is no header
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"FeatureFolder: {csv_path} is not UTF-8 text (byte {data[e.start : e.end]!r} on line "
            f"{line}, offset {e.start}); save it as UTF-8"
        ) from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    except csv.Error as e:
        raise ValueError(f"FeatureFolder: {csv_path} is not a readable CSV file: {e}") from None
    return rows, columns


def _check_clip_name(clip: str, features: str, where: str) -> None:
    """A clip name must name a file inside ``features`` (checked on the names, not by
    resolving links, so a features folder of symbolic links still works)."""
    target = os.path.normpath(os.path.join(features, clip + ".npy"))
    inside = os.path.normpath(features) + os.sep
    if not clip or "\0" in clip or os.path.isabs(clip) or not target.startswith(inside):
        raise ValueError(
            f"FeatureFolder: {where}: clip name {clip!r} must be a path inside "
            f"{features} (relative, without '..' leading out of it)"
        )


def _load_features(
    path: str, clip: str, missing_frames: Optional[str] = None
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The float32 (T, D) array of one feature file, checked: errors name the file; and, with
    ``missing_frames="nan"``, its missing frames, ``(T,)`` bool (frames that are NaN in every
    channel, set to 0 in the array), or None where there are none."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"FeatureFolder: feature file {path} for clip {clip!r} not found")
    if not os.path.isfile(path):
        raise ValueError(f"FeatureFolder: feature file {path} for clip {clip!r} is not a file")
    try:
        a = np.load(path, allow_pickle=False)
    except OSError as e:  # unreadable (permissions, I/O); keeps the kind (PermissionError...)
        raise type(e)(
            f"FeatureFolder: cannot read feature file {path} for clip {clip!r}: {e}"
        ) from e
    except (ValueError, EOFError) as e:  # not a .npy file, truncated, or pickled objects
        raise ValueError(
            f"FeatureFolder: {path} is not a readable .npy array (written by numpy.save, no "
            f"pickled objects): {e}"
        ) from e
    if not isinstance(a, np.ndarray):  # a .npz archive under a .npy name
        getattr(a, "close", lambda: None)()
        raise ValueError(f"FeatureFolder: {path} is a .npz archive; expected one .npy array")
    if a.dtype.kind not in "biuf":
        what = "complex" if a.dtype.kind == "c" else "not numeric"
        raise ValueError(
            f"FeatureFolder: {path} has dtype {a.dtype} ({what}); expected real numbers "
            "(integer or floating)"
        )
    if a.ndim != 2:
        raise ValueError(f"FeatureFolder: {path} has shape {a.shape}; expected a 2-D (T, D) array")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(
            f"FeatureFolder: {path} has shape {a.shape}; a clip needs T >= 1 frames and D >= 1 "
            "channels"
        )
    with np.errstate(over="ignore"):  # values beyond float32's range become inf: refused below
        x = np.ascontiguousarray(a, dtype=np.float32)
    bad = ~np.isfinite(x)
    if not bad.any():
        return x, None
    gone = np.isnan(x).all(axis=1)  # (T,) frames that are NaN in every channel
    if missing_frames == "nan":
        bad &= ~gone[:, None]
        if not bad.any():
            x[gone] = 0.0
            return x, gone
    t, d = np.argwhere(bad)[0]
    where = " outside its missing (all-NaN) frames" if missing_frames == "nan" else ""
    if missing_frames == "nan":
        hint = "; only a frame that is NaN in every channel is a missing frame"
    elif gone.any():
        hint = (
            f"; its {int(gone.sum())} frame(s) that are NaN in every channel can be read as "
            "missing frames with missing_frames='nan' (--missing-frames nan)"
        )
    else:
        hint = ""
    raise ValueError(
        f"FeatureFolder: {path} has {int(bad.sum())} non-finite value(s){where} (NaN, Inf, or "
        f"beyond float32's range), the first at frame {t}, channel {d} "
        f"(value {a[t, d].item()!r}); clean or drop the clip{hint}"
    )


def read_ts(path: str) -> Tuple[list, list]:
    """Reads a ``.ts`` file, the text format of the UEA/UCR time-series archives (as shipped by
    sktime and aeon): ``(series, labels)``, each series a float32 ``(T, D)`` array (lengths may
    differ between series) and each label a string.

    Header lines start with ``@`` (``@data`` ends the header) and comments with ``#``; a data
    line holds the ``D`` dimensions separated by ``:``, each a comma-separated list of values,
    then the class label. Files with time stamps, missing values (``?``/NaN), no class labels, or
    dimensions of unequal length within one series are refused with a ValueError naming the
    file and line."""
    series, labels, header, dims = [], [], {}, None
    with open(path, encoding="utf-8") as f:
        lines = iter(enumerate(f, 1))
        for n, line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not line.startswith("@"):
                raise ValueError(f"read_ts: {path} line {n}: data before @data")
            key, _, value = line[1:].partition(" ")
            if key.lower() == "data":
                break
            header[key.lower()] = value.strip()
        if header.get("timestamps", "false").lower() == "true":
            raise ValueError(f"read_ts: {path}: time-stamped series are not supported")
        if not header.get("classlabel", "false").lower().startswith("true"):
            raise ValueError(f"read_ts: {path}: has no class labels (@classLabel true ...)")
        for n, line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            *parts, label = line.split(":")
            if not parts:
                raise ValueError(f"read_ts: {path} line {n}: expected dimensions and a label")
            try:
                rows = [np.array([float(v) for v in p.split(",")], np.float32) for p in parts]
            except ValueError as e:
                raise ValueError(f"read_ts: {path} line {n}: {e}") from None
            if len({r.shape[0] for r in rows}) != 1:
                raise ValueError(f"read_ts: {path} line {n}: dimensions of unequal length")
            a = np.stack(rows, axis=1)
            if not np.isfinite(a).all():
                raise ValueError(f"read_ts: {path} line {n}: missing or non-finite values")
            if dims is not None and a.shape[1] != dims:
                raise ValueError(
                    f"read_ts: {path} line {n}: {a.shape[1]} dimensions, earlier lines {dims}"
                )
            dims = a.shape[1]
            series.append(a)
            labels.append(label.strip())
    if not series:
        raise ValueError(f"read_ts: {path}: no series after @data")
    return series, labels


def ts_to_feature_folder(root: str, **splits: str) -> str:
    """Writes a FeatureFolder at ``root`` from ``.ts`` files, one per split:
    ``ts_to_feature_folder("jv", train="JV_TRAIN.ts", test="JV_TEST.ts")``. Clips are named
    ``<split>/<index>``; returns ``root``."""
    bad = [k for k in splits if k not in _SPLIT_OFFSETS]
    if bad or not splits:
        raise ValueError(f"ts_to_feature_folder: splits must be among {tuple(_SPLIT_OFFSETS)}")
    rows = ["clip,label,split"]
    for split, path in splits.items():
        series, labels = read_ts(path)
        os.makedirs(os.path.join(root, "features", split), exist_ok=True)
        for i, (a, label) in enumerate(zip(series, labels)):
            if "," in label or '"' in label:
                raise ValueError(f'ts_to_feature_folder: {path}: label {label!r} holds , or "')
            np.save(os.path.join(root, "features", split, f"{i:05d}.npy"), a)
            rows.append(f"{split}/{i:05d},{label},{split}")
    with open(os.path.join(root, "labels.csv"), "w", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")
    return root


def channel_stats(
    x: Tensor, lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Per-channel ``(mean, std)`` (each ``(D,)``, float32) of clips ``x (N, T, D)`` over their
    valid frames (the first ``lengths[i]`` of clip ``i``; all frames without ``lengths``; and
    of those, the ones where the frame mask ``mask (N, T)`` is True), accumulated in float64.
    A channel that is constant has std 1 (it is then only centred)."""
    valid = _valid_mask(x, lengths, mask).to(torch.float64)
    n = valid.sum()
    xd = x.to(torch.float64)
    mean = (xd * valid).sum((0, 1)) / n
    var = ((xd - mean).pow(2) * valid).sum((0, 1)) / n
    std = var.sqrt()
    std = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))
    return mean.float(), std.float()


def standardise(
    x: Tensor,
    mean: Tensor,
    std: Tensor,
    lengths: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """``(x − mean) / std`` per channel, with padded frames (beyond ``lengths``) and masked
    frames (False in ``mask (N, T)``) kept at 0."""
    z = (x - mean.to(x.dtype)) / std.to(x.dtype)
    if lengths is None and mask is None:
        return z
    return z * _valid_mask(x, lengths, mask).to(x.dtype)


def _valid_mask(x: Tensor, lengths: Optional[Tensor], mask: Optional[Tensor] = None) -> Tensor:
    """``(N, T, 1)`` True at the valid frames of clips ``x (N, T, D)``: within ``lengths`` and
    True in the frame mask ``mask (N, T)`` (each where given)."""
    if lengths is None:
        valid = torch.ones(x.shape[0], x.shape[1], 1, dtype=torch.bool)
    else:
        valid = (torch.arange(x.shape[1])[None, :] < lengths[:, None])[..., None]
    return valid if mask is None else valid & mask[..., None]


def stratified_split(
    n: int, labels: Optional[Tensor], fraction: float, seed: int
) -> Tuple[Tensor, Tensor]:
    """``(keep, held_out)`` index tensors: a seeded random ``fraction`` of ``n`` items held out,
    per class where ``labels`` (class indices) are given: ``round(fraction · n_c)`` of each class,
    at least one of every class with two or more items and never all of a class."""
    if not 0 < fraction < 1:
        raise ValueError(f"stratified_split: fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    groups = (
        [torch.arange(n)]
        if labels is None
        else [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    )
    held = []
    for idx in groups:
        m = idx.numel()
        k = min(max(round(fraction * m), 1 if m >= 2 else 0), m - 1)
        held.append(idx[torch.randperm(m, generator=g)[:k]])
    held_out = torch.cat(held).sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[held_out] = False
    return torch.nonzero(keep).flatten(), held_out


def _fit_frames(a: Tensor, T: int) -> Tensor:
    if a.shape[0] >= T:
        start = (a.shape[0] - T) // 2
        return a[start : start + T]
    return torch.cat([a, a.new_zeros(T - a.shape[0], a.shape[1])])
