// CPU kernels of fastgrpo's ops: rows in parallel (at::parallel_for), each row streamed in L1-sized chunks
// with at::vec (AVX2/AVX-512 when built for them), fp32 accumulation whatever the logits dtype.
//
// A row is read once from memory for the statistics (chunked online log-sum-exp: one exp per element, the
// running sum rescaled once per chunk) and once more for the gradient, which is written in that same sweep.
// Vectorized exps use ATen's exp_u20 (≤ 20 ulp, ~2e-6 relative; what ATen's own CPU attention uses): 3x the
// throughput of the 1-ulp Sleef exp, and far below the 3e-5 at which the tests compare with the fp32 oracle.
// Reductions run in a fixed order that depends on V only, so a token's results do not depend on the batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../token_objective.h"

namespace fastgrpo {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 2048;  // floats of a row staged at a time: 8 KB, resident in L1 for both uses
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kVeryNegative = -1e30f;  // floor of x − max: exp() is 0 and 0·floor is 0, never 0·(−inf)

// A chunk of a row as fp32: the row itself for fp32 logits, else converted into `buf`.
template <typename scalar_t>
const float* as_float(const scalar_t* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

struct RowStats {
  float logprob, max, log_sum, entropy;
};

// One sweep over a row of V logits: ℓ of `target`, the row max M, log Σ exp(x − M) and the entropy. A NaN or
// +inf logit makes all four NaN, as log_softmax gives (exp_u20 clamps its input, so it must not see them).
template <typename scalar_t>
RowStats row_statistics(const scalar_t* row, int64_t target, int64_t V, float inv_t, bool with_entropy,
                        float* buf) {
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  float m = kNegInf, s = 0.f, a = 0.f;  // a = Σ e^(x − m)·(x − m), for the entropy
  const Vec vinv(inv_t), floor_(kVeryNegative);
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const float* x = as_float(row + c0, buf, n);
    // τ > 0, so the max of z/τ is the max of z, over τ; at::vec::maximum keeps a NaN
    const float chunk_max =
        at::vec::reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, x, n) * inv_t;
    if (std::isnan(chunk_max) || chunk_max == std::numeric_limits<float>::infinity()) return {kNaN, kNaN, kNaN, kNaN};
    const float m_new = std::max(m, chunk_max);
    if (m_new == kNegInf) continue;  // only banned (−inf) logits so far
    const Vec vm(m_new);
    Vec vs(0.f), va(0.f);
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec d = at::vec::maximum(at::vec::fmsub(Vec::loadu(x + i), vinv, vm), floor_);
      const Vec e = d.exp_u20();
      vs = vs + e;
      if (with_entropy) va = at::vec::fmadd(e, d, va);
    }
    float cs = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, vs);
    float ca = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, va);
    for (; i < n; ++i) {
      const float d = std::max(x[i] * inv_t - m_new, kVeryNegative), e = std::exp(d);
      cs += e;
      ca += e * d;
    }
    if (s == 0.f) {
      s = cs;
      a = ca;
    } else {  // re-center the running sums on the new max
      const float scale = std::exp(m - m_new);
      a = scale * (a + (m - m_new) * s) + ca;
      s = s * scale + cs;
    }
    m = m_new;
  }
  const float log_s = std::log(s);
  // ids were validated by the caller; the row is only written (in place) after this sweep, by this thread
  const float x_target = static_cast<float>(row[target]) * inv_t;
  return {(x_target - m) - log_s, m, log_s, with_entropy ? log_s - a / s : 0.f};
}

// out[v] = [g_ℓ·(1[v = y] − p_v) − g_H·p_v·(log p_v + H)] / τ, reading the row once more. `out` may be `row`.
// log p = (x/τ − M) − log Σ, relative to the max as in row_statistics: x/τ − (M + log Σ) would lose the digits
// of log Σ to the rounding of M + log Σ (2.8e-3 relative at logits ~1e6; a tie at the bf16 maximum got p = 1).
// The gradient row when g_ℓ = ±inf: ±inf where 1[v = y] − p_v is non-zero, 0 where it is (p_v underflowed),
// never 0·inf = NaN.
template <typename scalar_t>
void write_saturated_grad_row(scalar_t* out, const scalar_t* row, int64_t target, int64_t V, const RowStats& st,
                              float g_lp, float g_ent, float inv_t, float* buf) {
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const float* x = as_float(row + c0, buf, n);
    float* g_out = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(out + c0) : buf;
    for (int64_t i = 0; i < n; ++i) {
      const float log_p = std::max((x[i] * inv_t - st.max) - st.log_sum, kVeryNegative), p = std::exp(log_p);
      const float coef = (c0 + i == target ? 1.f : 0.f) - p;
      g_out[i] = ((coef == 0.f ? 0.f : g_lp * coef) - g_ent * p * (log_p + st.entropy)) * inv_t;
    }
    if (!std::is_same_v<scalar_t, float>) at::vec::convert(buf, out + c0, n);
  }
}

template <typename scalar_t>
void write_grad_row(scalar_t* out, const scalar_t* row, int64_t target, int64_t V, const RowStats& st, float g_lp,
                    float g_ent, float inv_t, float* buf) {
  if (std::isnan(st.log_sum)) {  // a NaN or +inf logit in the row (see row_statistics): its gradient is NaN
    std::fill(out, out + V, static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN()));
    return;
  }
  if (std::isinf(g_lp)) {  // ∂L/∂ℓ beyond fp32 (the loss is ±inf): the rare rows, scalar code
    write_saturated_grad_row(out, row, target, V, st, g_lp, g_ent, inv_t, buf);
    return;
  }
  const Vec vmax(st.max), vlog_s(st.log_sum), floor_(kVeryNegative), vg_lp(-g_lp * inv_t), vg_ent(-g_ent * inv_t),
      vent(st.entropy), vinv(inv_t);
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const float* x = as_float(row + c0, buf, n);
    float* g_out = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(out + c0) : buf;
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec log_p = at::vec::maximum(at::vec::fmsub(Vec::loadu(x + i), vinv, vmax) - vlog_s, floor_);
      const Vec p = log_p.exp_u20();
      Vec g = vg_lp * p;
      if (g_ent != 0.f) g = at::vec::fmadd(vg_ent * p, log_p + vent, g);
      g.store(g_out + i);
    }
    for (; i < n; ++i) {
      const float log_p = std::max(x[i] * inv_t - st.max - st.log_sum, kVeryNegative), p = std::exp(log_p);
      g_out[i] = (-g_lp * p - g_ent * p * (log_p + st.entropy)) * inv_t;
    }
    if (target >= c0 && target < c0 + n) g_out[target - c0] += g_lp * inv_t;
    if (!std::is_same_v<scalar_t, float>) at::vec::convert(buf, out + c0, n);
  }
}

template <typename scalar_t>
void write_zero_row(scalar_t* out, int64_t V) {
  std::fill(out, out + V, static_cast<scalar_t>(0));
}

// A fresh [N, V] gradient is written once, page by page: backing it with transparent huge pages (where the
// kernel leaves them to madvise) turns ~250k page faults of 4 KB into ~500 of 2 MB. Advisory only.
at::Tensor empty_gradient(const at::Tensor& logits) {
  auto grad = at::empty(logits.sizes(), logits.options());
#ifdef MADV_HUGEPAGE
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(grad.data_ptr()) + page - 1) & ~(page - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(grad.data_ptr()) + grad.nbytes();
  if (grad.nbytes() >= (4u << 20) && end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return grad;
}

// Per-thread staging buffer for one chunk of a row.
float* chunk_buffer() {
  thread_local std::vector<float> buf(kChunk);
  return buf.data();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                                  const std::optional<at::Tensor>& mask,
                                                                  const at::Tensor& inv_temperature,
                                                                  bool with_entropy) {
  check_logits(logits, targets);
  const float inv_t = *float_params(inv_temperature, logits, 1, "inv_temperature").const_data_ptr<float>();
  const int64_t rows = targets.numel(), V = logits.size(-1);
  const auto f32 = logits.options().dtype(at::kFloat);
  auto logprobs = at::empty(targets.sizes(), f32);
  auto stats = stats_like(logprobs);
  auto entropy = with_entropy ? at::empty(targets.sizes(), f32) : at::empty({0}, f32);
  const auto ids = rows_long(targets);
  const auto row_mask = mask ? rows_float(*mask) : at::Tensor();
  const RowAddress addr = row_address(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_cpu", [&] {
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const int64_t* y = ids.const_data_ptr<int64_t>();
    const float* mk = mask ? row_mask.const_data_ptr<float>() : nullptr;
    float *lp = logprobs.mutable_data_ptr<float>(), *st = stats.mutable_data_ptr<float>();
    float* ent = with_entropy ? entropy.mutable_data_ptr<float>() : nullptr;
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      float* buf = chunk_buffer();
      for (int64_t r = begin; r < end; ++r) {
        RowStats s{0.f, 0.f, 0.f, 0.f};
        if (!mk || mk[r] != 0.f) s = row_statistics(z + addr.offset(r), y[r], V, inv_t, with_entropy, buf);
        lp[r] = s.logprob;
        st[2 * r] = s.max;
        st[2 * r + 1] = s.log_sum;
        if (ent) ent[r] = s.entropy;
      }
    });
  });
  return {logprobs, stats, entropy};
}

at::Tensor token_logprobs_backward_cpu(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                                       const at::Tensor& logits, const at::Tensor& targets,
                                       const std::optional<at::Tensor>& mask, const at::Tensor& stats,
                                       const at::Tensor& entropy, const at::Tensor& inv_temperature) {
  check_logits(logits, targets);
  const float inv_t = *float_params(inv_temperature, logits, 1, "inv_temperature").const_data_ptr<float>();
  const int64_t rows = targets.numel(), V = logits.size(-1);
  auto grad = empty_gradient(logits);
  const auto g_lp = rows_float(grad_logprobs);
  const auto g_ent = grad_entropy ? rows_float(*grad_entropy) : at::Tensor();
  const auto ids = rows_long(targets);
  const auto row_mask = mask ? rows_float(*mask) : at::Tensor();
  const auto st = stats.reshape(-1).contiguous();
  const auto ent = grad_entropy ? rows_float(entropy) : at::Tensor();
  const RowAddress addr = row_address(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_backward_cpu", [&] {
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      float* buf = chunk_buffer();
      for (int64_t r = begin; r < end; ++r) {
        const float gl = g_lp.const_data_ptr<float>()[r];
        const float ge = grad_entropy ? g_ent.const_data_ptr<float>()[r] : 0.f;
        const bool masked = mask && row_mask.const_data_ptr<float>()[r] == 0.f;
        if (masked || (gl == 0.f && ge == 0.f)) {  // constant or inactive row: zeros, no exp work
          write_zero_row(out + r * V, V);
          continue;
        }
        const float* s = st.const_data_ptr<float>() + 2 * r;
        const RowStats rs{0.f, s[0], s[1], grad_entropy ? ent.const_data_ptr<float>()[r] : 0.f};
        write_grad_row(out + r * V, z + addr.offset(r), ids.const_data_ptr<int64_t>()[r], V, rs, gl, ge, inv_t, buf);
      }
    });
  });
  return grad;
}

// The fused loss: statistics sweep, per-token objective, gradient sweep, row by row. Returns (loss, outputs).
std::tuple<at::Tensor, at::Tensor> fused_rows(const at::Tensor& logits, const at::Tensor& targets,
                                              const at::Tensor& tokens, const std::optional<at::Tensor>& rewards,
                                              const std::optional<at::Tensor>& seq, const at::Tensor& params,
                                              at::ArrayRef<int64_t> codes, bool with_entropy,
                                              const at::Tensor& grad /* undefined: none */) {
  check_logits(logits, targets);
  check_codes(codes, kNumCodes);
  const int64_t rows = targets.numel(), V = logits.size(-1);
  const auto in = token_inputs(tokens, rows);
  ObjectiveParams p = unpack_codes(codes);
  load_scalars(p, float_params(params, logits, kNumScalars, "params").const_data_ptr<float>());
  auto outputs = at::empty({kNumTokenOutputs, rows}, logits.options().dtype(at::kFloat));
  const auto ids = rows_long(targets);
  const auto rw = p.adv_from_rewards ? rows_float(*rewards) : at::Tensor();
  const auto seq_ids = p.adv_from_rewards ? rows_long(*seq) : at::Tensor();
  const RowAddress addr = row_address(logits);
  const RowAddress gaddr = grad.defined() ? row_address(grad) : addr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "grpo_loss_fused_cpu", [&] {
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    scalar_t* out = grad.defined() ? static_cast<scalar_t*>(grad.data_ptr()) : nullptr;
    const float* x = in.const_data_ptr<float>();
    float* o = outputs.mutable_data_ptr<float>();
    const auto input = [&](TokenInput k, int64_t r) { return x[k * rows + r]; };
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      float* buf = chunk_buffer();
      for (int64_t r = begin; r < end; ++r) {
        if (input(kMask, r) == 0.f) {
          for (int64_t k = 0; k < kNumTokenOutputs; ++k) o[k * rows + r] = 0.f;
          if (out) write_zero_row(out + gaddr.offset(r), V);
          continue;
        }
        const int64_t y = ids.const_data_ptr<int64_t>()[r];
        const RowStats st = row_statistics(z + addr.offset(r), y, V, p.inv_temperature, with_entropy, buf);
        const float A = p.adv_from_rewards
                            ? group_advantage(rw.const_data_ptr<float>(), seq_ids.const_data_ptr<int64_t>()[r], p)
                            : input(kAdvantages, r);
        const TokenResult t = token_objective(st.logprob, st.entropy, A, input(kOldLogprobs, r),
                                              input(kRefLogprobs, r), input(kWPolicy, r), input(kWKl, r),
                                              input(kWEntropy, r), p);
        o[kOutLogprobs * rows + r] = st.logprob;
        o[kOutEntropy * rows + r] = st.entropy;
        o[kOutLossTerms * rows + r] = t.loss;
        o[kOutRatio * rows + r] = t.ratio;
        o[kOutGradLogprobs * rows + r] = t.dlogp;
        o[kOutAdvantagesUsed * rows + r] = A;
        if (out) {
          write_grad_row(out + gaddr.offset(r), z + addr.offset(r), y, V, st, t.dlogp, -input(kWEntropy, r),
                         p.inv_temperature, buf);
        }
      }
    });
  });
  return {outputs[kOutLossTerms].sum(), outputs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grpo_loss_fused_cpu(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& tokens,
    const std::optional<at::Tensor>& rewards, const std::optional<at::Tensor>& seq, const at::Tensor& params,
    at::ArrayRef<int64_t> codes, bool with_entropy, bool write_grad) {
  auto grad = write_grad ? empty_gradient(logits) : at::empty({0}, logits.options());
  auto [loss, outputs] = fused_rows(logits, targets, tokens, rewards, seq, params, codes, with_entropy,
                                    write_grad ? grad : at::Tensor());
  return {loss, outputs, grad};
}

std::tuple<at::Tensor, at::Tensor> grpo_loss_fused_inplace_cpu(
    at::Tensor& logits, const at::Tensor& targets, const at::Tensor& tokens, const std::optional<at::Tensor>& rewards,
    const std::optional<at::Tensor>& seq, const at::Tensor& params, at::ArrayRef<int64_t> codes, bool with_entropy) {
  return fused_rows(logits, targets, tokens, rewards, seq, params, codes, with_entropy, logits);
}

void scale_grad_cpu(at::Tensor& grad, const at::Tensor& scale) {
  const float s = scale.item<float>();  // a CPU scalar: reading it costs nothing
  if (s != 1.f && grad.numel() > 0) grad.mul_(s);
}

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
  m.impl("token_logprobs", &token_logprobs_cpu);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cpu);
  m.impl("grpo_loss_fused", &grpo_loss_fused_cpu);
  m.impl("grpo_loss_fused_inplace_", &grpo_loss_fused_inplace_cpu);
  m.impl("scale_grad_", &scale_grad_cpu);
  m.impl("advantages", &advantages_cpu);
}

}  // namespace fastgrpo
