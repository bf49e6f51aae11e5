// The Python modules lsef_ext._C (CPU kernels) and lsef_ext._C_cuda (CUDA kernels, built with
// LSEF_CUDA_MODULE): importing one runs its static initialisers, which register its kernels with
// the dispatcher through the stable ABI. The op schemas are declared in Python
// (lsef_ext/_schemas.py, with their tags, which the stable C API takes only from torch 2.12 on);
// autograd and fake (meta) kernels are registered there too (lsef_ext/ops.py).
//
// Built on Python's limited API (Py_LIMITED_API, CMakeLists.txt): one binary for every CPython
// from 3.10 on. The module holds one attribute, BUILD_INFO: what the binary was compiled with,
// as a small JSON object (read by `lsef info`).
#include <Python.h>

#ifdef LSEF_CUDA_MODULE
#define LSEF_MODULE_NAME "_C_cuda"
#define LSEF_BUILD_INFO                                                                   \
  "{\"compiler\": \"" LSEF_CXX_COMPILER "\", \"build_type\": \"" LSEF_BUILD_TYPE          \
  "\", \"torch_target\": \"" LSEF_TORCH_TARGET "\", \"torch_built\": \"" LSEF_TORCH_BUILT \
  "\", \"cuda_version\": \"" LSEF_CUDA_VERSION "\", \"cuda_archs\": \"" LSEF_CUDA_ARCHS "\"}"
#else
#define LSEF_MODULE_NAME "_C"
#define LSEF_BUILD_INFO                                                          \
  "{\"compiler\": \"" LSEF_CXX_COMPILER "\", \"build_type\": \"" LSEF_BUILD_TYPE \
  "\", \"torch_target\": \"" LSEF_TORCH_TARGET "\", \"torch_built\": \"" LSEF_TORCH_BUILT "\"}"
#endif

namespace {

PyModuleDef module_def = {PyModuleDef_HEAD_INIT,
                          LSEF_MODULE_NAME,
                          nullptr,
                          -1,
                          nullptr,
                          nullptr,
                          nullptr,
                          nullptr,
                          nullptr};

PyObject* init_module() {
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddStringConstant(module, "BUILD_INFO", LSEF_BUILD_INFO) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

}  // namespace

#ifdef LSEF_CUDA_MODULE
PyMODINIT_FUNC PyInit__C_cuda(void) { return init_module(); }
#else
PyMODINIT_FUNC PyInit__C(void) { return init_module(); }
#endif
