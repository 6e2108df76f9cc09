"""``backend="triton"``: the Triton ops behind the common kernel backend (see ``kernel_backend``)."""

from __future__ import annotations

from . import kernel_ops
from .kernel_backend import KernelBackend
from .triton_advantages import advantages_op
from .triton_grpo_loss import grpo_loss_fused_inplace_op, grpo_loss_fused_op, scale_grad_op
from .triton_token_logprobs import token_logprobs_backward_op, token_logprobs_op

OPS = kernel_ops.Ops(token_logprobs_op, token_logprobs_backward_op, grpo_loss_fused_op, grpo_loss_fused_inplace_op,
                     scale_grad_op, advantages_op)
kernel_ops.register("triton_", OPS)
BACKEND = KernelBackend("triton", OPS)
