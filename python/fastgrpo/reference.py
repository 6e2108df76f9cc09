"""The fp32 PyTorch reference of MATH §2–§4: the oracle every kernel is tested against.

Written for reading, not speed: every token is flattened to one axis of N entries with ``seq`` [N] giving
its sequence, so the padded [B, T] and the packed [N] + ``cu_seqlens`` layouts share one code path. Inputs
are assumed valid (``fastgrpo`` validates them before any backend runs).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .config import AdvantageConfig, LossConfig, LossOutput, Rewards

Normalizer = Union[float, Tensor, None]


def _acc(x: Tensor) -> Tensor:
    """The accumulation dtype: fp32, or fp64 for fp64 inputs (so gradcheck can run on the oracle)."""
    return x if x.dtype == torch.float64 else x.float()


def _as(x: Tensor, value: Optional[float]) -> Optional[Tensor]:
    """A config float as a 0-d tensor of ``x``'s dtype (None stays None), for clamp bounds and where() branches:
    torch.compile specializes a float passed to those (a recompile for every new value), not one added to a
    tensor. The same value as the float: the op would round it to ``x``'s dtype too."""
    return None if value is None else x.new_zeros(()) + value


def _clamp(x: Tensor, lo: Optional[float] = None, hi: Optional[float] = None) -> Tensor:
    """``x.clamp(lo, hi)``, with the bounds as tensors (see ``_as``)."""
    return x.clamp(_as(x, lo), _as(x, hi))


# ----------------------------------------------------------------------------------------------------------
# Log-probs and entropy (MATH §1)
# ----------------------------------------------------------------------------------------------------------
def token_logprobs(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, entropy: bool = False, mask: Optional[Tensor] = None
) -> tuple[Tensor, Optional[Tensor]]:
    """ℓ = z_y/τ − logsumexp(z/τ) and H = logsumexp(z/τ) − Σ p·z/τ, in fp32, differentiable. Rows where ``mask``
    is 0 give ℓ = H = 0 and a zero gradient whatever their logits hold (as the kernels, which skip them)."""
    z = _acc(logits) / temperature
    if mask is not None:  # selected, not multiplied: a NaN logit of a masked row must not reach its gradient
        z = torch.where(mask.unsqueeze(-1) != 0, z, 0.0)
    lp = _TargetLogprob.apply(z, targets.long())
    ent = None
    if entropy:  # a banned token (z = −inf) has p = 0 and adds nothing, not 0·(−inf)
        logp = torch.log_softmax(z, dim=-1)
        ent = -(logp.exp() * torch.where(torch.isfinite(logp), logp, 0.0)).sum(-1)
    if mask is not None:
        lp = torch.where(mask != 0, lp, 0.0)
        ent = None if ent is None else torch.where(mask != 0, ent, 0.0)
    return lp, ent


class _TargetLogprob(torch.autograd.Function):
    """ℓ = log_softmax(z)[y], with ∂ℓ/∂z_v = 1[v = y] − p_v applied as g·(1[v = y] − p_v) and 0 where that
    coefficient is 0. Autograd's own g − p·Σg is the same value, except when g is ±inf (the loss itself beyond
    fp32, e.g. an unclipped ratio e^100 with A < 0): then inf − inf = NaN at the target and 0·inf where p
    underflowed, where the true values are ±inf and 0."""

    @staticmethod
    def forward(z: Tensor, targets: Tensor) -> Tensor:
        return torch.log_softmax(z, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # (not in forward: torch.func transforms need it apart)
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        z, targets = ctx.saved_tensors
        coef = (-torch.softmax(z, dim=-1)).scatter_add(-1, targets.unsqueeze(-1), torch.ones_like(z[..., :1]))
        return torch.where(coef == 0, 0.0, grad.unsqueeze(-1) * coef), None


def hidden_to_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None, logit_scale: float = 1.0,
                     logit_softcap: Optional[float] = None) -> Tensor:
    """z = softcap(scale · (hidden @ weightᵀ + bias)) in fp32 (the oracle never rounds a product to the input
    dtype); softcap(x) = c·tanh(x/c) (Gemma's final_logit_softcapping), scale as Cohere's logit_scale."""
    z = _acc(hidden) @ _acc(weight).t()
    z = (z if bias is None else z + _acc(bias)) * logit_scale
    return z if logit_softcap is None else logit_softcap * torch.tanh(z / logit_softcap)


def linear_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
    temperature: float = 1.0, entropy: bool = False, logit_scale: float = 1.0, logit_softcap: Optional[float] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    z = hidden_to_logits(hidden, weight, bias, logit_scale, logit_softcap)
    return token_logprobs(z, targets, temperature, entropy)


# ----------------------------------------------------------------------------------------------------------
# Reward side (MATH §3)
# ----------------------------------------------------------------------------------------------------------
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
    """Group-normalized advantages [B] (fp32, detached) and the reward metrics of MATH §3 (``{}`` without
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
    """MATH §3 metrics from the rewards, the advantages, each reward's group and the group statistics.
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


# ----------------------------------------------------------------------------------------------------------
# Trajectory side (MATH §2)
# ----------------------------------------------------------------------------------------------------------
class TokenLayout:
    """Which sequence each token belongs to, for segment sums over the flattened token axis."""

    def __init__(self, shape: torch.Size, cu_seqlens: Optional[Tensor], max_length: Optional[int], device):
        if cu_seqlens is None:
            b, t = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
            self.seq = torch.arange(b, device=device).repeat_interleave(t)
            self.num_seqs = b
            self.max_length: Union[int, Tensor] = t if max_length is None else max_length
        else:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            self.num_seqs = lengths.numel()
            # output_size: the token count is known, so no host sync to size the result
            self.seq = torch.arange(self.num_seqs, device=device).repeat_interleave(lengths, output_size=shape[0])
            self.max_length = (lengths.max() if self.num_seqs else 0) if max_length is None else max_length

    def seg_sum(self, x: Tensor) -> Tensor:
        return torch.zeros(self.num_seqs, device=x.device, dtype=x.dtype).index_add(0, self.seq, x)

    def per_token(self, x: Tensor, token_shape: torch.Size) -> Tensor:
        """A per-sequence ([B], [B, 1], packed [S]) or per-token tensor as a per-token [N] fp32 tensor.

        Packed input with S == N is read per token (the only case where the two shapes coincide)."""
        per_sequence = x.numel() != token_shape.numel() or (len(token_shape) == 2 and x.shape != token_shape)
        x = _acc(x).reshape(-1)
        return x[self.seq] if per_sequence else x


def aggregation_weights(m: Tensor, mode: str, lay: TokenLayout, cfg: LossConfig, normalizer: Normalizer) -> Tensor:
    """MATH §2.6 as per-token weights a_t: the aggregate of per-token values x is Σ_t a_t·x_t."""
    if mode == "token_mean":
        return m / (normalizer if normalizer is not None else m.sum().clamp(min=1))
    count = lay.seg_sum(m)

    def at_least_1(n: Union[int, Tensor]) -> Union[int, Tensor]:
        return max(n, 1) if isinstance(n, int) else n.clamp(min=1)

    def num_seqs() -> Union[int, Tensor]:
        return at_least_1(lay.num_seqs if cfg.count_empty_sequences else (count > 0).sum())

    if mode == "token_sum_norm":
        if normalizer is None:
            normalizer = at_least_1((num_seqs() if cfg.divide_by_num_sequences else 1) * lay.max_length)
        return m / normalizer
    if mode == "seq_mean_token_mean":
        m = m / count.clamp(min=1)[lay.seq]
    return m / (num_seqs() if normalizer is None else normalizer)


def _aggregate(x: Tensor, m: Tensor, mode: str, lay: TokenLayout, cfg: LossConfig, normalizer: Normalizer) -> Tensor:
    return (aggregation_weights(m, mode, lay, cfg, normalizer) * x).sum()


class _K3(torch.autograd.Function):
    """k3 = e^(−D) − 1 + D as expm1(−D) + D, with derivative −expm1(−D): the forms that lose the least to
    cancellation near D = 0 (autograd of expm1 would take 1 − (expm1(−D) + 1) and lose it again)."""

    @staticmethod
    def forward(d: Tensor) -> Tensor:
        return torch.expm1(-d) + d

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (d,) = ctx.saved_tensors
        return -grad * torch.expm1(-d)


def kl_estimate(lp: Tensor, ref: Tensor, cfg: LossConfig) -> Tensor:
    """MATH §2.5: the per-token KL estimate K_t of D = ℓ − ℓ^ref."""
    d = lp - ref
    if cfg.kl_input_clamp is not None:
        d = _clamp(d, -cfg.kl_input_clamp, cfg.kl_input_clamp)
    estimate = {"k1": lambda x: x, "abs": torch.abs, "k2": lambda x: 0.5 * x * x,
                "k3": _K3.apply}[cfg.kl_estimator.rstrip("+")]
    k = estimate(d)
    if cfg.kl_output_clamp is not None:
        # Where the estimate saturates its derivative is 0: selected, with the estimate evaluated there on a
        # constant, so that k3 = inf (D < −88 without an input clamp: OpenRLHF, which clamps D at −10 for this)
        # gives 0 and not 0·inf = NaN.
        c = cfg.kl_output_clamp
        saturated = k.detach().abs() > c
        k = torch.where(saturated, _clamp(k.detach(), -c, c), estimate(torch.where(saturated, 0.0, d)))
    if cfg.kl_estimator.endswith("+"):  # straight-through: value of the estimator, gradient of k2
        k2 = 0.5 * (lp - ref) ** 2
        k = k2 - k2.detach() + k.detach()
    return k


def rollout_weights(old: Tensor, samp: Tensor, m: Tensor, lay: TokenLayout, cfg: LossConfig) -> Tensor:
    """MATH §2.4: detached importance weights of the trainer's old policy over the rollout engine."""
    # A token's weight is its own ratio (a fractional mask weights the loss, not the ratio, as in TRL and
    # OpenRLHF); sequence statistics are the trainers' masked sums Σ m·log w. Masked tokens are selected away.
    log_w = torch.where(m > 0, old - samp, 0.0)
    seq_log_w = lay.seg_sum(m * log_w)
    mode = cfg.rollout_correction
    lo = cfg.rollout_min if cfg.rollout_min is not None else float("-inf")
    hi = cfg.rollout_max if cfg.rollout_max is not None else float("inf")
    if mode == "sequence_geomean_mask":
        geo = torch.exp(seq_log_w / lay.seg_sum(m).clamp(min=1))
        keep = (geo >= lo) & (geo <= hi)
        return torch.exp(log_w) * keep[lay.seq]
    w = torch.exp(seq_log_w)[lay.seq] if mode.startswith("sequence") else torch.exp(log_w)
    if mode.endswith("truncate"):
        return _clamp(w, cfg.rollout_min, cfg.rollout_max)
    return torch.where((w < lo) | (w > hi), torch.zeros_like(w), w)


def _entropy_mask(ent: Tensor, m: Tensor, q: float) -> Tensor:
    """TRL's top-entropy mask: tokens with H ≥ the (1 − q) quantile of the masked entropies. Masked tokens enter
    the quantile as NaN, which nanquantile skips (no data-dependent shape: it compiles without a graph break); with
    no unmasked token the threshold is NaN and no token is kept."""
    if ent.numel() == 0:  # (a static shape: no graph break)
        return torch.zeros_like(m)
    threshold = torch.nanquantile(torch.where(m > 0, ent, float("nan")), 1.0 - q)
    return ((ent >= threshold) & (m > 0)).float()


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    return (torch.where(m > 0, x, 0.0) * m).sum() / m.sum().clamp(min=1)  # a NaN where m = 0 is not counted


def _masked_extreme(x: Tensor, m: Tensor, largest: bool) -> Tensor:
    if x.numel() == 0:
        return x.new_zeros(())
    fill = float("-inf") if largest else float("inf")
    v = torch.where(m > 0, x, torch.full_like(x, fill))
    v = v.max() if largest else v.min()
    return torch.where(m.sum() > 0, v, torch.zeros_like(v))


class _RatioExp(torch.autograd.Function):
    """ρ = exp(log r), whose derivative ρ is applied only where a gradient flows in. Past log r ≈ 88 (no clamp)
    ρ = inf in fp32, and a branch that is flat there (a clipped ratio, SAPO's saturated gate, a dual clip) passes
    0: the true derivative is then 0, where autograd's 0·inf would give NaN."""

    @staticmethod
    def forward(log_r: Tensor) -> Tensor:
        return torch.exp(log_r)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (rho,) = ctx.saved_tensors
        return torch.where(grad == 0, 0.0, grad * rho)


def _objective(
    lp: Tensor, adv: Tensor, m: Tensor, lay: TokenLayout, cfg: LossConfig, normalizer: Normalizer,
    old: Optional[Tensor], ref: Optional[Tensor], samp: Optional[Tensor], is_w: Optional[Tensor],
    ent: Optional[Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """The scalar loss of MATH §2 from flattened per-token fp32 tensors, and the values metrics need."""
    # masked positions are ignored whatever they hold (NaN advantages or weights of padding): selected away,
    # since the mask's 0 would turn them into NaN, not 0
    adv = torch.where(m > 0, adv, 0.0)
    is_w = None if is_w is None else torch.where(m > 0, is_w, 0.0)
    old = lp.detach() if old is None else old
    log_r = lp - old  # §2.1
    if cfg.log_ratio_clamp is not None:
        log_r = _clamp(log_r, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    count = lay.seg_sum(m)
    if cfg.ratio_level == "sequence":  # §2.2 GSPO
        log_s = lay.seg_sum(log_r * m) / count.clamp(min=1)
        log_rho = log_s[lay.seq]
        if cfg.sequence_ratio_grad == "token":  # verl's GSPO-token: the value of s_i, the gradient of ℓ_t
            log_rho = lp - lp.detach() + log_rho.detach()
        if cfg.seq_log_ratio_max is not None:
            log_rho = _clamp(log_rho, hi=cfg.seq_log_ratio_max)
        rho = _RatioExp.apply(log_rho)
    else:
        rho = _RatioExp.apply(log_r)

    # §2.4 weights, all detached
    weight = torch.ones_like(lp)
    if is_w is not None:
        weight = is_w
    elif cfg.rollout_correction is not None:
        weight = rollout_weights(old, samp, m, lay, cfg)
    is_weight = weight
    emask = None
    if cfg.top_entropy_quantile < 1.0:
        emask = _entropy_mask(ent.detach(), m, cfg.top_entropy_quantile)
        weight = weight * emask
    if cfg.off_policy_mask_threshold is not None:
        samp_or_old = old if samp is None else samp
        seq_kl = lay.seg_sum((samp_or_old - lp.detach()) * m) / count.clamp(min=1)
        keep = (adv >= 0) | (seq_kl[lay.seq] <= cfg.off_policy_mask_threshold)
        weight = weight * keep

    lo, hi = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
    values = {"rho": rho.detach(), "is_weight": is_weight}
    if cfg.policy_loss == "gmpo":  # §2.3: a sequence loss, always a mean over sequences
        sgn = torch.sign(adv)
        d_clip = _clamp(log_r, -cfg.epsilon_low, cfg.epsilon_high)
        d = sgn * torch.minimum(sgn * log_r, sgn * d_clip)
        rho_seq = torch.exp(lay.seg_sum(m * d) / (count + 1e-8))
        adv_seq = lay.seg_sum(m * adv) / (count + 1e-8)
        seq_weight = torch.exp(lay.seg_sum(torch.log(weight + 1e-10) * m) / (count + 1e-8))
        seq_loss = -adv_seq * rho_seq * seq_weight
        policy = seq_loss.sum() / (normalizer if normalizer is not None else max(lay.num_seqs, 1))
        values["low"] = (log_r < -cfg.epsilon_low) & (adv < 0)
        values["high"] = (log_r > cfg.epsilon_high) & (adv > 0)
    else:
        if cfg.policy_loss == "ppo":  # §2.3
            unclipped = rho if cfg.ratio_cap is None else _clamp(rho, hi=cfg.ratio_cap)
            p = -torch.minimum(unclipped * adv, _clamp(rho, lo, hi) * adv)
            if cfg.dual_clip is not None:
                p = torch.where(adv < 0, torch.minimum(p, -cfg.dual_clip * adv), p)
        elif cfg.policy_loss == "cispo":
            unbounded = cfg.cispo_low is None and cfg.cispo_high is None  # clamp() needs at least one bound
            p = -(rho if unbounded else _clamp(rho, cfg.cispo_low, cfg.cispo_high)).detach() * adv * lp
        elif cfg.policy_loss == "sapo":
            tau = torch.where(adv > 0, _as(adv, cfg.sapo_tau_pos), _as(adv, cfg.sapo_tau_neg))
            p = -(4.0 / tau) * torch.sigmoid(tau * (rho - 1.0)) * adv
        else:  # reinforce
            p = -adv * lp
        policy = _aggregate(p * weight, m, cfg.aggregation, lay, cfg, normalizer)
        values["low"] = (rho < lo) & (adv < 0)
        values["high"] = (rho > hi) & (adv > 0)

    loss = policy
    if cfg.beta != 0.0:  # §2.5
        k = kl_estimate(lp, ref, cfg)
        if cfg.kl_ratio_weighted:
            k = k * rho
        loss = loss + cfg.beta * _aggregate(k, m, cfg.kl_aggregation or cfg.aggregation, lay, cfg, normalizer)
    if ref is not None:
        values["kl"] = kl_estimate(lp.detach(), ref, cfg).detach()
    if cfg.entropy_coef != 0.0:  # §2.7
        ent_mask = m if emask is None else m * emask
        loss = loss - cfg.entropy_coef * _aggregate(
            ent, ent_mask, cfg.entropy_aggregation or cfg.aggregation, lay, cfg, normalizer)
    values["ppo_kl"] = (old - lp).detach()
    return loss * cfg.loss_scale, values


def loss_metrics(values: dict[str, Tensor], grad_lp: Tensor, adv: Tensor, m: Tensor, ent: Optional[Tensor],
             cfg: LossConfig, weights_used: bool) -> dict[str, Tensor]:
    """MATH §4 over the masked tokens."""
    rho = values["rho"]
    low, high = values["low"].float(), values["high"].float()
    out = {
        "clip_ratio/low_mean": _masked_mean(low, m),
        "clip_ratio/high_mean": _masked_mean(high, m),
        "clip_ratio/region_mean": _masked_mean(torch.maximum(low, high), m),
        "clip_ratio/dual": _masked_mean(((adv < 0) & (rho > cfg.dual_clip)).float(), m)
        if cfg.dual_clip is not None else m.new_zeros(()),
        "ppo_kl": _masked_mean(values["ppo_kl"], m),
        "ratio/mean": _masked_mean(rho, m),
        "ratio/min": _masked_extreme(rho, m, largest=False),
        "ratio/max": _masked_extreme(rho, m, largest=True),
        "grad_active_fraction": _masked_mean((grad_lp != 0).float(), m),
    }
    if cfg.policy_loss == "cispo":
        above = (rho > cfg.cispo_high) & (adv > 0) if cfg.cispo_high is not None else torch.zeros_like(m, dtype=torch.bool)
        below = (rho < cfg.cispo_low) & (adv < 0) if cfg.cispo_low is not None else torch.zeros_like(m, dtype=torch.bool)
        out["cispo_clip_ratio"] = _masked_mean((above | below).float(), m)
    if "kl" in values:
        out["kl"] = _masked_mean(values["kl"], m)
    if ent is not None:
        out["entropy"] = _masked_mean(ent.detach(), m)
    if weights_used:
        w = values["is_weight"]
        out["is_weight/mean"] = _masked_mean(w, m)
        out["is_weight/min"] = _masked_extreme(w, m, largest=False)
        out["is_weight/max"] = _masked_extreme(w, m, largest=True)
    return out


def policy_loss(
    logprobs: Tensor,
    advantages: Union[Tensor, Rewards],
    mask: Tensor,
    *,
    old_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    sampling_logprobs: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    normalizer: Normalizer = None,
    config: LossConfig = LossConfig(),
) -> LossOutput:
    """MATH §2 on per-token log-probs [B, T] (or packed [N] with ``cu_seqlens``); advantages per sequence
    ([B] / [S]) or per token, or the :class:`Rewards` to normalize first. Differentiable w.r.t. ``logprobs``
    (and ``entropy`` for the bonus)."""
    advantages = resolve_advantages(advantages, config.advantage)
    shape = logprobs.shape
    lay = TokenLayout(shape, cu_seqlens, config.max_length, logprobs.device)

    m = _acc(mask.reshape(-1))

    def flat(x: Optional[Tensor]) -> Optional[Tensor]:
        """Flattened, with masked tokens set to 0: kernels never read them, and an inf there (ℓ of a padding
        id far from ℓ^ref) must not turn into NaN through a multiplication by the mask."""
        return None if x is None else torch.where(m > 0, _acc(x.reshape(-1)), 0.0)

    adv = lay.per_token(advantages.detach(), shape)
    is_w = None if is_weights is None else lay.per_token(is_weights.detach(), shape)
    args = (adv, m, lay, config, normalizer, flat(old_logprobs), flat(ref_logprobs), flat(sampling_logprobs),
            is_w)
    lp = flat(logprobs)
    ent = flat(entropy)
    loss, values = _objective(lp, *args, ent)

    # grad_active_fraction needs ∂L/∂ℓ: autodiff of a second, detached evaluation keeps the oracle plain.
    # torch.func.grad, not torch.autograd.grad: torch.compile traces the former into the graph.
    ent_probe = None if ent is None else ent.detach()
    grad_lp = torch.func.grad(lambda leaf: _objective(leaf, *args, ent_probe)[0])(lp.detach())
    weights_used = is_weights is not None or config.rollout_correction is not None
    metrics = loss_metrics(values, grad_lp, adv, m, ent, config, weights_used)
    return LossOutput(loss=loss, logprobs=lp.detach().reshape(shape),
                      entropy=None if ent is None else ent.detach().reshape(shape), metrics=metrics)


def grpo_loss(
    logits: Tensor, targets: Tensor, advantages: Union[Tensor, Rewards], mask: Tensor, *,
    return_entropy: bool = False, config: LossConfig = LossConfig(), **kwargs,
) -> LossOutput:
    """MATH §2 on logits [B, T, V] (or packed [N, V]); same keywords as :func:`policy_loss`."""
    safe_targets = torch.where(mask.bool(), targets, torch.zeros_like(targets))  # masked ids may be padding
    lp, ent = token_logprobs(logits, safe_targets, config.temperature,
                             entropy=return_entropy or config.needs_entropy, mask=mask)
    return policy_loss(lp, advantages, mask, entropy=ent, config=config, **kwargs)


def linear_grpo_loss(
    hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Union[Tensor, Rewards], mask: Tensor, *,
    bias: Optional[Tensor] = None, return_entropy: bool = False, config: LossConfig = LossConfig(),
    chunk_tokens: Optional[int] = None, logit_scale: float = 1.0, logit_softcap: Optional[float] = None, **kwargs,
) -> LossOutput:
    """MATH §2 on hidden states [B, T, H] (or [N, H]) and the LM-head weight [V, H]. The oracle materializes
    the fp32 logits (``chunk_tokens`` is accepted and ignored)."""
    return grpo_loss(hidden_to_logits(hidden, weight, bias, logit_scale, logit_softcap), targets, advantages, mask,
                     return_entropy=return_entropy, config=config, **kwargs)
