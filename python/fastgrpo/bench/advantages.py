"""Group advantage normalization from raw rewards (``fastgrpo.advantages``), forward only (rewards carry no
gradient). Work: 8·B bytes (fp32 rewards read, fp32 advantages written). Roofline: a copy of the rewards."""

from __future__ import annotations

import torch

from .. import reference
from ..config import AdvantageConfig
from ..reward.advantages import advantages
from .common import generator, kernel_backends, reference_providers, timed
from .harness import Case, Provider

OP = "advantages"
GROUP = 8


def bytes_moved(b: int) -> int:
    return 2 * 4 * b


def sizes(device: str, quick: bool) -> list[int]:
    if device == "cuda":
        return [4096, 65536] if quick else [1024, 16384, 262144, 1048576]
    return [4096, 65536] if quick else [4096, 65536, 1048576]


def cases(device: str, batches: list[int]) -> list[Case]:
    return [case(b, device) for b in batches]


def case(b: int, device: str) -> Case:
    rewards = torch.randint(0, 2, (b,), device=device, generator=generator(device)).float()
    providers = {
        f"fastgrpo ({k})": Provider(timed(lambda r, k=k: advantages(r, GROUP, backend=k), False), lambda: rewards)
        for k in kernel_backends(device)
    }
    providers.update(
        reference_providers(
            lambda r: reference.advantages(r, GROUP, config=AdvantageConfig())[0], lambda: rewards, False
        )
    )
    dst = torch.empty_like(rewards)
    return Case(
        OP,
        "fwd",
        dict(B=b),
        "fp32",
        providers,
        bytes=bytes_moved(b),
        roofline=Provider(lambda r: dst.copy_(r), lambda: rewards),
    )
