"""The O(N) trajectory side of the kernel backends (MATH §2, §4): everything after the log-probs, on flattened
per-token fp32 vectors.

The kernels stream the vocabulary; what remains is O(N) PyTorch, here: which sequence each token belongs to
(``TokenLayout``), the aggregation of §2.6 as per-token weights (``aggregation_weights``, folded into the fused
kernel's w_policy/w_kl/w_entropy), rollout importance weights (§2.4), the KL estimate (§2.5), the whole
objective for the configs that need a statistic over other tokens first (``policy_loss``: GSPO/GMPO sequence
ratios, the entropy quantile and off-policy masks; also ``policy_loss`` on given log-probs) and the metrics of
§4 (``loss_metrics``). Every token is one entry of an [N] axis with ``seq`` [N] giving its sequence, so the
padded [B, T] and packed [N] + ``cu_seqlens`` layouts share one code path. Inputs are valid (the public functions
validate them). ``fastgrpo.reference`` states the same math independently; the tests hold this module to it.
"""

from __future__ import annotations

from typing import Optional, Union, overload

import torch
from torch import Tensor

from .. import _library
from ..config import LossConfig, LossOutput, Normalizer
from ..inputs import LossInputs
from ..reward import advantages as reward


@overload
def _as(x: Tensor, value: float) -> Tensor: ...
@overload
def _as(x: Tensor, value: Optional[float]) -> Optional[Tensor]: ...


def _as(x: Tensor, value: Optional[float]) -> Optional[Tensor]:
    """A config float as a 0-d tensor of ``x``'s dtype (None stays None), for clamp bounds and where() branches:
    torch.compile specializes a float passed to those (a recompile for every new value), not one added to a
    tensor. The same value as the float: the op would round it to ``x``'s dtype too."""
    return None if value is None else x.new_zeros(()) + value


def _clamp(x: Tensor, lo: Optional[float] = None, hi: Optional[float] = None) -> Tensor:
    """``x.clamp(lo, hi)``, with the bounds as tensors (see ``_as``)."""
    return x.clamp(_as(x, lo), _as(x, hi))


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
        x = _library.accumulate(x).reshape(-1)
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
    estimate = {"k1": lambda x: x, "abs": torch.abs, "k2": lambda x: 0.5 * x * x, "k3": _K3.apply}[
        cfg.kl_estimator.rstrip("+")
    ]
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
    assert mode is not None  # called only with a rollout_correction
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
    lp: Tensor,
    adv: Tensor,
    m: Tensor,
    lay: TokenLayout,
    cfg: LossConfig,
    normalizer: Normalizer,
    old: Optional[Tensor],
    ref: Optional[Tensor],
    samp: Optional[Tensor],
    is_w: Optional[Tensor],
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
        assert samp is not None  # a rollout correction without is_weights needs them (checked on input)
        weight = rollout_weights(old, samp, m, lay, cfg)
    is_weight = weight
    emask = None
    if cfg.top_entropy_quantile < 1.0:
        assert ent is not None  # the config needs the entropy (checked on input)
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
        assert ref is not None  # beta != 0 needs ref_logprobs (checked on input)
        k = kl_estimate(lp, ref, cfg)
        if cfg.kl_ratio_weighted:
            k = k * rho
        loss = loss + cfg.beta * _aggregate(k, m, cfg.kl_aggregation or cfg.aggregation, lay, cfg, normalizer)
    if ref is not None:
        values["kl"] = kl_estimate(lp.detach(), ref, cfg).detach()
    if cfg.entropy_coef != 0.0:  # §2.7
        assert ent is not None  # the config needs the entropy (checked on input)
        ent_mask = m if emask is None else m * emask
        loss = loss - cfg.entropy_coef * _aggregate(
            ent, ent_mask, cfg.entropy_aggregation or cfg.aggregation, lay, cfg, normalizer
        )
    values["ppo_kl"] = (old - lp).detach()
    return loss * cfg.loss_scale, values


def loss_metrics(
    values: dict[str, Tensor],
    grad_lp: Tensor,
    adv: Tensor,
    m: Tensor,
    ent: Optional[Tensor],
    cfg: LossConfig,
    weights_used: bool,
) -> dict[str, Tensor]:
    """MATH §4 over the masked tokens."""
    rho = values["rho"]
    low, high = values["low"].float(), values["high"].float()
    out = {
        "clip_ratio/low_mean": _masked_mean(low, m),
        "clip_ratio/high_mean": _masked_mean(high, m),
        "clip_ratio/region_mean": _masked_mean(torch.maximum(low, high), m),
        "clip_ratio/dual": _masked_mean(((adv < 0) & (rho > cfg.dual_clip)).float(), m)
        if cfg.dual_clip is not None
        else m.new_zeros(()),
        "ppo_kl": _masked_mean(values["ppo_kl"], m),
        "ratio/mean": _masked_mean(rho, m),
        "ratio/min": _masked_extreme(rho, m, largest=False),
        "ratio/max": _masked_extreme(rho, m, largest=True),
        "grad_active_fraction": _masked_mean((grad_lp != 0).float(), m),
    }
    if cfg.policy_loss == "cispo":
        above = (
            (rho > cfg.cispo_high) & (adv > 0) if cfg.cispo_high is not None else torch.zeros_like(m, dtype=torch.bool)
        )
        below = (
            (rho < cfg.cispo_low) & (adv < 0) if cfg.cispo_low is not None else torch.zeros_like(m, dtype=torch.bool)
        )
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


def policy_loss(logprobs: Tensor, inputs: LossInputs, entropy: Optional[Tensor] = None) -> LossOutput:
    """MATH §2 on per-token log-probs [B, T] (or packed [N] with ``cu_seqlens``). Differentiable w.r.t.
    ``logprobs`` (and ``entropy`` for the bonus)."""
    config, normalizer = inputs.config, inputs.normalizer
    old_logprobs, ref_logprobs, is_weights = inputs.old_logprobs, inputs.ref_logprobs, inputs.is_weights
    advantages = reward.resolve_advantages(inputs.advantages, config.advantage)
    shape = logprobs.shape
    lay = TokenLayout(shape, inputs.cu_seqlens, config.max_length, logprobs.device)

    m = _library.accumulate(inputs.mask.reshape(-1))

    @overload
    def flat(x: Tensor) -> Tensor: ...
    @overload
    def flat(x: Optional[Tensor]) -> Optional[Tensor]: ...

    def flat(x: Optional[Tensor]) -> Optional[Tensor]:
        """Flattened, with masked tokens set to 0: kernels never read them, and an inf there (ℓ of a padding
        id far from ℓ^ref) must not turn into NaN through a multiplication by the mask."""
        return None if x is None else torch.where(m > 0, _library.accumulate(x.reshape(-1)), 0.0)

    adv = lay.per_token(advantages.detach(), shape)
    is_w = None if is_weights is None else lay.per_token(is_weights.detach(), shape)
    args = (
        adv,
        m,
        lay,
        config,
        normalizer,
        flat(old_logprobs),
        flat(ref_logprobs),
        flat(inputs.sampling_logprobs),
        is_w,
    )
    lp = flat(logprobs)
    ent = flat(entropy)
    loss, values = _objective(lp, *args, ent)

    # grad_active_fraction needs ∂L/∂ℓ: autodiff of a second, detached evaluation (the fused path has it from the
    # kernel; this path is the two-phase one and policy_loss on given log-probs).
    # torch.func.grad, not torch.autograd.grad: torch.compile traces the former into the graph.
    ent_probe = None if ent is None else ent.detach()
    grad_lp = torch.func.grad(lambda leaf: _objective(leaf, *args, ent_probe)[0])(lp.detach())
    weights_used = is_weights is not None or config.rollout_correction is not None
    metrics = loss_metrics(values, grad_lp, adv, m, ent, config, weights_used)
    return LossOutput(
        loss=loss,
        logprobs=lp.detach().reshape(shape),
        entropy=None if ent is None else ent.detach().reshape(shape),
        metrics=metrics,
    )
