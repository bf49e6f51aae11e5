// Input validation shared by every op entry point (CPU and CUDA).
// Messages always start with "<op>: <argument> ..." so users can tell what to fix. Wrong dtype or
// device raises RuntimeError; a wrong shape or value raises ValueError (LSEF_CHECK_VALUE).
// A tensor argument given as None raises TypeError: that check is made in Python, before the
// kernel runs (lsef_ext/ops.py, _check_tensor_args), since no C++ exception the stable ABI can
// carry arrives in Python as a TypeError; the kernels repeat it as a RuntimeError for callers
// below autograd.
#pragma once

#include "common/stable.h"

namespace lsef {

// A tensor argument given as None (torch.ops passes an undefined tensor).
inline void check_defined(const char* op, const char* name, const Tensor& t) {
  LSEF_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
}

inline void check_floating(const char* op, const char* name, const Tensor& t) {
  check_defined(op, name, t);
  LSEF_CHECK(is_floating(t.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
             t.scalar_type());
}

inline void check_same_dtype(const char* op, const char* name, const Tensor& t,
                             const char* ref_name, const Tensor& ref) {
  check_defined(op, name, t);
  LSEF_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
             ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const Tensor& t,
                              const char* ref_name, const Tensor& ref) {
  LSEF_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name,
             " (", device_name(ref), "), got ", device_name(t));
}

inline void check_min_dim(const char* op, const char* name, const Tensor& t, int64_t dim,
                          const char* layout) {
  LSEF_CHECK_VALUE(t.dim() >= dim, op, ": ", name, " must have at least ", dim, " dimensions ",
                   layout, ", got shape ", shape(t));
}

// Kernels in this library are compiled for float32 and float64 on the CPU.
inline void check_cpu_dtype(const char* op, const char* name, const Tensor& t) {
  LSEF_CHECK(t.scalar_type() == kFloat || t.scalar_type() == kDouble, op, ": ", name,
             " must be float32 or float64 on the CPU, got ", t.scalar_type());
}

}  // namespace lsef
