"""Per-token log-probs (+ entropy) of the targets from [N, V] logits (``fastgrpo.token_logprobs``).

Work: bytes of the [N, V] traffic. Forward: the logits read once (N·V·s). Forward+backward: 3·N·V·s, since
the backward needs the upstream gradient, unknown in the forward: it reads the logits again and writes their
gradient. Roofline: a read of the logits (forward) or a read + copy of them (forward+backward).
"""

from __future__ import annotations

import torch

from .. import reference
from ..trajectory.token_logprobs import token_logprobs
from .common import DTYPES, generator, kernel_backends, leaf, reference_providers, timed
from .harness import Case, Provider

OP = "token_logprobs"


def bytes_moved(n: int, v: int, itemsize: int, mode: str) -> int:
    return (3 if mode == "fwd+bwd" else 1) * n * v * itemsize


def cases(device: str, dtype: str, tokens: list[int], vocabs: list[int], modes: list[str]) -> list[Case]:
    return [case(n, v, device, dtype, mode) for v in vocabs for n in tokens for mode in modes]


def case(n: int, v: int, device: str, dtype: str, mode: str) -> Case:
    g = generator(device)
    logits = torch.randn(n, v, device=device, dtype=DTYPES[dtype], generator=g)
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    weights = torch.randn(n, device=device, generator=g)  # a downstream use of the log-probs
    grad = mode == "fwd+bwd"

    def fresh():
        return leaf(logits, grad)

    providers = {
        f"fastgrpo ({b})": Provider(
            timed(lambda z, b=b: (token_logprobs(z, targets, backend=b) * weights).sum(), grad), fresh
        )
        for b in kernel_backends(device)
    }
    providers.update(
        reference_providers(lambda z: (reference.token_logprobs(z, targets)[0] * weights).sum(), fresh, grad)
    )
    if grad:
        copy_dst = torch.empty_like(logits)
        roof = Provider(lambda z: (z.sum(dtype=torch.float32), copy_dst.copy_(z)), lambda: logits)
    else:
        roof = Provider(lambda z: z.sum(dtype=torch.float32), lambda: logits)
    return Case(
        OP, mode, dict(N=n, V=v), dtype, providers, bytes=bytes_moved(n, v, logits.element_size(), mode), roofline=roof
    )
