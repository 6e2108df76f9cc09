// CUDA kernel of the advantages op (one thread per reward, group statistics of token_objective.h) and its launcher.
#include "rows.cuh"

namespace fastgrpo {
namespace cuda {
namespace {

__global__ void advantages_kernel(const float* rewards, const float* params, int64_t n, ObjectiveParams p, float* adv,
                                  float* mean, float* std_) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  load_advantage_scalars(p, params);
  float gm, gs;
  adv[i] = group_advantage(rewards, i, p, &gm, &gs);
  if (i % p.group_size == 0) {
    mean[i / p.group_size] = gm;
    std_[i / p.group_size] = gs;
  }
}

}  // namespace

const char* advantages(const float* rewards, const float* params, int64_t n, ObjectiveParams codes, float* adv,
                       float* mean, float* std_, void* stream) {
  if (n == 0) return nullptr;
  advantages_kernel<<<(n + 255) / 256, 256, 0, static_cast<cudaStream_t>(stream)>>>(rewards, params, n, codes, adv,
                                                                                    mean, std_);
  return last_error();
}

}  // namespace cuda
}  // namespace fastgrpo
