"""The reward side (SPEC §3): rewards → group-normalized advantages."""

from __future__ import annotations

from typing import Literal, Optional, Union, overload

from torch import Tensor

from . import _checks, backends
from .config import AdvantageConfig


def check_rewards(
    rewards: Tensor, group_size: Optional[int], group_ids: Optional[Tensor], reward_weights: Optional[Tensor],
    checks: _checks.ValueChecks, num_seqs: Optional[int] = None,
) -> None:
    """Rewards enter their group's mean and std: every one must be finite, masked sequence or not."""
    _checks.tensor("rewards", rewards)
    _checks.floating("rewards", rewards)
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be [B] or [B, K] (K reward functions), got {list(rewards.shape)}")
    b = rewards.shape[0]
    if num_seqs is not None and b != num_seqs:
        raise ValueError(f"rewards must have one entry per sequence ({num_seqs}), got {b}")
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size (contiguous groups) or group_ids (an id per sequence)")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if b % group_size != 0:
            raise ValueError(f"group_size ({group_size}) must divide the number of rewards ({b})")
    else:
        _checks.tensor("group_ids", group_ids)
        _checks.integer("group_ids", group_ids)
        _checks.shape("group_ids", group_ids, (b,), "one group id per reward")
        _checks.same_device(rewards.device, group_ids=group_ids)
    if reward_weights is not None:
        if rewards.dim() != 2:
            raise ValueError("reward_weights needs rewards of shape [B, K]")
        _checks.tensor("reward_weights", reward_weights)
        _checks.floating("reward_weights", reward_weights)
        _checks.shape("reward_weights", reward_weights, (rewards.shape[1],), "one weight per reward function")
        _checks.same_device(rewards.device, reward_weights=reward_weights)
    checks.finite("rewards", rewards, masked=False)
    checks.finite("reward_weights", reward_weights, masked=False)


@overload
def advantages(rewards: Tensor, group_size: Optional[int] = ..., group_ids: Optional[Tensor] = ..., *,
               return_metrics: Literal[False] = ..., **kw) -> Tensor: ...
@overload
def advantages(rewards: Tensor, group_size: Optional[int] = ..., group_ids: Optional[Tensor] = ..., *,
               return_metrics: Literal[True], **kw) -> tuple[Tensor, dict[str, Tensor]]: ...


def advantages(
    rewards: Tensor,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    *,
    estimator: str = "grpo",
    scale: str = "group",
    eps: float = 1e-4,
    singleton: str = "zero",
    reward_weights: Optional[Tensor] = None,
    config: Optional[AdvantageConfig] = None,
    return_metrics: bool = False,
    backend: str = "auto",
    check_values: Optional[bool] = None,
) -> Union[Tensor, tuple[Tensor, dict[str, Tensor]]]:
    """Advantages [B] (fp32, no grad) from rewards [B] or [B, K] with weights [K].

    Groups are contiguous runs of ``group_size`` rewards, or share a value of ``group_ids`` [B]. ``config``
    (an :class:`AdvantageConfig`) replaces ``estimator``/``scale``/``eps``/``singleton`` when given.
    PyTorch equivalent for ``estimator="grpo", scale="group"`` and contiguous groups of G::

        r = rewards.view(-1, G)
        ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)

    With ``return_metrics`` also returns 0-d tensors: ``reward/mean``, ``reward/std``,
    ``reward/group_std_mean``, ``frac_reward_zero_std``, ``advantage/group_sum_abs_max`` (≈ 0 for
    ``grpo``/``rloo``) and, for 0/1 rewards, ``frac_groups_all_solved`` / ``frac_groups_all_failed``.

    ``check_values`` (None: the global default, see ``fastgrpo.set_check_values``): reject non-finite rewards
    and reward weights, at the cost of one host sync (none when False, under torch.compile or on meta tensors).
    """
    _checks.tensor("rewards", rewards)
    checks = _checks.ValueChecks(check_values, rewards)
    check_rewards(rewards, group_size, group_ids, reward_weights, checks)
    if config is not None and not isinstance(config, AdvantageConfig):
        raise TypeError(f"config must be a fastgrpo.AdvantageConfig or None, got {type(config).__name__}")
    cfg = config if config is not None else AdvantageConfig(estimator, scale, eps, singleton)
    checks.run()
    impl = backends.select(backend, rewards.device)
    adv, metrics = impl.advantages(rewards, group_size, group_ids, cfg, reward_weights, metrics=return_metrics)
    return (adv, metrics) if return_metrics else adv
