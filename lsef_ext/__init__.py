"""lsef_ext: fast low-rank + sparse ops and modules for video affect analysis.

Importing the package loads the compiled kernels, which register ``torch.ops.lsef.*``.
"""

import torch  # noqa: F401  (the compiled library needs libtorch loaded first)

from . import _C  # noqa: F401  (registers the op schemas and kernels)
from . import ops  # noqa: F401  (registers autograd and fake kernels)

__version__ = "0.1.0"
__all__ = ["ops", "build_info", "__version__"]


def build_info() -> dict:
    """What the compiled library contains: compiler, build type, the torch it was built
    against, backends (``["CPU"]`` or ``["CPU", "CUDA"]``) and CUDA version and architectures."""
    import json

    return json.loads(torch.ops.lsef._build_info())
