"""The GRPO-family loss (SPEC §2) at its three input levels, and its ``nn.Module`` wrapper.

``policy_loss`` takes per-token log-probs, ``grpo_loss`` logits, ``linear_grpo_loss`` hidden states and the
LM-head weight. All three take the same :class:`LossConfig`, return the same :class:`LossOutput`, and give
the same loss and gradients for the same inputs (up to fp32 rounding).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import _checks, backends
from .advantages import check_rewards
from .config import LossConfig, LossOutput, Rewards
from .logprobs import autocast_operands, check_linear, check_logit_transform, check_logits
from .config import Normalizer



def _check_config(config: LossConfig) -> None:
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a fastgrpo.LossConfig (see fastgrpo.presets), got {type(config).__name__}")


def _resolve_inputs(
    tokens: torch.Size, device: torch.device, checks: _checks.ValueChecks, *, advantages: Optional[Tensor],
    mask: Optional[Tensor], old_logprobs: Optional[Tensor], ref_logprobs: Optional[Tensor],
    sampling_logprobs: Optional[Tensor], is_weights: Optional[Tensor], rewards: Optional[Tensor],
    group_size: Optional[int], group_ids: Optional[Tensor], reward_weights: Optional[Tensor],
    cu_seqlens: Optional[Tensor], normalizer: Normalizer, config: LossConfig,
) -> tuple[Union[Tensor, Rewards], Tensor]:
    """Validates everything but the logit-level tensors, adding the value checks to ``checks`` (the caller
    runs them); returns (advantages or the rewards to normalize, mask) ready for a backend."""
    _check_config(config)
    num_seqs = _checks.token_layout(tokens, cu_seqlens, "the token dims")
    if mask is None:
        mask = torch.ones(tokens, device=device)
    _checks.tensor("mask", mask)
    _checks.real("mask", mask, "0/1, or fractional soft weights")
    _checks.shape("mask", mask, tokens, "one 0/1 entry per token")
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                    ("sampling_logprobs", sampling_logprobs)):
        if x is not None:
            _checks.tensor(name, x)
            _checks.floating(name, x)
            _checks.shape(name, x, tokens, "one log-prob per token")
    _checks.same_device(device, mask=mask, advantages=advantages, old_logprobs=old_logprobs,
                        ref_logprobs=ref_logprobs, sampling_logprobs=sampling_logprobs, is_weights=is_weights,
                        rewards=rewards, cu_seqlens=cu_seqlens,
                        normalizer=normalizer if isinstance(normalizer, Tensor) else None)
    # value checks are added in the order their errors are reported; they run in the caller
    checks.cu_seqlens(cu_seqlens, tokens[0])
    checks.set_mask(mask, cu_seqlens)
    if config.beta != 0.0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs is required when config.beta != 0 (beta={config.beta}): pass the "
                         "reference policy's per-token log-probs, or set beta=0")
    if config.rollout_correction is not None and is_weights is None and sampling_logprobs is None:
        raise ValueError(f"config.rollout_correction={config.rollout_correction!r} needs sampling_logprobs "
                         "(the rollout engine's log-probs) or precomputed is_weights")
    if is_weights is not None:
        _checks.tensor("is_weights", is_weights)
        _checks.floating("is_weights", is_weights)
        _checks.per_sequence_or_token("is_weights", is_weights, tokens, num_seqs)
    if isinstance(normalizer, Tensor):
        if normalizer.dtype not in _checks.FLOATS + _checks.INTS:
            raise TypeError(f"normalizer must be a floating or integer tensor (a count), got {normalizer.dtype}")
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a float or a 0-d tensor, got shape {list(normalizer.shape)}")
    elif normalizer is not None:
        # comparisons, not math.isfinite: torch.compile traces them on a symbolic float (NaN fails both)
        if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) or not 0 < normalizer < math.inf:
            raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")

    if (advantages is None) == (rewards is None):
        raise ValueError("pass exactly one of advantages (per sequence or per token) or rewards "
                         "(with group_size or group_ids)")
    if rewards is not None:
        check_rewards(rewards, group_size, group_ids, reward_weights, checks, num_seqs)
    else:
        _checks.tensor("advantages", advantages)
        _checks.floating("advantages", advantages)
        _checks.per_sequence_or_token("advantages", advantages, tokens, num_seqs)

    checks.finite("advantages", advantages)
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                    ("sampling_logprobs", sampling_logprobs)):
        checks.logprobs(name, x)
    checks.weights("is_weights", is_weights)
    if isinstance(normalizer, Tensor):
        checks.normalizer(normalizer)
    if rewards is not None:
        return Rewards(rewards, group_size, group_ids, reward_weights), mask
    return advantages, mask


def policy_loss(
    logprobs: Tensor,
    advantages: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    old_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    sampling_logprobs: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    rewards: Optional[Tensor] = None,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    reward_weights: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    normalizer: Normalizer = None,
    config: LossConfig = LossConfig(),
    backend: str = "auto",
    check_values: Optional[bool] = None,
) -> LossOutput:
    """The loss of SPEC §2 from per-token log-probs ``logprobs`` [B, T] (or packed [N] + ``cu_seqlens``).

    advantages: per sequence [B] / [B, 1] / [S], or per token [B, T]; or pass ``rewards`` [B] ([B, K] with
        ``reward_weights``) and ``group_size``/``group_ids`` to normalize them first (``config.advantage``).
    mask: 0/1 per token (default: all ones). old/ref/sampling_logprobs: [B, T] log-probs of the old,
        reference and rollout policies (``old`` defaults to sg[logprobs], i.e. on-policy).
    is_weights: precomputed rollout importance weights, per token or per sequence.
    entropy: per-token entropy [B, T], needed for ``entropy_coef`` and ``top_entropy_quantile``.
    normalizer: a float or 0-d tensor replacing the local denominator of the aggregation (e.g. a global
        token count); never read on the host (its value check is part of the call's one read).
    check_values: None (the global default, ``fastgrpo.set_check_values``), True or False. On, a call rejects
        (ValueError naming the argument, the first bad value and its position) a mask entry that is negative
        or not finite (fractional entries are soft weights, as TRL multiplies by the mask), non-finite
        old/ref/sampling log-probs (−inf included: a sampled token has p > 0), advantages or entropy at
        unmasked positions, negative or non-finite ``is_weights`` there, non-finite rewards or reward weights
        anywhere (they enter the group statistics), a tensor ``normalizer`` ≤ 0 or not finite, ids or
        ``cu_seqlens`` out of range: all in one device-side reduction read once (one host sync per call).
        Off, and always under torch.compile or on meta/fake tensors, nothing is read (no host sync) and a
        non-finite input propagates to the loss. Masked positions are never checked: they are ignored.

    PyTorch equivalent of the default config (token-level PPO clip, token mean)::

        ratio = torch.exp(logprobs - old_logprobs)
        pg = -torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
        loss = (pg * mask).sum() / mask.sum()
    """
    _checks.tensor("logprobs", logprobs)
    _checks.floating("logprobs", logprobs)
    tokens = logprobs.shape
    checks = _checks.ValueChecks(check_values, logprobs)
    advantages, mask = _resolve_inputs(
        tokens, logprobs.device, checks, advantages=advantages, mask=mask, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, sampling_logprobs=sampling_logprobs, is_weights=is_weights, rewards=rewards,
        group_size=group_size, group_ids=group_ids, reward_weights=reward_weights, cu_seqlens=cu_seqlens,
        normalizer=normalizer, config=config)
    if config.needs_entropy and entropy is None:
        raise ValueError("entropy is required by this config (entropy_coef != 0 or top_entropy_quantile < 1): "
                         "pass the per-token entropy, or use grpo_loss on logits")
    if entropy is not None:
        _checks.tensor("entropy", entropy)
        _checks.floating("entropy", entropy)
        _checks.shape("entropy", entropy, tokens, "one entropy per token")
        _checks.same_device(logprobs.device, entropy=entropy)
    checks.finite("entropy", entropy)
    checks.run()
    return backends.select(backend, logprobs.device).policy_loss(
        logprobs, advantages, mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        sampling_logprobs=sampling_logprobs, is_weights=is_weights, entropy=entropy, cu_seqlens=cu_seqlens,
        normalizer=normalizer, config=config)


def grpo_loss(
    logits: Tensor,
    targets: Tensor,
    advantages: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    old_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    sampling_logprobs: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    rewards: Optional[Tensor] = None,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    reward_weights: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    normalizer: Normalizer = None,
    return_entropy: bool = False,
    inplace_grad: bool = False,
    config: LossConfig = LossConfig(),
    backend: str = "auto",
    check_values: Optional[bool] = None,
) -> LossOutput:
    """The loss of SPEC §2 from ``logits`` [B, T, V] (or packed [N, V]) and ``targets`` [B, T] / [N].

    Same keywords as :func:`policy_loss`; log-probs and entropy come from the logits divided by
    ``config.temperature``. Leading dims of ``logits`` may be any view (e.g. ``logits[:, :-1]``); the
    vocabulary dim must be contiguous. Target ids at masked positions are ignored (padding such as -100).
    ``check_values`` as in :func:`policy_loss`, plus the ids; the logits are never scanned (a NaN or inf
    logit at an unmasked position propagates to the loss).
    ``inplace_grad=True`` (Triton backend, token-local configs, eager) writes the gradient over ``logits``
    in the forward, so no second [N, V] buffer exists; the logits are unusable afterwards.

    PyTorch equivalent::

        logprobs = torch.log_softmax(logits.float() / config.temperature, -1).gather(
            -1, targets.unsqueeze(-1)).squeeze(-1)
        policy_loss(logprobs, advantages, mask, ..., config=config)
    """
    check_logits(logits, targets)
    checks = _checks.ValueChecks(check_values, logits)
    advantages, mask = _resolve_inputs(
        targets.shape, logits.device, checks, advantages=advantages, mask=mask, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, sampling_logprobs=sampling_logprobs, is_weights=is_weights, rewards=rewards,
        group_size=group_size, group_ids=group_ids, reward_weights=reward_weights, cu_seqlens=cu_seqlens,
        normalizer=normalizer, config=config)
    checks.token_ids("targets", targets, logits.shape[-1])
    checks.run()
    impl = backends.select(backend, logits.device)
    extra = {}
    if inplace_grad:
        if not getattr(impl, "SUPPORTS_INPLACE_GRAD", False):
            raise ValueError(f"inplace_grad=True needs the Triton backend (CUDA tensors), got {impl.__name__}")
        extra["inplace_grad"] = True
    return impl.grpo_loss(
        logits, targets, advantages, mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        sampling_logprobs=sampling_logprobs, is_weights=is_weights, cu_seqlens=cu_seqlens, normalizer=normalizer,
        return_entropy=return_entropy, config=config, **extra)


def linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    old_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    sampling_logprobs: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    rewards: Optional[Tensor] = None,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    reward_weights: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    normalizer: Normalizer = None,
    return_entropy: bool = False,
    chunk_tokens: Optional[int] = None,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    config: LossConfig = LossConfig(),
    backend: str = "auto",
    check_values: Optional[bool] = None,
) -> LossOutput:
    """The loss of SPEC §2 from ``hidden`` [B, T, H] (or [N, H]) and the LM-head ``weight`` [V, H] (+ ``bias``
    [V]); gradients flow to hidden, weight and bias. Same keywords as :func:`policy_loss`.

    The kernel backends never materialize the [N, V] logits: unmasked tokens are processed ``chunk_tokens`` at
    a time (default: 256 MiB of fp32 logits per chunk on CUDA, 48 MiB on CPU), and the gradients are computed
    in the forward.

    ``logit_scale`` and ``logit_softcap`` c apply z = c·tanh(scale·(hidden @ weightᵀ + bias)/c) (Cohere's
    logit_scale, Gemma's final_logit_softcapping) before the temperature. Under autocast the GEMMs take the
    autocast dtype (as ``F.linear`` would); the logits and everything after them stay fp32.

    ``check_values`` as in :func:`grpo_loss` (hidden and weight are never scanned).

    PyTorch equivalent: ``grpo_loss(hidden @ weight.T + bias, targets, ...)``.
    """
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    check_logit_transform(logit_scale, logit_softcap)
    with autocast_operands(hidden, weight, bias) as (hidden, weight, bias):
        check_linear(hidden, weight, targets, bias)
        checks = _checks.ValueChecks(check_values, hidden)
        advantages, mask = _resolve_inputs(
            targets.shape, hidden.device, checks, advantages=advantages, mask=mask, old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs, sampling_logprobs=sampling_logprobs, is_weights=is_weights, rewards=rewards,
            group_size=group_size, group_ids=group_ids, reward_weights=reward_weights, cu_seqlens=cu_seqlens,
            normalizer=normalizer, config=config)
        checks.token_ids("targets", targets, weight.shape[0])
        checks.run()
        return backends.select(backend, hidden.device).linear_grpo_loss(
            hidden, weight, targets, advantages, mask, bias=bias, old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs, sampling_logprobs=sampling_logprobs, is_weights=is_weights,
            cu_seqlens=cu_seqlens, normalizer=normalizer, return_entropy=return_entropy, chunk_tokens=chunk_tokens,
            logit_scale=logit_scale, logit_softcap=logit_softcap, config=config)


class GRPOLoss(nn.Module):
    """``nn.Module`` form of :func:`grpo_loss` holding the config and backend.

    ``GRPOLoss(fastgrpo.presets.trl(loss_type="dapo"))(logits, targets, advantages, mask, **kw)``.
    ``check_values`` is the default of every call (a call may pass its own).
    """

    def __init__(self, config: LossConfig = LossConfig(), backend: str = "auto",
                 check_values: Optional[bool] = None) -> None:
        super().__init__()
        _check_config(config)
        _checks.ValueChecks.resolve(check_values)
        self.config = config
        self.backend = backend
        self.check_values = check_values

    def forward(self, logits: Tensor, targets: Tensor, advantages: Optional[Tensor] = None,
                mask: Optional[Tensor] = None, **kwargs) -> LossOutput:
        kwargs.setdefault("check_values", self.check_values)
        return grpo_loss(logits, targets, advantages, mask, config=self.config, backend=self.backend, **kwargs)

    def extra_repr(self) -> str:
        return f"config={self.config}, backend={self.backend!r}, check_values={self.check_values!r}"
