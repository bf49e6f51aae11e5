// The public surface of the library: every op's schema, in one place.
// Kernels register themselves per backend (csrc/<op>/<op>_cpu.cpp, <op>_cuda.cu); autograd and
// fake (meta) kernels are registered from Python (lsef_ext/ops.py).
#include <Python.h>
#include <torch/library.h>

#include <sstream>
#include <string>

namespace lsef {
namespace {

// What this binary was compiled with, as a small JSON object (read by `lsef info`).
std::string build_info() {
  std::ostringstream out;
  out << "{\"compiler\": \"" << LSEF_CXX_COMPILER << "\", \"build_type\": \"" << LSEF_BUILD_TYPE
      << "\", \"torch_version\": \"" << LSEF_TORCH_VERSION << "\", \"backends\": [\"CPU\"";
#ifdef LSEF_WITH_CUDA
  out << ", \"CUDA\"], \"cuda_version\": \"" << LSEF_CUDA_VERSION << "\", \"cuda_archs\": \""
      << LSEF_CUDA_ARCHS << "\"}";
#else
  out << "], \"cuda_version\": null, \"cuda_archs\": null}";
#endif
  return out.str();
}

}  // namespace
}  // namespace lsef

TORCH_LIBRARY(lsef, m) {
  const std::vector<at::Tag> pt2{at::Tag::pt2_compliant_tag};
  // S = shrink(X - L, lam); L may be None; lam broadcastable to X.
  m.def("soft_threshold(Tensor X, Tensor? L, Tensor lam, bool hard=False) -> Tensor", pt2);
  // Gradients for (X, L, lam) as selected by output_mask; unselected ones are None.
  m.def(
      "soft_threshold_backward(Tensor grad, Tensor X, Tensor? L, Tensor lam, bool hard, "
      "bool[3] output_mask) -> (Tensor?, Tensor?, Tensor?)",
      pt2);
  // G' = beta G + (alpha - beta) U (U^T G).
  m.def("rank_scale(Tensor G, Tensor U, Tensor alpha, Tensor beta) -> Tensor", pt2);
  // Truncated SVD by a randomized range finder; exact when k + oversample >= min(m, n).
  m.def(
      "rsvd(Tensor A, int k, int oversample=8, int n_iter=2, int seed=0) "
      "-> (Tensor, Tensor, Tensor)",
      pt2);
  // Townsend's derivative of the rank-k truncated SVD; gradients not given are None.
  m.def(
      "rsvd_backward(Tensor? grad_U, Tensor? grad_S, Tensor? grad_V, Tensor U, Tensor S, "
      "Tensor V) -> Tensor",
      pt2);
  // L = U diag(S) V^T. U and V are returned too: the backward needs them.
  m.def(
      "lowrank(Tensor A, int k, int oversample=8, int n_iter=2, int seed=0) "
      "-> (Tensor, Tensor, Tensor)",
      pt2);
  // Projection onto the tangent space of rank-k matrices at L: P_U G + G P_V - P_U G P_V.
  m.def("lowrank_backward(Tensor grad, Tensor U, Tensor V) -> Tensor", pt2);

  m.def("_build_info() -> str", &lsef::build_info);
  // The counter-based generator behind rsvd's test matrix, exposed for tests.
  m.def("_philox_words(int blocks, int seed) -> Tensor");
  m.def("_philox_normal(int count, int seed) -> Tensor");
}

// Importing lsef_ext._C loads this library, whose static initialisers run the registrations.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
