// CUDA kernels of the token_logprobs op and its backward, and their launchers (launch.h; row machinery: rows.cuh).
#include "rows.cuh"

namespace fastgrpo {
namespace cuda {
namespace {

// stats: [rows, kNumRowStats] (token_objective.h: RowStat). kEntropy = with_entropy: a template parameter, so that
// the kernel without the entropy carries none of its sums (rows.cuh: LSE). Each block loops over rows (rows.cuh:
// programs); a masked row skips the loop's body, the same for every thread of the block, as row_statistics' barriers
// need.
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    token_logprobs_kernel(const T* logits, RowLayout layout, const int64_t* targets, const float* mask,
                          const float* inv_temperature, float* logprobs, float* stats, float* entropy) {
  const float inv_t = *inv_temperature;
  for (int64_t r = blockIdx.x; r < layout.rows; r += gridDim.x) {
    float* row_stats = stats + kNumRowStats * r;
    if (mask != nullptr && mask[r] == 0.f) {
      if (threadIdx.x == 0) {
        logprobs[r] = 0.f;
        for (int k = 0; k < kNumRowStats; ++k) row_stats[k] = 0.f;
        if (kEntropy) entropy[r] = 0.f;
      }
      continue;
    }
    const RowStats st = row_statistics<kEntropy>(logits + row_offset(layout, r), targets[r], layout.V, inv_t);
    if (threadIdx.x == 0) {
      logprobs[r] = st.logprob;
      row_stats[kStatMax] = st.max;
      row_stats[kStatLogSum] = st.log_sum;
      row_stats[kStatProbSq] = st.prob_sq;
      row_stats[kStatProbSqLogp] = st.prob_sq_logp;  // 0 without kEntropy
      row_stats[kStatProbSqLogpSq] = st.prob_sq_logp_sq;
      if (kEntropy) entropy[r] = st.entropy;
    }
  }
}

// kEntropy: grad_entropy is given (else g_H = 0 and the entropy's term is left out of the loop).
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM) token_logprobs_backward_kernel(
    T* grad, const T* logits, RowLayout layout, const int64_t* targets, const float* mask, const float* stats,
    const float* entropy, const float* grad_logprobs, const float* grad_entropy, const float* inv_temperature) {
  const float inv_t = *inv_temperature;
  for (int64_t r = blockIdx.x; r < layout.rows; r += gridDim.x) {
    T* out = grad + r * layout.V;
    const float g_lp = grad_logprobs[r], g_ent = kEntropy ? grad_entropy[r] : 0.f;
    if ((mask != nullptr && mask[r] == 0.f) || (g_lp == 0.f && g_ent == 0.f)) {
      write_zero_row(out, layout.V);
      continue;
    }
    // only M and log Σ of the forward's stats are needed (the other fields of st are unused by write_grad_row)
    const float* row_stats = stats + kNumRowStats * r;
    const RowStats st{0.f, row_stats[kStatMax], row_stats[kStatLogSum], kEntropy ? entropy[r] : 0.f};
    write_grad_row<kEntropy>(out, logits + row_offset(layout, r), targets[r], layout.V, st, g_lp, g_ent, inv_t);
  }
}

}  // namespace

const char* token_logprobs(DType dtype, const void* logits, RowLayout l, const int64_t* targets, const float* mask,
                           const float* inv_t, bool with_entropy, float* logprobs, float* stats, float* entropy,
                           void* stream) {
  if (l.rows == 0) return nullptr;
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    const auto kernel = with_entropy ? token_logprobs_kernel<T, true> : token_logprobs_kernel<T, false>;
    kernel<<<programs(kernel, l.rows, 0), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(logits), l, targets, mask, inv_t, logprobs, stats, entropy);
  });
}

const char* token_logprobs_backward(DType dtype, void* grad, const void* logits, RowLayout l, const int64_t* targets,
                                    const float* mask, const float* stats, const float* entropy,
                                    const float* grad_logprobs, const float* grad_entropy, const float* inv_t,
                                    void* stream) {
  if (l.rows == 0) return nullptr;
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    const auto kernel =
        grad_entropy ? token_logprobs_backward_kernel<T, true> : token_logprobs_backward_kernel<T, false>;
    kernel<<<programs(kernel, l.rows, 0), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<T*>(grad), static_cast<const T*>(logits), l, targets, mask, stats, entropy, grad_logprobs,
        grad_entropy, inv_t);
  });
}

}  // namespace cuda
}  // namespace fastgrpo
