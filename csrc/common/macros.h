// Small portability macros shared by the C++ and CUDA sources.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LSEF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LSEF_HOST_DEVICE inline
#endif

// The rsvd block code (rsvd/rsvd_block.cuh), compiled by nvcc for the kernels and by the host
// compiler for the CPU fiber emulator in tests/: device functions, functions both sides call,
// and loop unrolling, each a no-op decoration on the host.
#if defined(__CUDACC__)
#define LSEF_BLOCK_FN __device__ __forceinline__
#define LSEF_BLOCK_HD __host__ __device__ inline
#define LSEF_UNROLL _Pragma("unroll")
#else
#define LSEF_BLOCK_FN inline
#define LSEF_BLOCK_HD inline
#define LSEF_UNROLL
#endif
