// CUDA bindings of the fused loss ops and scale_grad_: validate, allocate, launch on the current stream, check.
#include "bindings.h"

namespace fastgrpo {
namespace {
using namespace cuda_bindings;

// Returns (loss, outputs).
std::tuple<at::Tensor, at::Tensor> fused(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& tokens,
                                         const std::optional<at::Tensor>& rewards,
                                         const std::optional<at::Tensor>& seq, const at::Tensor& params,
                                         at::ArrayRef<int64_t> codes, bool with_entropy, const at::Tensor& grad) {
  check_logits(logits, targets);
  check_codes(codes, kNumCodes);
  c10::DeviceGuard guard(logits.device());
  const int64_t rows = targets.numel();
  const auto in = token_inputs(tokens, logits, rows);
  const auto values = float_params(params, logits, kNumScalars, "params");  // read by the kernel, never here
  const ObjectiveParams p = unpack_codes(codes);
  check_reward_inputs(p, rewards, seq, logits, rows);
  auto outputs = at::empty({kNumTokenOutputs, rows}, logits.options().dtype(at::kFloat));
  const auto ids = rows_long(targets);
  const auto rw = p.adv_from_rewards ? rows_float(*rewards) : at::Tensor();
  const auto sq = p.adv_from_rewards ? rows_long(*seq) : at::Tensor();
  const RowAddress ga = grad.defined() ? row_address(grad) : RowAddress{1, 0, 0};
  const cuda::FusedLossArgs a{ids.const_data_ptr<int64_t>(), in.const_data_ptr<float>(), opt_ptr<float>(rw),
                              values.const_data_ptr<float>(), opt_ptr<int64_t>(sq), outputs.mutable_data_ptr<float>(),
                              grad.defined() ? grad.data_ptr() : nullptr, ga.stride_b, ga.stride_t};
  check_launch(cuda::grpo_loss_fused(dtype_of(logits), logits.const_data_ptr(), layout_of(logits, rows), a, p,
                                     with_entropy, current_stream(logits)),
               "grpo_loss_fused");
  return {outputs[kOutLossTerms].sum(), outputs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grpo_loss_fused_cuda(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& tokens,
    const std::optional<at::Tensor>& rewards, const std::optional<at::Tensor>& seq, const at::Tensor& params,
    at::ArrayRef<int64_t> codes, bool with_entropy, bool write_grad) {
  auto grad = write_grad ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  auto [loss, outputs] = fused(logits, targets, tokens, rewards, seq, params, codes, with_entropy,
                               write_grad ? grad : at::Tensor());
  return {loss, outputs, grad};
}

std::tuple<at::Tensor, at::Tensor> grpo_loss_fused_inplace_cuda(
    at::Tensor& logits, const at::Tensor& targets, const at::Tensor& tokens, const std::optional<at::Tensor>& rewards,
    const std::optional<at::Tensor>& seq, const at::Tensor& params, at::ArrayRef<int64_t> codes, bool with_entropy) {
  return fused(logits, targets, tokens, rewards, seq, params, codes, with_entropy, logits);
}

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& scale) {
  if (grad.numel() == 0) return;
  c10::DeviceGuard guard(grad.device());
  const auto s = rows_float(scale);
  // Logits-shaped gradients ([B, T, V] / [N, V], maybe the in-place view of a larger buffer) keep their strides;
  // the others (hidden, weight, bias of the linear path) are contiguous: one row per leading index.
  const bool rows_as_given = (grad.dim() == 2 || grad.dim() == 3) && (grad.size(-1) <= 1 || grad.stride(-1) == 1);
  TORCH_CHECK(rows_as_given || grad.is_contiguous(),
              "grad must be contiguous, or a [B, T, V] / [N, V] view contiguous in its last dim, got strides ",
              grad.strides());
  const at::Tensor rows = rows_as_given ? grad : grad.view({-1, grad.dim() ? grad.size(-1) : 1});
  check_launch(cuda::scale_grad(dtype_of(grad), grad.mutable_data_ptr(), layout_of(rows, rows.numel() / rows.size(-1)),
                                s.const_data_ptr<float>(), current_stream(grad)),
               "scale_grad_");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgrpo, CUDA, m) {
  m.impl("grpo_loss_fused", &grpo_loss_fused_cuda);
  m.impl("grpo_loss_fused_inplace_", &grpo_loss_fused_inplace_cuda);
  m.impl("scale_grad_", &scale_grad_cuda);
}

}  // namespace fastgrpo
