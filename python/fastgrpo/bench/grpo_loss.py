"""The GRPO loss on [N, V] logits (``fastgrpo.grpo_loss``), forward and forward+backward.

Work: bytes of the [N, V] logits traffic (the O(N) per-token vectors are under 0.01% and not counted).
Forward+backward moves 2·N·V·s: the logits read once and their gradient written once (fastgrpo computes
the gradient in the forward); forward alone reads the logits once. Roofline: a copy moving those bytes.
Peers: Liger-Kernel's ``triton_grpo_loss`` on CUDA when installed.
"""

from __future__ import annotations

import torch

from .. import reference
from ..trajectory.grpo_loss import grpo_loss
from .common import CONFIG, DTYPES, generator, kernel_backends, leaf, reference_providers, timed
from .harness import Case, Provider

OP = "grpo_loss"


def bytes_moved(n: int, v: int, itemsize: int, mode: str) -> int:
    return (2 if mode == "fwd+bwd" else 1) * n * v * itemsize


def inputs(n: int, v: int, dtype: torch.dtype, device: str, seq_len: int = 512):
    t = min(n, seq_len)
    b = n // t
    g = generator(device)
    logits = torch.randn(b, t, v, device=device, dtype=dtype, generator=g)
    targets = torch.randint(0, v, (b, t), device=device, generator=g)
    lp = torch.randn(b, t, device=device, generator=g) - 5.0
    kw = dict(
        advantages=torch.randn(b, device=device, generator=g),
        mask=torch.ones(b, t, device=device),
        old_logprobs=lp + 0.01,
        ref_logprobs=lp - 0.01,
    )
    return logits, targets, kw


def _liger_loss(targets, kw):
    """Liger-Kernel's Triton GRPO loss (CUDA) with the same options: DAPO token mean, k3 KL. Its logits carry
    one position more than the completion (it drops the last), so it scores T − 1 of the T positions."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    old, ref, ids, mask = (
        x[:, :-1].contiguous() for x in (kw["old_logprobs"], kw["ref_logprobs"], targets, kw["mask"])
    )

    def loss(logits):
        out = triton_grpo_loss(
            logits,
            old,
            ref,
            ids,
            kw["advantages"],
            mask,
            temperature=1.0,
            beta=CONFIG.beta,
            eps_low=CONFIG.epsilon_low,
            eps_high=CONFIG.epsilon_high,
            loss_type="dapo",
            reduce=True,
        )
        return out[0] if isinstance(out, tuple) else out

    return loss


def cases(device: str, dtype: str, tokens: list[int], vocabs: list[int], modes: list[str]) -> list[Case]:
    return [case(n, v, device, dtype, mode) for v in vocabs for n in tokens for mode in modes]


def case(n: int, v: int, device: str, dtype: str, mode: str) -> Case:
    logits, targets, kw = inputs(n, v, DTYPES[dtype], device)
    grad = mode == "fwd+bwd"

    def fastgrpo(backend, inplace=False):
        return timed(lambda z: grpo_loss(z, targets, config=CONFIG, backend=backend, inplace_grad=inplace, **kw), grad)

    def fresh():
        return leaf(logits, grad)

    providers = {f"fastgrpo ({b})": Provider(fastgrpo(b), fresh) for b in kernel_backends(device)}
    if grad:  # inplace_grad overwrites its input: a fresh non-leaf copy each call, as a model's logits are
        providers.update(
            {
                f"fastgrpo ({b}, inplace_grad)": Provider(
                    fastgrpo(b, inplace=True), lambda: logits.detach().clone().requires_grad_().view_as(logits)
                )
                for b in kernel_backends(device)
            }
        )
    providers.update(
        reference_providers(lambda z: reference.grpo_loss(z, targets, config=CONFIG, **kw).loss, fresh, grad)
    )
    if device == "cuda":
        try:
            providers["Liger triton_grpo_loss"] = Provider(timed(_liger_loss(targets, kw), grad), fresh)
        except ImportError:
            pass
    if grad:
        copy_dst = torch.empty_like(logits)
        roof = Provider(lambda z: copy_dst.copy_(z), lambda: logits)
    else:
        roof = Provider(lambda z: z.sum(dtype=torch.float32), lambda: logits)
    return Case(
        OP, mode, dict(N=n, V=v), dtype, providers, bytes=bytes_moved(n, v, logits.element_size(), mode), roofline=roof
    )
