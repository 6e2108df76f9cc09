"""The inputs of the public functions: validated once, then handed to a backend as one typed object.

Every check names the argument and what was expected (MATH §6); value checks are collected in a
``_checks.ValueChecks`` and read once per call by the caller.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping, Optional, TypedDict, Union

import torch
from torch import Tensor

from . import _checks
from .config import LossConfig, Normalizer, Rewards

if TYPE_CHECKING:
    from .distributed import Parallel


@dataclass(frozen=True)
class LossInputs:
    """Everything a loss takes besides its log-prob source (log-probs, logits, or hidden states and LM head).

    advantages: per sequence or per token, or the :class:`Rewards` to normalize first. mask: per token, 0/1 or
    soft weights. The rest as the public functions document them."""

    advantages: Union[Tensor, Rewards]
    mask: Tensor
    config: LossConfig
    old_logprobs: Optional[Tensor] = None
    ref_logprobs: Optional[Tensor] = None
    sampling_logprobs: Optional[Tensor] = None
    teacher_logprobs: Optional[Tensor] = None
    is_weights: Optional[Tensor] = None
    cu_seqlens: Optional[Tensor] = None
    normalizer: Normalizer = None
    parallel: Optional["Parallel"] = None  # tensor / context parallel layout (fastgrpo.distributed)
    generator: Optional[torch.Generator] = None  # the random draws of clip_cov
    # from logits: per token [*tokens, 3] the sums Σ p², Σ p²·log p, Σ p²·(log p)² over the non-target entries of the
    # log-prob pass (kernels/params.py ROW_STATS), from which the loss reports its gradient norms
    logit_stats: Optional[Tensor] = None
    # with config.effective_rank_sketch = k: per token [*tokens, 3k] the projections of trajectory/gradient_rank.py
    logit_sketch: Optional[Tensor] = None


class LossOptions(TypedDict, total=False):
    """The keywords every loss entry point shares (``policy_loss``, ``grpo_loss``, ``linear_grpo_loss``, ``GRPOLoss``),
    each None when absent; ``fastgrpo.policy_loss`` documents them. Spelled once here: the entry points take them as
    ``**options`` and :func:`resolve` validates them into :class:`LossInputs`."""

    old_logprobs: Optional[Tensor]
    ref_logprobs: Optional[Tensor]
    sampling_logprobs: Optional[Tensor]
    teacher_logprobs: Optional[Tensor]
    generator: Optional[torch.Generator]
    is_weights: Optional[Tensor]
    rewards: Optional[Tensor]
    group_size: Optional[int]
    group_ids: Optional[Tensor]
    reward_weights: Optional[Tensor]
    cu_seqlens: Optional[Tensor]
    normalizer: Normalizer


def check_options(function: str, options: Mapping[str, object]) -> None:
    """The error Python gives for an unknown keyword, which ``**options`` would otherwise accept."""
    for name in options:
        if name not in LossOptions.__annotations__:
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")


@dataclass(frozen=True, eq=False)  # identity, not elementwise tensor comparison
class LMHead:
    """The LM head of the hidden-state entry points: logits z = c·tanh(s·(h·weightᵀ + bias)/c) with s = ``logit_scale``
    (Cohere) and c = ``logit_softcap`` (Gemma's final_logit_softcapping; None: no cap). ``weight`` [V, H] and
    ``bias`` [V]: under tensor parallelism this rank's vocabulary shard."""

    weight: Tensor
    bias: Optional[Tensor] = None
    logit_scale: float = 1.0
    logit_softcap: Optional[float] = None

    def transform(self, z: Tensor) -> Tensor:
        """The scale and softcap applied to raw logits z = h·weightᵀ + bias (fp32, out of place, differentiable)."""
        z = z * self.logit_scale
        c = self.logit_softcap
        return z if c is None else c * torch.tanh(z / c)


def _positive_number(value: object) -> bool:
    # comparisons, not math.isfinite: torch.compile traces them on a symbolic float (NaN fails both)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def check_temperature(temperature: float) -> None:
    if not _positive_number(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_logit_transform(logit_scale: float, logit_softcap: Optional[float]) -> None:
    if not _positive_number(logit_scale):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    if logit_softcap is not None and not _positive_number(logit_softcap):
        raise ValueError(f"logit_softcap must be None or a finite number > 0, got {logit_softcap!r}")


def check_logits(logits: Tensor, targets: Tensor) -> None:
    """Types, shapes and devices (metadata only: the ids are a value check of the caller's ``ValueChecks``)."""
    _checks.tensor("logits", logits)
    _checks.tensor("targets", targets)
    _checks.floating("logits", logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [B, T, V] or packed [N, V], got {list(logits.shape)}")
    _checks.vocabulary("logits", logits.shape[-1])
    _checks.shape("targets", targets, logits.shape[:-1], "the leading dims of logits")
    _checks.same_device(logits.device, targets=targets)
    _checks.vocab_contiguous("logits", logits)
    _checks.integer("targets", targets)


def check_linear(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor]) -> None:
    """Types, shapes and devices of the hidden-state level (metadata only, as :func:`check_logits`)."""
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        _checks.tensor(name, x)
    _checks.floating("hidden", hidden)
    _checks.floating("weight", weight)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or packed [N, H], got {list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = {hidden.shape[-1]} (the hidden size), got {list(weight.shape)}"
        )
    _checks.vocabulary("weight", weight.shape[0])
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight ({weight.dtype}) must have the dtype of hidden ({hidden.dtype})")
    if bias is not None:
        _checks.tensor("bias", bias)
        _checks.floating("bias", bias)
        _checks.shape("bias", bias, (weight.shape[0],), "one bias per vocabulary entry")
    _checks.shape("targets", targets, hidden.shape[:-1], "the leading dims of hidden")
    _checks.same_device(hidden.device, weight=weight, targets=targets, bias=bias)
    _checks.integer("targets", targets)


@contextlib.contextmanager
def autocast_operands(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Iterator[tuple]:
    """Under autocast, the LM-head GEMMs take the autocast dtype as ``F.linear`` would (the logits and the
    log-sum-exp stay fp32), and autocast is off inside, so the kernels' own fp32 GEMMs are not recast."""
    device = hidden.device.type
    # meta tensors (FSDP meta init) have no autocast state to ask for
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        yield hidden, weight, bias
        return
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        yield tuple(None if x is None else x.to(dtype) for x in (hidden, weight, bias))


@contextlib.contextmanager
def lm_head_operands(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    logit_scale: float,
    logit_softcap: Optional[float],
) -> Iterator[tuple[Tensor, LMHead]]:
    """The hidden-state entry points' operands, checked (metadata only) and in the autocast dtype, as (hidden, head);
    autocast is off inside (:func:`autocast_operands`)."""
    check_logit_transform(logit_scale, logit_softcap)
    with autocast_operands(hidden, weight, bias) as (hidden, weight, bias):
        check_linear(hidden, weight, targets, bias)
        yield hidden, LMHead(weight, bias, logit_scale, logit_softcap)


def check_rewards(
    rewards: Tensor,
    group_size: Optional[int],
    group_ids: Optional[Tensor],
    reward_weights: Optional[Tensor],
    checks: _checks.ValueChecks,
    num_seqs: Optional[int] = None,
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
        group_ids = _checks.tensor("group_ids", group_ids)
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


def check_config(config: LossConfig) -> None:
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a fastgrpo.LossConfig (see fastgrpo.presets), got {type(config).__name__}")


def resolve(
    tokens: torch.Size,
    device: torch.device,
    checks: _checks.ValueChecks,
    advantages: Optional[Tensor],
    mask: Optional[Tensor],
    config: LossConfig,
    parallel: Optional["Parallel"],
    options: LossOptions,
) -> LossInputs:
    """Validates everything but the log-prob source (logprobs, logits or hidden states), adding the value checks
    to ``checks`` (the caller runs them); returns the inputs ready for a backend."""
    old_logprobs, ref_logprobs = options.get("old_logprobs"), options.get("ref_logprobs")
    sampling_logprobs, teacher_logprobs = options.get("sampling_logprobs"), options.get("teacher_logprobs")
    is_weights, rewards, cu_seqlens = options.get("is_weights"), options.get("rewards"), options.get("cu_seqlens")
    group_size, group_ids = options.get("group_size"), options.get("group_ids")
    reward_weights, normalizer = options.get("reward_weights"), options.get("normalizer")
    check_config(config)
    num_seqs = _checks.token_layout(tokens, cu_seqlens, "the token dims")
    if mask is None:
        mask = torch.ones(tokens, device=device)
    _checks.tensor("mask", mask)
    _checks.real("mask", mask, "0/1, or fractional soft weights")
    _checks.shape("mask", mask, tokens, "one 0/1 entry per token")
    for name, x in (
        ("old_logprobs", old_logprobs),
        ("ref_logprobs", ref_logprobs),
        ("sampling_logprobs", sampling_logprobs),
        ("teacher_logprobs", teacher_logprobs),
    ):
        if x is not None:
            _checks.tensor(name, x)
            _checks.floating(name, x)
            _checks.shape(name, x, tokens, "one log-prob per token")
    _checks.same_device(
        device,
        mask=mask,
        advantages=advantages,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        sampling_logprobs=sampling_logprobs,
        teacher_logprobs=teacher_logprobs,
        is_weights=is_weights,
        rewards=rewards,
        cu_seqlens=cu_seqlens,
        normalizer=normalizer if isinstance(normalizer, Tensor) else None,
    )
    # value checks are added in the order their errors are reported; they run in the caller
    checks.cu_seqlens(cu_seqlens, tokens[0])
    checks.set_mask(mask, cu_seqlens)
    if config.beta != 0.0 and ref_logprobs is None:
        raise ValueError(
            f"ref_logprobs is required when config.beta != 0 (beta={config.beta}): pass the "
            "reference policy's per-token log-probs, or set beta=0"
        )
    if config.teacher_coef != 0.0 and teacher_logprobs is None:
        raise ValueError(
            f"teacher_logprobs is required when config.teacher_coef != 0 (teacher_coef={config.teacher_coef}): pass "
            "the teacher's per-token log-probs of the sampled tokens, or set teacher_coef=0"
        )
    if config.rollout_correction is not None and is_weights is None and sampling_logprobs is None:
        raise ValueError(
            f"config.rollout_correction={config.rollout_correction!r} needs sampling_logprobs "
            "(the rollout engine's log-probs) or precomputed is_weights"
        )
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
        raise ValueError(
            "pass exactly one of advantages (per sequence or per token) or rewards (with group_size or group_ids)"
        )
    given: Union[Tensor, Rewards]
    if rewards is not None:
        check_rewards(rewards, group_size, group_ids, reward_weights, checks, num_seqs)
        given = Rewards(rewards, group_size, group_ids, reward_weights)
    else:
        given = _checks.tensor("advantages", advantages)
        _checks.floating("advantages", given)
        _checks.per_sequence_or_token("advantages", given, tokens, num_seqs)

    checks.finite("advantages", advantages)
    for name, x in (
        ("old_logprobs", old_logprobs),
        ("ref_logprobs", ref_logprobs),
        ("sampling_logprobs", sampling_logprobs),
        ("teacher_logprobs", teacher_logprobs),
    ):
        checks.logprobs(name, x)
    checks.weights("is_weights", is_weights)
    if isinstance(normalizer, Tensor):
        checks.normalizer(normalizer)
    return LossInputs(
        advantages=given,
        mask=mask,
        config=config,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        sampling_logprobs=sampling_logprobs,
        teacher_logprobs=teacher_logprobs,
        is_weights=is_weights,
        cu_seqlens=cu_seqlens,
        normalizer=normalizer,
        parallel=parallel,
        generator=options.get("generator"),
    )
