"""The reward side (MATH §3): rewards → group-normalized advantages."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..config import AdvantageConfig, Rewards


def _acc(x: Tensor) -> Tensor:
    """The accumulation dtype: fp32, or fp64 for fp64 inputs (so gradcheck can run on the oracle)."""
    return x if x.dtype == torch.float64 else x.float()


def _group_index(num: int, group_size: Optional[int], group_ids: Optional[Tensor], device) -> tuple[Tensor, int]:
    if group_ids is not None:
        _, inverse = torch.unique(group_ids, return_inverse=True)
        return inverse, int(inverse.max()) + 1 if inverse.numel() else 0
    assert group_size is not None
    return torch.arange(num, device=device) // group_size, num // group_size


def advantages(
    rewards: Tensor,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    config: AdvantageConfig = AdvantageConfig(),
    reward_weights: Optional[Tensor] = None,
    metrics: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Group-normalized advantages [B] (fp32, detached) and the reward metrics of SPEC §3 (``{}`` without
    ``metrics``).

    The group std is that of (r − mean)/s times s, with s the group's largest |r − mean|: (r − mean)² overflows
    fp32 from |r − mean| ~ 1e19, and the advantages would all become 0."""
    r = combine_rewards(rewards, reward_weights)
    g, num_groups = _group_index(r.shape[0], group_size, group_ids, r.device)
    count = r.new_zeros(num_groups).index_add_(0, g, torch.ones_like(r))
    mean = r.new_zeros(num_groups).index_add_(0, g, r) / count.clamp(min=1)
    deviation = r - mean[g]
    scale = r.new_zeros(num_groups).scatter_reduce_(0, g, deviation.abs(), "amax")
    unit = deviation / torch.where(scale > 0, scale, 1.0)[g]
    sq = r.new_zeros(num_groups).index_add_(0, g, unit * unit)
    std = scale * (sq / (count - 1).clamp(min=1)).sqrt()  # unbiased; a group of one has std 0
    single = (count == 1)[g]

    cfg = config
    if cfg.singleton == "raw":  # verl: a group of one has mean 0 and std 1
        mean_t = torch.where(single, torch.zeros_like(r), mean[g])
        std_t = torch.where(single, torch.ones_like(r), std[g])
    else:
        mean_t, std_t = mean[g], std[g]
    centered = r - mean_t
    if cfg.estimator == "grpo":
        if cfg.scale == "group":
            adv = centered / (std_t + cfg.eps)
        elif cfg.scale == "batch":
            adv = centered / (r.std() + cfg.eps) if r.numel() > 1 else torch.zeros_like(r)
        else:
            adv = centered
    elif cfg.estimator == "rloo":
        n = count[g]
        adv = torch.where(n > 1, centered * n / (n - 1).clamp(min=1), centered)
    else:  # reinforce_baseline: whiten R − mean_g over the batch
        std_b = centered.std() if centered.numel() > 1 else torch.ones(())
        adv = (centered - centered.mean()) / (std_b + cfg.eps)

    return adv, advantage_metrics(r, adv, g, mean, std) if metrics else {}


def resolve_advantages(advantages_or_rewards: Union[Tensor, Rewards], config: AdvantageConfig) -> Tensor:
    """Advantages as given, or computed from :class:`Rewards`."""
    if not isinstance(advantages_or_rewards, Rewards):
        return advantages_or_rewards
    r = advantages_or_rewards
    return advantages(r.rewards, r.group_size, r.group_ids, config, r.weights, metrics=False)[0]


def combine_rewards(rewards: Tensor, reward_weights: Optional[Tensor]) -> Tensor:
    """[B] rewards as they are; [B, K] reward functions summed with their weights (TRL "sum_then_normalize")."""
    r = _acc(rewards.detach())
    if r.dim() == 2:
        w = torch.ones(r.shape[1], device=r.device) if reward_weights is None else _acc(reward_weights)
        r = (r * w).sum(-1)
    return r


def advantage_metrics(r: Tensor, adv: Tensor, g: Tensor, mean: Tensor, std: Tensor) -> dict[str, Tensor]:
    """SPEC §3 metrics from the rewards, the advantages, each reward's group and the group statistics.
    All solved / all failed are the zero-std groups whose rewards are all 1 / all 0 (binary rewards)."""
    num_groups = mean.numel()
    zero_std = std == 0
    nonempty = max(num_groups, 1)
    frac = lambda x: x.float().sum() / nonempty  # noqa: E731
    return {
        "reward/mean": r.mean() if r.numel() else r.new_zeros(()),
        "reward/std": r.std() if r.numel() > 1 else r.new_zeros(()),
        "reward/group_std_mean": std.sum() / nonempty,
        "frac_reward_zero_std": frac(zero_std),
        "frac_groups_all_solved": frac(zero_std & (mean == 1)),
        "frac_groups_all_failed": frac(zero_std & (mean == 0)),
        "advantage/group_sum_abs_max": torch.zeros(num_groups, device=r.device, dtype=adv.dtype)
        .index_add_(0, g, adv).abs().max() if num_groups else r.new_zeros(()),
    }
