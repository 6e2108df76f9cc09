"""Input validation of SPEC §6: every bad input gets an error naming the argument and what was expected.

Shape, dtype and device checks read metadata only. Reading values (token ids in range, ``cu_seqlens``
well formed) costs a host sync, so those run only where the call is not captured by ``torch.compile``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(name: str, x: Tensor) -> None:
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (bf16, fp16, fp32 or fp64), got {x.dtype}")


def integer(name: str, x: Tensor) -> None:
    if x.dtype not in _INTS:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")


def same_device(device: torch.device, **tensors: Optional[Tensor]) -> None:
    for name, x in tensors.items():
        if x is not None and x.device != device:
            raise ValueError(f"{name} is on {x.device} but the inputs are on {device}: move it to {device}")


def shape(name: str, x: Tensor, expected: tuple, what: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {list(expected)} ({what}), got {list(x.shape)}")


def values_checkable(x: Tensor) -> bool:
    """Value checks sync with the host: skip them under torch.compile tracing and on fake tensors."""
    if torch.compiler.is_compiling():
        return False
    return not type(x).__name__.startswith("Fake")


def vocab_contiguous(name: str, x: Tensor) -> None:
    if x.dim() >= 1 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last (vocabulary) dimension, got stride {x.stride(-1)}; "
            "leading dimensions may be any view")


def token_ids(name: str, targets: Tensor, vocab: int, mask: Optional[Tensor] = None) -> None:
    """Ids in [0, vocab) at unmasked positions (callers have checked the dtype)."""
    if not values_checkable(targets) or targets.numel() == 0:
        return
    valid = (targets >= 0) & (targets < vocab)
    if mask is not None:
        valid = valid | ~mask.bool()
    if not bool(valid.all()):
        bad = targets[~valid][0].item()
        raise ValueError(f"{name} must hold token ids in [0, {vocab}) at unmasked positions, found {bad}")


def token_layout(
    tokens: torch.Size, cu_seqlens: Optional[Tensor], what: str
) -> int:
    """Checks the token layout ([B, T], or packed [N] with cu_seqlens) and returns the number of sequences."""
    if cu_seqlens is None:
        if len(tokens) != 2:
            raise ValueError(f"{what} must be [B, T] (or packed [N] with cu_seqlens), got {list(tokens)}")
        return tokens[0]
    tensor("cu_seqlens", cu_seqlens)
    integer("cu_seqlens", cu_seqlens)
    if len(tokens) != 1:
        raise ValueError(f"with cu_seqlens the input must be packed: {what} must be [N], got {list(tokens)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [S + 1], got shape {list(cu_seqlens.shape)}")
    if values_checkable(cu_seqlens):
        ok = int(cu_seqlens[0]) == 0 and int(cu_seqlens[-1]) == tokens[0]
        if not ok or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(
                f"cu_seqlens must start at 0, be non-decreasing and end at N = {tokens[0]}, got "
                f"{cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else 'a malformed tensor'}")
    return cu_seqlens.numel() - 1


def per_sequence_or_token(name: str, x: Tensor, tokens: torch.Size, num_seqs: int) -> None:
    """Advantages and IS weights: per sequence ([B], [B, 1], packed [S]) or per token (the token shape)."""
    ok = tuple(x.shape) == tuple(tokens) or x.numel() == num_seqs and (
        x.dim() == 1 or (x.dim() == 2 and x.shape[1] == 1))
    if not ok:
        raise ValueError(
            f"{name} must be per sequence ([{num_seqs}]) or per token ({list(tokens)}), got {list(x.shape)}")
