"""Group-normalized advantages from rewards in contiguous groups of G (MATH §3).

``group_advantage`` is the per-reward math, shared by the standalone kernel (one program per reward) and the
fused loss kernel, which normalizes a token's reward itself so rewards go to loss and gradient in one launch.
Each call reads its group's G rewards (a few dozen floats, L1/L2 resident) and computes in fp32:
  estimator 0 = grpo: (R − mean)/(std + eps) when ``divide`` (the batch std when ``use_batch_std``),
  estimator 1 = rloo: G/(G − 1)·(R − mean),  estimator 2 = R − mean (REINFORCE++ before batch whitening);
std unbiased. ``singleton_raw``: a group of one keeps its reward (verl: mean 0, std 1) instead of 0 (TRL).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import params as P

GROUP_BLOCK = 64  # rewards read per step; groups are usually 4–64 completions
GROUP_BLOCK_CONSTEXPR = tl.constexpr(GROUP_BLOCK)  # the same, readable from inside other kernels
# named parameters (kernels/params.py) as constexprs: entries of the advantages op's `params`, estimator codes
ADV_EPS, BATCH_STD = (tl.constexpr(P.ADVANTAGE_SCALARS.index(n)) for n in ("adv_eps", "batch_std"))
GRPO, RLOO = tl.constexpr(P.ADV_ESTIMATOR["grpo"]), tl.constexpr(P.ADV_ESTIMATOR["rloo"])


@triton.jit
def group_advantage(
    rewards_ptr, seq, G, estimator, divide, use_batch_std, singleton_raw, eps, batch_std, BLOCK: tl.constexpr
):
    """(advantage of reward ``seq``, its group's mean, its group's std)."""
    first = (seq // G) * G
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], tl.float32)
    for j in range(0, G, BLOCK):
        total += tl.load(rewards_ptr + first + j + offs, mask=j + offs < G, other=0.0).to(tl.float32)
    mean = tl.sum(total, axis=0) / G
    # The std is that of (r − mean)/s times s, with s the group's largest |r − mean|: (r − mean)² overflows fp32
    # from |r − mean| ~ 1e19, and the advantages would all become 0.
    deviation = tl.zeros([BLOCK], tl.float32)
    for j in range(0, G, BLOCK):
        r = tl.load(rewards_ptr + first + j + offs, mask=j + offs < G, other=0.0).to(tl.float32)
        deviation = tl.maximum(deviation, tl.where(j + offs < G, tl.abs(r - mean), 0.0))
    scale = tl.max(deviation, axis=0)  # may drop a NaN: a NaN reward still reaches the std through the mean
    squares = tl.zeros([BLOCK], tl.float32)
    for j in range(0, G, BLOCK):
        r = tl.load(rewards_ptr + first + j + offs, mask=j + offs < G, other=0.0).to(tl.float32)
        u = tl.where(scale > 0.0, (r - mean) / scale, 0.0)  # not times 1/scale: it overflows for a subnormal spread
        squares += tl.where(j + offs < G, u * u, 0.0)
    std = scale * tl.sqrt(tl.sum(squares, axis=0) / tl.maximum(G - 1, 1))
    own = tl.load(rewards_ptr + seq).to(tl.float32)
    single = G == 1
    raw = single & (singleton_raw != 0)
    centered = tl.where(raw, own, own - mean)
    scale = tl.where(use_batch_std != 0, batch_std, tl.where(raw, 1.0, std))
    grpo = tl.where(divide != 0, centered / (scale + eps), centered)
    rloo = tl.where(single, centered, centered * G / tl.maximum(G - 1, 1))
    return (
        tl.where(estimator == GRPO, grpo, tl.where(estimator == RLOO, rloo, centered)),
        mean,
        std,
    )  # else REINFORCE_BASELINE


@triton.jit
def advantages_kernel(
    # pointers (params_ptr: ADVANTAGE_SCALARS, fp32, loaded per program: torch.compile would specialize floats)
    rewards_ptr,
    params_ptr,
    advantages_ptr,
    group_mean_ptr,
    group_std_ptr,
    # variant codes (ADVANTAGE_CODES)
    group_size,
    adv_estimator,
    adv_divide,
    adv_use_batch_std,
    adv_singleton_raw,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    adv, mean, std = group_advantage(
        rewards_ptr,
        seq,
        group_size,
        adv_estimator,
        adv_divide,
        adv_use_batch_std,
        adv_singleton_raw,
        tl.load(params_ptr + ADV_EPS),
        tl.load(params_ptr + BATCH_STD),
        BLOCK,
    )
    tl.store(advantages_ptr + seq, adv)
    if seq % group_size == 0:
        tl.store(group_mean_ptr + seq // group_size, mean)
        tl.store(group_std_ptr + seq // group_size, std)


def aot_specializations():
    """Every (kernel, signature, constexprs, num_warps) the launcher can produce (see tests/aot_compile.py)."""
    yield advantages_kernel, P.aot_signature(advantages_kernel.arg_names), {"BLOCK": GROUP_BLOCK}, 1
