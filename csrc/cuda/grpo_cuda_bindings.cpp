// CUDA implementations of fastgrpo's ops: validate, allocate, launch on the current stream, check the launch.
// Compiled by the host compiler against any PyTorch (a CPU-only one included): the stream comes through the
// device-generic guard interface, the kernels through launch.h's plain signatures.
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
namespace {

cuda::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: TORCH_CHECK(false, "logits must be float32, bfloat16 or float16 on CUDA, got ", x.scalar_type());
  }
}

void* current_stream(const at::Tensor& x) {
#ifdef FASTGRPO_STREAM_NATIVE_HANDLE  // newer torch: no link to c10_cuda, so this builds against a CPU-only torch
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(x.device()).native_handle();
#else  // older torch (2.6): through c10_cuda, which setup.py links (a CUDA build of torch only)
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
#endif
}

void check_launch(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, "fastgrpo::", op, " CUDA kernel failed: ", error);
}

cuda::RowLayout layout_of(const at::Tensor& logits, int64_t rows) {
  const RowAddress a = row_address(logits);
  return {rows, logits.size(-1), a.T, a.stride_b, a.stride_t};
}

template <typename T>
const T* opt_ptr(const at::Tensor& x) { return x.defined() ? x.const_data_ptr<T>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                                   const std::optional<at::Tensor>& mask,
                                                                   const at::Tensor& inv_temperature,
                                                                   bool with_entropy) {
  check_logits(logits, targets);
  c10::DeviceGuard guard(logits.device());
  const auto inv_t = float_params(inv_temperature, logits, 1, "inv_temperature");
  const auto f32 = logits.options().dtype(at::kFloat);
  auto logprobs = at::empty(targets.sizes(), f32);
  auto stats = stats_like(logprobs);
  auto entropy = with_entropy ? at::empty(targets.sizes(), f32) : at::empty({0}, f32);
  const auto ids = rows_long(targets);
  const auto row_mask = mask ? rows_float(*mask) : at::Tensor();
  check_launch(cuda::token_logprobs(dtype_of(logits), logits.const_data_ptr(), layout_of(logits, targets.numel()),
                                    ids.const_data_ptr<int64_t>(), opt_ptr<float>(row_mask),
                                    inv_t.const_data_ptr<float>(), with_entropy, logprobs.mutable_data_ptr<float>(),
                                    stats.mutable_data_ptr<float>(), with_entropy ? entropy.mutable_data_ptr<float>() : nullptr,
                                    current_stream(logits)),
               "token_logprobs");
  return {logprobs, stats, entropy};
}

at::Tensor token_logprobs_backward_cuda(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                                        const at::Tensor& logits, const at::Tensor& targets,
                                        const std::optional<at::Tensor>& mask, const at::Tensor& stats,
                                        const at::Tensor& entropy, const at::Tensor& inv_temperature) {
  check_logits(logits, targets);
  c10::DeviceGuard guard(logits.device());
  const auto inv_t = float_params(inv_temperature, logits, 1, "inv_temperature");
  auto grad = at::empty(logits.sizes(), logits.options());
  const auto g_lp = rows_float(grad_logprobs);
  const auto g_ent = grad_entropy ? rows_float(*grad_entropy) : at::Tensor();
  const auto ent = grad_entropy ? rows_float(entropy) : at::Tensor();
  const auto ids = rows_long(targets);
  const auto row_mask = mask ? rows_float(*mask) : at::Tensor();
  const auto st = stats.reshape(-1).contiguous();
  check_launch(cuda::token_logprobs_backward(dtype_of(logits), grad.mutable_data_ptr(), logits.const_data_ptr(),
                                             layout_of(logits, targets.numel()), ids.const_data_ptr<int64_t>(),
                                             opt_ptr<float>(row_mask), st.const_data_ptr<float>(), opt_ptr<float>(ent),
                                             g_lp.const_data_ptr<float>(), opt_ptr<float>(g_ent),
                                             inv_t.const_data_ptr<float>(), current_stream(logits)),
               "token_logprobs_backward");
  return grad;
}

// Returns (loss, outputs).
std::tuple<at::Tensor, at::Tensor> fused(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& tokens,
                                         const std::optional<at::Tensor>& rewards,
                                         const std::optional<at::Tensor>& seq, const at::Tensor& params,
                                         at::ArrayRef<int64_t> codes, bool with_entropy, const at::Tensor& grad) {
  check_logits(logits, targets);
  check_codes(codes, kNumCodes);
  c10::DeviceGuard guard(logits.device());
  const int64_t rows = targets.numel();
  const auto in = token_inputs(tokens, rows);
  const auto values = float_params(params, logits, kNumScalars, "params");  // read by the kernel, never here
  const ObjectiveParams p = unpack_codes(codes);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> advantages_cuda(const at::Tensor& rewards, const at::Tensor& params,
                                                               at::ArrayRef<int64_t> codes) {
  check_codes(codes, kNumAdvantageCodes);
  ObjectiveParams p{};
  unpack_advantage_codes(p, codes);
  TORCH_CHECK(p.group_size > 0 && rewards.numel() % p.group_size == 0, "group_size (", p.group_size,
              ") must divide the number of rewards (", rewards.numel(), ")");
  c10::DeviceGuard guard(rewards.device());
  const auto r = rows_float(rewards);
  const auto values = float_params(params, rewards, kNumAdvantageScalars, "params");  // read by the kernel
  const int64_t n = r.numel();
  auto adv = at::empty({n}, r.options()), mean = at::empty({n / p.group_size}, r.options()),
       std_ = at::empty({n / p.group_size}, r.options());
  check_launch(cuda::advantages(r.const_data_ptr<float>(), values.const_data_ptr<float>(), n, p,
                                adv.mutable_data_ptr<float>(), mean.mutable_data_ptr<float>(),
                                std_.mutable_data_ptr<float>(), current_stream(rewards)),
               "advantages");
  return {adv.view(rewards.sizes()), mean, std_};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgrpo, CUDA, m) {
  m.impl("token_logprobs", &token_logprobs_cuda);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cuda);
  m.impl("grpo_loss_fused", &grpo_loss_fused_cuda);
  m.impl("grpo_loss_fused_inplace_", &grpo_loss_fused_inplace_cuda);
  m.impl("scale_grad_", &scale_grad_cuda);
  m.impl("advantages", &advantages_cuda);
}

}  // namespace fastgrpo
