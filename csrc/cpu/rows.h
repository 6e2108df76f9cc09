// The row kernels of the CPU backend, shared by the token_logprobs op (token_logprobs.cpp) and the fused loss
// (grpo_loss.cpp): rows in parallel (at::parallel_for), each row streamed in L1-sized chunks with at::vec
// (AVX2/AVX-512 when built for them), fp32 accumulation whatever the logits dtype.
//
// A row is read once from memory for the statistics (chunked online log-sum-exp: one exp per element, the
// running sum rescaled once per chunk) and once more for the gradient, which is written in that same sweep.
// Vectorized exps use ATen's exp_u20 (≤ 20 ulp, ~2e-6 relative; what ATen's own CPU attention uses): 3x the
// throughput of the 1-ulp Sleef exp, and far below the 3e-5 at which the tests compare with the fp32 oracle.
// Reductions run in a fixed order that depends on V only, so a token's results do not depend on the batch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common.h"

namespace fastgrpo {
namespace cpu {

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
inline at::Tensor empty_gradient(const at::Tensor& logits) {
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
inline float* chunk_buffer() {
  thread_local std::vector<float> buf(kChunk);
  return buf.data();
}

}  // namespace cpu
}  // namespace fastgrpo
