// Helpers shared by the CUDA kernels: the dtype check, launch shapes, 16-byte memory packs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "common/cpu_utils.h"

namespace lsef {

// On CUDA the kernels also stream float16 and bfloat16, computing in float32.
inline void check_cuda_dtype(const char* op, const char* name, const at::Tensor& t) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ",
              name, " must be float32, float64, float16 or bfloat16 on CUDA, got ", s);
}

constexpr int kCudaThreads = 256;

// Grids loop over their work and are capped at a count that depends on nothing but the shape,
// never on the device: per-block partial sums then combine in the same order on every GPU.
// 1024 blocks of 256 threads fill the largest current GPUs (132 SMs x 2048 threads).
constexpr int64_t kMaxCudaBlocks = 1024;

inline unsigned cuda_grid(int64_t work_items, int64_t items_per_block) {
  return static_cast<unsigned>(
      std::clamp<int64_t>(ceil_div(work_items, items_per_block), 1, kMaxCudaBlocks));
}

inline int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

// N consecutive elements moved as one access: 16 bytes when N = kPackElems<T>.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
constexpr int kPackElems = 16 / sizeof(T);

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p, int64_t i) {
  return *reinterpret_cast<const Pack<T, N>*>(p + i);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p + i) = v;
}

// Whether every pointer allows 16-byte accesses; null pointers (absent operands) do.
template <typename... P>
bool aligned16(const P*... p) {
  return ((reinterpret_cast<uintptr_t>(p) % 16 == 0) && ...);
}

}  // namespace lsef
