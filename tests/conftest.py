import pytest
import torch

import lsef_ext  # noqa: F401  (registers torch.ops.lsef)

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]
DTYPES = [torch.float32, torch.float64]


def requires_cuda_kernels(device: str) -> None:
    """Skips a CUDA case when this build has no CUDA kernels for the op yet."""
    if device == "cuda" and "CUDA" not in lsef_ext.build_info()["backends"]:
        pytest.skip("this build has no CUDA kernels")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
