"""``backend="cpu"`` / ``"cuda"``: the C++ and CUDA ops of ``fastgrpo._C`` behind the common kernel backend.

Importing ``fastgrpo._C`` registers the ops (``csrc/ops.cpp``) with their CPU implementations and, when the
extension was built with a CUDA toolkit, their CUDA ones; this module adds the fakes and autograd.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the ops)
from . import kernel_ops
from .kernel_backend import KernelBackend

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
