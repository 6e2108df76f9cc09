"""Rollout correction (MATH §2.4): importance weights, rejection filters and mismatch metrics between the trainer's
policy and the rollout engine (train/inference mismatch, stale rollouts), as O(N) PyTorch.

Every per-token tensor lies on one token axis [N] (the rows of [B, T] flattened, or packed sequences) and
:class:`Segments` says which sequence each token is in. x_t = ℓ^train_t − ℓ^rollout_t is the log importance ratio
of a token, w_t = e^x_t its weight; ℓ^train is the trainer's old policy, or the current one detached (verl's bypass
mode). Nothing here is differentiable: weights multiply a policy term as constants.

- weights: :func:`raw_weights` (per token, or per sequence from Σ_t m·x_t), :func:`bound_weights` (TIS truncation
  or IcePop mask), :func:`geometric_mean_keep` (OpenRLHF ``seq-mask-tis``), :func:`gate_statistic` and
  :func:`divergence_keep` (OpenRLHF ``is_correction_gating``), :func:`batch_normalize` (verl
  ``rollout_is_batch_normalize``);
- rejection: :func:`filter_statistic` (verl's k1/k2/k3 per token, or their sum/mean/max per sequence) and
  :func:`rejection_keep` (a chain of filters that must all pass);
- :func:`loss_weights`: what ``LossConfig``'s rollout options make of those, the weight of each token's policy term
  (``objective.rollout_weights``: the fused and two-phase kernel paths);
- metrics (0-d tensors, no host sync): :func:`mismatch_metrics` (KL, k3 KL, perplexities, log-PPL differences, χ²
  per token and per sequence), :func:`weight_metrics` (mean/min/max, fractions beyond the bounds, std, effective
  sample size, per-sequence spread), :func:`filter_metrics`;
- verl drop-ins (read at verl 0.9.1, ``verl/trainer/ppo/rollout_corr_helper.py``; tested against it), with verl's
  signatures, return values and metric names: :func:`compute_rollout_correction_and_rejection_mask`,
  :func:`compute_rollout_correction_weights`, :func:`compute_rollout_rejection_mask`,
  :func:`compute_offpolicy_metrics`, :func:`compute_rollout_corr_metrics_from_logprobs`; and
  :func:`verl_loss_options`, the ``LossConfig`` fields that apply verl's options inside the loss.

verl quirks the drop-ins reproduce (their names promise verl's behaviour):

- k1 rejection bounds ``"L_U"`` apply to e^(−x) = π_rollout/π_train, the inverse of the importance ratio that
  verl's documentation says they bound (``-log r`` compared with [log L, log U]): asymmetric bounds select the
  mirrored band. ``LossConfig.rollout_rejection`` bounds the importance ratio itself; :func:`verl_loss_options`
  maps verl's (L, U) to (1/U, 1/L).
- ``rollout_rs_seq_masked_fraction`` divides by every sequence, all-masked ones included, while the per-filter
  ``*_seq_masked_fraction`` divides by the non-empty ones.
- ``rollout_is_max``/``_min`` at sequence level and ``rollout_is_ratio_fraction_*`` count all-masked sequences
  (log-ratio 0), and ``rollout_is_min`` there is not clamped at e^(−20) while ``_max`` is clamped at e^20.
- the k3 KL metric exponentiates the unclamped log-ratio (inf in fp32 past 88) while χ² clamps it at ±20.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..config import ROLLOUT_FILTERS, LossConfig, RolloutFilter

SAFETY_BOUND = 20.0  # verl's clamp of every log-ratio before an exp
INF = float("inf")
_K1 = ("token_k1", "seq_sum_k1", "seq_mean_k1")


class Segments:
    """Which of ``num`` sequences each of N tokens is in: ``seq`` [N] int64, in any order."""

    def __init__(self, seq: Tensor, num: int) -> None:
        self.seq, self.num = seq, num

    @classmethod
    def rows(cls, batch: int, length: int, device: torch.device) -> "Segments":
        """The rows of a [batch, length] tensor flattened."""
        return cls(torch.arange(batch, device=device).repeat_interleave(length), batch)

    def sum(self, x: Tensor) -> Tensor:
        """Σ of x [N] over each sequence's tokens [num]."""
        return x.new_zeros(self.num).index_add(0, self.seq, x)

    def max(self, x: Tensor, where: Tensor) -> Tensor:
        """The max of x over each sequence's tokens where ``where`` holds; 0 for a sequence without one."""
        picked = torch.where(where, x, -INF)
        top = x.new_full((self.num,), -INF).scatter_reduce(0, self.seq, picked, "amax")
        return torch.where(top == -INF, 0.0, top)

    def spread(self, v: Tensor) -> Tensor:
        """A per-sequence value [num] on each of its tokens [N]."""
        return v[self.seq]


def _const(x: Tensor, value: float) -> Tensor:
    """A bound as a 0-d tensor of x's dtype: torch.compile specializes a float given to clamp or where, not one
    added to a tensor."""
    return x.new_zeros(()) + value


def _clamp(x: Tensor, bound: Optional[float]) -> Tensor:
    return x if bound is None else x.clamp(_const(x, -bound), _const(x, bound))


def within(x: Tensor, low: Optional[float], high: Optional[float]) -> Tensor:
    """low ≤ x ≤ high (None: unbounded); NaN is outside."""
    keep = x == x
    if low is not None:
        keep = keep & (x >= _const(x, low))
    if high is not None:
        keep = keep & (x <= _const(x, high))
    return keep


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """m·x, 0 where m = 0 whatever x holds there (verl's masked_sum)."""
    return torch.where(mask != 0, x * mask, 0.0)


def _plus_eps(count: Tensor, mask: Tensor) -> Tensor:
    """verl's Σ m + 1e-8: a bool or integer mask sums to an integer tensor, to which 1e-8 is added in the default
    float dtype (so an integer count stays exact there); a floating mask's count gets it in its own dtype."""
    return (count if mask.is_floating_point() else count.to(torch.get_default_dtype())) + 1e-8


def _token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """verl's masked_mean over all tokens: Σ m·x / (Σ m + 1e-8)."""
    return _masked(x, mask).sum() / _plus_eps(mask.sum(), mask)


def _sequence_mean(x: Tensor, mask: Tensor, seg: Segments) -> Tensor:
    """verl's masked_mean over each sequence [num]: Σ_t m·x / (Σ_t m + 1e-8) (0 for an empty sequence)."""
    return seg.sum(_masked(x, mask)) / _plus_eps(seg.sum(mask.to(x.dtype)), mask)


# ------------------------------------------------------------------------------------------------------- weights
def log_ratios(train: Tensor, rollout: Tensor, mask: Tensor) -> Tensor:
    """x_t = ℓ^train_t − ℓ^rollout_t at unmasked tokens, 0 at masked ones (selected: padding may hold anything)."""
    return torch.where(mask != 0, train.detach() - rollout.detach(), 0.0)


def raw_weights(x: Tensor, mask: Tensor, seg: Segments, level: str, clamp: Optional[float] = None) -> Tensor:
    """Unbounded importance weights: e^x_t (``token``) or e^(Σ_t m·x_t) of the token's sequence (``sequence``,
    verl's product of token ratios), the exponent clamped to [−clamp, clamp] first (verl: 20)."""
    if level == "sequence":
        x = seg.spread(seg.sum(_masked(x, mask)))
    return torch.exp(_clamp(x, clamp))


def bound_weights(w: Tensor, low: Optional[float], high: Optional[float], truncate: bool) -> Tensor:
    """TIS (``truncate``): w clamped to [low, high]; IcePop: w where low ≤ w ≤ high, else 0 (None: unbounded)."""
    if truncate:
        if low is None and high is None:
            return w
        return w.clamp(None if low is None else _const(w, low), None if high is None else _const(w, high))
    return torch.where(within(w, low, high), w, 0.0)


def geometric_mean_keep(x: Tensor, mask: Tensor, seg: Segments, low: Optional[float], high: Optional[float]) -> Tensor:
    """OpenRLHF ``seq-mask-tis``: whether each token's sequence has e^(Σ m·x / max(1, Σ m)) in [low, high]."""
    mean = seg.sum(_masked(x, mask)) / seg.sum(mask.to(x.dtype)).clamp(min=1)
    return seg.spread(within(torch.exp(mean), low, high))


def divergence(train: Tensor, rollout: Tensor, kind: str) -> Tensor:
    """OpenRLHF's divergence of the sampled token's probability p = e^ℓ^rollout from q = e^ℓ^train, both clamped
    to [1e-6, 1 − 1e-6]: ``binary_kl`` p·log(p/q) + (1 − p)·log((1 − p)/(1 − q)), ``tv`` |p − q|."""
    p = rollout.detach().exp().clamp(1e-6, 1 - 1e-6)
    q = train.detach().exp().clamp(1e-6, 1 - 1e-6)
    if kind == "binary_kl":
        return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    return (p - q).abs()


def gate_statistic(train: Tensor, rollout: Tensor, mask: Tensor, seg: Segments, gating: str, level: str) -> Tensor:
    """OpenRLHF's gated statistic (``PolicyLoss`` with ``is_correction_gating``): the ratio e^x (``ratio``) or
    :func:`divergence`; per token [N], or per sequence [num] (``sequence``) as the mean over its tokens Σ m·s / Σ m
    (of x for ``ratio``, then e^), NaN for an empty sequence as OpenRLHF's masked_mean gives."""
    if gating == "ratio":
        s = log_ratios(train, rollout, mask)
        if level == "sequence":
            s = seg.sum(_masked(s, mask)) / seg.sum(mask.to(s.dtype))
        return torch.exp(s)
    s = torch.where(mask != 0, divergence(train, rollout, gating), 0.0)
    if level == "sequence":
        s = seg.sum(_masked(s, mask)) / seg.sum(mask.to(s.dtype))
    return s


def divergence_keep(
    train: Tensor,
    rollout: Tensor,
    mask: Tensor,
    seg: Segments,
    kind: str,
    level: str,
    low: Optional[float],
    high: Optional[float],
) -> Tensor:
    """Per token, whether its unit (token, or its sequence by the mean) has the ``kind`` divergence in [low, high]
    (OpenRLHF ``is_correction_mode="mask"`` with ``binary_kl``/``tv`` gating)."""
    stat = gate_statistic(train, rollout, mask, seg, kind, level)
    keep = within(stat, low, high)
    return seg.spread(keep) if level == "sequence" else keep


def batch_normalize(
    w: Tensor, mask: Tensor, seg: Segments, level: str, all_reduce: bool = False
) -> tuple[Tensor, Tensor]:
    """verl ``rollout_is_batch_normalize``: (w / μ, μ), or (w, 1) where μ ≤ 1e-8. μ is the masked token mean
    Σ m·w / (Σ m + 1e-8) (``token``), or (``sequence``) the mean over the non-empty sequences of each one's
    masked mean Σ_t m·w / (n + 1e-8). ``all_reduce``: the sums are summed over the default process group and
    μ = Σ / count without the epsilon (verl's distributed_masked_mean)."""
    m = mask.to(w.dtype)
    if level == "token":
        values, weights = w, m
    else:
        values, weights = _sequence_mean(w, mask, seg), (seg.sum(m) > 0).to(w.dtype)
    total, count = _masked(values, weights).sum(), weights.sum()
    if all_reduce:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
        mean = total / count
    else:
        mean = total / (count + 1e-8) if level == "token" else total / count.clamp(min=1e-8)
    ok = mean > 1e-8
    return torch.where(ok, w / mean, w), torch.where(ok, mean, torch.ones_like(mean))


# ----------------------------------------------------------------------------------------------------- rejection
def filter_statistic(kind: str, x: Tensor, mask: Tensor, seg: Segments) -> tuple[Tensor, Optional[Tensor]]:
    """verl's rejection statistic of ``kind`` (``rollout_rs``) on log-ratios x (clamp them first: verl ±20): per
    token k1 = −x, k2 = ½x², k3 = e^x − 1 − x; ``seq_sum_*`` Σ_t m·k, ``seq_mean_*`` Σ_t m·k / (Σ_t m + 1e-8),
    ``seq_max_*`` the max over the sequence's unmasked tokens (0 if none). Returns (the statistic on every token
    [N] (its sequence's for sequence kinds), the per-sequence statistic [num] or None)."""
    if kind not in ROLLOUT_FILTERS:
        raise ValueError(f"unknown rejection filter {kind!r}: one of {ROLLOUT_FILTERS}")
    estimator = kind[-2:]
    k = -x if estimator == "k1" else 0.5 * x**2 if estimator == "k2" else torch.exp(x) - 1.0 - x
    if kind.startswith("token"):
        return k, None
    if kind.startswith("seq_sum"):
        per_seq = seg.sum(_masked(k, mask))
    elif kind.startswith("seq_mean"):
        per_seq = _sequence_mean(k, mask, seg)
    else:
        per_seq = seg.max(k, mask != 0)
    return seg.spread(per_seq), per_seq


def rejection_keep(
    x: Tensor, mask: Tensor, seg: Segments, filters: Sequence[RolloutFilter], clamp: Optional[float] = None
) -> Tensor:
    """Per token, whether it passes every filter of ``LossConfig.rollout_rejection`` (kind, low, high) on the
    log-ratios x clamped to ±clamp: k1 kinds keep e^(x), e^(Σ m·x) or e^(mean) in [low, high] (the importance
    ratio; as −log bounds on verl's k1 = −x), k2/k3 kinds keep the statistic ≤ high."""
    x = _clamp(x, clamp)
    keep = torch.ones_like(x, dtype=torch.bool)
    for kind, low, high in filters:
        stat, _ = filter_statistic(kind, x, mask, seg)
        if kind in _K1:
            lo = None if high is None else -math.log(high)
            hi = None if low is None or low == 0 else -math.log(low)
        else:
            lo, hi = None, high
        keep = keep & within(stat, lo, hi)
    return keep


# -------------------------------------------------------------------------------------------------- in the loss
def loss_weights(train: Tensor, rollout: Tensor, mask: Tensor, seg: Segments, cfg: LossConfig) -> Tensor:
    """The detached weight of each token's policy term from ``cfg``'s rollout options (MATH §2.4; ``train``: ℓ^old,
    or sg[ℓ] in verl's bypass mode): the importance weight of ``rollout_correction`` (exponents clamped by
    ``rollout_log_ratio_clamp``), divided by its batch mean with ``rollout_batch_normalize``, then 0 where a
    ``rollout_rejection`` filter rejects the token, and under ``seq_mean_token_mean`` times max(1, n_i)/max(1, n'_i)
    (n' the kept mask) so that the sequence's token mean is over its kept tokens: verl removes rejected tokens from
    the policy term's response mask. The batch denominators stay those of the full mask (see
    ``LossConfig.rollout_rejection``)."""
    mode = cfg.rollout_correction
    assert mode is not None  # called only with a rollout_correction
    clamp, low, high = cfg.rollout_log_ratio_clamp, cfg.rollout_min, cfg.rollout_max
    x = log_ratios(train, rollout, mask)
    if mode == "unweighted":
        w = torch.ones_like(x)
    elif mode == "sequence_geomean_mask":
        xc = _clamp(x, clamp)
        w = torch.where(geometric_mean_keep(xc, mask, seg, low, high), torch.exp(xc), 0.0)
    elif mode.endswith(("_binary_kl_mask", "_tv_mask")):
        level, kind = mode.split("_", 1)
        keep = divergence_keep(train, rollout, mask, seg, kind[: -len("_mask")], level, low, high)
        w = torch.where(keep, torch.exp(_clamp(x, clamp)), 0.0)
    else:  # token_/sequence_ truncate or mask
        level, bound = mode.split("_")
        w = bound_weights(raw_weights(x, mask, seg, level, clamp), low, high, truncate=bound == "truncate")
    if cfg.rollout_batch_normalize:
        w = batch_normalize(w, mask, seg, "sequence" if mode in ("sequence_truncate", "sequence_mask") else "token")[0]
    if cfg.rollout_rejection:
        keep = rejection_keep(x, mask, seg, cfg.rollout_rejection, clamp)
        w = torch.where(keep, w, 0.0)
        if cfg.aggregation == "seq_mean_token_mean":
            m = mask.to(w.dtype)
            count, kept = seg.sum(m), seg.sum(torch.where(keep, m, 0.0))
            w = w * seg.spread(count.clamp(min=1) / kept.clamp(min=1))
    return w


# ------------------------------------------------------------------------------------------------------ metrics
def mismatch_metrics(train: Tensor, rollout: Optional[Tensor], mask: Tensor, seg: Segments) -> dict[str, Tensor]:
    """verl's off-policy diagnostics (``compute_offpolicy_metrics``) as 0-d tensors. With ℓ̄_i the masked mean
    log-prob of sequence i (Σ m·ℓ / (n + 1e-8)) and x = ℓ^train − ℓ^rollout: ``training_ppl`` mean_i e^(−ℓ̄^train_i),
    ``training_log_ppl`` mean_i −ℓ̄^train_i, and with ``rollout``: ``kl`` the token mean of −x (KL(π_rollout‖π_train)),
    ``k3_kl`` of e^x − x − 1, ``rollout_ppl``/``rollout_log_ppl``, ``log_ppl_diff`` mean_i d_i with
    d_i = ℓ̄^rollout_i − ℓ̄^train_i (and ``_abs_diff``, ``_max``, ``_min``), ``ppl_ratio`` mean_i e^d_i,
    ``chi2_token`` the token mean of e^(2·clamp(x, ±20)) − 1, ``chi2_seq`` mean_i e^(2·clamp(Σ m·x, ±20)) − 1.
    Sequence means count every sequence, all-masked ones included (as verl)."""
    out: dict[str, Tensor] = {}
    mean_train = _sequence_mean(train, mask, seg)
    out["training_ppl"] = torch.exp(-mean_train).mean()
    out["training_log_ppl"] = (-mean_train).mean()
    if rollout is None:
        return out
    out["kl"] = _token_mean(rollout - train, mask)
    x = train - rollout
    out["k3_kl"] = _token_mean(torch.exp(x) - x - 1, mask)
    mean_rollout = _sequence_mean(rollout, mask, seg)
    out["rollout_ppl"] = torch.exp(-mean_rollout).mean()
    out["rollout_log_ppl"] = (-mean_rollout).mean()
    d = mean_rollout - mean_train
    out["log_ppl_diff"] = d.mean()
    out["log_ppl_abs_diff"] = d.abs().mean()
    out["log_ppl_diff_max"] = d.max()
    out["log_ppl_diff_min"] = d.min()
    out["ppl_ratio"] = torch.exp(d).mean()
    rho = torch.exp(x.clamp(-SAFETY_BOUND, SAFETY_BOUND))
    out["chi2_token"] = _token_mean(rho.square(), mask) - 1.0
    seq_x = seg.sum(_masked(x, mask)).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    out["chi2_seq"] = torch.exp(2.0 * seq_x).mean() - 1.0
    return out


def effective_sample_size(w: Tensor, mask: Tensor, cap: float) -> Tensor:
    """ESS as a fraction of the tokens: 1 / mean_t(ŵ_t²) with ŵ = w̃ / (mean w̃ + 1e-8), w̃ = clamp(w, 0, cap)
    (verl ``rollout_is_eff_sample_size``; 1 for equal weights)."""
    capped = w.clamp(_const(w, 0.0), _const(w, cap))
    normalized = capped / (_token_mean(capped, mask) + 1e-8)
    return 1.0 / _token_mean(normalized.square(), mask)


def weight_metrics(
    w: Tensor,
    raw: Tensor,
    mask: Tensor,
    seg: Segments,
    level: str,
    upper: float,
    lower: Optional[float],
) -> dict[str, Tensor]:
    """verl's IS-weight metrics (``compute_is_metrics``; prefix ``rollout_is_``) of the bounded weights w and the
    raw ones (both 0 at masked tokens), bounds [lower (default 1/upper), upper]: the token mean of w; at token
    level the max and min of w over the unmasked tokens and the fractions of raw weights above/below the bounds
    (at sequence level these come from the log-weights: :func:`sequence_weight_extremes`); the std and ESS of
    clamp(w, 0, upper) over the unmasked tokens; and over the per-sequence masked means of w (every sequence,
    all-masked ones included) their mean, std, max, min, max |· − 1|, and the fractions of the raw weights'
    per-sequence means beyond the bounds."""
    lower = 1.0 / upper if lower is None else lower
    keep = mask != 0
    out: dict[str, Tensor] = {"rollout_is_mean": _token_mean(w, mask)}
    if level == "token":
        out["rollout_is_ratio_fraction_high"] = _token_mean((raw > upper).float(), mask)
        out["rollout_is_ratio_fraction_low"] = _token_mean((raw < lower).float(), mask)
        out["rollout_is_max"] = torch.where(keep, w, -INF).max()
        out["rollout_is_min"] = torch.where(keep, w, INF).min()
    capped = w.clamp(_const(w, 0.0), _const(w, upper))
    mean_capped = _token_mean(capped, mask)
    var = _token_mean(capped.square(), mask) - mean_capped.square()
    std = torch.sqrt(var.clamp(min=0.0))
    out["rollout_is_std"] = torch.where(mask.sum() > 1, std, torch.zeros_like(std))
    out["rollout_is_eff_sample_size"] = effective_sample_size(w, mask, upper)
    seq_w = _sequence_mean(w, mask, seg)
    out["rollout_is_seq_mean"] = seq_w.mean()
    out["rollout_is_seq_std"] = seq_w.std() if seg.num > 1 else seq_w.new_zeros(())
    out["rollout_is_seq_max"] = seq_w.max()
    out["rollout_is_seq_min"] = seq_w.min()
    out["rollout_is_seq_max_deviation"] = (seq_w - 1.0).abs().max()
    raw_seq = _sequence_mean(raw, mask, seg)
    out["rollout_is_seq_fraction_high"] = (raw_seq > upper).float().mean()
    out["rollout_is_seq_fraction_low"] = (raw_seq < lower).float().mean()
    return out


def sequence_weight_extremes(seq_log_w: Tensor, upper: float, lower: Optional[float]) -> dict[str, Tensor]:
    """verl's sequence-level IS metrics from the unclamped log-weights s_i = Σ m·x of every sequence (all-masked
    ones included, s = 0): max e^min(max s, 20), min e^(min s), and the fractions of sequences with s above
    log(upper) / below log(lower) (log taken in fp32, as verl does)."""
    lower = 1.0 / upper if lower is None else lower
    log_upper = torch.log(torch.tensor(upper, device=seq_log_w.device))
    log_lower = torch.log(torch.tensor(lower, device=seq_log_w.device))
    return {
        "rollout_is_max": torch.exp(seq_log_w.max().clamp(max=SAFETY_BOUND)),
        "rollout_is_min": torch.exp(seq_log_w.min()),
        "rollout_is_ratio_fraction_high": (seq_log_w > log_upper).float().mean(),
        "rollout_is_ratio_fraction_low": (seq_log_w < log_lower).float().mean(),
    }


def filter_metrics(
    kind: str,
    stat: Tensor,
    seq_stat: Optional[Tensor],
    mask: Tensor,
    seg: Segments,
    upper: float,
    lower: float,
) -> dict[str, Tensor]:
    """verl's per-filter metrics (``compute_rs_metrics``; prefix ``rollout_rs_<kind>_``) of a statistic from
    :func:`filter_statistic`, the bounds in the statistic's space (k1: log bounds; others: ``lower`` 0, unused).
    Needs at least one unmasked token (verl raises otherwise). Over the non-empty sequences: the per-sequence
    statistic (token kinds: its masked mean) gives min/max and the fractions beyond the bounds for sequence kinds,
    and the ``seq_*`` summaries; over the unmasked tokens: the mean, the std of the statistic clamped to the
    bounds, and min/max and fractions for token kinds."""
    k1 = kind in _K1
    prefix = f"rollout_rs_{kind}"
    keep = mask != 0
    valid = seg.sum(mask.to(stat.dtype)) > 0
    seq_values = seq_stat if seq_stat is not None else _sequence_mean(stat, mask, seg)
    num_valid = valid.sum()
    n = num_valid.clamp(min=1)

    def over_valid(flags: Tensor) -> Tensor:
        return (flags & valid).float().sum() / n

    seq_max = torch.where(valid, seq_values, -INF).max()
    seq_min = torch.where(valid, seq_values, INF).min()
    out: dict[str, Tensor] = {f"{prefix}_mean": _token_mean(stat, mask)}
    if seq_stat is not None:
        out[f"{prefix}_max"], out[f"{prefix}_min"] = seq_max, seq_min
        out[f"{prefix}_fraction_high"] = over_valid(seq_values > upper)
        out[f"{prefix}_fraction_low"] = over_valid(seq_values < lower) if k1 else stat.new_zeros(())
    else:
        out[f"{prefix}_max"] = torch.where(keep, stat, -INF).max()
        out[f"{prefix}_min"] = torch.where(keep, stat, INF).min()
        out[f"{prefix}_fraction_high"] = _token_mean((stat > upper).float(), mask)
        out[f"{prefix}_fraction_low"] = _token_mean((stat < lower).float(), mask) if k1 else stat.new_zeros(())
    clamped = stat.clamp(_const(stat, lower if k1 else 0.0), _const(stat, upper))
    mean_clamped = _token_mean(clamped, mask)
    std = torch.sqrt((_token_mean(clamped.square(), mask) - mean_clamped.square()).clamp(min=0.0))
    out[f"{prefix}_std"] = torch.where(mask.sum() > 1, std, torch.zeros_like(std))
    seq_mean = _masked(seq_values, valid).sum() / n
    seq_var = _masked((seq_values - seq_mean).square(), valid).sum() / (num_valid - 1).clamp(min=1)
    out[f"{prefix}_seq_mean"] = seq_mean
    out[f"{prefix}_seq_std"] = torch.where(num_valid > 1, seq_var.sqrt(), torch.zeros_like(seq_var))
    out[f"{prefix}_seq_max"], out[f"{prefix}_seq_min"] = seq_max, seq_min
    out[f"{prefix}_seq_max_deviation"] = torch.where(valid, seq_values.abs(), -INF).max()
    out[f"{prefix}_seq_fraction_high"] = over_valid(seq_values > upper)
    if k1:
        out[f"{prefix}_seq_fraction_low"] = over_valid(seq_values < lower)
    return out


# ------------------------------------------------------------------------------------------------- verl drop-ins
def _parse_is_threshold(spec: Any) -> tuple[float, Optional[float]]:
    """verl's ``rollout_is_threshold``: a number U (TIS, truncation at U) or a string "U" / "L_U" (IcePop band);
    returns (U, L or None)."""
    if isinstance(spec, bool):
        raise TypeError("rollout_is_threshold must be a number or a threshold string, not a bool")
    lower: Optional[float] = None
    if isinstance(spec, (int, float)):
        upper = float(spec)
    elif isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ValueError("rollout_is_threshold must not be an empty string")
        try:
            if "_" in text:
                low_text, up_text = text.split("_", 1)
                lower, upper = float(low_text), float(up_text)
            else:
                upper = float(text)
        except ValueError as exc:
            raise ValueError(f"Invalid rollout_is_threshold {spec!r}") from exc
    else:
        raise TypeError("rollout_is_threshold must be a number or a threshold string")
    if upper <= 0:
        raise ValueError(f"rollout_is_threshold upper bound must be positive, got {upper}")
    if lower is not None and lower <= 0:
        raise ValueError(f"rollout_is_threshold lower bound must be positive, got {lower}")
    if lower is not None and lower > upper:
        raise ValueError("rollout_is_threshold lower bound must be <= upper bound")
    return upper, lower


def _parse_rs_options(rollout_rs: Any) -> list[str]:
    """verl's ``rollout_rs``: comma-separated filter names, duplicates dropped (first kept)."""
    if rollout_rs is None or not isinstance(rollout_rs, str):
        raise ValueError("rollout_rs must be a non-empty string (comma separated for several filters)")
    names = [part.strip() for part in rollout_rs.split(",") if part.strip()]
    if not names:
        raise ValueError("rollout_rs must name at least one filter")
    options: list[str] = []
    for name in names:
        if name not in ROLLOUT_FILTERS:
            raise ValueError(f"Invalid rollout_rs option: {name}. Must be one of {sorted(ROLLOUT_FILTERS)}.")
        if name not in options:
            options.append(name)
    return options


def _parse_rs_thresholds(options: list[str], spec: Any) -> dict[str, tuple[Optional[float], float]]:
    """verl's ``rollout_rs_threshold``: one entry for all filters or one per filter (comma separated); a k1
    filter takes "L_U" or U (then L = 1/U), the others U. Returns {filter: (L or None, U)}."""
    if spec is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling")
    if isinstance(spec, (int, float)):
        parts = [str(spec)]
    elif isinstance(spec, str):
        parts = [part.strip() for part in spec.split(",") if part.strip()]
    else:
        raise TypeError("rollout_rs_threshold must be a string or a number")
    if not parts:
        raise ValueError("rollout_rs_threshold must hold at least one threshold")
    if len(parts) not in (1, len(options)):
        raise ValueError(
            f"rollout_rs_threshold needs one threshold for all filters or exactly {len(options)}, one per filter"
        )
    if len(parts) == 1:
        parts = parts * len(options)
    out: dict[str, tuple[Optional[float], float]] = {}
    for option, part in zip(options, parts):
        if option in _K1:
            low_text, up_text = part.split("_", 1) if "_" in part else (None, part)
            try:
                upper = float(up_text)
                lower = float(str(1.0 / upper)) if low_text is None else float(low_text)
            except (ValueError, ZeroDivisionError) as exc:
                raise ValueError(f"Invalid numeric threshold {part!r} for option {option!r}") from exc
            if lower <= 0 or upper <= 0:
                raise ValueError(f"Thresholds for option {option!r} must be positive, got {part}")
            if lower > upper:
                raise ValueError(f"Thresholds for option {option!r} must be lower <= upper, got {part}")
            out[option] = (lower, upper)
        else:
            if "_" in part:
                raise ValueError(f"rollout_rs_threshold for option {option!r} takes a single upper bound, got {part!r}")
            try:
                upper = float(part)
            except ValueError as exc:
                raise ValueError(f"Invalid numeric threshold {part!r} for option {option!r}") from exc
            if upper <= 0:
                raise ValueError(f"Threshold for option {option!r} must be positive, got {part}")
            out[option] = (None, upper)
    return out


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v.item() if isinstance(v, Tensor) else v for k, v in metrics.items()}


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _check_2d(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a [batch, response_length] tensor, got {getattr(x, 'shape', type(x))}")


def compute_rollout_correction_weights(
    log_ratio: Tensor,
    response_mask: Tensor,
    rollout_is: str = "token",
    rollout_is_threshold: Any = 2.0,
    rollout_is_batch_normalize: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """verl's ``compute_rollout_correction_weights``: detached IS weights [B, T] (0 at masked tokens) from the log
    ratio x = ℓ^train − ℓ^rollout [B, T]: e^clamp(x, ±20) per token (``token``) or e^clamp(Σ_t m·x, ±20) per
    sequence (``sequence``), truncated at U (threshold U: TIS) or zeroed outside [L, U] ("L_U": IcePop), divided
    by the batch mean with ``rollout_is_batch_normalize`` (all-reduced when torch.distributed is initialized, as
    verl); and verl's ``rollout_is_*`` metrics as floats."""
    if rollout_is not in ("token", "sequence"):
        raise ValueError(f"Invalid rollout_is: {rollout_is}. Must be one of {{'token', 'sequence'}}.")
    upper, lower = _parse_is_threshold(rollout_is_threshold)
    _check_2d("log_ratio", log_ratio)
    b, t = log_ratio.shape
    seg = Segments.rows(b, t, log_ratio.device)
    m = response_mask.reshape(-1)
    x = torch.where(m != 0, log_ratio.detach().reshape(-1), 0.0)
    raw = raw_weights(x, m, seg, rollout_is, SAFETY_BOUND) * m
    w = bound_weights(raw, lower, upper, truncate=lower is None)
    metrics = weight_metrics(w, raw, m, seg, rollout_is, upper, lower)
    if rollout_is == "sequence":
        metrics.update(sequence_weight_extremes(seg.sum(_masked(x, m)), upper, lower))
    if lower is not None:
        metrics["rollout_is_oob_ratio"] = _token_mean((~within(raw, lower, upper)).float(), m)
    w = w.detach()
    if rollout_is_batch_normalize:
        w, factor = batch_normalize(w, m, seg, rollout_is, all_reduce=_distributed())
        metrics["rollout_is_batch_norm_factor"] = factor
    return w.reshape(b, t), _floats(metrics)


def compute_rollout_rejection_mask(
    log_ratio: Tensor,
    response_mask: Tensor,
    rollout_rs: str = "token_k1",
    rollout_rs_threshold: Any = None,
) -> tuple[Tensor, dict[str, float]]:
    """verl's ``compute_rollout_rejection_mask``: the response mask [B, T] with the tokens (token filters) or whole
    sequences (``seq_*`` filters) that fail any of the comma-separated ``rollout_rs`` filters set to 0, and
    verl's ``rollout_rs_*`` metrics. On x clamped to ±20: k1 = −x kept within [log L, log U] (verl's sign: the
    bounds apply to π_rollout/π_train), k2 = ½x² and k3 = e^x − 1 − x kept ≤ U."""
    options = _parse_rs_options(rollout_rs)
    if rollout_rs_threshold is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling")
    _check_2d("log_ratio", log_ratio)
    if log_ratio.shape[0] == 0:
        return response_mask, {}
    thresholds = _parse_rs_thresholds(options, rollout_rs_threshold)
    if not bool(response_mask.any()):
        raise ValueError("response_mask must contain at least one valid token (1).")
    b, t = log_ratio.shape
    seg = Segments.rows(b, t, log_ratio.device)
    m = response_mask.reshape(-1)
    valid_token = m != 0
    valid_seq = seg.sum(valid_token.long()) > 0
    x = torch.where(valid_token, log_ratio.detach().reshape(-1), 0.0).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    combined = torch.ones_like(x)
    metrics: dict[str, Tensor] = {}
    for option in options:
        lower, upper = thresholds[option]
        stat, seq_stat = filter_statistic(option, x, m, seg)
        if option in _K1:
            assert lower is not None
            stat_lower, stat_upper = math.log(lower), math.log(upper)
            keep = within(stat, stat_lower, stat_upper)
        else:
            stat_lower, stat_upper = 0.0, upper
            keep = stat <= upper
        combined = combined * keep.to(x.dtype)
        metrics.update(filter_metrics(option, stat, seq_stat, m, seg, stat_upper, stat_lower))
        metrics[f"rollout_rs_{option}_masked_fraction"] = _token_mean(1 - keep.to(x.dtype), m)
        seq_rejected = seg.sum((~keep & valid_token).long()) > 0
        metrics[f"rollout_rs_{option}_seq_masked_fraction"] = (seq_rejected & valid_seq).float().sum() / valid_seq.sum()
    metrics["rollout_rs_masked_fraction"] = _token_mean(1 - combined, m)
    seq_has_rejected = seg.sum((~(combined > 0.5) & valid_token).long()) > 0
    metrics["rollout_rs_seq_masked_fraction"] = seq_has_rejected.float().mean()
    modified = (response_mask * combined.reshape(b, t)).to(response_mask.dtype)
    return modified, _floats(metrics)


def compute_offpolicy_metrics(
    old_log_prob: Tensor, rollout_log_prob: Optional[Tensor], response_mask: Tensor
) -> dict[str, float]:
    """verl's ``compute_offpolicy_metrics`` (:func:`mismatch_metrics`), as floats without a prefix."""
    if not bool(response_mask.any()):
        raise AssertionError("Expected at least one valid token in response_mask")
    _check_2d("old_log_prob", old_log_prob)
    b, t = old_log_prob.shape
    seg = Segments.rows(b, t, old_log_prob.device)
    m = response_mask.reshape(-1)
    train = old_log_prob.detach().reshape(-1)
    rollout = None if rollout_log_prob is None else rollout_log_prob.detach().reshape(-1)
    return _floats(mismatch_metrics(train, rollout, m, seg))


def compute_rollout_corr_metrics_from_logprobs(
    log_prob: Tensor, rollout_log_prob: Tensor, response_mask: Tensor
) -> dict[str, float]:
    """verl's ``compute_rollout_corr_metrics_from_logprobs``: :func:`compute_offpolicy_metrics` of the current
    log-probs, prefixed ``rollout_corr/``."""
    return {
        f"rollout_corr/{k}": v for k, v in compute_offpolicy_metrics(log_prob, rollout_log_prob, response_mask).items()
    }


class WeightsProto:
    """What verl's DataProto offers a caller of the rollout-correction helper: ``batch["rollout_is_weights"]``
    (returned when verl is not importable)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.batch = tensors


def _weights_proto(weights: Tensor) -> Any:
    try:
        from verl.protocol import DataProto
    except ImportError:
        return WeightsProto({"rollout_is_weights": weights})
    return DataProto.from_dict(tensors={"rollout_is_weights": weights})


def compute_rollout_correction_and_rejection_mask(
    old_log_prob: Tensor,
    rollout_log_prob: Tensor,
    response_mask: Tensor,
    rollout_is: Optional[str] = None,
    rollout_is_threshold: Any = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: Optional[str] = None,
    rollout_rs_threshold: Any = None,
) -> tuple[Any, Tensor, dict[str, float]]:
    """verl's ``compute_rollout_correction_and_rejection_mask``: (a DataProto holding ``rollout_is_weights``
    [B, T], or None without ``rollout_is``; the response mask with the rejected tokens set to 0; the metrics,
    prefixed ``rollout_corr/``: IS weights, each rejection filter, and the off-policy diagnostics).

    Same arguments: the old (or, in verl's bypass mode, current) and rollout log-probs [B, T] and the mask; IS
    ``rollout_is`` ("token", "sequence" or None) with ``rollout_is_threshold`` (U: truncate, "L_U": IcePop band)
    and ``rollout_is_batch_normalize``; rejection ``rollout_rs`` (comma-separated filters) with
    ``rollout_rs_threshold`` (one for all, or one per filter, comma-separated). The rejection rewrites the mask,
    as verl's does: in decoupled mode pass it as the loss's ``mask`` (every term, and the trainer's token count,
    see it), the weights as ``is_weights``. Inside the loss, :func:`verl_loss_options` applies the same options.
    Returns a ``WeightsProto`` instead of a DataProto when verl is not importable."""
    if not bool(response_mask.any()):
        raise ValueError("response_mask must contain at least one valid token (1).")
    if old_log_prob.shape != rollout_log_prob.shape:
        raise ValueError(
            f"old_log_prob shape {old_log_prob.shape} does not match rollout_log_prob shape {rollout_log_prob.shape}."
        )
    if old_log_prob.shape != response_mask.shape:
        raise ValueError(
            f"log_prob shape {old_log_prob.shape} does not match response_mask shape {response_mask.shape}."
        )
    log_ratio = old_log_prob - rollout_log_prob
    metrics: dict[str, float] = {}
    weights = None
    if rollout_is is not None and rollout_is_threshold is not None:
        weights, is_metrics = compute_rollout_correction_weights(
            log_ratio, response_mask, rollout_is, rollout_is_threshold, rollout_is_batch_normalize
        )
        metrics.update(is_metrics)
    modified = response_mask.clone()
    if rollout_rs is not None:
        if rollout_rs_threshold is None:
            raise ValueError("rollout_rs_threshold must be explicitly provided when rollout_rs is enabled.")
        modified, rs_metrics = compute_rollout_rejection_mask(
            log_ratio, response_mask, rollout_rs, rollout_rs_threshold
        )
        metrics.update(rs_metrics)
    metrics.update(compute_offpolicy_metrics(old_log_prob, rollout_log_prob, response_mask))
    prefixed = {f"rollout_corr/{k}": v for k, v in metrics.items()}
    return None if weights is None else _weights_proto(weights), modified, prefixed


def verl_loss_options(
    rollout_is: Optional[str] = None,
    rollout_is_threshold: Any = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: Optional[str] = None,
    rollout_rs_threshold: Any = None,
) -> dict[str, Any]:
    """The ``LossConfig`` fields that apply verl's ``algorithm.rollout_correction`` options inside the loss::

        config = dataclasses.replace(fastgrpo.presets.verl(...), **verl_loss_options(rollout_is="token", ...))

    ``rollout_is`` with U → ``*_truncate`` (max U), with "L_U" → ``*_mask`` on [L, U]; None with ``rollout_rs`` →
    ``unweighted``; the safety clamp ±20; the filters of ``rollout_rs`` with verl's k1 bounds (L, U) on
    π_rollout/π_train turned into (1/U, 1/L) on the importance ratio. Errors as verl's parsers raise them.

    Which verl mode the loss then reproduces: with ``old_logprobs`` the weights are verl's decoupled-mode IS weights
    (the filters act on the policy term only; verl's decoupled mode rewrites the whole response mask, which
    :func:`compute_rollout_correction_and_rejection_mask` gives to pass as ``mask``); without (ℓ^old = sg[ℓ]) and
    ``policy_loss="reinforce"``, verl's bypass mode with ``loss_type="reinforce"`` exactly. verl's bypass
    ``ppo_clip`` (ratio against the rollout, filters on the current policy) is not a config: pass the rollout
    log-probs as ``old_logprobs`` and the current policy's :func:`rejection_keep` as ``is_weights``."""
    out: dict[str, Any] = {}
    if rollout_is is not None and rollout_is_threshold is not None:
        if rollout_is not in ("token", "sequence"):
            raise ValueError(f"Invalid rollout_is: {rollout_is}. Must be one of {{'token', 'sequence'}}.")
        upper, lower = _parse_is_threshold(rollout_is_threshold)
        out["rollout_correction"] = f"{rollout_is}_{'truncate' if lower is None else 'mask'}"
        out["rollout_min"], out["rollout_max"] = lower, upper
        out["rollout_batch_normalize"] = bool(rollout_is_batch_normalize)
    if rollout_rs is not None:
        options = _parse_rs_options(rollout_rs)
        thresholds = _parse_rs_thresholds(options, rollout_rs_threshold)
        filters: list[tuple[str, Optional[float], Optional[float]]] = []
        for option in options:
            lower, upper = thresholds[option]
            if option in _K1:
                assert lower is not None
                filters.append((option, 1.0 / upper, 1.0 / lower))
            else:
                filters.append((option, None, upper))
        out["rollout_rejection"] = tuple(filters)
        out.setdefault("rollout_correction", "unweighted")
    if out:
        out["rollout_log_ratio_clamp"] = SAFETY_BOUND
    return out
