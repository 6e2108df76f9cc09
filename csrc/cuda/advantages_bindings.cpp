// CUDA binding of the advantages op: validate, allocate, launch on the current stream, check.
#include "bindings.h"

namespace fastgrpo {
namespace {
using namespace cuda_bindings;

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
  m.impl("advantages", &advantages_cuda);
}

}  // namespace fastgrpo
