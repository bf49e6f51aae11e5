import pytest
import torch

import lsef_ext  # noqa: F401  (registers torch.ops.lsef)

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]
DTYPES = [torch.float32, torch.float64]


def requires_cuda_kernels(device: str, op: str) -> None:
    """Skips a CUDA case when this build has no CUDA kernel for lsef::<op>."""
    if device == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
        f"lsef::{op}", "CUDA"
    ):
        pytest.skip(f"this build has no CUDA kernel for lsef::{op}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
