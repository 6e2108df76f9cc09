// What the CUDA bindings of every op share: dtype dispatch, the current stream, launch checks, row layouts.
// Compiled by the host compiler against any PyTorch (a CPU-only one included): the stream comes through the
// device-generic guard interface, the kernels through launch.h's plain signatures.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>
#ifndef FASTGRPO_STREAM_NATIVE_HANDLE
#include <c10/cuda/CUDAStream.h>
#endif

#include "../common.h"
#include "launch.h"

namespace fastgrpo {
namespace cuda_bindings {

inline cuda::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: TORCH_CHECK(false, "logits must be float32, bfloat16 or float16 on CUDA, got ", x.scalar_type());
  }
}

inline void* current_stream(const at::Tensor& x) {
#ifdef FASTGRPO_STREAM_NATIVE_HANDLE  // newer torch: no link to c10_cuda, so this builds against a CPU-only torch
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(x.device()).native_handle();
#else  // older torch (2.6): through c10_cuda, which setup.py links (a CUDA build of torch only)
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
#endif
}

inline void check_launch(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, "fastgrpo::", op, " CUDA kernel failed: ", error);
}

inline cuda::RowLayout layout_of(const at::Tensor& logits, int64_t rows) {
  const RowAddress a = row_address(logits);
  return {rows, logits.size(-1), a.T, a.stride_b, a.stride_t};
}

template <typename T>
const T* opt_ptr(const at::Tensor& x) { return x.defined() ? x.const_data_ptr<T>() : nullptr; }

}  // namespace cuda_bindings
}  // namespace fastgrpo
