// The row machinery of the CUDA kernels, shared by the token_logprobs op (token_logprobs.cu) and the fused loss
// (grpo_loss.cu): a thread block per token row at a time, programs() blocks, each looping over the rows
// r ≡ blockIdx.x (mod gridDim.x).
//
// A row is streamed with 128-bit loads (4 fp32 / 8 bf16 or fp16 per load) into a per-thread online log-sum-exp
// kept relative to the running max, merged across the block by a fixed shuffle tree: a token's results depend on
// its row, V and the block size only, never on the rest of the batch nor on which block ran it. The fused loss then
// streams the row again and writes the gradient with 128-bit stores. 64-bit offsets throughout. Only CUDA headers
// are included.
//
// One exponential per element and pass: 2^d in a single MUFU.EX2 (fast_exp2), log2(e) folded into the scale
// k = log2(e)/τ, so that the first pass forms an element's exponent in one FMA, d = x·k − o, from the raw logit x
// (o = m·k, m the running max of the raw logits; rows with |x/τ| beyond ~1.2e7 are summed again, d = (x − m)·k). A
// group of 16-byte packs takes its max first: only a group above the running max pays one more exponential, to
// re-center the sums. The sums stay in base 2 and are converted to natural logs once, at the end of the row
// (row_statistics). The gradient pass forms log p = (x/τ − M) − log Σ in two FMAs (one constant M + log Σ would
// round log Σ away next to a large M) and p in one exponential. No division runs per element.
//
// The fused loss reads each row twice: its blocks in flight are bounded (programs) so that their rows fit in half
// of L2, and the second read comes from L2 rather than from memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "launch.h"

namespace fastgrpo {
namespace cuda {
namespace {  // each kernel file gets its own copy: device code is compiled per translation unit

constexpr int kThreads = 512;  // 16 warps: enough loads in flight per SM at ~2 resident blocks
constexpr int kWarps = kThreads / 32;
// The row kernels' __launch_bounds__: 2 resident blocks per SM, which caps them at 64 registers (ptxas would
// otherwise take up to 89 for some, and 1 block per SM).
constexpr int kBlocksPerSM = 2;
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// 2^x in one MUFU.EX2 (expf without fast-math is ~8 instructions): within ~2 ulp; 2^−inf = 0, 2^NaN = NaN, and
// results below 2^−126 flush to 0 (next to a row's largest term, 1, such terms never count).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Running statistics of a set of logits x (raw, not yet divided by τ) in base 2, relative to the offset o of the
// running max m of the raw logits: an element's exponent is d = x·k − o with k = log2(e)/τ and o = m·k, one FMA (for
// rows with kLarge, d = (x − o)·k with o = m: see exponent). Its term is 2^d, and
//   s = Σ 2^d,  a = Σ 2^d·d,  and over the counted elements (all but the row's target) q = Σ' 2^(2d),
//   b = Σ' 2^(2d)·d,  c = Σ' 2^(2d)·d².
// From them with L = log2 s (log2 p = d − L): H = ln2·(L − a/s), Σ' p² = q/s², Σ' p²·ln p = ln2·(b − L·q)/s² and
// Σ' p²·(ln p)² = ln2²·(c − 2L·b + L²·q)/s²: sums of terms of one sign (d ≤ 0, L ≥ 0, up to the rounding of o), so
// nothing cancels. The target is left out while accumulating (lse_add's `counted`), never subtracted at the end:
// with p_y → 1 its 2^(2d) ≈ 1 would swamp the rest, which the subtraction would then lose entirely.
// a, b, c (the entropy's) are only accumulated with kEntropy, a template parameter: the kernels without the
// entropy carry neither their registers nor their per-element FMAs; q always is (Σ' p² needs no log p).
// An empty state has m = −inf and a finite offset o = −FLT_MAX: its banned logits give 2^(−inf − o) = 0, not
// 2^(−inf + inf) = NaN, and re-centering it multiplies its zeros by 2^(−FLT_MAX − o_new) = 0.
struct LSE {
  float m, o, s, a, q, b, c;
};

constexpr LSE kEmptyLSE{-INFINITY, -FLT_MAX, 0.f, 0.f, 0.f, 0.f, 0.f};

// The exponent of x and the offset of a max m. o = m·k is rounded, so the max's own exponent m·k − o is not 0 but
// its rounding, up to half an ulp of o: below 2^24 that is at most 1/2, above (|x/τ| beyond ~1.2e7) it grows without
// bound (~1e31 at bf16's max), and 2^d would overflow or vanish. Such rows are summed again with kLarge, which takes
// the difference first, d = (x − m)·k: exact next to the max (and −inf, 2^d = 0, where it overflows), one
// instruction more per element.
template <bool kLarge>
__device__ __forceinline__ float exponent(float x, float o, float k) {
  return kLarge ? (x - o) * k : fmaf(x, k, -o);
}

template <bool kLarge>
__device__ __forceinline__ float offset(float m, float k) {
  return kLarge ? m : m * k;
}

// Re-centers st on a max m_new >= st.m with the offset o_new. Every exponent d becomes d + δ, δ ≤ 0 (δ = o − o_new,
// or (o − o_new)·k with kLarge), and with sc = 2^δ every 2^d becomes sc·2^d: s' = sc·s, a' = sc·(a + δ·s),
// q' = sc²·q, b' = sc²·b + sc·sd·q, c' = sc²·c + 2·sc·sd·b + sd²·q with sd = sc·δ, formed so that a scale that
// underflowed to 0 gives 0, not 0·(huge δ²). sd is 0 where sc is: δ may be −inf (the empty state's −FLT_MAX, or
// offsets of opposite signs near the fp32 limit), and 0·(−inf) would be NaN.
template <bool kEntropy, bool kLarge>
__device__ __forceinline__ void lse_rescale(LSE& st, float m_new, float o_new, float k) {
  const float delta = kLarge ? (st.o - o_new) * k : st.o - o_new, sc = fast_exp2(delta);
  if constexpr (kEntropy) {
    const float sd = sc > 0.f ? sc * delta : 0.f, sc2 = sc * sc;
    st.a = sc * st.a + sd * st.s;
    st.c = sc2 * st.c + 2.f * sc * sd * st.b + sd * sd * st.q;  // old q, b: update c, then b, then q
    st.b = sc2 * st.b + sc * sd * st.q;
  }
  st.s *= sc;
  st.q *= sc * sc;
  st.m = m_new;
  st.o = o_new;
}

// Adds logit x <= st.m (or NaN); `counted`: x enters q, b, c (false for the row's target). A banned (−inf) logit,
// or one ~FLT_MAX below the max, has d = −inf and adds 2^d = 0; the entropy sums take d floored at −FLT_MAX, so that
// its terms are 0·finite, never 0·(−inf) (fmaxf drops a NaN d: 2^d is NaN then). A NaN logit makes d NaN, and a
// +inf one o = +inf and its d = inf − inf = NaN: s turns NaN, and so do ℓ, H, the gradient row and the q, b, c sums
// (divided by s²), as log_softmax gives (skipping it would hide it).
template <bool kEntropy, bool kLarge>
__device__ __forceinline__ void lse_add(LSE& st, float x, float k, bool counted) {
  const float d = exponent<kLarge>(x, st.o, k), e = fast_exp2(d);
  st.s += e;
  const float e2 = counted ? e * e : 0.f;  // selected, not branched: the target's term is replaced by 0
  st.q += e2;
  if constexpr (kEntropy) {
    const float df = fmaxf(d, -FLT_MAX);
    st.a += e * df;
    const float e2d = e2 * df;
    st.b += e2d;
    st.c += e2d * df;
  }
}

// Adds a group of N logits; y: the target's place in it, −1 where the group does not hold it. The group's max
// first, so that at most one exponential re-centers the sums (fmaxf drops a NaN from the max: it still reaches s
// through its own term).
template <bool kEntropy, bool kLarge, int N>
__device__ __forceinline__ void lse_add_group(LSE& st, const float (&x)[N], float k, int y) {
  float top = x[0];
#pragma unroll
  for (int j = 1; j < N; ++j) top = fmaxf(top, x[j]);
  if (__builtin_expect(top > st.m, 0)) lse_rescale<kEntropy, kLarge>(st, top, offset<kLarge>(top, k), k);
#pragma unroll
  for (int j = 0; j < N; ++j) lse_add<kEntropy, kLarge>(st, x[j], k, j != y);
}

template <bool kEntropy, bool kLarge>
__device__ __forceinline__ LSE lse_merge(LSE x, LSE y, float k) {
  const float m = fmaxf(x.m, y.m), o = fmaxf(x.o, y.o);  // o grows with m (k > 0); an empty side's −FLT_MAX loses
  lse_rescale<kEntropy, kLarge>(x, m, o, k);
  lse_rescale<kEntropy, kLarge>(y, m, o, k);
  return {m, o, x.s + y.s, x.a + y.a, x.q + y.q, x.b + y.b, x.c + y.c};
}

// Block-wide merge in a fixed order; the result is returned to every thread. Only the fields kEntropy uses travel
// through the shuffles and the shared memory. Safe to call once per row in a loop over rows: a fast thread's writes
// for the next row come after barriers that every thread reaches only once done with this row's shared data.
template <bool kEntropy, bool kLarge>
__device__ LSE block_lse(LSE st, float k) {
  constexpr int kFields = kEntropy ? 7 : 4;  // m, o, s, q [, a, b, c]
  __shared__ float shm[kFields][kWarps];
  __shared__ LSE total;
  const auto shuffle = [](float v, int offset) { return __shfl_xor_sync(0xffffffffu, v, offset); };
  for (int offset = 16; offset > 0; offset >>= 1) {
    LSE other{shuffle(st.m, offset), shuffle(st.o, offset), shuffle(st.s, offset), 0.f, shuffle(st.q, offset),
              0.f, 0.f};
    if constexpr (kEntropy) {
      other.a = shuffle(st.a, offset);
      other.b = shuffle(st.b, offset);
      other.c = shuffle(st.c, offset);
    }
    st = lse_merge<kEntropy, kLarge>(st, other, k);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shm[0][warp] = st.m;
    shm[1][warp] = st.o;
    shm[2][warp] = st.s;
    shm[3][warp] = st.q;
    if constexpr (kEntropy) {
      shm[4][warp] = st.a;
      shm[5][warp] = st.b;
      shm[6][warp] = st.c;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    LSE acc = kEmptyLSE;
    for (int w = 0; w < kWarps; ++w) {
      LSE other{shm[0][w], shm[1][w], shm[2][w], 0.f, shm[3][w], 0.f, 0.f};
      if constexpr (kEntropy) {
        other.a = shm[4][w];
        other.b = shm[5][w];
        other.c = shm[6][w];
      }
      acc = lse_merge<kEntropy, kLarge>(acc, other, k);
    }
    total = acc;
  }
  __syncthreads();
  return total;
}

// A pack: the 16 bytes of one 128-bit load, kPack<T> values.
template <typename T>
constexpr int kPack = 16 / sizeof(T);
// Packs a thread loads before it uses the first: the L2 bound leaves few blocks in flight (programs), so each
// thread keeps several 16-byte loads outstanding. 2 in the gradient pass, whose second read of a row comes from L2
// and whose entropy form would not fit 64 registers with 4.
constexpr int kUnrollStats = 4, kUnrollGrad = 2;

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename To, typename From>
__device__ __forceinline__ To bit_cast(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast");
  To t;
  memcpy(&t, &f, sizeof(To));
  return t;
}

// A pack's values as floats at x, and floats as a pack (rounded to nearest); bf16 and fp16 two per 32-bit word,
// the first in the low half.
template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float* x) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same<T, float>::value) {
      x[i] = __uint_as_float(w[i]);
    } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {  // a bf16 is the high half of its fp32
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      const float2 f = __half22float2(bit_cast<__half2>(w[i]));
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float* x) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same<T, float>::value) {
      w[i] = __float_as_uint(x[i]);
    } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      w[i] = bit_cast<uint32_t>(__floats2bfloat162_rn(x[2 * i], x[2 * i + 1]));
    } else {
      w[i] = bit_cast<uint32_t>(__floats2half2_rn(x[2 * i], x[2 * i + 1]));
    }
  }
  return {w[0], w[1], w[2], w[3]};
}

// Calls f(p, raw, u) over this thread's packs p ≡ threadIdx.x (mod kThreads) below `end`, in order, in groups: raw
// holds kUnroll packs p, p + kThreads, …, all loaded before any is used (the remainder: one pack, raw[1]); u is the
// place in the group of the pack `target_pack`, −1 where the group does not hold it. The group holding it, if whole,
// is called between two loops over the others, which test nothing but their bound and pass a constant −1: their
// bodies compile without the per-element select.
template <int kUnroll, typename Load, typename F>
__device__ __forceinline__ void for_each_pack(int64_t end, int64_t target_pack, Load load, F f) {
  constexpr int64_t kGroup = kUnroll * kThreads;
  const int64_t whole = end - (kUnroll - 1) * kThreads;  // the groups starting below it are whole
  // the start of this thread's group holding the target's pack, `whole` where there is none
  const int64_t d = target_pack - threadIdx.x;
  const int64_t own = d >= 0 && d % kThreads == 0 ? threadIdx.x + d / kGroup * kGroup : whole;
  int64_t p = threadIdx.x;
  const auto group = [&](int u) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) raw[i] = load(p + i * kThreads);
    f(p, raw, u);
    p += kGroup;
  };
  while (p < std::min(own, whole)) group(-1);
  if (p == own && p < whole) group(static_cast<int>((target_pack - p) / kThreads));
  while (p < whole) group(-1);
  for (; p < end; p += kThreads) {
    const uint4 raw[1] = {load(p)};
    if (p == target_pack) {
      f(p, raw, 0);
    } else {
      f(p, raw, -1);
    }
  }
}

// Calls f(x, y) over a row in groups x of values (float[n]): the kUnrollStats packs (1 for the remainder) of a
// for_each_pack group where the row is 16-byte aligned, one value at a time for the rest; y: the target's place in
// x, −1 where x does not hold it (a constant for all groups but one).
template <typename T, typename F>
__device__ __forceinline__ void for_each_group(const T* row, int64_t V, int64_t target, F f) {
  constexpr int N = kPack<T>;
  int64_t start = 0;
  if (aligned16(row)) {
    const int64_t packs = V / N, target_pack = target >= 0 ? target / N : -1;
    const int target_at = static_cast<int>(target - target_pack * N);
    const uint4* in = reinterpret_cast<const uint4*>(row);
    const auto load = [&](int64_t p) { return __ldg(in + p); };
    for_each_pack<kUnrollStats>(packs, target_pack, load, [&](int64_t, const auto& raw, int u) {
      constexpr int G = sizeof(raw) / sizeof(uint4);
      float x[G * N];
#pragma unroll
      for (int g = 0; g < G; ++g) unpack<T>(raw[g], x + g * N);
      f(x, u < 0 ? -1 : u * N + target_at);
    });
    start = packs * N;
  }
  for (int64_t i = start + threadIdx.x; i < V; i += kThreads) {
    const float x[1] = {to_float(row[i])};
    f(x, i == target ? 0 : -1);
  }
}

// out[i] = f(row[i], i == target) over a row, 128-bit loads and stores where both are 16-byte aligned (the groups
// without the target compile without the per-element select, as in for_each_pack). `out` may be `row`: each element
// is read by the thread that then overwrites it.
template <typename T, typename F>
__device__ __forceinline__ void map_row(T* out, const T* row, int64_t V, int64_t target, F f) {
  constexpr int N = kPack<T>;
  int64_t start = 0;
  if (aligned16(row) && aligned16(out)) {
    const int64_t packs = V / N, target_pack = target >= 0 ? target / N : -1;
    const int target_at = static_cast<int>(target - target_pack * N);
    const uint4* in = reinterpret_cast<const uint4*>(row);
    const auto load = [&](int64_t p) { return in[p]; };
    for_each_pack<kUnrollGrad>(packs, target_pack, load, [&](int64_t p, const auto& raw, int u) {
      constexpr int G = sizeof(raw) / sizeof(uint4);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float x[N];
        unpack<T>(raw[g], x);
#pragma unroll
        for (int j = 0; j < N; ++j) x[j] = f(x[j], g == u && j == target_at);
        reinterpret_cast<uint4*>(out)[p + g * kThreads] = pack<T>(x);
      }
    });
    start = packs * N;
  }
  for (int64_t i = start + threadIdx.x; i < V; i += kThreads) out[i] = from_float<T>(f(to_float(row[i]), i == target));
}

struct RowStats {
  float logprob, max, log_sum, entropy;
  float prob_sq, prob_sq_logp, prob_sq_logp_sq;  // over v ≠ target (LSE above); the last two with kEntropy only
};

// The first pass over a row (LSE), merged over the block.
template <bool kEntropy, bool kLarge, typename T>
__device__ LSE row_lse(const T* row, int64_t target, int64_t V, float k) {
  LSE st = kEmptyLSE;
  for_each_group(row, V, target, [&](const auto& x, int y) { lse_add_group<kEntropy, kLarge>(st, x, k, y); });
  return block_lse<kEntropy, kLarge>(st, k);
}

// In place (grpo_loss_fused_kernel) the row is overwritten afterwards: the __syncthreads() of block_lse orders the
// streaming reads before any write, and the caller's barrier before its first write the read of the target logit,
// made last (held through the passes, it took the 65th register). Without kEntropy, entropy and the two log p sums
// are 0. A target outside [0, V) matches no index: every element is counted.
//
// A row whose offset is 2^24 or more (or overflows, turning s or o non-finite) is summed again with kLarge (see
// exponent); so is a row with a NaN or +inf logit, which stays NaN. A row of banned logits (m = −inf) is not.
//
// M = max x/τ (−inf for a row of banned logits) and log Σ are stored for the backward and the tensor-parallel fold,
// which form log p_v = (x_v/τ − M) − log Σ, x_v/τ − M in one FMA as write_grad_row does. The sums are relative to
// their offset instead (o·ln2, or m/τ with kLarge), which is M only up to rounding: log Σ takes in the difference at
// the max, from the exact FMA residual m/τ − M and the max's own exponent, so that log p of the max, the one that
// can be ≈ 0 (p → 1), is the kernel's.
template <bool kEntropy, typename T>
__device__ RowStats row_statistics(const T* row, int64_t target, int64_t V, float inv_t) {
  const bool valid = target >= 0 && target < V;
  const float k = inv_t * kLog2e;
  LSE t = row_lse<kEntropy, false>(row, target, V, k);
  const bool large = t.m > -INFINITY && !(fabsf(t.o) < 0x1p24f && isfinite(t.s));  // the block's t: uniform
  if (large) t = row_lse<kEntropy, true>(row, target, V, k);
  const float x_target = valid ? to_float(row[target]) : NAN;
  const float M = t.m * inv_t;
  const float L = log2f(t.s), inv_s2 = 1.f / (t.s * t.s);  // s ≤ 2V: s² is far from overflowing
  const float at_max = large ? exponent<true>(t.m, t.o, k) : exponent<false>(t.m, t.o, k);
  const float log_s = kLn2 * L + (isfinite(M) ? fmaf(t.m, inv_t, -M) - kLn2 * at_max : 0.f);
  RowStats r{fmaf(x_target, inv_t, -M) - log_s, M, log_s, 0.f, t.q * inv_s2, 0.f, 0.f};
  if constexpr (kEntropy) {
    r.entropy = kLn2 * (L - t.a / t.s);
    r.prob_sq_logp = kLn2 * (t.b - L * t.q) * inv_s2;
    r.prob_sq_logp_sq = kLn2 * kLn2 * (t.c - 2.f * L * t.b + L * L * t.q) * inv_s2;
  }
  return r;
}

// out[v] = [g_ℓ·(1[v = y] − p_v) − g_H·p_v·(log p_v + H)] / τ (the entropy's term with kEntropy only: g_H = 0
// otherwise); `out` may be `row`. log2 p_v = (x_v/τ − M)·log2(e) − log2 Σ: x/τ − M in one FMA (exact next to the
// max), then one more FMA and one exponential for p_v. The entropy's term in base 2, its constants folded once per
// row with 1/τ: g_H·ln2/τ·p_v·(log2 p_v + H·log2(e)), log2 p floored so that a banned (−inf) logit gives 0·finite,
// not 0·(−inf) (fmaxf drops a NaN log2 p: p_v is NaN then, and the row stays NaN).
template <bool kEntropy, typename T>
__device__ void write_grad_row(T* out, const T* row, int64_t target, int64_t V, const RowStats& st, float g_lp,
                               float g_ent, float inv_t) {
  g_lp *= inv_t;
  const float log2_sum = st.log_sum * kLog2e, g_ent2 = g_ent * inv_t * kLn2, entropy2 = st.entropy * kLog2e;
  const auto write = [&](auto saturated) {
    map_row(out, row, V, target, [&](float x, bool is_target) {
      const float log2_p = fmaf(fmaf(x, inv_t, -st.max), kLog2e, -log2_sum), p = fast_exp2(log2_p);
      const float coef = is_target ? 1.f - p : -p;
      float g = g_lp * coef;
      if constexpr (decltype(saturated)::value) g = coef == 0.f ? 0.f : g;
      if constexpr (kEntropy) g -= g_ent2 * p * (fmaxf(log2_p, -1e30f) + entropy2);
      return g;
    });
  };
  // ∂L/∂ℓ beyond fp32 (the loss is ±inf): ±inf where the coefficient 1[v = y] − p_v is non-zero, 0 where it is
  // (p_v underflowed), never 0·inf. A loop of its own, so that the usual rows run without the select.
  if (isinf(g_lp)) {
    write(std::true_type{});
  } else {
    write(std::false_type{});
  }
}

template <typename T>
__device__ void write_zero_row(T* out, int64_t V) {
  for (int64_t i = threadIdx.x; i < V; i += kThreads) out[i] = from_float<T>(0.f);
}

__device__ __forceinline__ int64_t row_offset(const RowLayout& l, int64_t r) {
  return (r / l.T) * l.stride_b + (r % l.T) * l.stride_t;
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename F>
const char* dispatch(DType dtype, F f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat16: f(__half{}); break;
  }
  return last_error();
}

// Half of L2 holds the rows read twice (the fused loss's logits between its two passes); the other half the
// gradient rows being written back and everything else.
constexpr double kL2RowFraction = 0.5;

struct DeviceShape {
  int sms, l2_bytes;
};

// The current device's SM count and L2 size, queried once per device (host code, no sync); zeros where a query
// failed (its error is then the launch's, last_error).
DeviceShape device_shape() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> known[kMaxDevices];  // SMs << 32 | L2 bytes; 0 until queried
  int dev = 0;
  cudaGetDevice(&dev);
  const bool cached = dev >= 0 && dev < kMaxDevices;
  const int64_t bits = cached ? known[dev].load(std::memory_order_relaxed) : 0;
  if (bits != 0) return {static_cast<int>(bits >> 32), static_cast<int>(bits & 0xffffffff)};
  DeviceShape d{0, 0};
  if (cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&d.l2_bytes, cudaDevAttrL2CacheSize, dev) != cudaSuccess)
    return {0, 0};
  if (cached) known[dev].store(static_cast<int64_t>(d.sms) << 32 | d.l2_bytes, std::memory_order_relaxed);
  return d;
}

// Blocks for a row kernel (its blocks loop over the rows, so the grid never changes a row's results): as many as
// fit on the GPU at once (the occupancy of `kernel` at kThreads), and where each row is read twice (`reread_bytes`:
// the bytes of a row, 0 for a kernel that reads it once) no more than have their rows fit in kL2RowFraction of L2,
// so that the second read comes from L2:
//   programs = max(1, min(rows, SMs·blocks per SM, ⌊kL2RowFraction·L2 / row bytes⌋)).
// E.g. H100 SXM, 50 MiB L2, 132 SMs × 2 blocks = 264: bf16 V = 151936, rows of 297 KiB: 86 blocks, 25 MiB in flight;
// bf16 V = 256000: 51; fp32 V = 256000: 25.
template <typename Kernel>
unsigned programs(Kernel kernel, int64_t rows, int64_t reread_bytes) {
  const DeviceShape d = device_shape();
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  int64_t n = static_cast<int64_t>(std::max(d.sms, 1)) * std::max(per_sm, 1);
  if (reread_bytes > 0 && d.l2_bytes > 0)
    n = std::min(n, static_cast<int64_t>(kL2RowFraction * d.l2_bytes / reread_bytes));
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(rows, n)));
}

}  // namespace
}  // namespace cuda
}  // namespace fastgrpo
