"""The public surface of the library: every op's schema, in one place.

The compiled modules (``lsef_ext._C``, ``lsef_ext._C_cuda``) register kernels for these schemas
per backend (csrc/<op>/<op>_cpu.cpp, <op>_cuda.cu); autograd and fake (meta) kernels are
registered in Python (lsef_ext/ops.py). The schemas are declared here rather than in C++ because
the stable C API takes an op's tags only from torch 2.12 on, and the wheel serves torch 2.10 on
(docs/DESIGN.md §15). Importing this module a second time declares nothing new.
"""

import torch

_PT2 = (torch.Tag.pt2_compliant_tag,)

SCHEMAS = {
    # S = shrink(X - L, lam); L may be None; lam broadcastable to X.
    "soft_threshold": (
        "soft_threshold(Tensor X, Tensor? L, Tensor lam, bool hard=False) -> Tensor",
        _PT2,
    ),
    # Gradients for (X, L, lam) as selected by output_mask; unselected ones are None.
    "soft_threshold_backward": (
        "soft_threshold_backward(Tensor grad, Tensor X, Tensor? L, Tensor lam, bool hard, "
        "bool[3] output_mask) -> (Tensor?, Tensor?, Tensor?)",
        _PT2,
    ),
    # G' = beta G + (alpha - beta) U (U^T G).
    "rank_scale": ("rank_scale(Tensor G, Tensor U, Tensor alpha, Tensor beta) -> Tensor", _PT2),
    # Truncated SVD by a randomized range finder; exact when k + oversample >= min(m, n).
    "rsvd": (
        "rsvd(Tensor A, int k, int oversample=8, int n_iter=2, int seed=0) "
        "-> (Tensor, Tensor, Tensor)",
        _PT2,
    ),
    # Townsend's derivative of the rank-k truncated SVD; gradients not given are None.
    "rsvd_backward": (
        "rsvd_backward(Tensor? grad_U, Tensor? grad_S, Tensor? grad_V, Tensor U, Tensor S, "
        "Tensor V) -> Tensor",
        _PT2,
    ),
    # L = U diag(S) V^T. U and V are returned too: the backward needs them.
    "lowrank": (
        "lowrank(Tensor A, int k, int oversample=8, int n_iter=2, int seed=0) "
        "-> (Tensor, Tensor, Tensor)",
        _PT2,
    ),
    # Projection onto the tangent space of rank-k matrices at L: P_U G + G P_V - P_U G P_V.
    "lowrank_backward": ("lowrank_backward(Tensor grad, Tensor U, Tensor V) -> Tensor", _PT2),
    # The counter-based generator behind rsvd's test matrix, exposed for tests.
    "_philox_words": ("_philox_words(int blocks, int seed) -> Tensor", ()),
    "_philox_normal": ("_philox_normal(int count, int seed) -> Tensor", ()),
    # The elementwise half of one robust-PCA iteration (lsef_ext/rpca.py, rpca_ialm), CPU
    # only: W, S and A updated in place from X, L and per-matrix t = lam / mu, ratio = mu / mu'
    # (matrices marked done left alone); returns err2, the residual's squared norm per matrix.
    "_ialm_step_": (
        "_ialm_step_(Tensor X, Tensor L, Tensor(a!) W, Tensor(b!) S, Tensor(c!) A, Tensor t, "
        "Tensor ratio, Tensor done) -> Tensor",
        (),
    ),
    # The CPU path rsvd takes for a batch of (m, n) matrices: an index into ops.RSVD_PATHS.
    "_rsvd_path": (
        "_rsvd_path(int m, int n, int k, int oversample, int n_iter, bool float64, int batch=1) "
        "-> int",
        (),
    ),
}

_LIB = torch.library.Library("lsef", "DEF")  # noqa: TOR901 (kept alive for the process)
for _schema, _tags in SCHEMAS.values():
    _LIB.define(_schema, tags=_tags)
