"""Backend selection: which implementation runs a call.

``auto`` takes the first available backend in the device's preference order; naming a backend forces it and
fails clearly when it is not available. Only the fp32 reference exists so far: the Triton, CUDA and C++ CPU
kernels register here as they land.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import reference

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")

# Preference of ``auto`` per device type: fused kernels first, the reference as the last resort.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def _load(name: str) -> ModuleType | None:
    """The module implementing a backend, or None when it is not part of this build."""
    if name == "reference":
        return reference
    return None


def available(device: torch.device) -> list[str]:
    """Names of the backends that can run on ``device``, in ``auto``'s order of preference."""
    return [name for name in _AUTO_ORDER.get(device.type, ("reference",)) if _load(name) is not None]


def select(backend: str, device: torch.device) -> ModuleType:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return _load(available(device)[0])
    module = _load(backend)
    if module is None:
        raise RuntimeError(
            f"backend={backend!r} is not available in this build of fastgrpo "
            f"(available on {device.type}: {available(device)}); use backend='auto' or 'reference'")
    return module
