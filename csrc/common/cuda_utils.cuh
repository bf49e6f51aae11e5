// Helpers shared by the CUDA kernels: the dtype check, CUDA error checks, the current stream and
// device attributes through the stable ABI, launch shapes, 16-byte memory packs.
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "common/cpu_utils.h"

// The stable C shim declares its CUDA entry points only under USE_CUDA, which this project's
// build does not define (it would switch on CUDA code in other torch headers too); the one used
// here is declared again, with the shim's own signature. libtorch_cuda exports it.
#ifndef USE_CUDA
extern "C" AOTI_TORCH_EXPORT AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index,
                                                                               void** ret_stream);
#endif

// Throws RuntimeError (std::runtime_error) when a CUDA runtime call did not return cudaSuccess.
#define LSEF_CUDA_CHECK(expr)                                                                   \
  do {                                                                                          \
    const cudaError_t lsef_cuda_err_ = (expr);                                                  \
    if (lsef_cuda_err_ != cudaSuccess) {                                                        \
      throw std::runtime_error(::lsef::str("CUDA error: ", cudaGetErrorString(lsef_cuda_err_),  \
                                           " (", #expr, " at ", __FILE__, ":", __LINE__, ")")); \
    }                                                                                           \
  } while (0)

namespace lsef {

// On CUDA the kernels also stream float16 and bfloat16, computing in float32.
inline void check_cuda_dtype(const char* op, const char* name, const Tensor& t) {
  const ScalarType s = t.scalar_type();
  LSEF_CHECK(s == kFloat || s == kDouble || s == kHalf || s == kBFloat16, op, ": ", name,
             " must be float32, float64, float16 or bfloat16 on CUDA, got ", s);
}

// torch's current CUDA stream on device `device_index` (torch.cuda.current_stream): kernels
// launched on it are ordered with torch's own work before and after them.
inline cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}
inline cudaStream_t current_stream(const Tensor& t) { return current_stream(t.get_device_index()); }

// Attribute `attr` of the current CUDA device (set by the caller's DeviceGuard).
inline int current_device_attribute(cudaDeviceAttr attr) {
  int device = 0;
  LSEF_CUDA_CHECK(cudaGetDevice(&device));
  int value = 0;
  LSEF_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
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
