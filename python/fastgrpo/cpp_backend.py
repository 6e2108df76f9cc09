"""``backend="cpu"`` / ``"cuda"``: the C++ and CUDA ops of the extension behind the common kernel backend.

Importing ``fastgrpo._C`` registers the ops (``csrc/ops.cpp``) with their CPU implementations; ``fastgrpo._C_cuda``
(built when a CUDA toolkit was found) adds their CUDA ones. The CUDA module is loaded here too, but a failure to
load it (no CUDA runtime of the version it was built against) only leaves the CUDA backend unavailable, with
the reason in ``CUDA_UNAVAILABLE``. This module adds the fakes and autograd.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (registers the ops and their CPU kernels)
from . import kernel_ops
from .kernel_backend import KernelBackend

CUDA_UNAVAILABLE: Optional[str] = None
try:
    from . import _C_cuda  # noqa: F401  (registers the CUDA kernels)
except ImportError as exc:  # not built (no toolkit), or its CUDA runtime cannot be loaded here
    CUDA_UNAVAILABLE = str(exc)

_ops = torch.ops.fastgrpo
OPS = kernel_ops.Ops(_ops.token_logprobs, _ops.token_logprobs_backward, _ops.grpo_loss_fused,
                     _ops.grpo_loss_fused_inplace_, _ops.scale_grad_, _ops.advantages)
kernel_ops.register("", OPS)
OP_NAMES = ("token_logprobs", "token_logprobs_backward", "grpo_loss_fused", "grpo_loss_fused_inplace_",
            "scale_grad_", "advantages")


def has_kernels(device_type: str) -> bool:
    """Whether every op has an implementation for ``device_type`` ("cpu" or "cuda") in this build."""
    key = "CPU" if device_type == "cpu" else "CUDA"
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgrpo::{op}", key) for op in OP_NAMES)


# None where this build lacks the kernels (e.g. no CUDA toolkit): decided here, at import, because the dispatcher
# query is opaque to torch.compile and backend selection may first run inside a compiled region
CPU = KernelBackend("cpu", OPS) if has_kernels("cpu") else None
CUDA = KernelBackend("cuda", OPS) if has_kernels("cuda") else None
