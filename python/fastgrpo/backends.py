"""Backend selection: which implementation runs a call.

``auto`` takes the first available backend in the device's preference order; naming a backend forces it and
fails clearly when it is not available. Backends are imported on first use, never at ``import fastgrpo``.
The Triton and CUDA backends run on CUDA tensors, the C++ ``cpu`` backend on CPU tensors; Triton also runs on
CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is
how CI tests it. A backend whose compiled part is missing (no triton, extension not built) is skipped by
``auto`` with a warning.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import reference

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")

# Preference of ``auto`` per device type: fused kernels first, the reference as the last resort.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


# backend name → (module, attribute): imported on first use
_IMPLS = {"triton": ("fastgrpo.triton_backend", "BACKEND"), "cpu": ("fastgrpo.cpp_backend", "CPU"),
          "cuda": ("fastgrpo.cpp_backend", "CUDA")}
_warned: set[str] = set()


def _load(name: str):
    """The object implementing a backend, or None when it is not part of this build."""
    if name == "reference":
        return reference
    if name not in _IMPLS:
        return None
    module_name, attr = _IMPLS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # triton not installed (macOS, Windows), or the extension was not built
        if name not in _warned and name != "cuda":
            _warned.add(name)
            warnings.warn(f"fastgrpo: backend {name!r} unavailable ({exc}); falling back to the next backend",
                          stacklevel=3)
        return None
    if name in ("cpu", "cuda") and not module.has_kernels(name):
        return None  # e.g. built without a CUDA toolkit
    return getattr(module, attr)


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "triton" and device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return name not in ("cpu", "cuda") or name == device.type


def available(device: torch.device) -> list[str]:
    """Names of the backends that can run on ``device``, in ``auto``'s order of preference."""
    return [name for name in _AUTO_ORDER.get(device.type, ("reference",))
            if _runs_on(name, device) and _load(name) is not None]


def select(backend: str, device: torch.device):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return _load(available(device)[0])
    if not _runs_on(backend, device):
        raise RuntimeError(f"backend={backend!r} cannot run on {device.type} tensors" + (
            " (on CPU Triton runs only under the interpreter, TRITON_INTERPRET=1)" if backend == "triton" else "")
            + "; use backend='auto' or 'reference'")
    module = _load(backend)
    if module is None:
        raise RuntimeError(
            f"backend={backend!r} is not available in this build of fastgrpo "
            f"(available on {device.type}: {available(device)}); use backend='auto' or 'reference'")
    return module
