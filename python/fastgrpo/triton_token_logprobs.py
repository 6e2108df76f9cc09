"""``fastgrpo::token_logprobs``: the Triton token log-prob (+ entropy) op, its fake shape and its autograd.

Registered with ``torch.library.triton_op`` so ``torch.compile(fullgraph=True)`` sees through it and
``torch.library.opcheck`` can test it. Under the Triton interpreter (CI, no GPU) the kernels are plain
Python functions that ``triton_op``'s tracing would run on fake tensors, so there the same launchers are
registered as opaque ``custom_op``s. The kernels live in ``fastgrpo.kernels.token_logprobs``; this module
only allocates, picks the launch configuration and wires the backward.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from .kernels import token_logprobs as K

_register = custom_op if os.environ.get("TRITON_INTERPRET") == "1" else triton_op


def _row_addressing(logits: Tensor) -> tuple[int, int, int]:
    """(T, stride_b, stride_t) so that row r lives at (r // T)·stride_b + (r % T)·stride_t."""
    if logits.dim() == 3:
        return logits.shape[1], logits.stride(0), logits.stride(1)
    return 1, logits.stride(0), 0


def _rows(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A per-row tensor as a dense 1-D buffer: the kernels index it by row, and autograd hands in expanded
    (stride-0) gradients."""
    return x.reshape(-1).to(dtype or x.dtype).contiguous()


def _as_row_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    if mask is None:
        return None
    mask = _rows(mask)
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


@_register("fastgrpo::token_logprobs", mutates_args=())
def token_logprobs_op(
    logits: Tensor, targets: Tensor, mask: Optional[Tensor], inv_temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(ℓ, stats, H) per row, fp32, shaped like ``targets`` (stats: [..., 2] = row max and log-sum of
    exp(z/τ − max); H is [0] without ``with_entropy``); rows with ``mask`` 0 get zeros."""
    rows, vocab = targets.numel(), logits.shape[-1]
    out = dict(device=logits.device, dtype=torch.float32)
    logprobs, stats = torch.empty(targets.shape, **out), torch.empty(targets.shape + (2,), **out)
    entropy = torch.empty(targets.shape if with_entropy else (0,), **out)
    if rows > 0:
        t, stride_b, stride_t = _row_addressing(logits)
        row_mask = _as_row_mask(mask)
        block = K.block_v(vocab)
        wrap_triton(K.token_logprobs_fwd_kernel)[(rows,)](
            logits, _rows(targets), logprobs if row_mask is None else row_mask, logprobs, stats, entropy,
            t, vocab, stride_b, stride_t, float(inv_temperature),
            HAS_MASK=row_mask is not None, HAS_ENTROPY=with_entropy, BLOCK_V=block, num_warps=K.num_warps(block))
    return logprobs, stats, entropy


@_register("fastgrpo::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(
    grad_logprobs: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, targets: Tensor, mask: Optional[Tensor],
    stats: Tensor, entropy: Tensor, inv_temperature: float,
) -> Tensor:
    """∂/∂logits of Σ g_ℓ·ℓ + g_H·H, a contiguous tensor shaped like ``logits`` in its dtype."""
    rows, vocab = targets.numel(), logits.shape[-1]
    grad_logits = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    if rows > 0:
        t, stride_b, stride_t = _row_addressing(logits)
        block = K.block_v(vocab)
        has_grad_entropy = grad_entropy is not None
        row_mask = _as_row_mask(mask)
        wrap_triton(K.token_logprobs_bwd_kernel)[(rows,)](
            grad_logits, logits, _rows(targets), stats if row_mask is None else row_mask, stats, _rows(entropy),
            _rows(grad_logprobs, torch.float32),
            _rows(grad_entropy, torch.float32) if has_grad_entropy else grad_logprobs,
            t, vocab, stride_b, stride_t, float(inv_temperature),
            HAS_MASK=row_mask is not None, HAS_GRAD_ENTROPY=has_grad_entropy, BLOCK_V=block,
            num_warps=K.num_warps(block))
    return grad_logits


# Explicit fake (meta) implementations: triton_op would trace the launcher itself, but under the Triton
# interpreter (CI) the kernels are plain Python functions that would run on fake tensors.
@token_logprobs_op.register_fake
def _(logits, targets, mask, inv_temperature, with_entropy):
    out = dict(device=logits.device, dtype=torch.float32)
    return (logits.new_empty(targets.shape, **out), logits.new_empty(targets.shape + (2,), **out),
            logits.new_empty(targets.shape if with_entropy else (0,), **out))


@token_logprobs_backward_op.register_fake
def _(grad_logprobs, grad_entropy, logits, targets, mask, stats, entropy, inv_temperature):
    return torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)


def _setup_context(ctx, inputs, output) -> None:
    logits, targets, mask, inv_temperature, _with_entropy = inputs
    _, stats, entropy = output
    ctx.save_for_backward(logits, targets, mask, stats, entropy)
    ctx.inv_temperature = inv_temperature
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logprobs: Optional[Tensor], _grad_stats: Optional[Tensor], grad_entropy: Optional[Tensor]):
    logits, targets, mask, stats, entropy = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros(targets.shape, device=stats.device, dtype=stats.dtype)
    if grad_entropy is not None and grad_entropy.numel() == 0:
        grad_entropy = None
    grad_logits = token_logprobs_backward_op(grad_logprobs, grad_entropy, logits, targets, mask, stats, entropy,
                                             ctx.inv_temperature)
    return grad_logits, None, None, None, None


torch.library.register_autograd("fastgrpo::token_logprobs", _backward, setup_context=_setup_context)


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0, entropy: bool = False,
                   mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    logprobs, _, ent = token_logprobs_op(logits, targets, mask, 1.0 / temperature, entropy)
    return logprobs, ent if entropy else None
