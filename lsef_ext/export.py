"""Deployment: a trained checkpoint as one file that runs without this package's Python code
(``lsef export``; docs/DESIGN.md §13).

:func:`export_checkpoint` rebuilds the model of a checkpoint
(:func:`lsef_ext.train.load_checkpoint`), wraps it with the checkpoint's normalisation
(:class:`Predictor`: raw features in, the model's outputs out, what ``lsef predict`` computes),
traces it with ``torch.export`` for clips of the checkpoint's frames and feature channels with
a dynamic batch size, and writes either

* an **AOTInductor package** (``torch._inductor.aoti_compile_and_package``): the graph compiled
  to C++ for this machine's kind of CPU. The custom ops ``torch.ops.lsef.*`` stay calls into
  the compiled library (AOTInductor's proxy executor runs any op the dispatcher knows), so the
  loading process must ``import lsef_ext`` first; or
* an **ExportedProgram** (``torch.export.save``) where AOTInductor cannot compile it (no C++
  compiler, say) or is not asked for (``format="program"``).

Either loads in a process that imports only ``torch`` and ``lsef_ext``::

    import torch, lsef_ext
    run = torch._inductor.aoti_load_package("model.pt2")  # AOTInductor package
    run = torch.export.load("model.pt2").module()          # ExportedProgram
    logits = run(x)  # x: (B, frames, D) float32 raw features

or with :func:`load`, which tells the two apart.

What is not exported: ``lengths``. Every model's ``forward(X, lengths)`` reads the lengths on
the host and branches on them (LSEF groups clips by length), which ``torch.export`` cannot
trace; the exported program takes clips that have all ``frames`` frames.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from contextlib import contextmanager
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .nn import LSEFOutput

__all__ = [
    "FORMATS",
    "ExportError",
    "ExportResult",
    "Predictor",
    "predictor",
    "export_program",
    "save",
    "file_kind",
    "load",
    "export_checkpoint",
]

# "auto": an AOTInductor package where it compiles and checks out, else an ExportedProgram.
FORMATS = ("auto", "aoti", "program")

# The largest |exported - eager| accepted by the check after writing, relative to the largest
# |eager| (at least 1): the compiled kernels fuse and reorder float32 sums (about 1e-7 seen).
CHECK_TOLERANCE = 1e-4


class ExportError(Exception):
    """The model cannot be exported or written as asked; the message says why."""


class ExportResult(NamedTuple):
    """What :func:`export_checkpoint` wrote."""

    path: str
    kind: str  # "aoti" (AOTInductor package) or "program" (ExportedProgram)
    reason: Optional[str]  # why not AOTInductor, for kind "program"
    frames: int
    d_in: int
    normalised: bool  # the checkpoint's standardisation is in the graph
    max_abs_diff: float  # the check: the written file against eager, on random clips
    model: str  # the checkpoint's model name
    epoch: int
    outputs: str  # what the outputs are, in words


class Predictor(nn.Module):
    """``forward(x) -> Tensor``: the model's outputs (logits or regression values) for raw
    features ``x (B, T, D)``: first standardised by ``(x - mean) / std`` per channel where the
    checkpoint stores them (as ``lsef predict`` does), then the model, of whose output (an
    :class:`~lsef_ext.nn.LSEFOutput` for LSEF) only the prediction is kept."""

    def __init__(
        self, model: nn.Module, mean: Optional[Tensor] = None, std: Optional[Tensor] = None
    ):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("Predictor: give both mean and std, or neither")
        self.model = model
        self.normalised = mean is not None
        if mean is not None:
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        if self.normalised:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = self.model(x)
        return out.pred if isinstance(out, LSEFOutput) else out


def predictor(ck) -> Predictor:
    """The :class:`Predictor` of a loaded checkpoint (:func:`lsef_ext.train.load_checkpoint`),
    its normalisation from ``ck.meta["norm"]``, in eval mode."""
    norm = ck.meta.get("norm")
    mean, std = (norm["mean"], norm["std"]) if norm else (None, None)
    return Predictor(ck.model, mean, std).to("cpu").eval()


def export_program(
    module: nn.Module, frames: int, d_in: int, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` (eval mode) on float32 clips ``(B, frames, d_in)``; the
    batch size ``B`` is dynamic (any ``B >= 1``) unless ``dynamic_batch=False``, the frames and
    channels are fixed. Raises :class:`ExportError` where the model cannot be traced."""
    example = (torch.randn(2, frames, d_in),)
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        with _quiet():
            return torch.export.export(module.eval(), example, dynamic_shapes=shapes)
    except Exception as e:
        raise ExportError(f"torch.export cannot trace the model: {_first_line(e)}") from e


def save(ep: torch.export.ExportedProgram, path: str, format: str = "auto") -> Optional[str]:
    """Writes ``ep`` to ``path`` (a name ending in ``.pt2``): an AOTInductor package
    (``format="aoti"``), an ExportedProgram (``"program"``), or the first where AOTInductor
    compiles (``"auto"``). Returns None for a package, or for an ExportedProgram why it is not
    one. The file is written beside ``path`` and moved there whole."""
    if format not in FORMATS:
        raise ValueError(f"save: format must be one of {FORMATS}, got {format!r}")
    if not path.endswith(".pt2"):
        raise ExportError(f"{path}: expected a file name ending in .pt2")
    tmp = f"{path[: -len('.pt2')]}.tmp-{os.getpid()}.pt2"
    reason = "not asked for (format 'program')"
    try:
        if format != "program":
            try:
                with _quiet():
                    torch._inductor.aoti_compile_and_package(ep, package_path=tmp)
                os.replace(tmp, path)
                return None
            except Exception as e:
                if format == "aoti":
                    raise ExportError(
                        f"AOTInductor cannot compile the model: {_first_line(e)}"
                    ) from e
                reason = f"AOTInductor failed: {_first_line(e)}"
        torch.export.save(ep, tmp)
        os.replace(tmp, path)
        return reason
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_kind(path: str) -> str:
    """``"aoti"`` (AOTInductor package) or ``"program"`` (ExportedProgram) for a ``.pt2`` file
    (ExportError for anything else)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise ExportError(f"{path}: not a .pt2 file ({_first_line(e)})") from e
    if any("/data/aotinductor/" in n for n in names):
        return "aoti"
    if any(n.split("/", 1)[-1].startswith("models/") for n in names):
        return "program"
    raise ExportError(f"{path}: neither an AOTInductor package nor an ExportedProgram")


def load(path: str) -> Callable[[Tensor], Tensor]:
    """The callable in a file of :func:`save`: ``x (B, frames, D) -> outputs``."""
    if file_kind(path) == "aoti":
        return torch._inductor.aoti_load_package(path)
    return torch.export.load(path).module()


def export_checkpoint(
    checkpoint: str, out: str, format: str = "auto", check_clips: int = 4
) -> ExportResult:
    """Exports the model of ``checkpoint`` (its normalisation baked in, :class:`Predictor`) to
    ``out`` (:func:`save`), then loads the file and checks it against eager on
    ``check_clips`` random clips (and on one alone: the batch size is dynamic). Raises
    FileNotFoundError or :class:`lsef_ext.train.RunError` for a missing or bad checkpoint,
    :class:`ExportError` where the model cannot be exported or the file disagrees."""
    from .train import load_checkpoint

    ck = load_checkpoint(checkpoint, "cpu", "ext")
    module = predictor(ck)
    name = str(ck.config.get("model", type(ck.model).__name__))
    frames = int(ck.meta.get("frames") or ck.config.get("T"))
    d_in = int(getattr(ck.model, "d_in", None) or ck.meta["D"])
    try:
        ep = export_program(module, frames, d_in)
    except ExportError as e:
        raise ExportError(f"{checkpoint} ({name}): {e}") from e
    reason = save(ep, out, format)
    diff = _check(module, out, frames, d_in, check_clips)
    return ExportResult(
        path=out,
        kind="aoti" if reason is None else "program",
        reason=reason,
        frames=frames,
        d_in=d_in,
        normalised=module.normalised,
        max_abs_diff=diff,
        model=name,
        epoch=int(ck.epoch),
        outputs=_outputs(ck),
    )


def _check(module: Predictor, path: str, frames: int, d_in: int, n: int) -> float:
    """The largest |file − eager| over ``n`` random raw clips and a batch of one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(max(n, 1), frames, d_in, generator=g)
    if module.normalised:  # clips on the scale of the raw features
        x = x * module.std + module.mean
    run = load(path)
    diff, scale = 0.0, 1.0
    with torch.no_grad():
        for xb in (x, x[:1]):
            want, got = module(xb), run(xb)
            if got.shape != want.shape:
                raise ExportError(
                    f"{path}: gives outputs of shape {tuple(got.shape)}, eager {tuple(want.shape)}"
                )
            diff = max(diff, float((got - want).abs().max()))
            scale = max(scale, float(want.abs().max()))
    if not diff <= CHECK_TOLERANCE * scale:
        raise ExportError(
            f"{path}: the exported model disagrees with eager (max |difference| {diff:.3g})"
        )
    return diff


def _outputs(ck) -> str:
    if ck.config.get("task", "classification") == "regression":
        names: Sequence[str] = ck.meta.get("target_names") or []
        return "regression values" + (f" ({', '.join(names)})" if names else "")
    names = ck.meta.get("class_names") or []
    return "logits" + (f" of the classes {', '.join(names)}" if names else "")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextmanager
def _quiet():
    """torch's notes while tracing and compiling (deprecation warnings of its own internals;
    AOTInductor's "missing a c-shim implementation, using proxy executor" per op without a C
    shim, e.g. aten.median.dim) kept off the terminal; errors still raise."""
    loggers: Dict[str, int] = {}
    for name in ("torch._inductor", "torch.export", "torch._export", "torch.fx.experimental"):
        log = logging.getLogger(name)
        loggers[name] = log.level
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)
