// What this build of the library is. Built as the Python extension pyprotoclip._C it exposes
// build_info() for pyprotoclip.build_info() / `pyprotoclip doctor`; built by CMake it is a plain
// shared library and keeps only pyprotoclip_torch_version(). No op is defined here: each op's schemas
// are in csrc/<stem>.cpp (TORCH_LIBRARY_FRAGMENT) and its kernels in cpu/<stem>.cpp and cuda/<stem>.cu.
#ifdef PYPROTOCLIP_PYTHON_MODULE
#include <torch/extension.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef TORCH_VERSION_STRING
#define TORCH_VERSION_STRING "unknown"
#endif
#ifndef PYPROTOCLIP_CUDA_ARCHS
#define PYPROTOCLIP_CUDA_ARCHS ""
#endif

// The torch version this library was compiled against, for C++ users checking their link.
extern "C" const char* pyprotoclip_torch_version() { return TORCH_VERSION_STRING; }

#ifdef PYPROTOCLIP_PYTHON_MODULE
PYBIND11_MODULE(_C, module) {
  module.def("build_info", [] {
    pybind11::dict info;
    info["torch_version"] = TORCH_VERSION_STRING;
#ifdef WITH_CUDA
    info["cuda"] = true;
    info["cuda_archs"] = PYPROTOCLIP_CUDA_ARCHS;
#else
    info["cuda"] = false;
    info["cuda_archs"] = "";
#endif
#ifdef _OPENMP
    info["openmp"] = true;
    info["openmp_max_threads"] = omp_get_max_threads();
#else
    info["openmp"] = false;
    info["openmp_max_threads"] = 1;
#endif
    info["compiler"] = __VERSION__;
    return info;
  });
}
#endif
