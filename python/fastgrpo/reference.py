"""The oracle: a short PyTorch statement of the contract (MATH §1–§4) that every backend is tested against, and
``backend="reference"``.

It imports nothing of the production layer (``fastgrpo.trajectory``, ``fastgrpo.reward``, the kernels), so an error
there cannot hide in a kernel-vs-reference test. Two exceptions, each a function-level import: :func:`advantages`
hands the estimators that have no kernel to ``fastgrpo.reward.advantages`` (``computed_by_kernels`` decides,
``estimator_advantages`` computes: O(B·T) PyTorch on every backend, tested against the trainers' own functions),
and the opt-in effective-rank metric takes its random projection Ω from ``trajectory.gradient_rank.projection``
(Ω is part of the metric's definition, so both sides must draw the same one). Written for reading, not speed:
- tokens lie on one axis of N entries, grouped in sets (sequences; rewards in groups) that give two operations: the
  sum over each set and the spread of a per-set value to its members. Equal contiguous sets (the rows of [B, T],
  groups of ``group_size``) are the rows of a view; the spans of ``cu_seqlens`` and ``group_ids`` a membership
  matrix M [sets, N] (a row sum of M-selected entries, and Mᵀ). Static shapes, no host sync;
- each aggregation is its formula of MATH §2.6; group statistics are computed in fp64, where (r − mean)² of
  rewards near 1e20 does not overflow;
- anything at a masked position (NaN, inf, padding ids) is selected away with torch.where, never multiplied by 0,
  and an inf in one sequence stays in that sequence.
Values are fp32, or fp64 for fp64 inputs (gradcheck). Inputs are valid: the public functions validate them first.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union, overload

import torch
from torch import Tensor

from .config import AdvantageConfig, LossConfig, LossOutput, Normalizer, Rewards

INF = float("inf")


def _acc(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


@overload
def _const(like: Tensor, value: float) -> Tensor: ...
@overload
def _const(like: Tensor, value: Optional[float]) -> Optional[Tensor]: ...


def _const(like: Tensor, value: Optional[float]) -> Optional[Tensor]:
    """A config float as a 0-d tensor: torch.compile specializes a float bound of clamp (a recompilation for every new
    value), not a float added to a tensor."""
    return None if value is None else like.new_zeros(()) + value


def _clamp(x: Tensor, lo: Optional[float] = None, hi: Optional[float] = None) -> Tensor:
    return x if lo is None and hi is None else x.clamp(_const(x, lo), _const(x, hi))


class _Sets(NamedTuple):
    """Which set (sequence, group) each of N entries is in, as the two operations the math needs."""

    sums: Callable[[Tensor], Tensor]  # x [N] → Σ of x over each set [sets]
    spread: Callable[[Tensor], Tensor]  # v [sets] → each entry's set value [N]
    num: int  # how many sets


def _rows(count: int, size: int) -> _Sets:
    """Contiguous sets of ``size`` entries: the rows of a [count, size] view."""
    return _Sets(lambda x: x.reshape(count, size).sum(-1), lambda v: v[:, None].expand(count, size).reshape(-1), count)


def _members(member: Tensor) -> _Sets:
    """Sets given by a membership matrix M [sets, N]: sums selected, not M @ x (an inf of one set would make
    0·inf = NaN in all the others), values reaching their members through Mᵀ."""
    return _Sets(
        lambda x: torch.where(member, x, 0.0).sum(-1),
        lambda v: torch.where(member, v[:, None], 0.0).sum(0),
        member.shape[0],
    )


def _at_least_1(n: Union[int, Tensor]) -> Union[int, Tensor]:
    return n.clamp(min=1) if isinstance(n, Tensor) else max(n, 1)


# ------------------------------------------------------------------------------------------ MATH §1 log-probs
class _TargetLogprob(torch.autograd.Function):
    """ℓ = log_softmax(z)[y], whose gradient g·(1[v = y] − p_v) is taken as 0 wherever 1[v = y] − p_v is 0: for
    g = ±inf (a loss beyond fp32, e.g. an unclipped ρ = e^100 with A < 0) autograd's g − p·Σg gives inf − inf at
    the target and 0·inf where p underflowed, where the true values are ±inf and 0."""

    @staticmethod
    def forward(z: Tensor, y: Tensor) -> Tensor:
        return torch.log_softmax(z, -1).gather(-1, y[..., None]).squeeze(-1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # apart from forward: torch.func transforms need it so
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        z, y = ctx.saved_tensors
        slope = (torch.arange(z.shape[-1], device=z.device) == y[..., None]).to(z.dtype) - torch.softmax(z, -1)
        return torch.where(slope == 0, 0.0, g[..., None] * slope), None


def token_logprobs(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, entropy: bool = False, mask: Optional[Tensor] = None
) -> tuple[Tensor, Optional[Tensor]]:
    """ℓ = log softmax(z/τ)[y] and, with ``entropy``, H = −Σ p·log p, p = softmax(z/τ); differentiable. Rows where
    ``mask`` is 0 give ℓ = H = 0 and a zero gradient whatever their logits hold (the kernels skip them)."""
    z = _acc(logits) / temperature
    keep = None if mask is None else mask != 0
    if keep is not None:  # a NaN logit of a masked row must not reach the gradient
        z = torch.where(keep[..., None], z, 0.0)
    lp = _TargetLogprob.apply(z, targets.long())
    ent = None
    if entropy:  # a banned token (z = −inf) has p = 0 and adds 0, not 0·(−inf)
        logp = torch.log_softmax(z, -1)
        ent = -(logp.exp() * torch.where(logp.isfinite(), logp, 0.0)).sum(-1)
    if keep is not None:
        lp = torch.where(keep, lp, 0.0)
        ent = None if ent is None else torch.where(keep, ent, 0.0)
    return lp, ent


def hidden_to_logits(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
) -> Tensor:
    """z = c·tanh(s·(h Wᵀ + b)/c) (Gemma's final-logit softcap c, Cohere's logit scale s), in fp32: the oracle never
    rounds a product to the input dtype."""
    z = torch.nn.functional.linear(_acc(hidden), _acc(weight), None if bias is None else _acc(bias)) * logit_scale
    return z if logit_softcap is None else logit_softcap * torch.tanh(z / logit_softcap)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    entropy: bool = False,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    return token_logprobs(
        hidden_to_logits(hidden, weight, bias, logit_scale, logit_softcap), targets, temperature, entropy
    )


# -------------------------------------------------------------------------------------- MATH §3 reward side
def advantages(
    rewards: Tensor,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    config: AdvantageConfig = AdvantageConfig(),
    reward_weights: Optional[Tensor] = None,
    metrics: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Advantages [B] (fp32, detached) from rewards [B], or [B, K] reward functions summed with their weights (TRL
    "sum_then_normalize"), in contiguous groups of ``group_size`` or one group per distinct ``group_ids`` value;
    and the reward metrics of MATH §3 (``{}`` without ``metrics``). The estimators beyond grpo, rloo and the
    sequence-whitened reinforce_baseline are O(B·T) PyTorch already (``fastgrpo.reward.estimators``, tested
    against the trainers' own functions): the oracle hands them over."""
    from .reward import advantages as reward  # (a function-level import: reward imports the backends, and they this)

    if not reward.computed_by_kernels(config):
        return reward.estimator_advantages(rewards, group_size, group_ids, config, reward_weights, metrics)
    out = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.detach().double()
    if r.dim() == 2:
        r = r @ (torch.ones_like(r[0]) if reward_weights is None else reward_weights.double())
    num = r.shape[0]
    if group_ids is not None:  # one group per distinct id: a membership matrix [groups, B]
        sets = _members(torch.unique(group_ids)[:, None] == group_ids)
    else:  # contiguous groups: the rows of a [groups, group_size] view (the membership matrix has B²/size entries)
        assert group_size is not None  # one of the two is given (the public functions check it)
        sets = _rows(num // group_size, group_size)
    sums, of_group, num_groups = sets.sums, sets.spread, sets.num
    size = sums(torch.ones_like(r))
    total = sums(r)
    mean = total / size.clamp(min=1)
    std = (sums((r - of_group(mean)) ** 2) / (size - 1).clamp(min=1)).sqrt()  # unbiased; 0 for a group of one

    n, baseline, spread = of_group(size), of_group(mean), of_group(std)
    if config.singleton == "raw":  # verl: a group of one has mean 0 and std 1
        baseline, spread = torch.where(n == 1, 0.0, baseline), torch.where(n == 1, 1.0, spread)
    centered = r - baseline
    if config.estimator == "rloo":  # R − the mean of the others in its group; a group of one keeps R − baseline
        adv = torch.where(n > 1, r - (of_group(total) - r) / (n - 1).clamp(min=1), centered)
    elif config.estimator == "reinforce_baseline":  # R − mean_g, whitened over the batch
        adv = (centered - centered.mean()) / ((centered.std() if num > 1 else 1.0) + config.eps)
    elif config.scale == "group":
        adv = centered / (spread + config.eps)
    elif config.scale == "batch":
        adv = centered / (r.std() + config.eps) if num > 1 else torch.zeros_like(r)
    else:  # Dr. GRPO: no division
        adv = centered
    adv = adv.to(out)
    if not metrics:
        return adv, {}
    zero_std = std == 0
    groups = max(num_groups, 1)
    values = {
        "reward": r.mean() if num else r.new_zeros(()),
        "reward_std": r.std() if num > 1 else r.new_zeros(()),
        "reward/group_std_mean": std.sum() / groups,
        "frac_reward_zero_std": zero_std.sum() / groups,
        "frac_groups_all_solved": (zero_std & (mean == 1)).sum() / groups,  # binary rewards
        "frac_groups_all_failed": (zero_std & (mean == 0)).sum() / groups,
        "advantage/group_sum_abs_max": sums(adv).abs().amax() if num_groups else r.new_zeros(()),
    }
    return adv, {key: v.to(out) for key, v in values.items()}


def _from_rewards(given: Union[Tensor, Rewards], config: AdvantageConfig) -> Tensor:
    if not isinstance(given, Rewards):
        return given
    return advantages(given.rewards, given.group_size, given.group_ids, config, given.weights, metrics=False)[0]


# ---------------------------------------------------------------------------------- MATH §2 trajectory side
class _Exp(torch.autograd.Function):
    """exp(x), or k3(x) = expm1(−x) + x (the forms that lose least near x = 0), with the derivative (e^x; −expm1(−x))
    applied only where a gradient flows in: past |x| ≈ 88 it is inf in fp32, and a branch that is flat there (a clip,
    a clamp, SAPO's saturated gate, the KL output clamp) passes 0, whose true product with it is 0, not NaN."""

    @staticmethod
    def forward(x: Tensor, k3: bool) -> Tensor:
        return torch.expm1(-x) + x if k3 else torch.exp(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.k3 = inputs[1]
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        x, y = ctx.saved_tensors
        return torch.where(g == 0, 0.0, g * (-torch.expm1(-x) if ctx.k3 else y)), None


def _estimate(d: Tensor, kind: str, lo_clamp: Optional[float], hi_clamp: Optional[float]) -> Tensor:
    """k1 D, abs |D|, k2 D²/2 or k3 e^(−D) + D − 1 of D clamped to ±lo_clamp, the estimate clamped to ±hi_clamp."""
    if lo_clamp is not None:
        d = _clamp(d, -lo_clamp, lo_clamp)
    k = _Exp.apply(d, True) if kind == "k3" else d if kind == "k1" else d.abs() if kind == "abs" else 0.5 * d * d
    if hi_clamp is not None:  # beyond the clamp: the bound, and no gradient (where() passes none)
        k = torch.where(k.detach().abs() > hi_clamp, _clamp(k.detach(), -hi_clamp, hi_clamp), k)
    return k


def kl_estimate(lp: Tensor, ref: Tensor, cfg: LossConfig, old: Optional[Tensor] = None) -> Tensor:
    """MATH §2.5: the per-token estimate K of the KL to the reference policy, from D = ℓ − ℓ^ref."""
    k = _estimate(lp - ref, cfg.kl_estimator.rstrip("+"), cfg.kl_input_clamp, cfg.kl_output_clamp)
    if cfg.kl_estimator.endswith("+"):  # verl's straight-through: the value of the estimate, the gradient of k2
        k2 = 0.5 * (lp - ref) ** 2
        k = k.detach() + (k2 - k2.detach())
    elif cfg.kl_importance_gradient:  # OpenRLHF: the value of the estimate, the gradient sg[min(ρ, cap)]·D·∇ℓ
        rho = torch.ones_like(lp) if old is None else torch.exp(lp.detach() - old)
        d = (lp - ref).detach()
        k = k.detach() + _ValueZero.apply(lp, torch.where(d == 0, 0.0, _clamp(rho, hi=cfg.kl_importance_cap) * d))
    return k


class _ValueZero(torch.autograd.Function):
    """0, with the given per-token derivative g w.r.t. ℓ (passed as 0 where g is 0 or no gradient comes in)."""

    @staticmethod
    def forward(lp: Tensor, g: Tensor) -> Tensor:
        return torch.zeros_like(lp)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (g,) = ctx.saved_tensors
        return torch.where((g == 0) | (grad == 0), 0.0, grad * g), None


class _Batch(NamedTuple):
    """A batch on the token axis [N] (0 at masked tokens), all but ℓ and H."""

    m: Tensor  # loss mask
    adv: Tensor
    old: Optional[Tensor]
    ref: Optional[Tensor]
    samp: Optional[Tensor]
    is_weights: Optional[Tensor]
    teacher: Optional[Tensor]  # the teacher's log-probs (on-policy distillation)
    cov: Optional[Tensor]  # the tokens clip_cov / kl_cov act on (bool [N]), drawn once per call
    seq: _Sets  # the sequences
    max_length: Union[int, Tensor]  # L_max of token_sum_norm
    normalizer: Normalizer
    cfg: LossConfig


def _masked(m: Tensor, x: Tensor) -> Tensor:
    """m·x, with masked tokens selected away (0·inf would be NaN, in the value or in the gradient)."""
    return torch.where(m > 0, m * x, 0.0)


def _seq_mean(b: _Batch, x: Tensor) -> Tensor:
    """Σ_t m·x / max(1, Σ_t m) per sequence."""
    return b.seq.sums(_masked(b.m, x)) / b.seq.sums(b.m).clamp(min=1)


def _aggregate(x: Tensor, m: Tensor, mode: Optional[str], b: _Batch) -> Tensor:
    """MATH §2.6: per-token values x [N] → the loss, under token weights m (the loss mask, or fewer tokens);
    a call's ``normalizer`` replaces the denominator."""
    cfg = b.cfg
    mode = mode or cfg.aggregation
    per_seq = b.seq.sums(m)
    num_seqs = _at_least_1(b.seq.num if cfg.count_empty_sequences else (per_seq > 0).sum())
    denominator: Union[int, Tensor]
    if mode == "token_mean":  # Σ m·x / Σ m
        total, denominator = _masked(m, x).sum(), m.sum().clamp(min=1)
    elif mode == "seq_mean_token_mean":  # Σ_i [Σ_t m·x / max(1, Σ_t m)] / S
        total, denominator = (b.seq.sums(_masked(m, x)) / per_seq.clamp(min=1)).sum(), num_seqs
    elif mode == "seq_mean_token_sum":  # Σ_i Σ_t m·x / S
        total, denominator = b.seq.sums(_masked(m, x)).sum(), num_seqs
    else:  # token_sum_norm: Σ m·x / (S·L_max), or / L_max alone
        total = _masked(m, x).sum()
        denominator = _at_least_1((num_seqs if cfg.divide_by_num_sequences else 1) * b.max_length)
    return total / (denominator if b.normalizer is None else b.normalizer)


def _rollout_weight(old: Tensor, b: _Batch) -> Tensor:
    """MATH §2.4: the weight of a token's policy term. With x = ℓ^old − ℓ^samp (clamped to ±c by
    ``rollout_log_ratio_clamp``, and a sequence's Σ_t m·x likewise) and [lo, hi] = [min, max]:
    ``token_*`` w = e^x, ``sequence_*`` w = e^(Σ_t m·x) on every token of the sequence, ``truncate`` clamps w to
    [lo, hi], ``mask`` zeroes it outside; ``sequence_geomean_mask`` keeps the token's own w and zeroes the sequences
    whose geometric-mean weight lies outside; ``*_binary_kl_mask`` / ``*_tv_mask`` keep the token's own w where the
    binary KL / total variation of p = e^ℓ^samp from q = e^ℓ^old (both clamped to [1e-6, 1 − 1e-6]), per token or
    as the sequence's mean, lies in [lo, hi]; ``unweighted`` w = 1. Then w over its batch mean
    (``rollout_batch_normalize``), and 0 on the tokens a ``rollout_rejection`` filter rejects, those of a sequence
    that keeps some rescaled by n_i/n'_i under ``seq_mean_token_mean`` (its token mean over its kept tokens). A soft
    mask weights the loss, not the ratio (TRL, OpenRLHF)."""
    cfg = b.cfg
    # called only with a rollout_correction and no is_weights, which need sampling_logprobs (checked on input)
    assert cfg.rollout_correction is not None and b.samp is not None
    mode = cfg.rollout_correction
    c = cfg.rollout_log_ratio_clamp
    clamped = (lambda v: v) if c is None else (lambda v: _clamp(v, -c, c))  # noqa: E731
    lo = -INF if cfg.rollout_min is None else cfg.rollout_min
    hi = INF if cfg.rollout_max is None else cfg.rollout_max
    inside = lambda v: (v >= lo) & (v <= hi)  # noqa: E731
    n = b.seq.sums(b.m)
    x = torch.where(b.m > 0, old - b.samp, 0.0)
    own = torch.exp(clamped(x))
    if mode == "unweighted":
        w = torch.ones_like(x)
    elif mode == "sequence_geomean_mask":
        w = torch.where(inside(b.seq.spread(torch.exp(_seq_mean(b, clamped(x))))), own, 0.0)
    elif "binary_kl" in mode or "tv" in mode:
        p, q = (torch.exp(v).clamp(1e-6, 1 - 1e-6) for v in (b.samp, old))
        d = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q)) if "binary_kl" in mode else (p - q).abs()
        if mode.startswith("sequence"):  # the plain mean: NaN for an empty sequence, whose tokens are all masked
            d = b.seq.spread(b.seq.sums(_masked(b.m, d)) / n)
        w = torch.where(inside(d), own, 0.0)
    else:
        w = b.seq.spread(torch.exp(clamped(b.seq.sums(_masked(b.m, x))))) if mode.startswith("sequence") else own
        w = _clamp(w, cfg.rollout_min, cfg.rollout_max) if mode.endswith("truncate") else torch.where(inside(w), w, 0.0)
    if cfg.rollout_batch_normalize:  # verl: means Σ m·w / (Σ m + 1e-8), over tokens or non-empty sequences
        if mode in ("sequence_truncate", "sequence_mask"):
            nonempty = (n > 0).to(w.dtype)
            mean = (b.seq.sums(_masked(b.m, w)) / (n + 1e-8) * nonempty).sum() / nonempty.sum().clamp(min=1e-8)
        else:
            mean = _masked(b.m, w).sum() / (b.m.sum() + 1e-8)
        w = torch.where(mean > 1e-8, w / mean, w)
    if cfg.rollout_rejection:
        xs = clamped(x)
        per_token = {"k1": -xs, "k2": 0.5 * xs * xs, "k3": torch.exp(xs) - 1.0 - xs}
        passed = torch.ones_like(b.m, dtype=torch.bool)
        for kind, low, high in cfg.rollout_rejection:
            k, bound = per_token[kind[-2:]], INF if high is None else high
            if kind.startswith("seq_max"):  # the max is ≤ high iff no unmasked token exceeds it (NaN exceeds)
                ok = b.seq.spread(b.seq.sums(_masked(b.m, (~(k <= bound)).to(x.dtype)))) == 0
            else:
                if kind.startswith("seq_sum"):
                    k = b.seq.spread(b.seq.sums(_masked(b.m, k)))
                elif kind.startswith("seq_mean"):
                    k = b.seq.spread(b.seq.sums(_masked(b.m, k)) / (n + 1e-8))
                if kind.endswith("k1"):  # the importance ratio e^(−k1) within [low, high]
                    ratio = torch.exp(-k)
                    ok = (ratio >= (0.0 if low is None else low)) & (ratio <= bound)
                else:
                    ok = k <= bound
            passed = passed & ok
        w = torch.where(passed, w, 0.0)
        if cfg.aggregation == "seq_mean_token_mean":
            kept = b.seq.sums(torch.where(passed, b.m, 0.0))
            w = w * b.seq.spread(n.clamp(min=1) / kept.clamp(min=1))
    return w


def _dppo_inside(lp: Tensor, old: Tensor, adv: Tensor, cfg: LossConfig) -> Tensor:
    """DPPO-Binary's trust region on the sampled token's probability (TV or binary KL)."""
    p, q = lp.detach().exp(), old.exp()
    if cfg.policy_loss == "dppo_tv":
        return torch.where(adv > 0, p - q <= cfg.epsilon_high, p - q >= -cfg.epsilon_low)
    bkl = q * torch.log(q / p) + (1 - q) * torch.log((1 - q + 1e-8) / (1 - p + 1e-8))
    return torch.where(adv > 0, (bkl <= cfg.epsilon_high) | (p <= q), (bkl <= cfg.epsilon_low) | (p >= q))


def _covariance_tokens(lp: Tensor, old: Tensor, b: _Batch, generator: Optional[torch.Generator]) -> Tensor:
    """clip_cov / kl_cov's tokens (bool [N]): clip_cov draws ⌊f·Σm⌋ (≥ 1) at random among the unmasked, unclipped
    tokens whose covariance (A − Ā)(ℓ − ℓ̄) lies strictly inside (low, high); kl_cov takes the ⌊f·n⌋ (≥ 1) of
    largest covariance among the n unmasked tokens."""
    cfg, m, adv = b.cfg, b.m, b.adv
    out = torch.zeros(m.shape, dtype=torch.bool, device=m.device)
    valid = (m > 0).nonzero().flatten()
    if cfg.policy_loss == "kl_cov":
        if len(valid):
            a, x = adv[valid], lp[valid]
            top = ((a - a.mean()) * (x - x.mean())).topk(max(1, int(len(valid) * cfg.cov_fraction))).indices
            out[valid[top]] = True
        return out
    rho = torch.exp(lp - old)
    unclipped = ~(-adv * _clamp(rho, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high) > -adv * rho)
    a_bar, l_bar = (adv * m).sum() / (m.sum() + 1e-8), (lp * m).sum() / (m.sum() + 1e-8)
    cov = (adv - a_bar) * (lp - l_bar)
    pool = ((m > 0) & unclipped & (cov > cfg.clip_cov_low) & (cov < cfg.clip_cov_high)).nonzero().flatten()
    if len(pool):
        order = torch.randperm(len(pool), generator=generator, device=generator.device if generator else "cpu")
        order = order.to(pool.device)
        out[pool[order[: max(int(cfg.cov_fraction * m.sum().item()), 1)]]] = True
    return out


def _policy_term(lp: Tensor, rho: Tensor, log_r: Tensor, old: Tensor, adv: Tensor, b: _Batch) -> Tensor:
    """P_t of MATH §2.3 for the token-level terms."""
    cfg = b.cfg
    if cfg.policy_loss in ("ppo", "clip_cov"):
        capped = _clamp(rho, hi=cfg.ratio_cap)  # TRL's delta
        p = -torch.minimum(capped * adv, _clamp(rho, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high) * adv)
        if cfg.dual_clip is not None:
            p = torch.where(adv < 0, torch.minimum(p, -cfg.dual_clip * adv), p)
        return p if b.cov is None else torch.where(b.cov, 0.0, p)
    if cfg.policy_loss == "kl_cov":
        assert b.cov is not None
        return -adv * rho + torch.where(b.cov, cfg.kl_cov_coef * log_r.abs(), 0.0)
    if cfg.policy_loss in ("dppo_tv", "dppo_kl"):
        w = torch.where(_dppo_inside(lp, old, adv, cfg), _clamp(rho, hi=cfg.ratio_cap).detach(), 0.0)
        return -adv * w * lp
    if cfg.policy_loss == "dro":
        return -lp * adv + cfg.dro_beta / 2 * log_r**2
    if cfg.policy_loss == "cispo":
        return -_clamp(rho, cfg.cispo_low, cfg.cispo_high).detach() * adv * lp
    if cfg.policy_loss == "sapo":
        kappa = torch.where(adv > 0, _const(adv, cfg.sapo_tau_pos), _const(adv, cfg.sapo_tau_neg))
        return -(4.0 / kappa) * torch.sigmoid(kappa * (rho - 1.0)) * adv
    return -adv * lp  # reinforce


def _vespo_phi(log_r: Tensor, w_rollout: Optional[Tensor], b: _Batch) -> Tensor:
    """VESPO's gamma weight φ(w) = e^λ·w^k·e^(−λw) of the sequence ratio w (TRL ``get_gamma_weights``), 0 where
    not finite; w = exp(Σ_t m·clamp(log r, ±20) [+ Σ_t m·clamp(log w_rollout, log 1e-8, 20)]) in [1e-8, e^20]."""
    cfg, tiny = b.cfg, math.log(1e-8)
    total = b.seq.sums(_masked(b.m, _clamp(log_r.detach(), -20.0, 20.0)))
    if w_rollout is not None:
        total = total + b.seq.sums(_masked(b.m, _clamp(torch.log(w_rollout), tiny, 20.0)))
    w = torch.exp(b.seq.spread(_clamp(total, tiny, 20.0)))
    positive = b.adv >= 0
    k = torch.where(positive, _const(w, cfg.vespo_k_pos), _const(w, cfg.vespo_k_neg))
    lam = _clamp(torch.where(positive, _const(w, cfg.vespo_lambda_pos), _const(w, cfg.vespo_lambda_neg)), 1e-4)
    phi = torch.exp(lam) * w**k * torch.exp(-lam * w)
    return torch.where(torch.isfinite(phi), phi, 0.0)


def _gmpo(log_r: Tensor, w: Tensor, b: _Batch) -> Tensor:
    """MATH §2.3 GMPO, a mean over sequences of −Ā_i·ρ_i: ρ_i the geometric mean of the sign-aware clipped token
    ratios, each sequence weighted by the geometric mean of its token weights (log(w + 1e-10): w = 0 drops it)."""
    cfg, sign = b.cfg, torch.sign(b.adv)
    d = sign * torch.minimum(sign * log_r, sign * _clamp(log_r, -cfg.epsilon_low, cfg.epsilon_high))
    mean = lambda x: b.seq.sums(_masked(b.m, x)) / (b.seq.sums(b.m) + 1e-8)  # noqa: E731
    per_seq = -mean(b.adv) * torch.exp(mean(d)) * torch.exp(mean(torch.log(w + 1e-10)))
    return per_seq.sum() / (max(b.seq.num, 1) if b.normalizer is None else b.normalizer)


def _objective(lp: Tensor, ent: Optional[Tensor], b: _Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss of MATH §2 (differentiable in ℓ and H), the ratio ρ, the log-ratio and the rollout weight."""
    cfg, m, adv = b.cfg, b.m, b.adv
    old = lp.detach() if b.old is None else b.old  # on-policy: ρ = 1 with the gradient of ℓ
    log_r = lp - old  # §2.1
    if cfg.log_ratio_clamp is not None:
        log_r = _clamp(log_r, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    log_rho = log_r
    if cfg.ratio_level == "sequence":  # §2.2 GSPO: log s_i on every token of sequence i
        log_rho = b.seq.spread(_seq_mean(b, log_r))
        if cfg.sequence_ratio_grad == "token":  # verl's GSPO-token: the value of log s_i, the gradient of ℓ_t
            log_rho = lp - lp.detach() + log_rho.detach()
        log_rho = _clamp(log_rho, hi=cfg.seq_log_ratio_max)
    rho = _Exp.apply(log_rho, False)

    # §2.4 weights, all detached
    if b.is_weights is not None:
        w_rollout = b.is_weights
    elif cfg.rollout_correction is not None:
        w_rollout = _rollout_weight(old.detach(), b)
    else:
        w_rollout = torch.ones_like(m)
    kept, top = torch.ones_like(m), None  # the token masks
    if cfg.top_entropy_quantile < 1.0:  # TRL: H_t ≥ the (1 − q) quantile of the unmasked entropies
        assert ent is not None  # the config needs the entropy (checked on input)
        h = ent.detach()
        top = m > 0
        if h.numel():  # nanquantile skips the masked tokens (no data-dependent shape); none unmasked: NaN, none kept
            top = top & (h >= torch.nanquantile(torch.where(top, h, float("nan")), 1.0 - cfg.top_entropy_quantile))
        kept = torch.where(top, kept, 0.0)
    if cfg.off_policy_mask_threshold is not None:  # TRL: drop a stale sequence with A < 0
        drift = b.seq.spread(_seq_mean(b, (old if b.samp is None else b.samp).detach() - lp.detach()))
        kept = torch.where((adv >= 0) | (drift <= cfg.off_policy_mask_threshold), kept, 0.0)
    w = w_rollout * kept

    if cfg.policy_loss == "gmpo":
        loss = _gmpo(log_r, w, b)
    elif cfg.policy_loss == "vespo":  # the rollout weight enters φ's sequence ratio instead of multiplying
        weighted = b.is_weights is not None or cfg.rollout_correction is not None
        phi = _vespo_phi(log_r, w_rollout if weighted else None, b)
        loss = _aggregate(-phi * adv * lp * kept, m, None, b)
    else:
        loss = _aggregate(_policy_term(lp, rho, log_r, old, adv, b) * w, m, None, b)
    if cfg.beta != 0.0:  # §2.5
        assert b.ref is not None  # beta != 0 needs ref_logprobs (checked on input)
        k = kl_estimate(lp, b.ref, cfg, b.old)
        loss = loss + cfg.beta * _aggregate(k * rho if cfg.kl_ratio_weighted else k, m, cfg.kl_aggregation, b)
    if cfg.teacher_coef != 0.0 and cfg.teacher_form == "loss":  # distillation: λ·aggregate(K(ℓ − ℓ^T))
        assert b.teacher is not None  # teacher_coef != 0 needs teacher_logprobs (checked on input)
        k = _estimate(lp - b.teacher, cfg.teacher_estimator, cfg.teacher_input_clamp, cfg.teacher_output_clamp)
        loss = loss + cfg.teacher_coef * _aggregate(k, m, None, b)
    if cfg.entropy_coef != 0.0:  # §2.7, over the tokens the entropy mask keeps
        assert ent is not None  # the config needs the entropy (checked on input)
        loss = loss - cfg.entropy_coef * _aggregate(
            ent, m if top is None else torch.where(top, m, 0.0), cfg.entropy_aggregation, b
        )
    return loss * cfg.loss_scale, rho.detach(), log_r.detach(), w_rollout


def _metrics(
    lp: Tensor, ent: Optional[Tensor], b: _Batch, rho: Tensor, log_r: Tensor, w_rollout: Tensor, grad_lp: Tensor
) -> dict[str, Tensor]:
    """MATH §4: token means over the unmasked tokens (and min/max)."""
    cfg, m, adv = b.cfg, b.m, b.adv
    keep = m > 0
    mean = lambda x: _masked(m, x.to(m.dtype)).sum() / m.sum().clamp(min=1)  # noqa: E731

    def extreme(x: Tensor, largest: bool) -> Tensor:  # 0 without an unmasked token
        if x.numel() == 0:
            return x.new_zeros(())
        v = torch.where(keep, x, -INF if largest else INF)
        return torch.where(keep.any(), v.amax() if largest else v.amin(), 0.0)

    if cfg.policy_loss == "gmpo":  # GMPO clips the log-ratio
        low, high = (log_r < -cfg.epsilon_low) & (adv < 0), (log_r > cfg.epsilon_high) & (adv > 0)
    elif cfg.policy_loss in ("dppo_tv", "dppo_kl"):  # DPPO: outside its trust region
        outside = ~_dppo_inside(lp, lp.detach() if b.old is None else b.old, adv, cfg)
        low, high = outside & (adv <= 0), outside & (adv > 0)
    else:
        low, high = (rho < 1.0 - cfg.epsilon_low) & (adv < 0), (rho > 1.0 + cfg.epsilon_high) & (adv > 0)
    old = lp.detach() if b.old is None else b.old
    out = {
        "clip_ratio/low_mean": mean(low),
        "clip_ratio/high_mean": mean(high),
        "clip_ratio/region_mean": mean(low | high),
        "clip_ratio/dual": m.new_zeros(()) if cfg.dual_clip is None else mean((adv < 0) & (rho > cfg.dual_clip)),
        "ppo_kl": mean(old.detach() - lp.detach()),
        "ratio/mean": mean(rho),
        "ratio/min": extreme(rho, largest=False),
        "ratio/max": extreme(rho, largest=True),
        "grad_active_fraction": mean(grad_lp != 0),
    }
    if cfg.policy_loss == "cispo":
        lo = -INF if cfg.cispo_low is None else cfg.cispo_low
        hi = INF if cfg.cispo_high is None else cfg.cispo_high
        out["cispo_clip_ratio"] = mean(((rho > hi) & (adv > 0)) | ((rho < lo) & (adv < 0)))
    if b.ref is not None:
        out["kl"] = mean(kl_estimate(lp.detach(), b.ref, cfg).detach())
    if cfg.policy_loss == "vespo":
        weighted = b.is_weights is not None or cfg.rollout_correction is not None
        out["vespo/phi_mean"] = mean(_vespo_phi(log_r, w_rollout if weighted else None, b))
    if b.cov is not None:
        out["cov_selected_fraction"] = mean(b.cov)
    if ent is not None:
        out["entropy"] = mean(ent.detach())
    if b.is_weights is not None or cfg.rollout_correction is not None:
        out["is_weight/mean"] = mean(w_rollout)
        out["is_weight/min"] = extreme(w_rollout, largest=False)
        out["is_weight/max"] = extreme(w_rollout, largest=True)
    return out


def policy_loss(logprobs: Tensor, advantages: Union[Tensor, Rewards], mask: Tensor, **kwargs) -> LossOutput:
    """MATH §2 on per-token log-probs [B, T] (or packed [N] with ``cu_seqlens``); advantages and ``is_weights``
    per sequence ([B] / [S]) or per token, or the :class:`Rewards` to normalize first. Differentiable w.r.t.
    ``logprobs`` (and ``entropy`` for the bonus).
    The keywords: those of ``_policy_loss`` (old/ref/sampling/teacher log-probs, is_weights, entropy, cu_seqlens,
    normalizer, config, generator)."""
    return _policy_loss(logprobs, advantages, mask, **kwargs).out


class _Evaluated(NamedTuple):
    out: LossOutput
    grad_lp: Tensor  # ∂L/∂ℓ [N]
    grad_ent: Optional[Tensor]  # ∂L/∂H [N] when the entropy was given
    seq: _Sets
    m: Tensor


def _policy_loss(
    logprobs: Tensor,
    advantages: Union[Tensor, Rewards],
    mask: Tensor,
    *,
    old_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    sampling_logprobs: Optional[Tensor] = None,
    teacher_logprobs: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    normalizer: Normalizer = None,
    config: LossConfig = LossConfig(),
    generator: Optional[torch.Generator] = None,
) -> _Evaluated:
    shape = logprobs.shape
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    n = shape.numel()
    if cu_seqlens is None:  # the rows of [B, T]; a 1-D [N] is one sequence
        seq = _rows(shape[0], shape[1]) if len(shape) == 2 else _rows(1, n)
    else:  # the spans of cu_seqlens: a membership matrix [S, N]
        position = torch.arange(n, device=logprobs.device)
        seq = _members((cu_seqlens[:-1, None] <= position) & (position < cu_seqlens[1:, None]))
    m = mask.to(dtype).reshape(-1)

    @overload
    def per_token(x: Tensor) -> Tensor: ...
    @overload
    def per_token(x: Optional[Tensor]) -> Optional[Tensor]: ...

    def per_token(x: Optional[Tensor]) -> Optional[Tensor]:
        """[N], a per-sequence x spread over its tokens (packed with S == N: read per token); masked tokens 0."""
        if x is None:
            return None
        per_seq = x.numel() != n or (len(shape) == 2 and x.shape != shape)
        x = x.to(dtype).reshape(-1)
        return torch.where(m > 0, seq.spread(x) if per_seq else x, 0.0)

    longest = seq.sums(torch.ones_like(m)).amax() if seq.num else 0
    lp, ent = per_token(logprobs), per_token(entropy)
    old, teacher = per_token(old_logprobs), per_token(teacher_logprobs)
    adv = per_token(_from_rewards(advantages, config.advantage).detach())
    if config.teacher_coef != 0.0 and config.teacher_form == "advantage":  # the reverse KL as a token reward
        assert teacher is not None  # teacher_coef != 0 needs teacher_logprobs (checked on input)
        student = old if config.teacher_reward_at == "old" and old is not None else lp.detach()
        clamps = (config.teacher_input_clamp, config.teacher_output_clamp)
        k = _estimate(student - teacher, config.teacher_estimator, *clamps)
        adv = torch.where(m > 0, adv - config.teacher_coef * k, 0.0)
    b = _Batch(
        m,
        adv,
        old,
        per_token(ref_logprobs),
        per_token(sampling_logprobs),
        None if is_weights is None else per_token(is_weights.detach()),
        teacher,
        None,
        seq,
        longest if config.max_length is None else config.max_length,
        normalizer,
        config,
    )
    if config.policy_loss in ("clip_cov", "kl_cov"):
        b = b._replace(cov=_covariance_tokens(lp.detach(), lp.detach() if old is None else old, b, generator))
    loss, rho, log_r, w_rollout = _objective(lp, ent, b)
    # ∂L/∂ℓ (and ∂L/∂H) for grad_active_fraction and the gradient norms, by autodiff of a second, detached
    # evaluation: torch.func.grad, which torch.compile traces (torch.autograd.grad it does not)
    grad_ent = None
    if ent is None:
        grad_lp = torch.func.grad(lambda x: _objective(x, None, b)[0])(lp.detach())
    else:
        grad_lp, grad_ent = torch.func.grad(lambda x, h: _objective(x, h, b)[0], argnums=(0, 1))(
            lp.detach(), ent.detach()
        )
    out = LossOutput(
        loss=loss,
        logprobs=lp.detach().reshape(shape),
        entropy=None if ent is None else ent.detach().reshape(shape),
        metrics=_metrics(lp, ent, b, rho, log_r, w_rollout, grad_lp),
    )
    return _Evaluated(out, grad_lp, grad_ent, seq, m)


def grpo_loss(
    logits: Tensor,
    targets: Tensor,
    advantages: Union[Tensor, Rewards],
    mask: Tensor,
    *,
    return_entropy: bool = False,
    config: LossConfig = LossConfig(),
    **kwargs,
) -> LossOutput:
    """MATH §2 on logits [B, T, V] (or packed [N, V]); the keywords of :func:`policy_loss`. ``grad_norms``: the
    norm of each sequence's rows of ∂loss/∂logits, materialized (the log-prob map's vector-Jacobian product at
    ∂L/∂ℓ, ∂L/∂H)."""
    targets = torch.where(mask != 0, targets, 0)  # a masked id may be padding (−100)
    with_entropy = return_entropy or config.needs_entropy
    lp, ent = token_logprobs(logits, targets, config.temperature, with_entropy, mask)
    e = _policy_loss(lp, advantages, mask, entropy=ent, config=config, **kwargs)
    z = _acc(logits.detach())
    if e.grad_ent is None:
        vjp = torch.func.vjp(lambda x: token_logprobs(x, targets, config.temperature, False, mask)[0], z)[1]
        (dz,) = vjp(e.grad_lp.reshape(lp.shape))
    else:
        vjp = torch.func.vjp(lambda x: token_logprobs(x, targets, config.temperature, True, mask), z)[1]
        (dz,) = vjp((e.grad_lp.reshape(lp.shape), e.grad_ent.reshape(lp.shape)))
    norms = e.seq.sums(dz.square().sum(-1).reshape(-1)).sqrt()
    present = e.seq.sums((e.m > 0).to(norms.dtype)) > 0
    e.out.metrics["gradient/seq_norm_mean"] = torch.where(present, norms, 0.0).sum() / present.sum().clamp(min=1)
    e.out.metrics["gradient/seq_norm_max"] = (
        torch.where(present, norms, 0.0).amax() if norms.numel() else norms.new_zeros(())
    )
    e.out.grad_norms = norms
    if config.effective_rank_sketch:  # the rank of the per-sequence gradient matrix R, through RΩ (MATH §8.8)
        from .trajectory.gradient_rank import projection  # Ω is part of the metric's definition, not its computation

        omega = projection(0, dz.shape[-1], config.effective_rank_sketch, dz.device).to(dz.dtype)
        per_token = dz.reshape(-1, dz.shape[-1]) @ omega
        sketch = torch.stack([e.seq.sums(per_token[:, j]) for j in range(omega.shape[1])], -1)
        s = torch.linalg.svdvals(sketch)
        q = s / s.sum()
        rank = torch.exp(-torch.where(q > 0, q * q.log(), 0.0).sum())
        e.out.metrics["gradient/effective_rank"] = torch.where(s.sum() > 0, rank, 0.0).to(norms.dtype)
    return e.out


def linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Union[Tensor, Rewards],
    mask: Tensor,
    *,
    bias: Optional[Tensor] = None,
    return_entropy: bool = False,
    config: LossConfig = LossConfig(),
    chunk_tokens: Optional[int] = None,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    **kwargs,
) -> LossOutput:
    """MATH §2 on hidden states [B, T, H] (or [N, H]) and the LM-head weight [V, H]: the oracle materializes the
    fp32 logits (``chunk_tokens`` is accepted and ignored)."""
    return grpo_loss(
        hidden_to_logits(hidden, weight, bias, logit_scale, logit_softcap),
        targets,
        advantages,
        mask,
        return_entropy=return_entropy,
        config=config,
        **kwargs,
    )
