// Input validation shared by every op entry point (CPU and CUDA).
// Messages always start with "<op>: <argument> ..." so users can tell what to fix. Wrong dtype or
// device raises RuntimeError; a wrong shape or value raises ValueError (TORCH_CHECK_VALUE).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace lsef {

// A tensor argument given as None (torch.ops passes an undefined tensor).
inline void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " must be a tensor, got None");
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  check_defined(op, name, t);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const char* ref_name, const at::Tensor& ref) {
  check_defined(op, name, t);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

inline void check_min_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                          const char* layout) {
  TORCH_CHECK_VALUE(t.dim() >= dim, op, ": ", name, " must have at least ", dim, " dimensions ",
                    layout, ", got shape ", t.sizes());
}

// Kernels in this library are compiled for float32 and float64 on the CPU.
inline void check_cpu_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64 on the CPU, got ", t.scalar_type());
}

}  // namespace lsef
