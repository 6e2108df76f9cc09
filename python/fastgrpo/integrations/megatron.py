"""megatron-core drop-in: ``vocab_parallel_cross_entropy`` with megatron's signature, on fastgrpo's vocabulary-
parallel log-probs (one fused pass over the shard and one all_gather, where megatron-core runs three all-reduces
and keeps a [N, V/tp] fp32 softmax for the backward). Read at megatron-core 0.16.1,
megatron/core/tensor_parallel/cross_entropy.py.

    from fastgrpo.integrations.megatron import vocab_parallel_cross_entropy
    loss = vocab_parallel_cross_entropy(logits, target)   # [s, b, V/tp], [s, b] -> [s, b] fp32, −log p
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..trajectory.token_logprobs import token_logprobs
from ._rows import as_rows


def tensor_parallel_group(tp_group: Optional[Any]) -> Any:
    """``tp_group``, or megatron-core's tensor-parallel group when None (megatron's own functions take none)."""
    if tp_group is not None:
        return tp_group
    try:
        from megatron.core import parallel_state
    except ImportError:
        raise ValueError(
            "tp_group is required: megatron.core is not installed, so its tensor-parallel group cannot be used"
        ) from None
    return parallel_state.get_tensor_model_parallel_group()


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: Tensor, target: Tensor, label_smoothing: float = 0.0, tp_group: Optional[Any] = None
) -> Tensor:
    """megatron-core's ``vocab_parallel_cross_entropy``: per-token −log p [...] (fp32) of the global ids
    ``target`` under this rank's vocabulary shard ``vocab_parallel_logits`` [..., V/tp] (rank r holds
    [r·V/tp, (r + 1)·V/tp)). Differentiable w.r.t. the shard. Unlike megatron-core 0.16.1, the fp32 input is not
    overwritten. ``tp_group`` (the keyword of newer Megatron-LM): megatron's tensor-parallel group when None.
    Label smoothing is not supported (megatron's uses the local vocabulary size)."""
    if label_smoothing != 0.0:
        raise NotImplementedError(f"label_smoothing must be 0.0 (not supported), got {label_smoothing!r}")
    group = tensor_parallel_group(tp_group)
    z = vocab_parallel_logits
    rows = as_rows(z)
    lp = token_logprobs(rows, target.reshape(rows.shape[:-1]).long(), tp_group=group)
    return -lp.reshape(target.shape).to(torch.float32)
