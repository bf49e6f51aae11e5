# Decides whether the CUDA kernels are built (LSEF_WITH_CUDA) and how.
#
#   LSEF_CUDA=AUTO  build them when torch is a CUDA build and a working CUDA compiler is found;
#                   otherwise say why in one status line and build the CPU kernels only.
#   LSEF_CUDA=ON    the same checks, but a failed one stops the configure with its reason, so a
#                   build that was asked for CUDA never silently comes out CPU-only.
#   LSEF_CUDA=OFF   CPU kernels only.
#
# Target architectures: TORCH_CUDA_ARCH_LIST from the environment (torch's format, e.g.
# "8.0;9.0+PTX"), else CMAKE_CUDA_ARCHITECTURES if given, else sm_80 and sm_90 machine code plus
# compute_90 PTX, which newer GPUs compile at load time.
string(TOUPPER "${LSEF_CUDA}" _lsef_cuda_mode)
if(_lsef_cuda_mode MATCHES "^(1|TRUE|YES)$")
  set(_lsef_cuda_mode ON)
elseif(_lsef_cuda_mode MATCHES "^(0|FALSE|NO)$")
  set(_lsef_cuda_mode OFF)
endif()
if(NOT _lsef_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "lsef_ext: LSEF_CUDA must be AUTO, ON (1) or OFF (0), got '${LSEF_CUDA}'")
endif()

set(LSEF_WITH_CUDA OFF)
# Why the CUDA kernels cannot be built; stays empty while every check passes.
set(_lsef_no_cuda "")

if(_lsef_cuda_mode STREQUAL "OFF")
  set(_lsef_no_cuda "LSEF_CUDA=OFF")
endif()

# Asked of the interpreter that will import the module: torch's CUDA version, and the folders of
# the nvidia/* wheels that CUDA builds of torch install beside it (fallback headers and runtime).
if(_lsef_no_cuda STREQUAL "")
  string(CONCAT _lsef_py
    "import importlib.util, torch\n"
    "spec = importlib.util.find_spec('nvidia')\n"
    "dirs = list(spec.submodule_search_locations) if spec else []\n"
    "print(';'.join([torch.version.cuda or 'none'] + dirs), end='')\n")
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "${_lsef_py}"
    OUTPUT_VARIABLE _lsef_torch_query
    RESULT_VARIABLE _lsef_rc)
  if(NOT _lsef_rc EQUAL 0)
    message(FATAL_ERROR "lsef_ext: could not ask ${Python_EXECUTABLE} for torch's CUDA version")
  endif()
  list(POP_FRONT _lsef_torch_query LSEF_TORCH_CUDA_VERSION)
  set(_lsef_nvidia_dirs ${_lsef_torch_query})
  if(LSEF_TORCH_CUDA_VERSION STREQUAL "none")
    set(_lsef_no_cuda "torch ${Torch_VERSION} is a CPU-only build (torch.version.cuda is None)")
  endif()
endif()

if(_lsef_no_cuda STREQUAL "")
  # A compiler found missing on an earlier configure is looked for again: it may be there now.
  if(DEFINED CMAKE_CUDA_COMPILER AND NOT CMAKE_CUDA_COMPILER)
    unset(CMAKE_CUDA_COMPILER CACHE)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    set(_lsef_no_cuda "no working CUDA compiler was found (put nvcc on PATH, or set CUDACXX)")
  endif()
endif()

if(_lsef_no_cuda STREQUAL "")
  if(DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
    string(REPLACE " " ";" _lsef_torch_archs "$ENV{TORCH_CUDA_ARCH_LIST}")
    set(LSEF_CUDA_ARCHITECTURES "")
    foreach(_item IN LISTS _lsef_torch_archs)
      if(_item STREQUAL "")
        continue()
      endif()
      if(NOT _item MATCHES "^([0-9]+)\\.([0-9]+)([af]?)(\\+PTX)?$")
        message(FATAL_ERROR "lsef_ext: TORCH_CUDA_ARCH_LIST entry '${_item}' is not a compute "
                            "capability like 8.0, 9.0a or 9.0+PTX")
      endif()
      set(_arch "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
      list(APPEND LSEF_CUDA_ARCHITECTURES "${_arch}-real")
      if(CMAKE_MATCH_4)
        list(APPEND LSEF_CUDA_ARCHITECTURES "${_arch}-virtual")
      endif()
    endforeach()
  elseif(DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(LSEF_CUDA_ARCHITECTURES ${CMAKE_CUDA_ARCHITECTURES})
  else()
    set(LSEF_CUDA_ARCHITECTURES 80-real 90-real 90-virtual)
  endif()
  # Set before enable_language so CMake does not probe a default architecture of its own.
  set(CMAKE_CUDA_ARCHITECTURES ${LSEF_CUDA_ARCHITECTURES})
  # Host code of the .cu files must come from the same compiler as the .cpp files.
  if(NOT DEFINED CMAKE_CUDA_HOST_COMPILER AND NOT DEFINED ENV{CUDAHOSTCXX})
    set(CMAKE_CUDA_HOST_COMPILER "${CMAKE_CXX_COMPILER}")
  endif()
  enable_language(CUDA)
  string(REGEX MATCH "^[0-9]+" _lsef_nvcc_major "${CMAKE_CUDA_COMPILER_VERSION}")
  string(REGEX MATCH "^[0-9]+" _lsef_torch_cuda_major "${LSEF_TORCH_CUDA_VERSION}")
  if(NOT _lsef_nvcc_major STREQUAL _lsef_torch_cuda_major)
    # Kernels from another major version may need a runtime that torch did not load.
    string(CONCAT _lsef_no_cuda "nvcc ${CMAKE_CUDA_COMPILER_VERSION} (${CMAKE_CUDA_COMPILER}) "
                  "does not match the CUDA ${LSEF_TORCH_CUDA_VERSION} that torch was built with")
  endif()
endif()

# ATen's CUDA headers include the cuBLAS, cuSPARSE and cuSOLVER headers, and the kernels need
# the shared CUDA runtime. A toolkit may hold only the compiler and the runtime (pip's
# nvidia-cuda-nvcc, or a trimmed image); torch's own nvidia/* wheels then supply the rest, and
# match torch's CUDA version by construction. The toolkit's copies come first.
if(_lsef_no_cuda STREQUAL "")
  find_package(CUDAToolkit QUIET)
  set(_lsef_bundled_include "")
  set(_lsef_bundled_lib "")
  foreach(_dir IN LISTS _lsef_nvidia_dirs)
    file(GLOB _inc LIST_DIRECTORIES true "${_dir}/*/include")
    file(GLOB _lib LIST_DIRECTORIES true "${_dir}/*/lib")
    list(APPEND _lsef_bundled_include ${_inc})
    list(APPEND _lsef_bundled_lib ${_lib})
  endforeach()

  set(_lsef_toolkit_include
      ${CUDAToolkit_INCLUDE_DIRS} "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}/include")
  set(LSEF_CUDA_EXTRA_INCLUDE_DIRS "")
  foreach(_header cublas_v2.h cublasLt.h cusparse.h cusolverDn.h)
    unset(_lsef_header_dir)
    find_path(_lsef_header_dir ${_header} NO_CACHE NO_DEFAULT_PATH
              PATHS ${_lsef_toolkit_include} ${_lsef_bundled_include})
    if(NOT _lsef_header_dir)
      string(CONCAT _lsef_no_cuda "${_header} is in neither the CUDA toolkit "
                    "(${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}) nor torch's nvidia/* packages")
      break()
    endif()
    if(NOT _lsef_header_dir IN_LIST _lsef_toolkit_include)
      list(APPEND LSEF_CUDA_EXTRA_INCLUDE_DIRS "${_lsef_header_dir}")
    endif()
  endforeach()
  list(REMOVE_DUPLICATES LSEF_CUDA_EXTRA_INCLUDE_DIRS)

  if(TARGET CUDA::cudart)
    set(_lsef_cudart CUDA::cudart)
  else()
    find_library(_lsef_cudart NAMES cudart libcudart.so.${_lsef_nvcc_major} NO_CACHE
                 NO_DEFAULT_PATH PATHS ${_lsef_bundled_lib})
    if(NOT _lsef_cudart)
      string(CONCAT _lsef_no_cuda "the shared CUDA runtime (libcudart) is in neither the CUDA "
                    "toolkit nor torch's nvidia/* packages")
    endif()
  endif()
endif()

if(NOT _lsef_no_cuda STREQUAL "")
  if(_lsef_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "lsef_ext: LSEF_CUDA=ON, but ${_lsef_no_cuda}. Fix that, or build with "
                        "LSEF_CUDA=AUTO or OFF for the CPU kernels only.")
  endif()
  message(STATUS "lsef_ext: building the CPU kernels only: ${_lsef_no_cuda}")
  set(LSEF_CUDA_SOURCES "")
  return()
endif()

set(LSEF_WITH_CUDA ON)
set_property(TARGET torch::cudart PROPERTY INTERFACE_LINK_LIBRARIES "${_lsef_cudart}")

# The architectures as cuobjdump names them: sm_XY for machine code, compute_XY for PTX.
set(LSEF_CUDA_ARCHS_TEXT "")
foreach(_arch IN LISTS LSEF_CUDA_ARCHITECTURES)
  if(_arch MATCHES "^([0-9]+[af]?)-real$")
    list(APPEND LSEF_CUDA_ARCHS_TEXT "sm_${CMAKE_MATCH_1}")
  elseif(_arch MATCHES "^([0-9]+[af]?)-virtual$")
    list(APPEND LSEF_CUDA_ARCHS_TEXT "compute_${CMAKE_MATCH_1}")
  elseif(_arch MATCHES "^([0-9]+[af]?)$")
    list(APPEND LSEF_CUDA_ARCHS_TEXT "sm_${CMAKE_MATCH_1}" "compute_${CMAKE_MATCH_1}")
  else()
    list(APPEND LSEF_CUDA_ARCHS_TEXT "${_arch}")
  endif()
endforeach()
# Spaces, not CMake's semicolons, which would split the compile definition below.
string(REPLACE ";" " " LSEF_CUDA_ARCHS_TEXT "${LSEF_CUDA_ARCHS_TEXT}")
message(STATUS "lsef_ext: CUDA kernels with nvcc ${CMAKE_CUDA_COMPILER_VERSION} for "
               "${LSEF_CUDA_ARCHS_TEXT} (torch CUDA ${LSEF_TORCH_CUDA_VERSION})")

function(lsef_configure_cuda_target target)
  set_target_properties(${target} PROPERTIES
    CUDA_ARCHITECTURES "${LSEF_CUDA_ARCHITECTURES}"
    # Not CMake's default static runtime: the kernels must share torch's runtime (its streams,
    # its allocator's memory, its error state), which torch::cudart links as a shared library.
    CUDA_RUNTIME_LIBRARY None)
  # LSEF_CXX_STANDARD (CMakeLists.txt) is given to nvcc directly because CMake 3.25 knows no
  # C++20 flag for nvcc (CUDA_STANDARD 20 fails to generate).
  # -O3 comes with CMake's Release flags, and ptxas optimises device code fully unless -G.
  # -lineinfo lets profilers map machine code to source lines; it does not change the code.
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-std=c++${LSEF_CXX_STANDARD} --expt-relaxed-constexpr -lineinfo>)
  target_compile_definitions(${target} PRIVATE
    LSEF_WITH_CUDA
    LSEF_CUDA_VERSION="${CMAKE_CUDA_COMPILER_VERSION}"
    LSEF_CUDA_ARCHS="${LSEF_CUDA_ARCHS_TEXT}")
  # Only for nvcc, which searches its own toolkit's headers (-I) before any -isystem folder.
  target_include_directories(${target} SYSTEM PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:${LSEF_CUDA_EXTRA_INCLUDE_DIRS}>)
  # TORCH_LIBRARIES already brings torch_cuda and c10_cuda.
  target_link_libraries(${target} PRIVATE torch::cudart)
endfunction()
