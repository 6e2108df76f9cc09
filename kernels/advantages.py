"""Group-normalized advantages from rewards in contiguous groups (SPEC §3): one program per group.

Each program loads its G rewards, computes the group mean and unbiased std in fp32 and writes the advantage
of every member for the runtime ``estimator``: 0 = grpo (÷ (std + eps) when ``divide``), 1 = rloo
(G/(G − 1)·(R − mean)), 2 = centered only (reinforce_baseline before its batch whitening). ``divide`` may
read the batch std from ``batch_std_ptr`` instead of the group's (TRL ``scale_rewards="batch"``).
``singleton_raw``: a group of one keeps its reward (verl: mean 0, std 1) instead of getting 0 (TRL).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def advantages_kernel(
    # pointers
    rewards_ptr, batch_std_ptr, advantages_ptr, group_mean_ptr, group_std_ptr,
    # shapes
    G,
    # scalars
    estimator, divide, use_batch_std, singleton_raw, eps,
    # meta-parameters
    BLOCK_G: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    inside = offs < G
    r = tl.load(rewards_ptr + group * G + offs, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(r, axis=0) / G
    centered = tl.where(inside, r - mean, 0.0)
    std = tl.sqrt(tl.sum(centered * centered, axis=0) / tl.maximum(G - 1, 1))
    tl.store(group_mean_ptr + group, mean)
    tl.store(group_std_ptr + group, std)
    single = G == 1
    centered = tl.where(single & (singleton_raw != 0), r, centered)
    scale = tl.where(use_batch_std != 0, tl.load(batch_std_ptr), tl.where(single & (singleton_raw != 0), 1.0, std))
    grpo = tl.where(divide != 0, centered / (scale + eps), centered)
    rloo = tl.where(single, centered, centered * G / tl.maximum(G - 1, 1))
    adv = tl.where(estimator == 0, grpo, tl.where(estimator == 1, rloo, centered))
    tl.store(advantages_ptr + group * G + offs, adv, mask=inside)


def aot_specializations():
    """Every (kernel, signature, constexprs, num_warps) the launcher can produce (see tests/aot_compile.py)."""
    sig = {"rewards_ptr": "*fp32", "batch_std_ptr": "*fp32", "advantages_ptr": "*fp32", "group_mean_ptr": "*fp32",
           "group_std_ptr": "*fp32", "G": "i32", "estimator": "i32", "divide": "i32", "use_batch_std": "i32",
           "singleton_raw": "i32", "eps": "fp32"}
    for block in (1, 16, 1024):
        yield advantages_kernel, sig, {"BLOCK_G": block}, 4
