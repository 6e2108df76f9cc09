"""The reward side's estimators beyond group normalization (MATH §3): every advantage estimator of verl 0.9.1,
OpenRLHF 0.11.2 and TRL 1.16 that needs no critic, as O(B·T) PyTorch. No kernels: each is a few passes over
[B] or [B, T] values, beside a policy step that reads [B, T, V] logits; ``grpo``/``rloo``/``reinforce_baseline``
keep their kernels (reward/advantages.py).

An estimator is three steps, each a function below; ``estimate`` chains them for an :class:`AdvantageConfig`:

1. per-sequence advantages a [B] from the rewards r [B] and their groups (``pass_at_k``, ``group_baseline`` ...);
2. with a response mask m [B, T]: per-token advantages, the return-to-go G_t of a placed at the last response
   token plus the per-token rewards (KL-in-reward, process rewards), discounted by γ for ``discounted_return``
   (``token_advantages``); ``optimal_token_baseline`` subtracts a baseline per token from G instead;
3. whitening over the batch, per sequence before step 2 (``whiten_sequences``) or per token (``whiten_tokens``).

Notation: g(i) the group of sequence i, n_g its size, L_i = Σ_t m_it the response length. Values are computed
in fp32 (fp64 for fp64 inputs) whatever the inputs' dtype; masks are read as booleans (m ≠ 0).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..config import AdvantageConfig, MaskedSteps, SingletonGroup, Whitening

TOKEN_WHITENING_EPS = 1e-8  # verl's masked_whiten and OpenRLHF's whitening both use 1e-8, a constant in each


# ------------------------------------------------------------------------------------------------ groups
class Groups(NamedTuple):
    """Each sequence's group ``ids`` [B] (0..num-1), the number of groups and their ``sizes`` [num] (in the
    values' dtype)."""

    ids: Tensor
    num: int
    sizes: Tensor

    def sums(self, x: Tensor) -> Tensor:
        """Per-group sums of ``x`` [B] or [B, K] → [num] or [num, K]."""
        return x.new_zeros((self.num,) + tuple(x.shape[1:])).index_add_(0, self.ids, x)

    def amax(self, x: Tensor, fill: float) -> Tensor:
        """Per-group max of ``x`` [B]; ``fill`` for a group with no entry."""
        return x.new_full((self.num,), fill).scatter_reduce_(0, self.ids, x, "amax")


def groups_of(num: int, group_size: Optional[int], group_ids: Optional[Tensor], like: Tensor) -> Groups:
    """Contiguous groups of ``group_size``, one group per distinct ``group_ids`` value, or (neither) one group."""
    if group_ids is not None:
        _, index = torch.unique(group_ids, return_inverse=True)
        count = int(index.max()) + 1 if index.numel() else 0
    elif group_size is not None:
        index = torch.arange(num, device=like.device) // group_size
        count = num // group_size
    else:
        index, count = torch.zeros(num, dtype=torch.long, device=like.device), min(num, 1)
    ones = like.new_ones(num)
    return Groups(index, count, like.new_zeros(count).index_add_(0, index, ones))


def group_mean_std(r: Tensor, groups: Groups) -> tuple[Tensor, Tensor]:
    """Per-group mean and unbiased std of r [B] or [B, K] (std 0 for a group of one)."""
    count = groups.sizes if r.dim() == 1 else groups.sizes[:, None]
    mean = groups.sums(r) / count.clamp(min=1)
    deviation = r - mean[groups.ids]
    std = (groups.sums(deviation * deviation) / (count - 1).clamp(min=1)).sqrt()
    return mean, std


def _singleton_baseline(r: Tensor, baseline: Tensor, groups: Groups, singleton: SingletonGroup) -> Tensor:
    """Each sequence's ``baseline`` [B], except a group of one: its own reward (``zero``: advantage 0) or 0
    (``raw``: verl's mean 0 for a group of one)."""
    alone = groups.sizes[groups.ids] == 1
    if r.dim() == 2:
        alone = alone[:, None]
    return torch.where(alone, r if singleton == "zero" else torch.zeros_like(r), baseline)


# --------------------------------------------------------------------------------- step 1: per sequence
def group_baseline(r: Tensor, groups: Groups, singleton: SingletonGroup) -> Tensor:
    """R − mean_g: the centering of verl ``reinforce_plus_plus_baseline`` and OpenRLHF ``reinforce_baseline``
    (REINFORCE++-baseline, arXiv 2501.03262), before their whitening."""
    mean, _ = group_mean_std(r, groups)
    return r - _singleton_baseline(r, mean[groups.ids], groups, singleton)


def pass_at_k(r: Tensor, groups: Groups, scale: str, eps: float) -> Tensor:
    """verl ``grpo_passk`` (pass@k optimization, arXiv 2503.19595 as verl cites): in each group only the best
    response has an
    advantage, R_max − R_second (its margin over the runner-up), divided by (std_g + eps) with ``scale="group"``.
    k is the group size: the group passes when its best response does, so only that one is credited.

    A tie for the best has margin 0 whichever response holds it, so the tie-break is immaterial. verl raises for a
    group of one (it has no runner-up); so does this."""
    if r.numel() and bool((groups.sizes < 2).any()):  # a host sync, as verl's per-group Python loop
        raise ValueError(
            "estimator='pass_at_k' needs at least 2 responses per group (the best is compared with the "
            "second best), got a group of 1"
        )
    _, std = group_mean_std(r, groups)
    best = groups.amax(r, float("-inf"))
    at_best = r == best[groups.ids]
    ties = groups.sums(at_best.to(r.dtype))
    runner_up = groups.amax(torch.where(at_best, torch.full_like(r, float("-inf")), r), float("-inf"))
    margin = torch.where(ties > 1, torch.zeros_like(best), best - runner_up)  # a tie: the runner-up is a best too
    if scale == "group":
        margin = margin / (std + eps)
    return torch.where(at_best, margin[groups.ids], torch.zeros_like(r))


def length_weighted_baseline(r: Tensor, lengths: Tensor, groups: Groups, singleton: SingletonGroup) -> Tensor:
    """verl ``opo`` (On-Policy RL with Optimal reward baseline, arXiv 2505.23585): R − Σ_g L·R / Σ_g L, the
    group's mean reward weighted by the response lengths (the variance-optimal baseline when the gradient's
    norm grows with the length).

    A group whose responses are all empty has baseline 0 here; verl divides 0 by 0 there and its advantages
    are NaN (masked, since every token of such a group is masked)."""
    total = groups.sums(lengths)
    weighted = groups.sums(lengths * r)
    baseline = torch.where(total > 0, weighted / torch.where(total > 0, total, 1.0), 0.0)
    return r - _singleton_baseline(r, baseline[groups.ids], groups, singleton)


def rescaled_group_baseline(r: Tensor, groups: Groups, singleton: SingletonGroup) -> Tensor:
    """verl ``gpg`` (GPG, arXiv 2504.02546): α·(R − mean_g) with α = B / #{i: R_i ≠ 0}.

    GPG's α makes up for the samples that carry no gradient (as we read the paper: B over the number of samples
    whose advantage is not 0, i.e. of groups whose rewards differ); verl counts the batch's nonzero *rewards*
    instead (with 0/1 rewards: the correct responses), which looks like a bug. Reproduced as verl computes it.
    verl's ``f_norm`` (1) and ``alpha`` arguments change nothing (alpha is recomputed)."""
    alpha = r.numel() / (r != 0).sum().clamp(min=1).to(r.dtype)
    mean, _ = group_mean_std(r, groups)
    return alpha * (r - _singleton_baseline(r, mean[groups.ids], groups, singleton))


def batch_baseline(r: Tensor) -> Tensor:
    """OpenRLHF ``flash_reinforce``: R − the batch's mean reward (one response per prompt: there is no group)."""
    return r - r.mean() if r.numel() else r


def greedy_baseline(r: Tensor, baseline_rewards: Tensor) -> Tensor:
    """verl ``remax`` (ReMax, arXiv 2310.10505): R − the reward of the prompt's greedy response. Per token
    (``token_advantages``) that is the return-to-go G_t minus the baseline, as verl's ``returns − b·m``."""
    return r - baseline_rewards


def normalize_then_sum(
    r: Tensor, weights: Optional[Tensor], groups: Groups, scale: str, eps: float, singleton: SingletonGroup
) -> Tensor:
    """TRL ``multi_objective_aggregation="normalize_then_sum"`` and verl ``gdpo`` (GDPO, arXiv 2601.05242): each
    reward function's rewards r [B, K] normalized per group as ``grpo``, (r_k − mean_gk)/(std_gk + eps) (no
    division with ``scale="none"``), then their weighted sum; the trainers then whiten it over the batch (TRL
    per sequence, verl per token: ``whitening``). Normalizing first keeps a reward with a large spread from
    drowning the others."""
    mean, std = group_mean_std(r, groups)
    baseline = _singleton_baseline(r, mean[groups.ids], groups, singleton)
    spread = std[groups.ids]
    if singleton == "raw":  # verl: a group of one has std 1
        spread = torch.where(groups.sizes[groups.ids][:, None] == 1, torch.ones_like(spread), spread)
    normalized = (r - baseline) / (spread + eps) if scale == "group" else r - baseline
    w = torch.ones(r.shape[1], dtype=r.dtype, device=r.device) if weights is None else weights.to(r.dtype)
    return normalized @ w


# ------------------------------------------------------------------------------------ step 2: per token
def last_token_rewards(a: Tensor, mask: Tensor) -> Tensor:
    """a [B] at each row's last response token of ``mask`` [B, T] (bool), 0 elsewhere: where OpenRLHF's
    ``compute_reward`` puts the outcome reward (verl's reward manager likewise). A row with no token drops it."""
    out = a.new_zeros(mask.shape)
    if mask.shape[1] == 0:
        return out
    last = mask.shape[1] - 1 - mask.flip(-1).to(torch.uint8).argmax(-1)
    return out.scatter_(1, last[:, None], torch.where(mask.any(-1), a, 0.0)[:, None])


def return_to_go(rewards: Tensor, mask: Tensor, gamma: float, masked_steps: MaskedSteps) -> Tensor:
    """G_t = Σ_{s ≥ t} γ^(steps from t to s) r_s over the response tokens s of ``mask`` [B, T] (bool).

    ``skip``: masked tokens are no steps: the running return crosses them unchanged and G is 0 there (verl
    ``reinforce_plus_plus``, so a reward propagates past a tool output's span). ``count``: every position is a
    step (OpenRLHF's ``get_cumulative_returns``; masked rewards count 0) and G at a masked position is what is
    carried through it. With γ = 1 both are the reverse cumulative sum at the response tokens."""
    r = torch.where(mask, rewards, 0.0)
    if gamma == 1.0:
        out = r.flip(-1).cumsum(-1).flip(-1)
        return torch.where(mask, out, 0.0) if masked_steps == "skip" else out
    out = torch.zeros_like(r)
    running = r.new_zeros(r.shape[0])
    for t in range(r.shape[1] - 1, -1, -1):  # a linear recurrence: O(T) steps of O(B), as both trainers
        step = r[:, t] + gamma * running
        if masked_steps == "skip":
            running = torch.where(mask[:, t], step, running)
            out[:, t] = torch.where(mask[:, t], step, 0.0)
        else:
            running = step
            out[:, t] = step
    return out


def token_advantages(
    a: Tensor, mask: Tensor, token_rewards: Optional[Tensor], gamma: float, masked_steps: MaskedSteps
) -> Tensor:
    """Per-token advantages [B, T], 0 at masked tokens: the return-to-go of a [B] at the last response token plus
    ``token_rewards`` [B, T]. With neither token rewards nor discount that is a at every response token (each is
    at or before the last one), the broadcast of every outcome estimator."""
    if token_rewards is None and gamma == 1.0:
        return torch.where(mask, a[:, None], 0.0)
    per_token = last_token_rewards(a, mask)
    if token_rewards is not None:
        per_token = per_token + token_rewards.to(a.dtype)
    return torch.where(mask, return_to_go(per_token, mask, gamma, masked_steps), 0.0)


def optimal_token_baseline(
    returns: Tensor,
    mask: Tensor,
    groups: Groups,
    old_logprobs: Tensor,
    sum_pi_squared: Tensor,
    is_weights: Optional[Tensor],
    eps: float,
    zero_tail: bool,
    masked_steps: MaskedSteps,
) -> Tensor:
    """verl ``optimal_token_baseline`` (``masked_steps="count"``) and ``tir_optimal_token_baseline`` (``skip``):
    A_t = G_t − B_t with one baseline per group and step,

        B_t = Σ_i G_it·W_it / (Σ_i W_it + eps),   W_it = Σ_{s ≤ t} w_is·m_is,   w = (1 − 2π + Σ_v π_v²)·ρ²,

    π = exp(old log-prob) of the sampled token, Σ_v π_v² its distribution's squared norm (so w is the squared
    norm of the score function's logit gradient, and W the path's accumulated gradient variance), ρ the rollout
    importance weight (1 without ``is_weights``). The variance-minimizing baseline weights each response's return
    by how much gradient variance it carries up to t.

    A step is a position (``count``) or a response token's rank in its row (``skip``: a multi-turn row's tokens
    after a tool output align with the other rows' tokens of the same rank; rows without a token are left out of
    their group). A group of one has no baseline. ``zero_tail``: when one response is strictly the longest of its
    group, its steps past the second longest length get no baseline (no other response estimates them)."""
    w = 1 - 2 * old_logprobs.to(returns.dtype).exp() + sum_pi_squared.to(returns.dtype)
    if is_weights is not None:
        w = w * is_weights.to(returns.dtype) ** 2
    path = torch.where(mask, w, 0.0).cumsum(-1)
    lengths = mask.sum(-1)
    num_steps = mask.shape[1]
    if masked_steps == "count":
        step = torch.arange(num_steps, device=mask.device).expand(mask.shape)
        member = torch.ones_like(lengths, dtype=torch.bool)
    else:
        step = mask.long().cumsum(-1) - 1
        member = lengths > 0
    # one slot per (group, step): the sums over the group's response tokens at that step
    slot = (groups.ids[:, None] * num_steps + step.clamp(min=0))[mask]
    numerator = returns.new_zeros(groups.num * num_steps).index_add_(0, slot, (returns * path)[mask])
    denominator = returns.new_zeros(groups.num * num_steps).index_add_(0, slot, path[mask])
    baseline_of = (numerator / (denominator + eps)).view(groups.num, num_steps)
    members = torch.zeros(groups.num, dtype=torch.long, device=mask.device).index_add_(0, groups.ids, member.long())
    baseline = baseline_of[groups.ids[:, None], step.clamp(min=0)]
    baseline = torch.where((members[groups.ids] > 1)[:, None], baseline, 0.0)
    if zero_tail:
        length = torch.where(member, lengths, -1)
        longest = torch.full((groups.num,), -1, dtype=length.dtype, device=mask.device).scatter_reduce_(
            0, groups.ids, length, "amax"
        )
        at_longest = member & (length == longest[groups.ids])
        holders = torch.zeros(groups.num, dtype=torch.long, device=mask.device).index_add_(
            0, groups.ids, at_longest.long()
        )
        shorter = torch.where(at_longest, -1, length)
        second = torch.full((groups.num,), -1, dtype=length.dtype, device=mask.device).scatter_reduce_(
            0, groups.ids, shorter, "amax"
        )
        alone_longest = at_longest & (holders[groups.ids] == 1) & (members[groups.ids] > 1)
        tail = alone_longest[:, None] & (step >= second[groups.ids][:, None])
        baseline = torch.where(tail, 0.0, baseline)
    return torch.where(mask, returns - baseline, 0.0)


# ------------------------------------------------------------------------------------------ step 3: whitening
def whiten_sequences(a: Tensor, eps: float) -> Tensor:
    """(a − mean)/(std + eps) over the batch's sequences, unbiased std (1 for a batch of one): fastgrpo's
    ``reinforce_baseline`` and TRL ``normalize_then_sum``'s final step."""
    if a.numel() <= 1:
        return (a - a.mean()) / (1.0 + eps) if a.numel() else a
    return (a - a.mean()) / (a.std() + eps)


def whiten_tokens(x: Tensor, mask: Tensor, whitening: Whitening) -> Tensor:
    """Whitening over the response tokens of ``mask`` (bool), 0 at masked tokens; each sequence weighs by its
    length. ``token``: (x − mean)·rsqrt(var + 1e-8), unbiased var (verl ``masked_whiten``); ``token_biased``:
    (x − mean)·rsqrt(max(var, 1e-8)), biased var (OpenRLHF ``compute_advantages_and_returns``); ``token_center``:
    x − mean (OpenRLHF ``no_std_norm``).

    With fewer than two tokens the unbiased variance is undefined and verl raises; here x − mean is 0 at a
    single token (and there is nothing at none), so the result is 0."""
    m = mask.to(x.dtype)
    count = m.sum()
    mean = (x * m).sum() / count.clamp(min=1)
    centered = x - mean
    if whitening == "token":
        var = (centered * centered * m).sum() / (count - 1).clamp(min=1)
        centered = centered * torch.rsqrt(var + TOKEN_WHITENING_EPS)
    elif whitening == "token_biased":
        var = (centered * centered * m).sum() / count.clamp(min=1)
        centered = centered * torch.rsqrt(var.clamp(min=TOKEN_WHITENING_EPS))
    return torch.where(mask, centered, 0.0)


# ------------------------------------------------------------------------------------------------ the chain
def sequence_advantages(
    r: Tensor, groups: Groups, config: AdvantageConfig, lengths: Optional[Tensor], baseline_rewards: Optional[Tensor]
) -> Tensor:
    """Step 1 for ``config.estimator`` (``grpo``/``rloo`` excluded: the kernels' op computes them); r is [B], or
    [B, K] reward functions for ``normalize_then_sum`` (weighted there; summed before the others)."""
    est = config.estimator
    if est == "reinforce_baseline":
        return group_baseline(r, groups, config.singleton)
    if est == "pass_at_k":
        return pass_at_k(r, groups, config.scale, config.eps)
    if est == "length_weighted_baseline":
        assert lengths is not None
        return length_weighted_baseline(r, lengths, groups, config.singleton)
    if est == "rescaled_group_baseline":
        return rescaled_group_baseline(r, groups, config.singleton)
    if est == "batch_baseline":
        return batch_baseline(r)
    if est == "greedy_baseline":
        assert baseline_rewards is not None
        return greedy_baseline(r, baseline_rewards)
    if est in ("discounted_return", "optimal_token_baseline"):  # their baseline, if any, is per token
        return r
    raise AssertionError(f"no per-sequence step for estimator {est!r}")


def estimate(
    r: Tensor,
    groups: Groups,
    config: AdvantageConfig,
    *,
    reward_weights: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    token_rewards: Optional[Tensor] = None,
    baseline_rewards: Optional[Tensor] = None,
    old_logprobs: Optional[Tensor] = None,
    sum_pi_squared: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
) -> Tensor:
    """The three steps for ``config``: advantages [B] without ``mask``, [B, T] (0 at masked tokens) with it.
    ``r``: fp32/fp64 rewards [B], or [B, K] for ``normalize_then_sum`` (``reward_weights`` [K]). The inputs are
    validated by the public function (reward/advantages.py), which also says which ones each estimator needs."""
    if config.estimator == "normalize_then_sum":
        a = normalize_then_sum(
            r if r.dim() == 2 else r[:, None], reward_weights, groups, config.scale, config.eps, config.singleton
        )
    else:
        lengths = None if mask is None else mask.sum(-1).to(r.dtype)
        a = sequence_advantages(r, groups, config, lengths, baseline_rewards)
    whitening = config.effective_whitening
    if whitening == "sequence":
        a = whiten_sequences(a, config.eps)
    if mask is None:
        return a
    if config.estimator == "optimal_token_baseline":
        assert old_logprobs is not None and sum_pi_squared is not None
        rewards = last_token_rewards(a, mask)
        if token_rewards is not None:
            rewards = rewards + token_rewards.to(a.dtype)
        returns = return_to_go(rewards, mask, 1.0, "count")  # undiscounted: the same at response tokens
        adv = optimal_token_baseline(
            returns,
            mask,
            groups,
            old_logprobs,
            sum_pi_squared,
            is_weights,
            config.eps,
            config.zero_tail,
            config.masked_steps,
        )
    else:
        adv = token_advantages(a, mask, token_rewards, config.gamma, config.masked_steps)
    if whitening.startswith("token"):
        adv = whiten_tokens(adv, mask, whitening)
    return adv
