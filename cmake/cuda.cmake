# Decides whether the CUDA kernels are built (LSEF_WITH_CUDA) and how.
#
#   LSEF_CUDA=AUTO  build them when torch is a CUDA build and a working CUDA compiler is found;
#                   otherwise say why in one status line and build the CPU kernels only.
#   LSEF_CUDA=ON    the same checks, but a failed one stops the configure with its reason, so a
#                   build that was asked for CUDA never silently comes out CPU-only.
#   LSEF_CUDA=OFF   CPU kernels only.
#
# Target architectures: TORCH_CUDA_ARCH_LIST from the environment (torch's format, e.g.
# "8.0;9.0+PTX"), else CMAKE_CUDA_ARCHITECTURES if given, else machine code for every data-centre
# and desktop generation nvcc 13 builds for that these kernels suit (sm_80 Ampere, sm_90 Hopper,
# sm_100 Blackwell, sm_120 Blackwell desktop) plus compute_120 PTX, which newer GPUs compile at
# load time.
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
    set(LSEF_CUDA_ARCHITECTURES 80-real 90-real 100-real 120-real 120-virtual)
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

# The kernels need the CUDA runtime's headers and its static library (from the toolkit), and
# libtorch_cuda, which holds the C shim's CUDA part (the current stream), found already loaded
# at import by soname as libtorch_cpu is (CMakeLists.txt).
if(_lsef_no_cuda STREQUAL "")
  find_package(CUDAToolkit QUIET)
  if(NOT TARGET CUDA::cudart_static)
    set(_lsef_no_cuda "the CUDA toolkit of ${CMAKE_CUDA_COMPILER} has no static runtime (libcudart_static.a)")
  endif()
  find_library(LSEF_TORCH_CUDA_LIBRARY torch_cuda PATHS "${LSEF_TORCH_LIB}" NO_DEFAULT_PATH)
  if(NOT LSEF_TORCH_CUDA_LIBRARY)
    set(_lsef_no_cuda "torch's lib folder ${LSEF_TORCH_LIB} has no libtorch_cuda")
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
    # The CUDA runtime linked statically (docs/DESIGN.md §15): the module then loads under any
    # CUDA build of torch whose driver runs CUDA 13 code, whatever runtime torch ships. Streams,
    # memory and the context are the driver's, shared with torch's own runtime; error state is
    # per runtime, and the kernels check their own launches.
    CUDA_RUNTIME_LIBRARY Static)
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
  target_link_libraries(${target} PRIVATE "${LSEF_TORCH_CUDA_LIBRARY}" CUDA::cudart_static)
endfunction()
