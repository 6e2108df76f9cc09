"""Launchers of the fused Triton loss kernel, registered as ``fastgrpo::triton_grpo_loss_fused``, its in-place
form ``fastgrpo::triton_grpo_loss_fused_inplace_`` and ``fastgrpo::triton_scale_grad_`` (contract, fakes and
autograd: ``kernel_ops``)."""

from __future__ import annotations

from typing import Optional, Sequence  # Sequence, not list[...]: torch 2.6 infers no schema from list[int]

import torch
import triton
from torch import Tensor

from .kernels import grpo_loss as K
from .triton_token_logprobs import float_params, launch, register_op, row_addressing, rows


def _launch(logits, targets, mask, advantages, old_logprobs, ref_logprobs, w_policy, w_kl, w_entropy, rewards,
            batch_std, seq, params, codes, with_entropy, grad):
    """Runs the kernel; ``grad`` is None (no gradient), a new buffer, or ``logits`` itself (in place).
    ``rewards`` (with ``batch_std`` and the token → sequence map ``seq``) replace ``advantages`` when given.
    Absent optional pointers are replaced by any valid buffer: the kernel never reads them."""
    n, vocab = targets.numel(), logits.shape[-1]
    per_row = lambda: torch.empty(n, device=logits.device, dtype=torch.float32)  # noqa: E731
    logprobs, entropy, loss_terms, ratio, dlogp, adv_used = (per_row() for _ in range(6))
    if n > 0:
        t, stride_b, stride_t = row_addressing(logits)
        _, grad_stride_b, grad_stride_t = row_addressing(logits if grad is None else grad)
        block = K.block_v(vocab)
        ids = rows(targets)
        some = lambda x: advantages if x is None else x  # noqa: E731
        launch(K.grpo_loss_fwd_kernel)[(n,)](
            logits, ids, mask, advantages, some(old_logprobs), some(ref_logprobs), w_policy, w_kl, w_entropy,
            some(rewards), some(batch_std), ids if seq is None else seq,
            float_params(params, logits, len(K.PARAMS), "params"),
            logprobs, entropy, loss_terms, ratio, dlogp, adv_used, logprobs if grad is None else grad,
            t, vocab, stride_b, stride_t, grad_stride_b, grad_stride_t, *codes,
            HAS_ENTROPY=with_entropy, WRITE_GRAD=grad is not None, BLOCK_V=block, num_warps=K.num_warps(block))
    return loss_terms.sum(), logprobs, entropy, ratio, dlogp, adv_used


@register_op("fastgrpo::triton_grpo_loss_fused", mutates_args=())
def grpo_loss_fused_op(
    logits: Tensor, targets: Tensor, mask: Tensor, advantages: Tensor, old_logprobs: Optional[Tensor],
    ref_logprobs: Optional[Tensor], w_policy: Tensor, w_kl: Tensor, w_entropy: Tensor, rewards: Optional[Tensor],
    batch_std: Optional[Tensor], seq: Optional[Tensor], params: Tensor, codes: Sequence[int], with_entropy: bool,
    write_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grad = torch.empty(logits.shape if write_grad else (0,), device=logits.device, dtype=logits.dtype)
    outs = _launch(logits, targets, mask, advantages, old_logprobs, ref_logprobs, w_policy, w_kl, w_entropy,
                   rewards, batch_std, seq, params, codes, with_entropy, grad if write_grad else None)
    return (*outs, grad)


@register_op("fastgrpo::triton_grpo_loss_fused_inplace_", mutates_args=("logits",))
def grpo_loss_fused_inplace_op(
    logits: Tensor, targets: Tensor, mask: Tensor, advantages: Tensor, old_logprobs: Optional[Tensor],
    ref_logprobs: Optional[Tensor], w_policy: Tensor, w_kl: Tensor, w_entropy: Tensor, rewards: Optional[Tensor],
    batch_std: Optional[Tensor], seq: Optional[Tensor], params: Tensor, codes: Sequence[int], with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _launch(logits, targets, mask, advantages, old_logprobs, ref_logprobs, w_policy, w_kl, w_entropy,
                   rewards, batch_std, seq, params, codes, with_entropy, logits)


@register_op("fastgrpo::triton_scale_grad_", mutates_args=("grad",))
def scale_grad_op(grad: Tensor, scale: Tensor) -> None:
    if grad.numel() > 0:
        # logits-shaped gradients ([B, T, V] / [N, V], maybe the in-place view of a larger buffer) keep their
        # strides; the others (hidden, weight, bias of the linear path) are contiguous: one row per leading index
        rows2d = (grad if grad.dim() in (2, 3) and (grad.shape[-1] <= 1 or grad.stride(-1) == 1)
                  else grad.view(-1, grad.shape[-1]) if grad.dim() else grad.view(1, 1))
        t, stride_b, stride_t = row_addressing(rows2d)
        vocab = rows2d.shape[-1]
        launch(K.scale_grad_kernel)[(grad.numel() // vocab, triton.cdiv(vocab, K.SCALE_BLOCK))](
            grad, scale.reshape(1).float(), t, vocab, stride_b, stride_t, BLOCK=K.SCALE_BLOCK)
