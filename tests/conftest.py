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


def kernel_is_exact(A, k: int, oversample: int = 8, n_iter: int = 2) -> bool:
    """Whether the CPU rsvd kernel returns the exact truncated SVD for A's matrices (l reaches
    min(m, n), or its cost model finds the full SVD cheaper than the sketch): the ``exact``
    argument that makes lsef_ref.rsvd/lowrank compute what the kernel does."""
    from lsef_ext import ops

    m, n = A.shape[-2:]
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    return ops.rsvd_path(m, n, k, oversample, n_iter, dtype) in ("jacobi", "exact")
