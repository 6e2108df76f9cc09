"""Input validation of MATH §6: every bad input gets an error naming the argument and what was expected.

Shape, dtype and device checks read metadata only and always run. Value checks (token ids in range,
``cu_seqlens`` well formed, masks and weights non-negative, log-probs, advantages, rewards, entropy and the
normalizer finite at unmasked positions) are collected per call by :class:`ValueChecks` and evaluated on the
device, and their one combined result is read once: one host sync per call. They are switched off by an
entry point's ``check_values=False`` or globally by :func:`set_check_values` (zero host syncs), and skipped
wherever values cannot be read: under ``torch.compile`` (a read would break the graph) and on meta or fake
tensors (FSDP meta init, tracing). The logits are never scanned: that would be a second full read of [N, V].
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

_check_values = True  # the global default of every entry point's check_values=None


def set_check_values(enabled: bool) -> bool:
    """Turns the value checks of every entry point on or off by default; returns the previous setting.

    A call's own ``check_values=True/False`` overrides it. Off, validation costs no host sync (shapes, dtypes
    and devices are still checked); non-finite inputs then propagate to the loss on every backend."""
    global _check_values
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
    previous, _check_values = _check_values, enabled
    return previous


def tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(name: str, x: Tensor) -> None:
    if x.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating tensor (bf16, fp16, fp32 or fp64), got {x.dtype}")


def integer(name: str, x: Tensor) -> None:
    if x.dtype not in INTS:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")


def real(name: str, x: Tensor, what: str) -> None:
    """Bool, integer or floating (a mask, a count): not complex."""
    if x.dtype not in FLOATS + INTS + (torch.bool,):
        raise TypeError(f"{name} must be a bool, integer or floating tensor ({what}), got {x.dtype}")


def same_device(device: torch.device, **tensors: Optional[Tensor]) -> None:
    for name, x in tensors.items():
        if x is not None and x.device != device:
            raise ValueError(f"{name} is on {x.device} but the inputs are on {device}: move it to {device}")


def shape(name: str, x: Tensor, expected: tuple, what: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {list(expected)} ({what}), got {list(x.shape)}")


def values_checkable(x: Tensor) -> bool:
    """Whether ``x``'s values can be read: not under torch.compile tracing, not on meta, fake or functional
    tensors (FSDP meta init, AOT tracing), where a read fails or breaks the graph."""
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return not isinstance(x, (FakeTensor, FunctionalTensor))


def vocab_contiguous(name: str, x: Tensor) -> None:
    if x.dim() >= 1 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last (vocabulary) dimension, got stride {x.stride(-1)}; "
            "leading dimensions may be any view"
        )


def vocabulary(name: str, vocab: int) -> None:
    if vocab == 0:
        raise ValueError(f"{name} has an empty vocabulary (V = 0): a log-softmax over no tokens is undefined")


def token_layout(tokens: torch.Size, cu_seqlens: Optional[Tensor], what: str) -> int:
    """Checks the token layout ([B, T], or packed [N] with cu_seqlens) and returns the number of sequences.
    The values of ``cu_seqlens`` are checked by :meth:`ValueChecks.cu_seqlens`."""
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
    return cu_seqlens.numel() - 1


def per_sequence_or_token(name: str, x: Tensor, tokens: torch.Size, num_seqs: int) -> None:
    """Advantages and IS weights: per sequence ([B], [B, 1], packed [S]) or per token (the token shape)."""
    ok = (
        tuple(x.shape) == tuple(tokens)
        or x.numel() == num_seqs
        and (x.dim() == 1 or (x.dim() == 2 and x.shape[1] == 1))
    )
    if not ok:
        raise ValueError(
            f"{name} must be per sequence ([{num_seqs}]) or per token ({list(tokens)}), got {list(x.shape)}"
        )


def _position(index: int, shape: torch.Size) -> str:
    coords = []
    for size in reversed(shape):
        index, i = divmod(index, size)
        coords.append(i)
    return f"index {coords[0]}" if len(shape) == 1 else f"position {tuple(reversed(coords))}"


class ValueChecks:
    """The value checks of one call: each check is a boolean "bad" tensor computed on the device; :meth:`run`
    reduces all of them to the first bad index of each, stacked into one small tensor read with one host sync.
    Only on failure are more values read, to name the first bad value and its position.

    ``check_values`` is the entry point's argument (None: the global default of :func:`set_check_values`);
    ``like`` is any input tensor, telling whether values can be read at all (see :func:`values_checkable`)."""

    def __init__(self, check_values: Optional[bool], like: Tensor) -> None:
        self.enabled = self.resolve(check_values) and values_checkable(like)
        self._pending: list[tuple[str, Tensor, Tensor, str]] = []  # (name, tensor, bad, requirement)
        self._unmasked: Optional[Tensor] = None  # [N] bool: tokens with a non-zero mask
        self._used: Optional[Tensor] = None  # [S] bool: sequences with at least one unmasked token
        self._tokens: Optional[torch.Size] = None
        self._cu_seqlens: Optional[Tensor] = None

    @staticmethod
    def resolve(check_values: Optional[bool]) -> bool:
        """An entry point's ``check_values`` argument, None meaning the global default."""
        if check_values is not None and not isinstance(check_values, bool):
            raise TypeError(f"check_values must be None or a bool, got {type(check_values).__name__}")
        return _check_values if check_values is None else check_values

    def _add(self, name: str, x: Tensor, bad: Tensor, requirement: str) -> None:
        if x.numel() > 0:
            self._pending.append((name, x, bad, requirement))

    def set_mask(self, mask: Tensor, cu_seqlens: Optional[Tensor]) -> None:
        """Checks the mask (finite weights >= 0: 0/1, or fractional soft weights as TRL's multiplication by the
        mask allows) and makes it the definition of the unmasked positions of the later checks."""
        if not self.enabled:
            return
        m = mask.detach()
        if m.dtype != torch.bool:
            self._add(
                "mask", m, ~(torch.isfinite(m) & (m >= 0)), "hold finite weights >= 0 (0/1, or fractional soft weights)"
            )
        self._tokens, self._cu_seqlens = mask.shape, cu_seqlens
        self._unmasked = (m != 0).reshape(-1)

    def _used_sequences(self) -> Tensor:
        if self._used is None:
            assert self._unmasked is not None and self._tokens is not None
            if self._cu_seqlens is None:
                self._used = self._unmasked.view(self._tokens).any(-1)
            else:  # unmasked tokens counted per sequence by a prefix sum (clamped: cu_seqlens may be malformed)
                n = self._unmasked.numel()
                counts = torch.cat([self._unmasked.new_zeros(1, dtype=torch.long), self._unmasked.long().cumsum(0)])
                cu = self._cu_seqlens.detach().long().clamp(0, n)
                self._used = counts[cu[1:]] > counts[cu[:-1]]
        return self._used

    def _positions(self, x: Tensor) -> Tensor:
        """Which entries of ``x`` (per token, or per sequence as ``TokenLayout.per_token`` reads it) are used."""
        assert self._tokens is not None and self._unmasked is not None
        per_sequence = x.numel() != self._tokens.numel() or (len(self._tokens) == 2 and x.shape != self._tokens)
        return (self._used_sequences() if per_sequence else self._unmasked).view(x.shape)

    def finite(self, name: str, x: Optional[Tensor], *, masked: bool = True, requirement: str = "") -> None:
        """``x`` finite (at unmasked positions when ``masked``)."""
        if not self.enabled or x is None:
            return
        x = x.detach()
        bad = ~torch.isfinite(x)
        if masked:
            bad &= self._positions(x)
        self._add(name, x, bad, requirement or ("be finite at unmasked positions" if masked else "be finite"))

    def logprobs(self, name: str, x: Optional[Tensor]) -> None:
        self.finite(
            name,
            x,
            requirement="hold finite log-probs at unmasked positions (a sampled token has p > 0; "
            "-inf would make the ratio or the KL infinite)",
        )

    def weights(self, name: str, x: Optional[Tensor]) -> None:
        """Importance weights: finite and >= 0 at unmasked positions."""
        if not self.enabled or x is None:
            return
        x = x.detach()
        self._add(
            name,
            x,
            ~(torch.isfinite(x) & (x >= 0)) & self._positions(x),
            "hold finite weights >= 0 at unmasked positions",
        )

    def normalizer(self, x: Tensor) -> None:
        if self.enabled:
            x = x.detach()
            self._add("normalizer", x, ~(torch.isfinite(x) & (x > 0)), "be finite and > 0")

    def token_ids(self, name: str, targets: Tensor, vocab: int) -> None:
        """Ids in [0, vocab) (at unmasked positions when a mask was set)."""
        if not self.enabled:
            return
        bad = (targets < 0) | (targets >= vocab)
        if self._unmasked is not None:
            bad &= self._unmasked.view(targets.shape)
        self._add(name, targets, bad, f"hold token ids in [0, {vocab}) at unmasked positions")

    def cu_seqlens(self, cu_seqlens: Optional[Tensor], num_tokens: int) -> None:
        if not self.enabled or cu_seqlens is None:
            return
        cu = cu_seqlens.detach()
        bad = torch.cat([cu[:1] != 0, cu[1:] < cu[:-1]])
        bad[-1] |= cu[-1] != num_tokens
        self._add("cu_seqlens", cu, bad, f"start at 0, be non-decreasing and end at N = {num_tokens}")

    def run(self) -> None:
        """Raises for the first failing check, in the order they were added; one host sync."""
        if not self._pending:
            return
        with torch.no_grad():
            first = torch.stack(
                [torch.where(bad.any(), bad.reshape(-1).to(torch.uint8).argmax(), -1) for _, _, bad, _ in self._pending]
            )
            found = first.tolist()  # the one host sync of validation
        for (name, x, _, requirement), index in zip(self._pending, found):
            if index >= 0:
                if name == "cu_seqlens":
                    got = x.tolist() if x.numel() <= 16 else f"a malformed tensor (entry {index})"
                    raise ValueError(f"cu_seqlens must {requirement}, got {got}")
                value = x.reshape(-1)[index].item()
                where = "" if x.dim() == 0 else f" at {_position(index, x.shape)}"
                raise ValueError(f"{name} must {requirement}, found {value!r}{where}")
