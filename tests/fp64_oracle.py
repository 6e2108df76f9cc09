"""An independent fp64 statement of MATH §1–§3, the truth of the property and extreme-value tests.

Written from docs/MATH.md, not from ``fastgrpo.reference`` (an oracle that shares the library's code
cannot catch that code's errors). Padded [B, T] layout only; every function also runs in fp32, which the tests
use as "PyTorch's own error at the precision the library promises" (MATH §6: fp32 accumulation).

Gradients come from torch.autograd on fp64 tensors. Two rules make them the exact ones by construction:
- a clipped branch is evaluated on clipped inputs (clip(ρ) = exp(clamp(log ρ)), the KL input clamp before exp),
  so a gradient that is 0 in exact arithmetic is 0 here, never 0·inf;
- fp64 must not overflow: |log-ratio| and |D| stay below ``MAX_EXP`` (asserted), far beyond anything in the
  tests (|log-ratio| = 100 gives 2.7e43, finite in fp64). Where the fp64 value exceeds the fp32 range, the
  fp32 truth is that value cast to fp32, i.e. ±inf.
Anything at a masked position (m = 0) is never read: NaN, inf or padding ids there change nothing.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

F64 = torch.float64
MAX_EXP = 700.0  # exp(709.8) overflows fp64
Normalizer = Union[float, Tensor, None]


def _no_overflow(x: Tensor, what: str) -> None:
    assert not bool((x.detach().abs() > MAX_EXP).any()), f"{what} beyond ±{MAX_EXP}: exp overflows fp64"


# ---------------------------------------------------------------------------------------------- §1 log-probs
def token_logprobs(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, dtype: torch.dtype = F64
) -> tuple[Tensor, Tensor]:
    """ℓ = z_y/τ − logsumexp(z/τ) and H = −Σ p log p with p = softmax(z/τ), in ``dtype``, differentiable.
    Negative ids (padding) read entry 0: callers mask those tokens."""
    logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    lp = logp.gather(-1, targets.long().clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


# ------------------------------------------------------------------------------------------ §3 advantages
def advantages(
    rewards: Tensor,
    group_size: int,
    *,
    estimator: str = "grpo",
    scale: str = "group",
    eps: float = 1e-4,
    singleton: str = "zero",
    reward_weights: Optional[Tensor] = None,
    dtype: torch.dtype = F64,
) -> Tensor:
    """Advantages [B] from rewards [B] (or [B, K] summed with ``reward_weights``) in contiguous groups."""
    r = rewards.to(dtype)
    if r.dim() == 2:
        w = torch.ones(r.shape[1], dtype=dtype) if reward_weights is None else reward_weights.to(dtype)
        r = (r * w).sum(-1)
    groups = r.reshape(-1, group_size)
    mean = groups.mean(1, keepdim=True)
    # unbiased std; a group of one has none (std 0, its mean is itself)
    std = groups.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    if group_size == 1 and singleton == "raw":  # verl: a group of one has mean 0 and std 1
        mean, std = torch.zeros_like(mean), torch.ones_like(std)
    centered = (groups - mean).reshape(-1)
    if estimator == "grpo":
        if scale == "group":
            return ((groups - mean) / (std + eps)).reshape(-1)
        if scale == "batch":
            return centered / (r.std() + eps) if r.numel() > 1 else torch.zeros_like(r)
        return centered
    if estimator == "rloo":  # R − mean of the others
        return centered * group_size / (group_size - 1) if group_size > 1 else centered
    assert estimator == "reinforce_baseline", estimator
    std_b = centered.std() if centered.numel() > 1 else torch.ones((), dtype=dtype)
    return (centered - centered.mean()) / (std_b + eps)


# ------------------------------------------------------------------------------------ §2 trajectory side
def kl_estimate(
    lp: Tensor, ref: Tensor, estimator: str, input_clamp: Optional[float], output_clamp: Optional[float]
) -> Tensor:
    """K of D = ℓ − ℓ^ref; k3 as expm1(−D) + D (no cancellation near D = 0); a trailing ``+`` keeps the value
    and takes the gradient of k2 of the unclamped D (verl's straight-through)."""
    d = lp - ref
    if input_clamp is not None:
        d = d.clamp(-input_clamp, input_clamp)
    name = estimator.rstrip("+")
    if name == "k3":
        _no_overflow(d, "KL log-ratio D")
    k = {"k1": lambda: d, "abs": lambda: d.abs(), "k2": lambda: 0.5 * d * d, "k3": lambda: torch.expm1(-d) + d}[name]()
    if output_clamp is not None:
        k = k.clamp(-output_clamp, output_clamp)
    if estimator.endswith("+"):
        k2 = 0.5 * (lp - ref) ** 2
        k = k2 - k2.detach() + k.detach()
    return k


def _clip_ratio(log_rho: Tensor, lo: Optional[float], hi: Optional[float]) -> Tensor:
    """clamp(ρ, lo, hi) computed as exp(clamp(log ρ)): outside [lo, hi] the value is the bound and the
    gradient an exact 0 (no inf is ever formed)."""
    lo_log = -math.inf if lo is None or lo <= 0 else math.log(lo)
    hi_log = math.inf if hi is None else math.log(hi)
    return torch.exp(log_rho.clamp(lo_log, hi_log))


def aggregate(x: Tensor, m: Tensor, mode: str, cfg, normalizer: Normalizer) -> Tensor:
    """MATH §2.6 over rows = sequences; m may be a soft (fractional) weight."""
    b, t = m.shape
    count = m.sum(1)
    num_seqs = b if cfg.count_empty_sequences else int((count > 0).sum())
    num_seqs = max(num_seqs, 1)
    total = (m * x).sum()
    if mode == "token_mean":
        return total / (normalizer if normalizer is not None else m.sum().clamp(min=1))
    if mode == "seq_mean_token_sum":
        return total / (normalizer if normalizer is not None else num_seqs)
    if mode == "seq_mean_token_mean":
        per_seq = (m * x).sum(1) / count.clamp(min=1)
        return per_seq.sum() / (normalizer if normalizer is not None else num_seqs)
    assert mode == "token_sum_norm", mode
    if normalizer is None:
        max_length = cfg.max_length if cfg.max_length is not None else t
        normalizer = max((num_seqs if cfg.divide_by_num_sequences else 1) * max_length, 1)
    return total / normalizer


def _rollout_weights(old: Tensor, samp: Tensor, m: Tensor, cfg) -> Tensor:
    """A token's weight is its own ratio exp(ℓ^old − ℓ^samp) (TRL, OpenRLHF: a soft mask weights the loss, not
    the ratio); sequence statistics weight each token's log-ratio by m, as the trainers' masked sums do."""
    log_w = old - samp  # 0 at masked positions
    lo = -math.inf if cfg.rollout_min is None else cfg.rollout_min
    hi = math.inf if cfg.rollout_max is None else cfg.rollout_max
    mode = cfg.rollout_correction
    seq_sum = (m * log_w).sum(1, keepdim=True)
    if mode == "sequence_geomean_mask":
        geo = torch.exp(seq_sum / m.sum(1, keepdim=True).clamp(min=1))
        return torch.exp(log_w) * ((geo >= lo) & (geo <= hi))
    w = torch.exp(seq_sum).expand_as(log_w) if mode.startswith("sequence") else torch.exp(log_w)
    if mode.endswith("truncate"):
        return w.clamp(lo, hi)
    return torch.where((w < lo) | (w > hi), torch.zeros_like(w), w)


def objective(
    lp: Tensor,
    adv: Tensor,
    mask: Tensor,
    cfg,
    *,
    old: Optional[Tensor] = None,
    ref: Optional[Tensor] = None,
    samp: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    normalizer: Normalizer = None,
) -> Tensor:
    """The scalar loss of MATH §2 from per-token [B, T] tensors, computed in lp's dtype.

    adv and is_weights: per sequence [B] or per token [B, T]. ``cfg`` is a ``fastgrpo.LossConfig`` read as
    plain data."""
    dt = lp.dtype
    m = mask.to(dt)
    keep = m > 0

    def tok(x: Optional[Tensor]) -> Optional[Tensor]:
        """Per token, with masked positions replaced by 0 before anything reads them."""
        if x is None:
            return None
        x = x.detach().to(dt)
        x = x.reshape(-1, 1).expand_as(m) if x.shape != m.shape else x
        return torch.where(keep, x, torch.zeros((), dtype=dt))

    lp = torch.where(keep, lp, torch.zeros((), dtype=dt))
    a = tok(adv)
    old = lp.detach() if old is None else tok(old)
    ref, samp, is_w, ent = tok(ref), tok(samp), tok(is_weights), None
    if entropy is not None:
        ent = torch.where(keep, entropy.to(dt), torch.zeros((), dtype=dt))

    # 1. log-ratio, 2. ratio level
    log_r = lp - old
    if cfg.log_ratio_clamp is not None:
        log_r = log_r.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    count = m.sum(1, keepdim=True)
    if cfg.ratio_level == "sequence":
        log_s = ((log_r * m).sum(1, keepdim=True) / count.clamp(min=1)).expand_as(lp)
        log_rho = lp - lp.detach() + log_s.detach() if cfg.sequence_ratio_grad == "token" else log_s
        if cfg.seq_log_ratio_max is not None:
            log_rho = log_rho.clamp(max=cfg.seq_log_ratio_max)
    else:
        log_rho = log_r
    _no_overflow(log_rho, "log-ratio")
    rho = torch.exp(log_rho)

    # 4. weights, all detached
    w = torch.ones_like(lp)
    if is_w is not None:
        w = is_w
    elif cfg.rollout_correction is not None:
        w = _rollout_weights(old, samp, m, cfg)
    entropy_keep = None
    if cfg.top_entropy_quantile < 1.0:
        threshold = torch.quantile(ent.detach()[keep], 1.0 - cfg.top_entropy_quantile) if keep.any() else math.inf
        entropy_keep = ((ent.detach() >= threshold) & keep).to(dt)
        w = w * entropy_keep
    if cfg.off_policy_mask_threshold is not None:
        behaviour = old if samp is None else samp
        seq_kl = ((behaviour - lp.detach()) * m).sum(1, keepdim=True) / count.clamp(min=1)
        w = w * ((a >= 0) | (seq_kl <= cfg.off_policy_mask_threshold))

    # 3. policy term
    lo, hi = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
    if cfg.policy_loss == "gmpo":  # a sequence loss, a mean over sequences
        sgn = torch.sign(a)
        d = sgn * torch.minimum(sgn * log_r, sgn * log_r.clamp(-cfg.epsilon_low, cfg.epsilon_high))
        rho_seq = torch.exp((m * d).sum(1) / (count[:, 0] + 1e-8))
        adv_seq = (m * a).sum(1) / (count[:, 0] + 1e-8)
        w_seq = torch.exp((torch.log(w + 1e-10) * m).sum(1) / (count[:, 0] + 1e-8))
        total = (-adv_seq * rho_seq * w_seq).sum()
        loss = total / (normalizer if normalizer is not None else max(lp.shape[0], 1))
    else:
        if cfg.policy_loss == "ppo":
            unclipped = rho if cfg.ratio_cap is None else _clip_ratio(log_rho, None, cfg.ratio_cap)
            p = -torch.minimum(unclipped * a, _clip_ratio(log_rho, lo, hi) * a)
            if cfg.dual_clip is not None:
                p = torch.where(a < 0, torch.minimum(p, -cfg.dual_clip * a), p)
        elif cfg.policy_loss == "cispo":
            p = -_clip_ratio(log_rho, cfg.cispo_low, cfg.cispo_high).detach() * a * lp
        elif cfg.policy_loss == "sapo":
            kappa = torch.where(a > 0, cfg.sapo_tau_pos, cfg.sapo_tau_neg).to(dt)
            p = -(4.0 / kappa) * torch.sigmoid(kappa * (rho - 1.0)) * a
        else:
            assert cfg.policy_loss == "reinforce", cfg.policy_loss
            p = -a * lp
        loss = aggregate(p * w, m, cfg.aggregation, cfg, normalizer)

    # 5. KL to the reference
    if cfg.beta != 0.0:
        k = kl_estimate(lp, ref, cfg.kl_estimator, cfg.kl_input_clamp, cfg.kl_output_clamp)
        if cfg.kl_ratio_weighted:
            k = k * rho
        loss = loss + cfg.beta * aggregate(k, m, cfg.kl_aggregation or cfg.aggregation, cfg, normalizer)
    # 7. entropy bonus
    if cfg.entropy_coef != 0.0:
        m_ent = m if entropy_keep is None else m * entropy_keep
        loss = loss - cfg.entropy_coef * aggregate(
            ent, m_ent, cfg.entropy_aggregation or cfg.aggregation, cfg, normalizer
        )
    return loss * cfg.loss_scale


def grpo_loss(
    logits: Tensor, targets: Tensor, adv: Tensor, mask: Tensor, cfg, *, dtype: torch.dtype = F64, **kw
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, ℓ, H) from logits [B, T, V] in ``dtype``; differentiable w.r.t. ``logits``."""
    lp, ent = token_logprobs(logits, targets, cfg.temperature, dtype)
    return objective(lp, adv, mask, cfg, entropy=ent, **kw), lp, ent
