"""What the op modules share: sizes per device, the loss config every provider computes, and providers for
the eager reference and that reference under torch.compile."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .. import backends, presets
from .harness import Provider

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the loss every provider computes: TRL's DAPO with a k3 KL term (old and reference log-probs)
CONFIG = presets.trl(loss_type="dapo", beta=0.04)
# vocabularies of Qwen 2.5/3, Llama 3 and Gemma 2/3
VOCABS = {"qwen": 151936, "llama3": 128256, "gemma": 256000}


def sizes(device: str, quick: bool) -> tuple[list[int], list[int]]:
    """(token counts N, vocabularies V) of the logits benchmarks."""
    if device == "cuda":
        return (
            [4096, 16384] if quick else [1024, 4096, 16384, 32768],
            [VOCABS["qwen"]] if quick else list(VOCABS.values()),
        )
    return ([256, 1024] if quick else [1024, 4096], [32000] if quick else [32000, VOCABS["qwen"]])


def kernel_backends(device: str) -> list[str]:
    return [b for b in backends.available(torch.device(device)) if b != "reference"]


def reference_providers(fn: Callable, make: Callable, grad: bool) -> dict[str, Provider]:
    """The eager fp32 reference (the TRL/verl-style chain of ops) and the same under torch.compile."""
    compiled = torch.compile(fn)
    return {
        "eager reference": Provider(timed(fn, grad), make),
        "torch.compile reference": Provider(timed(compiled, grad), make),
    }


def timed(fn: Callable, grad: bool) -> Callable:
    """The timed call: fn(x)'s scalar result (or LossOutput's loss) backpropagated, or fn(x) under no_grad."""

    def run(x) -> None:
        with contextlib.nullcontext() if grad else torch.no_grad():
            out = fn(x)
        if grad:
            getattr(out, "loss", out).backward()

    return run


def leaf(x: torch.Tensor, grad: bool) -> torch.Tensor:
    return x.detach().requires_grad_(grad)


def generator(device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)
