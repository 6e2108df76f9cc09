"""NeMo-RL drop-in: ``from_parallel_logits_to_logprobs`` with NeMo-RL's signature (nemo_rl/distributed/
model_utils.py, read at NVIDIA-NeMo/RL 7ea279ab; the PyPI package ``nemo-rl`` is a placeholder, so this is tested
against its formula restated), on fastgrpo's vocabulary-parallel log-probs: one fused pass over the shard and one
all_gather, no [B, S, V/tp] fp32 softmax kept for the backward.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..trajectory.token_logprobs import token_logprobs


def from_parallel_logits_to_logprobs(
    vocab_parallel_logits: Tensor,
    target: Tensor,
    vocab_start_index: int,
    vocab_end_index: int,
    tp_group: Any,
    inference_only: bool = False,
    cp_group: Optional[Any] = None,
    chunk_size: Optional[int] = None,
    sampling_params: Optional[Any] = None,
) -> Tensor:
    """fp32 log-probs [B, S − 1] of the next tokens: ``target`` [B, S] (unshifted ids, shifted here as NeMo-RL
    does) under this rank's vocabulary shard [vocab_start_index, vocab_end_index) of ``vocab_parallel_logits``
    [B, S, V/tp]. Temperature is the caller's, as in NeMo-RL. ``inference_only`` and ``chunk_size`` are accepted
    for the signature (no softmax is kept either way). Not supported: ``cp_group`` (NeMo-RL's load-balanced
    sequence layout; use ``fastgrpo.grpo_loss(cp_group=...)``) and ``sampling_params`` (top-k/top-p)."""
    if cp_group is not None:
        raise NotImplementedError("cp_group is not supported here: pass cp_group to fastgrpo.grpo_loss instead")
    if sampling_params is not None:
        raise NotImplementedError("sampling_params (top-k / top-p log-probs) is not supported")
    if vocab_end_index - vocab_start_index != vocab_parallel_logits.shape[-1]:
        raise ValueError(
            f"vocab_end_index - vocab_start_index must be the shard's size {vocab_parallel_logits.shape[-1]}, "
            f"got {vocab_end_index} - {vocab_start_index}"
        )
    ids = target.roll(shifts=-1, dims=-1).long()
    lp = token_logprobs(vocab_parallel_logits, ids, tp_group=tp_group, vocab_start=vocab_start_index)
    return lp[:, :-1].to(torch.float32)
