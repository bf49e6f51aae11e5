"""lsef_ext: fast low-rank + sparse ops and modules for video affect analysis.

Importing the package loads the compiled kernels, which register ``torch.ops.lsef.*``.
"""

import glob
import os
import warnings

import torch  # noqa: F401  (the compiled library needs libtorch loaded first)


def _series(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _load_library():
    """Imports the compiled library, saying what is wrong where it cannot be used: a source tree
    that was never built, or a build for another torch series (whose C++ ABI differs)."""
    try:
        from ._build_torch import TORCH_VERSION as built
    except ImportError:
        built = None
    mismatch = built is not None and _series(built) != _series(torch.__version__)
    rebuild = 'pip install --no-build-isolation --force-reinstall --no-deps "lsef_ext @ <source>"'
    try:
        from . import _C  # noqa: F401  (registers the op schemas and kernels)
    except ImportError as e:
        here = os.path.dirname(os.path.abspath(__file__))
        if not glob.glob(os.path.join(here, "_C.*")):
            raise ImportError(
                f"lsef_ext: the compiled library (_C) is not in {here}: this is a source tree "
                "that was never built. From a clone's root, `import lsef_ext` finds this folder "
                "before the installed package. Either run from another folder (the installed "
                "package is then used), or build in place: "
                "pip install --no-build-isolation -e ."
            ) from e
        if mismatch:
            raise ImportError(
                f"lsef_ext was built for torch {built} but torch {torch.__version__} is "
                f"installed, and the library cannot load under it ({e}). Rebuild it against "
                f"this torch: {rebuild}"
            ) from e
        raise
    if mismatch:
        warnings.warn(
            f"lsef_ext was built for torch {built} but torch {torch.__version__} is installed; "
            f"the C++ ABI can differ between torch series. Rebuild: {rebuild}",
            RuntimeWarning,
            stacklevel=3,
        )


_load_library()

from . import ops  # noqa: E402, F401  (registers autograd and fake kernels)

__version__ = "0.1.0"
__all__ = ["ops", "build_info", "__version__"]


def build_info() -> dict:
    """What the compiled library contains: compiler, build type, the torch it was built
    against, backends (``["CPU"]`` or ``["CPU", "CUDA"]``) and CUDA version and architectures."""
    import json

    return json.loads(torch.ops.lsef._build_info())
