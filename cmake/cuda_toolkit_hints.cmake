# Included before find_package(Torch).
#
# A CUDA build of torch makes find_package(Torch) run torch's own CUDA probe (Caffe2's
# public/cuda.cmake), which needs a complete CUDA toolkit: with none it stops the configure, so
# even a CPU-only build of this project would fail, and with a partial one (nvcc and cudart but the
# math libraries only inside torch's nvidia/* wheels) it fails too. The probe also overrides
# CMAKE_CUDA_ARCHITECTURES with its own -gencode flags. This project needs none of what it sets
# up, so it is skipped through its include guard, the target torch::cudart; cmake/cuda.cmake
# points that target at the CUDA runtime when the CUDA kernels are built, and it stays empty
# otherwise (torch's libraries already carry their own dependency on the runtime).
if(NOT TARGET torch::cudart)
  add_library(torch::cudart INTERFACE IMPORTED)
endif()
