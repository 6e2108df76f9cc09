"""Benchmark: the fused linear path (hidden + LM-head weight → loss and gradients), forward + backward.

    python bench/bench_linear_grpo_loss.py [--device cuda|cpu] [--tokens N] [--hidden H] [--vocab V] [--dtype bf16]

Providers in one run: the three GEMMs of the ideal fused path (z = X·Wᵀ, dX = dZ·W, dW = dZᵀ·X: the FLOP
roofline, 6·N·V·H), fastgrpo's ``linear_grpo_loss`` (logits never materialized beyond a chunk), the same loss
on materialized logits (``grpo_loss(hidden @ weight.T, ...)`` with fastgrpo's kernels) and the eager fp32
reference. Reports the median with p20/p80, TFLOP/s over 6·N·V·H as a fraction of the GEMMs', peak memory
above the inputs (see bench_grpo_loss.py) and the ratios. Writes one JSON file per run.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib

import torch

import fastgrpo

_spec = importlib.util.spec_from_file_location("bench_grpo_loss", pathlib.Path(__file__).with_name("bench_grpo_loss.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
DTYPES, measure = _common.DTYPES, _common.measure


def linear_flops(n: int, v: int, h: int) -> int:
    """Forward logits, dX and dW: three GEMMs of 2·N·V·H multiply-adds each."""
    return 6 * n * v * h


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=None, help="default: 16384 on CUDA, 4096 on CPU")
    parser.add_argument("--hidden", type=int, default=None, help="default: 4096 on CUDA, 1024 on CPU")
    parser.add_argument("--vocab", type=int, default=None, help="default: 151936 on CUDA, 32000 on CPU")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    n, h, v = args.tokens or (16384 if cuda else 4096), args.hidden or (4096 if cuda else 1024), \
        args.vocab or (151936 if cuda else 32000)
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    g = torch.Generator(device=args.device).manual_seed(0)
    hidden = torch.randn(1, n, h, device=args.device, dtype=dtype, generator=g)
    weight = (torch.randn(v, h, device=args.device, generator=g) / h ** 0.5).to(dtype)
    targets = torch.randint(0, v, (1, n), device=args.device, generator=g)
    lp = torch.randn(1, n, device=args.device, generator=g) - 5.0
    kw = dict(advantages=torch.ones(1, device=args.device), old_logprobs=lp + 0.01, ref_logprobs=lp - 0.01,
              config=fastgrpo.presets.trl(loss_type="dapo", beta=0.04))

    def leaves():
        return hidden.detach().requires_grad_(), weight.detach().requires_grad_()

    def gemms(xw):
        x, w = xw[0].detach().view(n, h), xw[1].detach()
        z = x @ w.t()
        return z @ w, z.t() @ x

    def fused(xw):
        fastgrpo.linear_grpo_loss(xw[0], xw[1], targets, **kw).loss.backward()

    def materialized(xw):
        fastgrpo.grpo_loss(xw[0] @ xw[1].t(), targets, **kw).loss.backward()

    def reference(xw):
        fastgrpo.linear_grpo_loss(xw[0], xw[1], targets, backend="reference", **kw).loss.backward()

    flops = linear_flops(n, v, h)
    rows, roofline = [], None
    for name, fn in [("3 GEMMs (roofline)", gemms), ("fastgrpo linear_grpo_loss", fused),
                     ("fastgrpo grpo_loss on materialized logits", materialized), ("eager reference", reference)]:
        try:
            (med, p20, p80), peak = measure(fn, leaves, args.device, args.repeats)
        except Exception as exc:  # e.g. out of memory: reported, not fatal
            rows.append(dict(provider=name, error=f"{type(exc).__name__}: {exc}"[:200]))
            continue
        roofline = roofline or med
        rows.append(dict(provider=name, median_ms=med, p20_ms=p20, p80_ms=p80, tflops=flops / med / 1e9,
                         time_vs_gemms=med / roofline, peak_extra_bytes=peak))
    for row in rows:
        print(row)
    dtype_name = str(dtype).split(".")[-1]
    _common.save(args.out, f"linear_grpo_loss_{args.device}_{dtype_name}_{n}x{h}x{v}", cuda, tokens=n, hidden=h,
                 vocab=v, dtype=dtype_name, flops=flops, rows=rows)


if __name__ == "__main__":
    main()
