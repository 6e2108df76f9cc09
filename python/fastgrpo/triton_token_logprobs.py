"""Launchers of the Triton token log-prob kernels, registered as ``fastgrpo::triton_token_logprobs`` and
``fastgrpo::triton_token_logprobs_backward`` (contract, fakes and autograd: ``kernel_ops``).

Registered with ``torch.library.triton_op`` so ``torch.compile(fullgraph=True)`` sees through them. Under the
Triton interpreter (CI, no GPU) the kernels are plain Python functions that ``triton_op``'s tracing would run
on fake tensors, so there the same launchers are registered as opaque ``custom_op``s, which launch the kernels
directly (``launch``: torch 2.6's ``wrap_triton`` rejects an interpreted kernel; it is only needed for tracing).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from .kernels import token_logprobs as K

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
register_op = custom_op if _INTERPRET else triton_op
launch = (lambda kernel: kernel) if _INTERPRET else wrap_triton  # noqa: E731


def row_addressing(logits: Tensor) -> tuple[int, int, int]:
    """(T, stride_b, stride_t) so that row r lives at (r // T)·stride_b + (r % T)·stride_t."""
    if logits.dim() == 3:
        return logits.shape[1], logits.stride(0), logits.stride(1)
    return 1, logits.stride(0), 0


def rows(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A per-row tensor as a dense 1-D buffer: the kernels index it by row, and autograd hands in expanded
    (stride-0) gradients."""
    return x.reshape(-1).to(dtype or x.dtype).contiguous()


def float_params(x: Tensor, like: Tensor, numel: int, name: str) -> Tensor:
    """A float hyper-parameter tensor (``params``, ``inv_temperature``, ``eps``) as the kernels read it: dense fp32
    on the device of the op's inputs ``like`` (the kernel loads it: a short or misplaced buffer would be read out
    of bounds)."""
    if x.numel() != numel or x.device != like.device:
        raise ValueError(f"{name} must hold {numel} value(s) on the device of the op's inputs ({like.device}), got "
                         f"{x.numel()} on {x.device}")
    return rows(x, torch.float32)


def row_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    if mask is None:
        return None
    mask = rows(mask)
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


@register_op("fastgrpo::triton_token_logprobs", mutates_args=())
def token_logprobs_op(
    logits: Tensor, targets: Tensor, mask: Optional[Tensor], inv_temperature: Tensor, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    n, vocab = targets.numel(), logits.shape[-1]
    out = dict(device=logits.device, dtype=torch.float32)
    logprobs, stats = torch.empty(targets.shape, **out), torch.empty(targets.shape + (2,), **out)
    entropy = torch.empty(targets.shape if with_entropy else (0,), **out)
    if n > 0:
        t, stride_b, stride_t = row_addressing(logits)
        m = row_mask(mask)
        block = K.block_v(vocab)
        launch(K.token_logprobs_fwd_kernel)[(n,)](
            logits, rows(targets), logprobs if m is None else m,
            float_params(inv_temperature, logits, 1, "inv_temperature"), logprobs, stats, entropy,
            t, vocab, stride_b, stride_t,
            HAS_MASK=m is not None, HAS_ENTROPY=with_entropy, BLOCK_V=block, num_warps=K.num_warps(block))
    return logprobs, stats, entropy


@register_op("fastgrpo::triton_token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(
    grad_logprobs: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, targets: Tensor, mask: Optional[Tensor],
    stats: Tensor, entropy: Tensor, inv_temperature: Tensor,
) -> Tensor:
    n, vocab = targets.numel(), logits.shape[-1]
    grad_logits = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    if n > 0:
        t, stride_b, stride_t = row_addressing(logits)
        block = K.block_v(vocab)
        has_grad_entropy = grad_entropy is not None
        m = row_mask(mask)
        launch(K.token_logprobs_bwd_kernel)[(n,)](
            grad_logits, logits, rows(targets), stats if m is None else m, stats, rows(entropy),
            rows(grad_logprobs, torch.float32), rows(grad_entropy, torch.float32) if has_grad_entropy else stats,
            float_params(inv_temperature, logits, 1, "inv_temperature"), t, vocab, stride_b, stride_t,
            HAS_MASK=m is not None, HAS_GRAD_ENTROPY=has_grad_entropy, BLOCK_V=block, num_warps=K.num_warps(block))
    return grad_logits
