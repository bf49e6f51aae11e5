# Decides whether the CUDA kernels are built (LSEF_WITH_CUDA) and how.
# CUDA support is added by a later step of the project; until then LSEF_CUDA=ON fails loudly
# rather than silently producing a CPU-only library.
string(TOUPPER "${LSEF_CUDA}" _lsef_cuda)
if(_lsef_cuda STREQUAL "1")
  set(_lsef_cuda ON)
elseif(_lsef_cuda STREQUAL "0")
  set(_lsef_cuda OFF)
endif()
set(LSEF_WITH_CUDA OFF)
if(_lsef_cuda STREQUAL "ON")
  message(FATAL_ERROR "lsef_ext: LSEF_CUDA=ON but this version has no CUDA kernels yet")
endif()
