"""The counter-based generator behind rsvd's test matrix (csrc/common/philox.h), in NumPy.

Philox4x32-10 (Salmon et al., SC'11) on counter (b mod 2^32, b div 2^32, 0, 0) and key
(seed mod 2^32, seed div 2^32); each block's four words give four normals by Box-Muller on
(x + 1/2) 2^-32. The integer stream matches the C++ and CUDA kernels bit for bit; the normals
match to the last bits of the platform's log, sin and cos.
"""

from __future__ import annotations

import numpy as np
import torch

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_MASK = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)


def philox_words(blocks: int, seed: int) -> np.ndarray:
    """The (blocks, 4) uint32 words of blocks 0 .. blocks-1."""
    b = np.arange(blocks, dtype=np.uint64)
    c0, c1 = b & _MASK, b >> _SHIFT
    c2 = np.zeros_like(b)
    c3 = np.zeros_like(b)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2  # 32 x 32 -> 64-bit products
        c0, c1, c2, c3 = (p1 >> _SHIFT) ^ c1 ^ k0, p1 & _MASK, (p0 >> _SHIFT) ^ c3 ^ k1, p0 & _MASK
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def gaussian(count: int, seed: int) -> torch.Tensor:
    """Normals 0 .. count-1 of the stream keyed by seed, as float64."""
    words = philox_words((count + 3) // 4, seed).astype(np.float64)
    u = (words + 0.5) * 2.0**-32
    radius = np.sqrt(-2.0 * np.log(u[:, 0::2]))  # pairs (0, 1) and (2, 3)
    angle = 2.0 * np.pi * u[:, 1::2]
    z = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=2)  # (blocks, 2, 2)
    return torch.from_numpy(z.reshape(-1)[:count].copy())


def test_matrix(n: int, l: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """rsvd's Gaussian test matrix Omega (n x l): element (j, c) is stream index j * l + c."""
    return gaussian(n * l, seed).reshape(n, l).to(dtype)
