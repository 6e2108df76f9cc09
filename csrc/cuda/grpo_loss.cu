// CUDA kernels of the fused loss (thread 0 evaluates the per-token objective of token_objective.h, shared with the
// CPU kernel) and of scale_grad_, and their launchers. The float hyper-parameters (1/τ, the objective's scalars)
// are read from device memory once per block (1/τ by every thread, the scalars by the thread that evaluates the
// objective): the same few words for every block, served from cache, nothing per element.
#include "rows.cuh"

namespace fastgrpo {
namespace cuda {
namespace {

// `p` holds the variant codes; every thread loads 1/τ from `params`, thread 0 (which evaluates the objective)
// all the scalars. kEntropy = with_entropy, a template parameter (rows.cuh: LSE). Each block loops over rows
// (rows.cuh: programs); a masked row skips the loop's body, the same for every thread of the block, as the
// barriers of row_statistics and below need. shared_dlogp is rewritten for the next row only after
// row_statistics' barriers, which every thread reaches once it has read this row's value.
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    grpo_loss_fused_kernel(const T* logits, RowLayout layout, FusedLossArgs a, ObjectiveParams p) {
  __shared__ float shared_dlogp;
  const int64_t n = layout.rows;
  const float inv_t = a.params[kInvTemperature];
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const auto input = [&](TokenInput k) { return a.tokens[k * n + r]; };
    const auto output = [&](TokenOutput k) -> float& { return a.outputs[k * n + r]; };
    T* out = a.grad ? static_cast<T*>(a.grad) + (r / layout.T) * a.grad_stride_b + (r % layout.T) * a.grad_stride_t
                    : nullptr;
    if (input(kMask) == 0.f) {
      if (threadIdx.x == 0) {
        for (int k = 0; k < kNumTokenOutputs; ++k) output(static_cast<TokenOutput>(k)) = 0.f;
      }
      if (out) write_zero_row(out, layout.V);
      continue;
    }
    const T* row = logits + row_offset(layout, r);
    const int64_t target = a.targets[r];
    const RowStats st = row_statistics<kEntropy>(row, target, layout.V, inv_t);  // entropy 0 without kEntropy
    if (threadIdx.x == 0) {
      load_scalars(p, a.params);
      const float A = p.adv_from_rewards ? group_advantage(a.rewards, a.seq[r], p) : input(kAdvantages);
      const TokenResult t = token_objective(st.logprob, st.entropy, A, input(kOldLogprobs), input(kRefLogprobs),
                                            input(kWPolicy), input(kWKl), input(kWEntropy), input(kTeacherLogprobs),
                                            input(kWTeacher), p);
      output(kOutLogprobs) = st.logprob;
      output(kOutEntropy) = st.entropy;
      output(kOutLossTerms) = t.loss;
      output(kOutRatio) = t.ratio;
      output(kOutGradLogprobs) = t.dlogp;
      output(kOutAdvantagesUsed) = t.advantage;
      output(kOutProbSq) = st.prob_sq;
      output(kOutProbSqLogp) = st.prob_sq_logp;  // 0 without kEntropy
      output(kOutProbSqLogpSq) = st.prob_sq_logp_sq;
      shared_dlogp = t.dlogp;
    }
    __syncthreads();  // shared_dlogp, and every thread's reads of the row (the target logit last) before any write
    // without kEntropy, w_entropy is 0 (the op's with_entropy is set whenever the entropy has a weight)
    if (out) write_grad_row<kEntropy>(out, row, target, layout.V, st, shared_dlogp, -input(kWEntropy), inv_t);
  }
}

// grad *= scale over rows of V contiguous elements (blockIdx.x: the row, blockIdx.y: a slice of it), rows
// addressed as the loss kernels address them: a view such as logits[:, :-1] is scaled where it lies.
template <typename T>
__global__ void scale_grad_kernel(T* grad, RowLayout layout, const float* scale) {
  const float s = *scale;
  if (s == 1.f) return;  // the usual loss.backward(): decided on the device, no host sync
  T* row = grad + row_offset(layout, blockIdx.x);
  for (int64_t i = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < layout.V;
       i += static_cast<int64_t>(gridDim.y) * blockDim.x)
    row[i] = from_float<T>(to_float(row[i]) * s);
}

}  // namespace

const char* grpo_loss_fused(DType dtype, const void* logits, RowLayout l, const FusedLossArgs& args,
                            ObjectiveParams codes, bool with_entropy, void* stream) {
  if (l.rows == 0) return nullptr;
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    const auto kernel = with_entropy ? grpo_loss_fused_kernel<T, true> : grpo_loss_fused_kernel<T, false>;
    // with the gradient, each row is read twice: bound the rows in flight by L2
    const int64_t reread_bytes = args.grad ? l.V * static_cast<int64_t>(sizeof(T)) : 0;
    kernel<<<programs(kernel, l.rows, reread_bytes), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(logits), l, args, codes);
  });
}

const char* scale_grad(DType dtype, void* grad, RowLayout l, const float* scale, void* stream) {
  if (l.rows == 0 || l.V == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>(l.rows), static_cast<unsigned>(std::min<int64_t>((l.V + 1023) / 1024, 65535)));
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    scale_grad_kernel<T><<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(static_cast<T*>(grad), l, scale);
  });
}

}  // namespace cuda
}  // namespace fastgrpo
