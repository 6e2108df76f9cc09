"""The label shapes the trainers' log-prob helpers accept. Their fused paths (flash-attn's cross-entropy in verl and
OpenRLHF, verl's Triton ``linear_cross_entropy``) flatten the rows of the logits or hidden states and read the
labels flattened, so any label shape with one id per row works there: verl's own tests pass logits [N, V] with
labels [1, N]. A drop-in accepts the same."""

from __future__ import annotations

import math

from torch import Tensor

from .. import _checks
from ..trajectory.token_logprobs import token_logprobs


def labels_per_row(name: str, x: Tensor, labels: Tensor) -> Tensor:
    """``labels`` reshaped to the rows of ``x`` [..., V or H]; an error when it does not hold one id per row."""
    _checks.tensor(name, x)
    _checks.tensor("labels", labels)
    if x.dim() == 0:
        raise ValueError(f"{name} must have a last (vocabulary or hidden) dimension, got a 0-dim tensor")
    rows = x.shape[:-1]
    if labels.numel() != math.prod(rows):
        raise ValueError(
            f"labels must hold one id per row of {name} ({math.prod(rows)} for {name} of shape "
            f"{list(x.shape)}), got shape {list(labels.shape)}"
        )
    return labels.reshape(rows)


def as_rows(x: Tensor) -> Tensor:
    """``x`` [..., V] in fastgrpo's layouts: [N, V] or [B, T, V] as given, other ranks flattened to [N, V]."""
    return x if x.dim() in (2, 3) else x.reshape(-1, x.shape[-1])


def logprobs_per_row(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """fp32 log-probs, shaped ``logits.shape[:-1]``, of ``labels`` (one id per row, any shape) under ``logits``
    [..., V] / ``temperature``."""
    ids = labels_per_row("logits", logits, labels)
    rows = as_rows(logits)
    return token_logprobs(rows, ids.reshape(rows.shape[:-1]), temperature=temperature).reshape(ids.shape)
