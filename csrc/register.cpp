// The single TORCH_LIBRARY(pyprotoclip) block: every schema, forward and backward ops alike.
// Device kernels register themselves in cpu/*.cpp and cuda/*.cu with TORCH_LIBRARY_IMPL; fakes
// and autograd are registered from Python (pyprotoclip/ops). Built as the Python extension
// pyprotoclip._C it also exposes build_info(); built by CMake it is a plain shared library.
#include <torch/library.h>

#include "ops.h"

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

TORCH_LIBRARY(pyprotoclip, m) {
  // similarity cross-entropy (all-gather InfoNCE)
  m.def("similarity_cross_entropy(Tensor q, Tensor k, Tensor targets, Tensor scale) -> (Tensor loss, Tensor lse)");
  m.def(
      "_similarity_cross_entropy_backward(Tensor grad_loss, Tensor q, Tensor k, Tensor targets, Tensor scale, "
      "Tensor lse) -> (Tensor grad_q, Tensor grad_k, Tensor grad_scale)");
  m.def(
      "symmetric_similarity_cross_entropy(Tensor q, Tensor k, Tensor scale) -> "
      "(Tensor loss_rows, Tensor loss_cols, Tensor lse_rows, Tensor lse_cols)");
  m.def(
      "_symmetric_similarity_cross_entropy_backward(Tensor grad_rows, Tensor grad_cols, Tensor q, Tensor k, "
      "Tensor scale, Tensor lse_rows, Tensor lse_cols) -> (Tensor grad_q, Tensor grad_k, Tensor grad_scale)");
  // BEGIN proto_softmax schemas
  m.def(
      "proto_softmax_loss(Tensor features, Tensor prototypes, Tensor temperature, Tensor? target_index, "
      "Tensor? target_probs, Tensor? teacher_features, Tensor? teacher_prototypes, Tensor? teacher_temperature) "
      "-> (Tensor loss, Tensor lse, Tensor teacher_lse)");
  m.def(
      "_proto_softmax_loss_backward(Tensor grad_loss, Tensor? grad_lse, Tensor features, Tensor prototypes, "
      "Tensor temperature, Tensor? target_index, Tensor? target_probs, Tensor? teacher_features, "
      "Tensor? teacher_prototypes, Tensor? teacher_temperature, Tensor lse, Tensor teacher_lse, bool[3] output_mask) "
      "-> (Tensor grad_features, Tensor grad_prototypes, Tensor grad_temperature)");
  m.def("proto_assign(Tensor features, Tensor prototypes, Tensor temperature) -> Tensor");
  m.def("proto_assign_topk(Tensor features, Tensor prototypes, Tensor temperature, int k) -> (Tensor values, Tensor indices)");
  m.def(
      "_proto_assign_backward(Tensor grad_probs, Tensor features, Tensor prototypes, "
      "Tensor temperature, bool[3] output_mask) -> (Tensor grad_features, Tensor grad_prototypes, "
      "Tensor grad_temperature)");
  // END proto_softmax schemas
  // BEGIN kmeans schemas
  m.def(
      "kmeans_update(Tensor x, Tensor centroids, Tensor? weights, str metric) -> "
      "(Tensor assign, Tensor score, Tensor sums, Tensor counts)");
  // END kmeans schemas
}

namespace pyprotoclip {

// Compile-time facts about this library, for build_info() / `pyprotoclip doctor`.
extern "C" const char* pyprotoclip_torch_version() { return TORCH_VERSION_STRING; }

}  // namespace pyprotoclip

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
