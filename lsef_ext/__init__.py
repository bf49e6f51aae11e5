"""lsef_ext: fast low-rank + sparse ops and modules for video affect analysis.

Importing the package loads the compiled kernels, which register ``torch.ops.lsef.*``.
"""

import glob
import json
import os

import torch  # noqa: F401  (the compiled modules need libtorch loaded first)

# The oldest torch the compiled modules run under: they use only the LibTorch stable ABI as of
# this version (csrc/common/stable.h, docs/DESIGN.md §15), so one build serves it and every
# later torch. pyproject.toml (torch>=2.10) and CMakeLists.txt hold the same number.
MIN_TORCH = (2, 10)


def _torch_version() -> tuple:
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def _load_library():
    """Imports the compiled modules: the CPU kernels (``_C``), and the CUDA kernels
    (``_C_cuda``) where the running torch has CUDA and the wheel holds them. Says what is wrong
    where they cannot be used: a torch older than the stable ABI they use, or a source tree that
    was never built."""
    if _torch_version() < MIN_TORCH:
        raise ImportError(
            f"lsef_ext needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (its compiled kernels use "
            f"the LibTorch stable ABI of that version), but torch {torch.__version__} is "
            "installed. Upgrade torch: pip install -U torch"
        )
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        from . import _C  # noqa: F401  (registers the CPU kernels)
    except ImportError as e:
        if not glob.glob(os.path.join(here, "_C.*")):
            raise ImportError(
                f"lsef_ext: the compiled library (_C) is not in {here}: this is a source tree "
                "that was never built. From a clone's root, `import lsef_ext` finds this folder "
                "before the installed package. Either run from another folder (the installed "
                "package is then used), or build in place: "
                "pip install --no-build-isolation -e ."
            ) from e
        raise
    if torch.version.cuda is not None and glob.glob(os.path.join(here, "_C_cuda.*")):
        from . import _C_cuda  # noqa: F401  (registers the CUDA kernels)


from . import _schemas  # noqa: E402, F401  (declares the op schemas)

_load_library()

from . import ops  # noqa: E402, F401  (registers autograd and fake kernels)

__version__ = "0.1.0"
__all__ = ["ops", "build_info", "__version__"]


def build_info() -> dict:
    """What the compiled library contains: compiler, build type, the oldest torch it runs under
    (``torch_target``) and the torch it was built with, backends (``["CPU"]`` or
    ``["CPU", "CUDA"]``: CUDA where the CUDA module is loaded) and, with CUDA, the CUDA version
    and architectures (``sm_XY`` machine code, ``compute_XY`` PTX)."""
    from . import _C

    info = json.loads(_C.BUILD_INFO)
    info["backends"] = ["CPU"]
    info["cuda_version"] = info["cuda_archs"] = None
    cuda = _C_cuda_module()
    if cuda is not None:
        info["backends"].append("CUDA")
        cuda_info = json.loads(cuda.BUILD_INFO)
        info["cuda_version"] = cuda_info["cuda_version"]
        info["cuda_archs"] = cuda_info["cuda_archs"]
    return info


def _C_cuda_module():
    """The loaded CUDA module, or None (a CPU-only torch, or a build without CUDA kernels)."""
    import sys

    return sys.modules.get(__name__ + "._C_cuda")
