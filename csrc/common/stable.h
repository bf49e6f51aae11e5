// The one door to libtorch: every source in csrc/ reaches torch through this header, which holds
// only the LibTorch stable ABI (torch/csrc/stable, torch/headeronly). Built with
// TORCH_TARGET_VERSION set (CMakeLists.txt), any ATen or c10 header stops the build with #error,
// so no mangled at::/c10:: symbol can slip into the binary, and one compiled module serves every
// torch from the target version on (docs/DESIGN.md §15).
//
// What it adds to the stable API:
//   * error macros whose messages are the message alone (STD_TORCH_CHECK prefixes function, file
//     and line) and whose types reach Python as the ATen checks' did: LSEF_CHECK -> RuntimeError
//     (std::runtime_error), LSEF_CHECK_VALUE -> ValueError (std::invalid_argument);
//   * printing of shapes, dtypes and devices in ATen's format ("[2, 3]", "Float", "cuda:0");
//   * aten::call, a boxed call of any ATen op by name, and the few ops the host code needs that
//     torch/csrc/stable/ops.h does not wrap (Scalar arguments are not boxable: pytorch#169872, so
//     every scalar operand here is a 0-d tensor);
//   * dispatch_floating, a switch over the floating dtypes calling a generic lambda with the
//     element type (a kernel launch inside a THO_DISPATCH_V2 body does not compile).
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lsef {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
using Half = c10::Half;
using BFloat16 = c10::BFloat16;
constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kBool = ScalarType::Bool;
constexpr ScalarType kLong = ScalarType::Long;
constexpr ScalarType kInt = ScalarType::Int;

// --- Printing, in ATen's format -------------------------------------------------------------

struct Dims {
  IntArrayRef sizes;
};
inline std::ostream& operator<<(std::ostream& out, Dims s) {
  out << '[';
  for (size_t i = 0; i < s.sizes.size(); ++i) out << (i ? ", " : "") << s.sizes[i];
  return out << ']';
}
struct DeviceName {
  torch::stable::Device device;
};
inline std::ostream& operator<<(std::ostream& out, const DeviceName& d) {
  switch (d.device.type()) {
    case torch::headeronly::DeviceType::CPU:
      out << "cpu";
      break;
    case torch::headeronly::DeviceType::CUDA:
      out << "cuda";
      break;
    case torch::headeronly::DeviceType::Meta:
      out << "meta";
      break;
    default:
      out << "device type " << static_cast<int>(d.device.type());
  }
  if (d.device.index() >= 0) out << ':' << static_cast<int>(d.device.index());
  return out;
}
inline Dims shape(const Tensor& t) { return {t.sizes()}; }
inline DeviceName device_name(const Tensor& t) { return {t.device()}; }

template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream out;
  ((out << args), ...);
  return out.str();
}

}  // namespace lsef

#define LSEF_CHECK(cond, ...)                                        \
  do {                                                               \
    if (!(cond)) throw std::runtime_error(::lsef::str(__VA_ARGS__)); \
  } while (0)
#define LSEF_CHECK_VALUE(cond, ...)                                     \
  do {                                                                  \
    if (!(cond)) throw std::invalid_argument(::lsef::str(__VA_ARGS__)); \
  } while (0)

namespace lsef {

inline bool is_floating(ScalarType t) {
  return t == kFloat || t == kDouble || t == kHalf || t == kBFloat16 ||
         t == ScalarType::Float8_e4m3fn || t == ScalarType::Float8_e5m2 ||
         t == ScalarType::Float8_e4m3fnuz || t == ScalarType::Float8_e5m2fnuz;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// fn(TypeTag<T>{}) for T = float or double (and, with `halves`, c10::Half and c10::BFloat16);
// any other dtype is refused with RuntimeError, as AT_DISPATCH did.
template <bool halves = false, typename Fn>
decltype(auto) dispatch_floating(ScalarType t, const char* name, Fn&& fn) {
  switch (t) {
    case ScalarType::Float:
      return fn(TypeTag<float>{});
    case ScalarType::Double:
      return fn(TypeTag<double>{});
    case ScalarType::Half:
      if constexpr (halves) return fn(TypeTag<Half>{});
      break;
    case ScalarType::BFloat16:
      if constexpr (halves) return fn(TypeTag<BFloat16>{});
      break;
    default:
      break;
  }
  throw std::runtime_error(str("\"", name, "\" not implemented for '", t, "'"));
}

// The dtype of element type T.
template <typename T>
constexpr ScalarType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return kFloat;
  if constexpr (std::is_same_v<T, double>) return kDouble;
  if constexpr (std::is_same_v<T, Half>) return kHalf;
  if constexpr (std::is_same_v<T, BFloat16>) return kBFloat16;
  if constexpr (std::is_same_v<T, bool>) return kBool;
  if constexpr (std::is_same_v<T, int64_t>) return kLong;
  if constexpr (std::is_same_v<T, int32_t>) return kInt;
}

// The accumulation type of element type T (ATen's opmath_type): float for the half types.
template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<Half> {
  using type = float;
};
template <>
struct OpMath<BFloat16> {
  using type = float;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

template <typename T>
T* ptr(const Tensor& t) {
  return t.mutable_data_ptr<T>();
}
template <typename T>
const T* cptr(const Tensor& t) {
  return t.const_data_ptr<T>();
}

// t itself when it is contiguous (a field read, no boxed call), else a contiguous copy.
inline Tensor as_contiguous(const Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The leading (batch) sizes of t, all but its last `tail` dimensions.
inline std::vector<int64_t> leading(const Tensor& t, int64_t tail) {
  auto s = t.sizes();
  return std::vector<int64_t>(s.begin(), s.end() - tail);
}
inline bool same_sizes(IntArrayRef a, IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// --- Boxed ATen calls -----------------------------------------------------------------------
namespace aten {

// Calls ATen op `name.overload` with `args` (boxed as StableIValues); returns the first `Out`
// outputs as tensors.
template <size_t Out = 1, typename... Args>
std::array<Tensor, Out> call_n(const char* name, const char* overload, const Args&... args) {
  constexpr size_t n = sizeof...(Args) > Out ? sizeof...(Args) : Out;
  std::array<StableIValue, n> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  std::array<Tensor, Out> out;
  for (size_t i = 0; i < Out; ++i) out[i] = torch::stable::detail::to<Tensor>(stack[i]);
  return out;
}
template <typename... Args>
Tensor call(const char* name, const char* overload, const Args&... args) {
  return call_n<1>(name, overload, args...)[0];
}

// A 0-d tensor holding v, on the CPU, in dtype `dtype` (a wrapped-number operand: it takes part
// in a binary op with a tensor on any device without changing the result's dtype).
inline Tensor scalar(double v, ScalarType dtype = kDouble) {
  return torch::stable::full({}, v, dtype);
}

inline Tensor mul(const Tensor& a, const Tensor& b) { return call("aten::mul", "Tensor", a, b); }
inline Tensor div(const Tensor& a, const Tensor& b) { return call("aten::div", "Tensor", a, b); }
inline Tensor add(const Tensor& a, const Tensor& b) { return torch::stable::subtract(a, b, -1.0); }
inline Tensor sub(const Tensor& a, const Tensor& b) { return torch::stable::subtract(a, b); }
inline Tensor mul(const Tensor& a, double b) { return mul(a, scalar(b)); }
inline Tensor add(const Tensor& a, double b) { return add(a, scalar(b)); }
inline Tensor neg(const Tensor& a) { return call("aten::neg", "", a); }
inline Tensor where(const Tensor& c, const Tensor& a, const Tensor& b) {
  return call("aten::where", "self", c, a, b);
}
inline Tensor eq(const Tensor& a, const Tensor& b) { return call("aten::eq", "Tensor", a, b); }
inline Tensor ne(const Tensor& a, const Tensor& b) { return call("aten::ne", "Tensor", a, b); }
inline Tensor lt(const Tensor& a, const Tensor& b) { return call("aten::lt", "Tensor", a, b); }
inline Tensor gt(const Tensor& a, const Tensor& b) { return call("aten::gt", "Tensor", a, b); }
inline Tensor ge(const Tensor& a, const Tensor& b) { return call("aten::ge", "Tensor", a, b); }
inline Tensor le(const Tensor& a, const Tensor& b) { return call("aten::le", "Tensor", a, b); }
inline Tensor logical_or(const Tensor& a, const Tensor& b) {
  return call("aten::logical_or", "", a, b);
}
inline Tensor logical_and(const Tensor& a, const Tensor& b) {
  return call("aten::logical_and", "", a, b);
}
inline Tensor logical_not(const Tensor& a) { return call("aten::logical_not", "", a); }
inline Tensor isfinite(const Tensor& a) { return call("aten::isfinite", "", a); }
inline Tensor abs(const Tensor& a) { return call("aten::abs", "", a); }
inline Tensor all(const Tensor& a) { return call("aten::all", "", a); }
inline Tensor any(const Tensor& a) { return call("aten::any", "", a); }
inline Tensor all(const Tensor& a, int64_t dim) { return call("aten::all", "dim", a, dim, false); }
inline Tensor frexp_exponent(const Tensor& a) { return call_n<2>("aten::frexp", "Tensor", a)[1]; }
inline Tensor bitwise_left_shift(const Tensor& a, const Tensor& b) {
  return call("aten::bitwise_left_shift", "Tensor", a, b);
}
// The bits of a reinterpreted as `dtype` (same element size).
inline Tensor view_dtype(const Tensor& a, ScalarType dtype) {
  return call("aten::view", "dtype", a, dtype);
}
inline Tensor clamp(const Tensor& a, const std::optional<Tensor>& lo,
                    const std::optional<Tensor>& hi) {
  return call("aten::clamp", "Tensor", a, lo, hi);
}
// Largest value along `dim`, kept as a size-1 dimension.
inline Tensor max_keepdim(const Tensor& a, int64_t dim) {
  return call_n<2>("aten::max", "dim", a, dim, true)[0];
}
inline Tensor diag_embed(const Tensor& a) {
  return call("aten::diag_embed", "", a, int64_t{0}, int64_t{-2}, int64_t{-1});
}
inline Tensor zeros_like(const Tensor& a) {
  return call("aten::zeros_like", "", a, std::optional<ScalarType>{},
              std::optional<torch::headeronly::Layout>{}, std::optional<torch::stable::Device>{},
              std::optional<bool>{}, std::optional<torch::headeronly::MemoryFormat>{});
}
inline Tensor expand(const Tensor& a, IntArrayRef size) {
  return call("aten::expand", "", a, size, false);
}
inline Tensor sum_to_size(const Tensor& a, IntArrayRef size) {
  return call("aten::sum_to_size", "", a, size);
}
inline Tensor mT(const Tensor& a) { return torch::stable::transpose(a, -2, -1); }
inline Tensor to_dtype(const Tensor& a, ScalarType dtype) {
  return a.scalar_type() == dtype ? a : torch::stable::to(a, dtype);
}
inline Tensor to_device(const Tensor& a, const torch::stable::Device& device) {
  return torch::stable::to(a, std::nullopt, std::nullopt, device);
}
// A CPU copy of a 0-d or one-element bool tensor, read.
inline bool item_bool(const Tensor& a) {
  const Tensor c =
      a.is_cpu() ? a : to_device(a, torch::stable::Device(torch::headeronly::DeviceType::CPU));
  return *cptr<bool>(torch::stable::contiguous(c));
}

}  // namespace aten

// Uninitialised tensor of `sizes` with the dtype (default: like's) and device of `like`.
inline Tensor empty_as(const Tensor& like, IntArrayRef sizes,
                       std::optional<ScalarType> dtype = std::nullopt) {
  return torch::stable::empty(sizes, dtype.value_or(like.scalar_type()), std::nullopt,
                              like.device());
}
inline Tensor empty_cpu(IntArrayRef sizes, ScalarType dtype) {
  return torch::stable::empty(sizes, dtype);
}

}  // namespace lsef
