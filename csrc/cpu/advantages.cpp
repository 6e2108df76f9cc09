// CPU kernel of the advantages op: group statistics once per group (csrc/token_objective.h), whole groups per
// thread (schema: csrc/ops.cpp).
#include <torch/library.h>

#include "rows.h"

namespace fastgrpo {
namespace {
using namespace cpu;

std::tuple<at::Tensor, at::Tensor, at::Tensor> advantages_cpu(const at::Tensor& rewards, const at::Tensor& params,
                                                              at::ArrayRef<int64_t> codes) {
  check_codes(codes, kNumAdvantageCodes);
  ObjectiveParams p{};
  unpack_advantage_codes(p, codes);
  load_advantage_scalars(p, float_params(params, rewards, kNumAdvantageScalars, "params").const_data_ptr<float>());
  const int64_t G = p.group_size;
  TORCH_CHECK(G > 0 && rewards.numel() % G == 0, "group_size (", G, ") must divide the number of rewards (",
              rewards.numel(), ")");
  const auto r = rows_float(rewards);
  const int64_t n = r.numel(), groups = n / G;
  auto adv = at::empty({n}, r.options()), mean = at::empty({groups}, r.options()), std_ = at::empty({groups}, r.options());
  const float* rp = r.const_data_ptr<float>();
  float *ap = adv.mutable_data_ptr<float>(), *mp = mean.mutable_data_ptr<float>(), *sp = std_.mutable_data_ptr<float>();
  at::parallel_for(0, groups, 1024, [&](int64_t g0, int64_t g1) {  // whole groups per thread, statistics once each
    for (int64_t g = g0; g < g1; ++g) {
      const GroupStats s = group_stats(rp + g * G, G);
      mp[g] = s.mean;
      sp[g] = s.std;
      for (int64_t i = g * G; i < (g + 1) * G; ++i) ap[i] = advantage_of(rp[i], s, p);
    }
  });
  return {adv.view(rewards.sizes()), mean, std_};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgrpo, CPU, m) {
  m.impl("advantages", &advantages_cpu);
}

}  // namespace fastgrpo
