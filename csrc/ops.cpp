// Schemas of fastgrpo's compiled ops, declared once. Each backend file binds its implementations with
// TORCH_LIBRARY_IMPL(fastgrpo, CPU|CUDA, m); importing fastgrpo._C registers everything (no pybind11 module).
// The Triton ops of the same names, prefixed `triton_`, are registered from Python.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An importable module with no members: `import fastgrpo._C` loads the library, which registers the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// Float hyper-parameters come as fp32 tensors on the device of the op's inputs (`inv_temperature`, `eps`: 1 value;
// `params`: [1/τ, eps_low, eps_high, ratio_cap, dual_clip, log_ratio_clamp, cispo_low, cispo_high, sapo_tau_pos,
// sapo_tau_neg, kl_input_clamp, kl_output_clamp, adv_eps], see token_objective.h), not as `float` arguments:
// torch.compile specializes a float argument, recompiling for every new value. The int `codes` select variants.
TORCH_LIBRARY(fastgrpo, m) {
  // (ℓ, stats = [row max, log Σ exp(z/τ − max)], H) per row, fp32; rows with mask 0 get zeros.
  m.def("token_logprobs(Tensor logits, Tensor targets, Tensor? mask, Tensor inv_temperature, bool with_entropy)"
        " -> (Tensor, Tensor, Tensor)");
  // ∂/∂logits of Σ g_ℓ·ℓ + g_H·H, contiguous, in the logits' dtype.
  m.def("token_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor targets,"
        " Tensor? mask, Tensor stats, Tensor entropy, Tensor inv_temperature) -> Tensor");
  // (loss, ℓ, H, ρ, ∂loss/∂ℓ, advantage used, ∂loss/∂logits) of a token-local config in one pass.
  m.def("grpo_loss_fused(Tensor logits, Tensor targets, Tensor mask, Tensor advantages, Tensor? old_logprobs,"
        " Tensor? ref_logprobs, Tensor w_policy, Tensor w_kl, Tensor w_entropy, Tensor? rewards, Tensor? batch_std,"
        " Tensor? seq, Tensor params, int[] codes, bool with_entropy, bool write_grad)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same with the gradient written over the logits.
  m.def("grpo_loss_fused_inplace_(Tensor(a!) logits, Tensor targets, Tensor mask, Tensor advantages,"
        " Tensor? old_logprobs, Tensor? ref_logprobs, Tensor w_policy, Tensor w_kl, Tensor w_entropy,"
        " Tensor? rewards, Tensor? batch_std, Tensor? seq, Tensor params, int[] codes, bool with_entropy)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // grad *= scale in place, nothing done (on the device) when scale == 1.
  m.def("scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
  // (advantages [B], group mean, group std) for fp32 rewards in contiguous groups.
  m.def("advantages(Tensor rewards, Tensor batch_std, int group_size, int estimator, bool divide,"
        " bool use_batch_std, bool singleton_raw, Tensor eps) -> (Tensor, Tensor, Tensor)");
}
