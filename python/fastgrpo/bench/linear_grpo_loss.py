"""The fused linear path (``fastgrpo.linear_grpo_loss``: hidden [N, H] + LM-head weight [V, H] → loss and
gradients), forward and forward+backward.

Work: FLOPs of the GEMMs the loss needs: 2·N·V·H forward (the logits), 6·N·V·H forward+backward (+ dX and
dW). Roofline: those GEMMs alone, through the linear path's own GEMM routine, timed in the same run.
Peers: TRL's fused LM head (``trl.kernels.ChunkedLogProbFunction``, TRL ≥ 1.16) + TRL's eager DAPO loss, and
Liger-Kernel's ``LigerFusedLinearGRPOLoss``, when installed.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import reference
from ..inputs import LMHead
from ..trajectory.grpo_loss import grpo_loss
from ..trajectory.linear_grpo_loss import _Gemm, linear_grpo_loss
from .common import CONFIG, DTYPES, generator, kernel_backends, leaf, timed
from .harness import Case, Provider

OP = "linear_grpo_loss"


def flops(n: int, v: int, h: int, mode: str) -> int:
    return (6 if mode == "fwd+bwd" else 2) * n * v * h


def sizes(device: str, quick: bool) -> tuple[list[int], list[int], list[int]]:
    """(N, H, V): on CUDA a 7B-class LM head (H 4096, Qwen's V); on CPU a small one."""
    if device == "cuda":
        return ([4096, 16384] if quick else [1024, 4096, 16384]), [4096], [151936]
    return ([256, 1024] if quick else [1024, 4096]), [512 if quick else 1024], [32000]


def _trl_loss(x, w, targets, kw):
    """TRL 1.16's path: chunked log-probs from its fused LM head, then the DAPO loss in eager ops."""
    from trl.kernels import ChunkedLogProbFunction

    lp = ChunkedLogProbFunction.apply(x, w, None, targets.reshape(-1), 1.0, 32768, None, 1.0, ("log_probs",))[0]
    lp = lp.view_as(kw["old_logprobs"])
    coef = torch.exp(lp - kw["old_logprobs"])
    adv = kw["advantages"].unsqueeze(1)
    per_token = -torch.min(coef * adv, coef.clamp(1 - CONFIG.epsilon_low, 1 + CONFIG.epsilon_high) * adv)
    d = kw["ref_logprobs"] - lp
    per_token = per_token + CONFIG.beta * (torch.exp(d) - d - 1)
    return (per_token * kw["mask"]).sum() / kw["mask"].sum()


def _liger_loss(targets, kw, compiled=True):
    """Liger's fused LM head + GRPO loss. ``compiled`` is Liger's own switch for torch.compile of its per-chunk loss
    math: on for timing (Liger's default, what its users run), off where only the loss value is compared."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    module = LigerFusedLinearGRPOLoss(
        beta=CONFIG.beta,
        epsilon_low=CONFIG.epsilon_low,
        epsilon_high=CONFIG.epsilon_high,
        loss_type="dapo",
        compiled=compiled,
    )

    def loss(x, w):
        out = module(
            x,
            w,
            targets,
            kw["mask"],
            kw["advantages"],
            ref_per_token_logps=kw["ref_logprobs"],
            old_per_token_logps=kw["old_logprobs"],
        )
        return out[0] if isinstance(out, tuple) else out

    return loss


def cases(
    device: str, dtype: str, tokens: list[int], hiddens: list[int], vocabs: list[int], modes: list[str]
) -> list[Case]:
    return [case(n, h, v, device, dtype, mode) for v in vocabs for h in hiddens for n in tokens for mode in modes]


def case(n: int, h: int, v: int, device: str, dtype: str, mode: str) -> Case:
    g = generator(device)
    b, t = max(1, n // 512), min(n, 512)
    hidden = torch.randn(b, t, h, device=device, generator=g).to(DTYPES[dtype])
    weight = (torch.randn(v, h, device=device, generator=g) / h**0.5).to(DTYPES[dtype])
    targets = torch.randint(0, v, (b, t), device=device, generator=g)
    lp = torch.randn(b, t, device=device, generator=g) - 5.0
    kw: dict[str, Any] = dict(  # the loss functions' keywords
        advantages=torch.randn(b, device=device, generator=g),
        mask=torch.ones(b, t, device=device),
        old_logprobs=lp + 0.01,
        ref_logprobs=lp - 0.01,
    )
    grad = mode == "fwd+bwd"

    def provider(loss):
        return Provider(timed(lambda xw: loss(*xw), grad), lambda: (leaf(hidden, grad), leaf(weight, grad)))

    providers = {
        f"fastgrpo ({k})": provider(
            lambda x, w, k=k: linear_grpo_loss(x, w, targets, config=CONFIG, backend=k, **kw).loss
        )
        for k in kernel_backends(device)
    }
    backend = (kernel_backends(device) or ["reference"])[0]
    providers["materialized logits + fastgrpo"] = provider(
        lambda x, w: grpo_loss(x @ w.t(), targets, config=CONFIG, backend=backend, **kw).loss
    )
    providers["eager reference"] = provider(
        lambda x, w: reference.linear_grpo_loss(x, w, targets, config=CONFIG, **kw).loss
    )
    try:
        import trl.kernels  # noqa: F401

        providers["TRL fused LM head + eager loss"] = provider(lambda x, w: _trl_loss(x.reshape(-1, h), w, targets, kw))
    except ImportError:
        pass
    try:
        providers["Liger LigerFusedLinearGRPOLoss"] = provider(_liger_loss(targets, kw))
    except ImportError:
        pass

    gemm = _Gemm(LMHead(weight))  # the GEMM routine (dtypes, fp32 outputs) of the linear path
    # its operand, converted once outside the timing (the path converts fp32 slices per chunk where it must)
    w = gemm.weight if gemm.low_precision else gemm.weight.float()

    def gemms(xw):
        x = xw[0].view(-1, h)
        z = gemm._mm(x, w.t())
        if grad:
            gemm._mm(z, w), gemm._mm(z.t(), x)

    return Case(
        OP,
        mode,
        dict(N=n, H=h, V=v),
        dtype,
        providers,
        flops=flops(n, v, h, mode),
        roofline=Provider(gemms, lambda: (hidden.detach(), weight.detach())),
    )
