// Small portability macros shared by the C++ and CUDA sources.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LSEF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LSEF_HOST_DEVICE inline
#endif
