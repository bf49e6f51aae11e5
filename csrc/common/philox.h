// Counter-based Gaussian generator shared by the CPU and CUDA kernels (and mirrored bit for bit
// on its integer stream by python/lsef_ref/philox.py).
//
// Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
// SC'11): a keyed bijection of a 128-bit counter. Block b of the stream is
// philox(counter = (b mod 2^32, b div 2^32, 0, 0), key = (seed mod 2^32, seed div 2^32)); its four
// words give four standard normals by Box-Muller on (x + 1/2) 2^-32, computed in double.
// Element i of a stream is normal number i mod 4 of block i div 4, so any element can be drawn
// on its own, in any order, on any device.
#pragma once

#include <math.h>
#include <stdint.h>

#include "common/macros.h"

namespace lsef {
namespace philox {

struct Words {
  uint32_t x[4];
};

LSEF_HOST_DEVICE void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

LSEF_HOST_DEVICE Words philox4x32_10(uint64_t block, uint64_t seed) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c0, hi0, lo0);
    mulhilo(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return {{c0, c1, c2, c3}};
}

// Standard normal number i of the stream keyed by seed.
LSEF_HOST_DEVICE double normal(uint64_t i, uint64_t seed) {
  const Words w = philox4x32_10(i >> 2, seed);
  const int pair = static_cast<int>(i & 2);  // words (0, 1) or (2, 3)
  const double u1 = (static_cast<double>(w.x[pair]) + 0.5) * 2.3283064365386963e-10;  // 2^-32
  const double u2 = (static_cast<double>(w.x[pair + 1]) + 0.5) * 2.3283064365386963e-10;
  const double radius = sqrt(-2.0 * log(u1));
  const double angle = 6.283185307179586 * u2;
  return (i & 1) ? radius * sin(angle) : radius * cos(angle);
}

}  // namespace philox
}  // namespace lsef
