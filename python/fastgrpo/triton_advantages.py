"""Launcher of the Triton advantages kernel, registered as ``fastgrpo::triton_advantages`` (contract and fake:
``kernel_ops``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import advantages as K
from .triton_token_logprobs import float_params, launch, register_op


@register_op("fastgrpo::triton_advantages", mutates_args=())
def advantages_op(rewards: Tensor, batch_std: Tensor, group_size: int, estimator: int, divide: bool,
                  use_batch_std: bool, singleton_raw: bool, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    groups = rewards.numel() // group_size
    adv, mean, std = torch.empty_like(rewards), rewards.new_empty(groups), rewards.new_empty(groups)
    if groups > 0:
        launch(K.advantages_kernel)[(rewards.numel(),)](
            rewards, batch_std, float_params(eps, rewards, 1, "eps"), adv, mean, std, group_size, estimator,
            int(divide), int(use_batch_std), int(singleton_raw), BLOCK=K.GROUP_BLOCK, num_warps=1)
    return adv, mean, std
