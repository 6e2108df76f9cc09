"""``fastgrpo::advantages``: the Triton group normalization of rewards (contiguous groups).

Arbitrary ``group_ids`` need a relabelling to dense groups (``torch.unique``) and use the reference path;
the batch-wide steps (TRL's batch std, REINFORCE++'s whitening) are two O(B) reductions done by PyTorch
around the kernel.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from . import reference
from .config import AdvantageConfig
from .kernels import advantages as K

_register = custom_op if os.environ.get("TRITON_INTERPRET") == "1" else triton_op  # see triton_token_logprobs
_ESTIMATOR = {"grpo": 0, "rloo": 1, "reinforce_baseline": 2}


@_register("fastgrpo::advantages", mutates_args=())
def advantages_op(rewards: Tensor, batch_std: Tensor, group_size: int, estimator: int, divide: bool,
                  use_batch_std: bool, singleton_raw: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(advantages [B], group mean [B/G], group std [B/G]) for fp32 ``rewards`` [B] in groups of G."""
    num_groups = rewards.numel() // group_size
    adv = torch.empty_like(rewards)
    mean = rewards.new_empty(num_groups)
    std = rewards.new_empty(num_groups)
    if num_groups > 0:
        wrap_triton(K.advantages_kernel)[(rewards.numel(),)](
            rewards, batch_std, adv, mean, std, group_size, estimator, int(divide), int(use_batch_std),
            int(singleton_raw), float(eps), BLOCK=K.GROUP_BLOCK, num_warps=1)
    return adv, mean, std


@advantages_op.register_fake
def _(rewards, batch_std, group_size, estimator, divide, use_batch_std, singleton_raw, eps):
    num_groups = rewards.numel() // group_size
    return torch.empty_like(rewards), rewards.new_empty(num_groups), rewards.new_empty(num_groups)


def batch_std(r: Tensor, config: AdvantageConfig) -> tuple[bool, Tensor]:
    """(whether TRL's batch scale applies, the batch std as a 1-element tensor; 1 where unused)."""
    batch = config.estimator == "grpo" and config.scale == "batch"
    return batch, (r.std().reshape(1) if batch and r.numel() > 1 else r.new_ones(1))


def kernel_args(config: AdvantageConfig) -> tuple[int, bool, bool, float]:
    """(estimator code, divide, singleton_raw, eps) as the kernels take them."""
    return _ESTIMATOR[config.estimator], config.scale != "none", config.singleton == "raw", config.eps


def advantages(rewards: Tensor, group_size: Optional[int] = None, group_ids: Optional[Tensor] = None,
               config: AdvantageConfig = AdvantageConfig(),
               reward_weights: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
    if group_ids is not None:
        return reference.advantages(rewards, None, group_ids, config, reward_weights)
    r = reference.combine_rewards(rewards, reward_weights).float().contiguous()
    batch, std_b = batch_std(r, config)
    estimator, divide, singleton_raw, eps = kernel_args(config)
    adv, mean, std = advantages_op(r, std_b, group_size, estimator, divide, batch, singleton_raw, eps)
    if batch and r.numel() <= 1:
        adv = torch.zeros_like(r)
    if config.estimator == "reinforce_baseline":  # whiten the centered rewards over the batch
        std_b = adv.std() if adv.numel() > 1 else adv.new_ones(())
        adv = (adv - adv.mean()) / (std_b + config.eps)
    g = torch.arange(r.numel(), device=r.device) // group_size
    return adv, reference.advantage_metrics(r, adv, g, mean, std)
