// The row machinery of the CUDA kernels, shared by the token_logprobs op (token_logprobs.cu) and the fused loss
// (grpo_loss.cu): one thread block per token row.
//
// A row is streamed with 128-bit loads (4 fp32 / 8 bf16 or fp16 per load) into a per-thread online
// log-sum-exp kept relative to the running max, merged across the block by a fixed shuffle tree (so a
// token's results never depend on the rest of the batch); the block then streams the row again, usually from
// L2, and writes the gradient with 128-bit stores. 64-bit offsets throughout. Only CUDA headers are included.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "launch.h"

namespace fastgrpo {
namespace cuda {
namespace {  // each kernel file gets its own copy: device code is compiled per translation unit

constexpr int kThreads = 512;  // 16 warps: enough loads in flight per SM at ~2 resident blocks
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Running statistics of a set of logits x (already divided by τ): max m, s = Σ e^(x − m), a = Σ e^(x − m)(x − m).
struct LSE {
  float m, s, a;
};

__device__ __forceinline__ void lse_add(LSE& st, float x) {
  if (x > st.m) {  // new max: re-center the sums (nothing to re-center while empty)
    if (st.s > 0.f) {
      const float scale = expf(st.m - x);
      st.a = scale * (st.a + (st.m - x) * st.s);
      st.s *= scale;
    }
    st.m = x;
  }
  // A banned (−inf) logit adds nothing. For a NaN or +inf logit x − m is NaN (inf − inf): s turns NaN, and so
  // do ℓ, H and the gradient row, as log_softmax gives (skipping it would hide it).
  if (x > -INFINITY || x != x) {
    const float d = x - st.m, e = expf(d);
    st.s += e;
    st.a += e * d;
  }
}

__device__ __forceinline__ LSE lse_merge(LSE x, LSE y) {
  if (y.s == 0.f) return x;
  if (x.s == 0.f) return y;
  const float m = fmaxf(x.m, y.m), sx = expf(x.m - m), sy = expf(y.m - m);
  return {m, x.s * sx + y.s * sy, sx * (x.a + (x.m - m) * x.s) + sy * (y.a + (y.m - m) * y.s)};
}

// Block-wide merge in a fixed order; the result is returned to every thread.
__device__ LSE block_lse(LSE st) {
  __shared__ float shm[3][kWarps];
  __shared__ LSE total;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const LSE other{__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset),
                    __shfl_xor_sync(0xffffffffu, st.a, offset)};
    st = lse_merge(st, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shm[0][warp] = st.m;
    shm[1][warp] = st.s;
    shm[2][warp] = st.a;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    LSE acc{-INFINITY, 0.f, 0.f};
    for (int w = 0; w < kWarps; ++w) acc = lse_merge(acc, LSE{shm[0][w], shm[1][w], shm[2][w]});
    total = acc;
  }
  __syncthreads();
  return total;
}

template <typename T>
struct Pack {  // 16 bytes of T
  static constexpr int N = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[N];
  };
};

// Calls f(index, value) for every element of a row, 128-bit loads where the row is 16-byte aligned.
template <typename T, typename F>
__device__ __forceinline__ void for_each_in_row(const T* row, int64_t V, F f) {
  constexpr int N = Pack<T>::N;
  int64_t start = 0;
  if ((reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    const int64_t packs = V / N;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      Pack<T> pk;
      pk.raw = __ldg(reinterpret_cast<const uint4*>(row) + p);
#pragma unroll
      for (int j = 0; j < N; ++j) f(p * N + j, to_float(pk.v[j]));
    }
    start = packs * N;
  }
  for (int64_t i = start + threadIdx.x; i < V; i += blockDim.x) f(i, to_float(row[i]));
}

struct RowStats {
  float logprob, max, log_sum, entropy;
};

// Every thread reads the target logit before the row is streamed: in place (grpo_loss_fused_kernel) the row is
// overwritten afterwards, and the __syncthreads() of block_lse orders every thread's reads before any write.
template <typename T>
__device__ RowStats row_statistics(const T* row, int64_t target, int64_t V, float inv_t) {
  const bool valid = target >= 0 && target < V;
  const float x_target = valid ? to_float(row[target]) * inv_t : NAN;
  LSE st{-INFINITY, 0.f, 0.f};
  for_each_in_row(row, V, [&](int64_t, float x) { lse_add(st, x * inv_t); });
  const LSE total = block_lse(st);
  const float log_s = logf(total.s);
  return {(x_target - total.m) - log_s, total.m, log_s, log_s - total.a / total.s};
}

// out[v] = [g_ℓ·(1[v = y] − p_v) − g_H·p_v·(log p_v + H)] / τ; `out` may be `row` (each element is read by
// the thread that then overwrites it). log p is floored so that a banned (−inf) logit gives 0·floor, not
// 0·(−inf); the floor keeps a NaN (fmaxf would drop it: a NaN row must stay NaN).
template <typename T>
__device__ void write_grad_row(T* out, const T* row, int64_t target, int64_t V, const RowStats& st, float g_lp,
                               float g_ent, float inv_t) {
  constexpr int N = Pack<T>::N;
  // ∂L/∂ℓ beyond fp32 (the loss is ±inf): ±inf where the coefficient 1[v = y] − p_v is non-zero, 0 where it is
  // (p_v underflowed), never 0·inf. Uniform over the block, so the branch costs nothing.
  const bool saturated = isinf(g_lp);
  auto grad_of = [&](int64_t i, float x) {
    const float raw = (x * inv_t - st.max) - st.log_sum;
    const float log_p = raw < -1e30f ? -1e30f : raw, p = expf(log_p);
    const float coef = (i == target ? 1.f : 0.f) - p;
    float g = saturated && coef == 0.f ? 0.f : g_lp * coef;
    g -= g_ent * p * (log_p + st.entropy);
    return g * inv_t;
  };
  int64_t start = 0;
  if ((reinterpret_cast<uintptr_t>(row) & 15) == 0 && (reinterpret_cast<uintptr_t>(out) & 15) == 0) {
    const int64_t packs = V / N;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      Pack<T> in, res;
      in.raw = reinterpret_cast<const uint4*>(row)[p];
#pragma unroll
      for (int j = 0; j < N; ++j) res.v[j] = from_float<T>(grad_of(p * N + j, to_float(in.v[j])));
      reinterpret_cast<uint4*>(out)[p] = res.raw;
    }
    start = packs * N;
  }
  for (int64_t i = start + threadIdx.x; i < V; i += blockDim.x) out[i] = from_float<T>(grad_of(i, to_float(row[i])));
}

template <typename T>
__device__ void write_zero_row(T* out, int64_t V) {
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) out[i] = from_float<T>(0.f);
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


}  // namespace
}  // namespace cuda
}  // namespace fastgrpo
