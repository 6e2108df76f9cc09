"""Per-token log-probs (and entropy) of the targets, from logits or from hidden states + LM-head weight."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Union

import torch
from torch import Tensor

from . import _checks, backends

LogprobsResult = Union[Tensor, tuple[Tensor, Tensor]]


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
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]} (the hidden size), "
                         f"got {list(weight.shape)}")
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


def token_logprobs(
    logits: Tensor, targets: Tensor, *, temperature: float = 1.0, entropy: bool = False, backend: str = "auto",
    check_values: Optional[bool] = None,
) -> LogprobsResult:
    """log π(y_t) [B, T] (fp32) of ``targets`` [B, T] under ``logits`` [B, T, V] / τ; also the entropy
    [B, T] (fp32) when ``entropy=True``. Both differentiable w.r.t. ``logits``.

    ``check_values`` (None: the global default, see ``fastgrpo.set_check_values``): check that the ids are in
    [0, V), at the cost of one host sync (none when False or under torch.compile). The logits are never
    scanned: a NaN or inf logit propagates to its row's log-prob.

    PyTorch equivalent::

        logp = torch.log_softmax(logits.float() / temperature, -1)
        lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
    """
    check_logits(logits, targets)
    check_temperature(temperature)
    checks = _checks.ValueChecks(check_values, logits)
    checks.token_ids("targets", targets, logits.shape[-1])
    checks.run()
    lp, ent = backends.select(backend, logits.device).token_logprobs(logits, targets, temperature, entropy)
    return (lp, ent) if entropy else lp


def linear_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
    temperature: float = 1.0, entropy: bool = False, logit_scale: float = 1.0, logit_softcap: Optional[float] = None,
    backend: str = "auto", check_values: Optional[bool] = None,
) -> LogprobsResult:
    """:func:`token_logprobs` of ``softcap(logit_scale · (hidden @ weight.T + bias))`` (hidden [B, T, H],
    weight [V, H]), differentiable w.r.t. hidden, weight and bias. ``check_values`` as in :func:`token_logprobs`."""
    check_temperature(temperature)
    check_logit_transform(logit_scale, logit_softcap)
    with autocast_operands(hidden, weight, bias) as (hidden, weight, bias):
        check_linear(hidden, weight, targets, bias)
        checks = _checks.ValueChecks(check_values, hidden)
        checks.token_ids("targets", targets, weight.shape[0])
        checks.run()
        impl = backends.select(backend, hidden.device)
        lp, ent = impl.linear_token_logprobs(hidden, weight, targets, bias, temperature, entropy, logit_scale,
                                             logit_softcap)
    return (lp, ent) if entropy else lp
