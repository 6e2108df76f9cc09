// CUDA kernels of the token_logprobs op and its backward, and their launchers (launch.h; row machinery: rows.cuh).
#include "rows.cuh"

namespace fastgrpo {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) token_logprobs_kernel(const T* logits, RowLayout layout,
                                                                  const int64_t* targets, const float* mask,
                                                                  const float* inv_temperature, bool with_entropy,
                                                                  float* logprobs, float* stats, float* entropy) {
  const int64_t r = blockIdx.x;
  if (mask != nullptr && mask[r] == 0.f) {
    if (threadIdx.x == 0) {
      logprobs[r] = stats[2 * r] = stats[2 * r + 1] = 0.f;
      if (with_entropy) entropy[r] = 0.f;
    }
    return;
  }
  const RowStats st = row_statistics(logits + row_offset(layout, r), targets[r], layout.V, *inv_temperature);
  if (threadIdx.x == 0) {
    logprobs[r] = st.logprob;
    stats[2 * r] = st.max;
    stats[2 * r + 1] = st.log_sum;
    if (with_entropy) entropy[r] = st.entropy;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) token_logprobs_backward_kernel(
    T* grad, const T* logits, RowLayout layout, const int64_t* targets, const float* mask, const float* stats,
    const float* entropy, const float* grad_logprobs, const float* grad_entropy, const float* inv_temperature) {
  const int64_t r = blockIdx.x;
  T* out = grad + r * layout.V;
  const float g_lp = grad_logprobs[r], g_ent = grad_entropy ? grad_entropy[r] : 0.f;
  if ((mask != nullptr && mask[r] == 0.f) || (g_lp == 0.f && g_ent == 0.f)) {
    write_zero_row(out, layout.V);
    return;
  }
  const RowStats st{0.f, stats[2 * r], stats[2 * r + 1], grad_entropy ? entropy[r] : 0.f};
  write_grad_row(out, logits + row_offset(layout, r), targets[r], layout.V, st, g_lp, g_ent, *inv_temperature);
}

}  // namespace

const char* token_logprobs(DType dtype, const void* logits, RowLayout l, const int64_t* targets, const float* mask,
                           const float* inv_t, bool with_entropy, float* logprobs, float* stats, float* entropy,
                           void* stream) {
  if (l.rows == 0) return nullptr;
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    token_logprobs_kernel<T><<<l.rows, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(logits), l, targets, mask, inv_t, with_entropy, logprobs, stats, entropy);
  });
}

const char* token_logprobs_backward(DType dtype, void* grad, const void* logits, RowLayout l, const int64_t* targets,
                                    const float* mask, const float* stats, const float* entropy,
                                    const float* grad_logprobs, const float* grad_entropy, const float* inv_t,
                                    void* stream) {
  if (l.rows == 0) return nullptr;
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    token_logprobs_backward_kernel<T><<<l.rows, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<T*>(grad), static_cast<const T*>(logits), l, targets, mask, stats, entropy, grad_logprobs,
        grad_entropy, inv_t);
  });
}

}  // namespace cuda
}  // namespace fastgrpo
