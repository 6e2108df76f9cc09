"""Backend selection: which implementation runs a call.

``auto`` takes the first available backend in the device's preference order; naming a backend forces it and
fails clearly when it is not available. Backends are imported on first use, never at ``import fastgrpo``.
The Triton and CUDA backends run on CUDA tensors, the C++ ``cpu`` backend on CPU tensors; Triton also runs on
CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is
how CI tests it. A backend whose compiled part is missing (no triton, extension not built) is skipped by
``auto`` with a warning. ``auto`` never picks the CUDA backend: its kernels have not yet run on a GPU, so it
runs only when named (``backend="cuda"``).

A selection is resolved once per (backend, device type) and cached, so that under ``torch.compile`` a call
costs a dictionary lookup that Dynamo traces (and guards on) instead of an import. A first selection inside
a compiled region is traced too: backend modules are loaded by ``import`` statements, which Dynamo executes
at trace time.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from . import reference

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")

# Preference of ``auto`` per device type: fused kernels first, the reference as the last resort. The CUDA
# backend is left out until a GPU run validates its kernels.
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}
_NAMED_ONLY = ("cuda",)  # available to backend="cuda", never to auto

_warned: set[str] = set()
_selected: dict[tuple[str, str], Any] = {}  # (backend, device type) → the object implementing it


def _load(name: str):
    """The object implementing a backend, or None when it is not part of this build."""
    if name == "reference":
        return reference
    try:
        if name == "triton":
            from . import triton_backend
            return triton_backend.BACKEND
        from . import cpp_backend
    except ImportError as exc:  # triton not installed (macOS, Windows), or the extension was not built
        if name not in _warned and name != "cuda":
            _warned.add(name)
            warnings.warn(f"fastgrpo: backend {name!r} unavailable ({exc}); falling back to the next backend",
                          stacklevel=3)
        return None
    return cpp_backend.CPU if name == "cpu" else cpp_backend.CUDA  # None when built without those kernels


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "triton" and device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return name not in ("cpu", "cuda") or name == device.type


def available(device: torch.device) -> list[str]:
    """Names of the backends that can run on ``device``: ``auto``'s order of preference, then the backends
    that run only when named."""
    order = _AUTO_ORDER.get(device.type, ("reference",))
    return [name for name in order + _NAMED_ONLY if _runs_on(name, device) and _load(name) is not None]


def _resolve(backend: str, device: torch.device):
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):  # ends with the reference: always found
            impl = _load(name) if _runs_on(name, device) else None
            if impl is not None:
                return impl
    if not _runs_on(backend, device):
        raise RuntimeError(f"backend={backend!r} cannot run on {device.type} tensors" + (
            " (on CPU Triton runs only under the interpreter, TRITON_INTERPRET=1)" if backend == "triton" else "")
            + "; use backend='auto' or 'reference'")
    module = _load(backend)
    if module is None:
        why = ""
        if backend == "cuda":  # e.g. its CUDA runtime cannot be loaded in this process: say the loader's reason
            from . import cpp_backend
            why = f": {cpp_backend.CUDA_UNAVAILABLE}" if cpp_backend.CUDA_UNAVAILABLE else ""
        raise RuntimeError(
            f"backend={backend!r} is not available in this build of fastgrpo{why} "
            f"(available on {device.type}: {available(device)}); use backend='auto' or 'reference'")
    return module


def select(backend: str, device: torch.device):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    key = (backend, device.type)
    impl = _selected.get(key)
    if impl is None:
        impl = _selected[key] = _resolve(backend, device)
    return impl
