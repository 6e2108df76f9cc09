"""Backend selection: which implementation runs a call.

``auto`` takes the first available backend in the device's preference order; naming a backend forces it and
fails clearly when it is not available. Backends are imported on first use, never at ``import fastgrpo``.
The Triton backend runs on CUDA tensors, and on CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), which is how CI tests it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from . import reference

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")

# Preference of ``auto`` per device type: fused kernels first, the reference as the last resort.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


_MODULES = {"triton": "fastgrpo.triton_backend"}


def _load(name: str) -> ModuleType | None:
    """The module implementing a backend, or None when it is not part of this build."""
    if name == "reference":
        return reference
    if name not in _MODULES:
        return None
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError:  # e.g. triton not installed (macOS, Windows)
        return None


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "triton" and device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return True


def available(device: torch.device) -> list[str]:
    """Names of the backends that can run on ``device``, in ``auto``'s order of preference."""
    return [name for name in _AUTO_ORDER.get(device.type, ("reference",))
            if _runs_on(name, device) and _load(name) is not None]


def select(backend: str, device: torch.device) -> ModuleType:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return _load(available(device)[0])
    if not _runs_on(backend, device):
        raise RuntimeError(f"backend={backend!r} needs CUDA tensors (on CPU it runs only under the Triton "
                           "interpreter, TRITON_INTERPRET=1); use backend='auto' or 'reference'")
    module = _load(backend)
    if module is None:
        raise RuntimeError(
            f"backend={backend!r} is not available in this build of fastgrpo "
            f"(available on {device.type}: {available(device)}); use backend='auto' or 'reference'")
    return module
