"""Benchmark: GRPO loss on logits, forward + backward, against the bandwidth roofline and the peers.

    python bench/bench_grpo_loss.py [--tokens 16384] [--vocab 151936] [--dtype bf16] [--out bench/results]

Providers, all in one run on one device: a device-to-device copy of the logits (the roofline: 1 read + 1
write is what the fused kernel must move), ``fastgrpo`` (backend="triton", also with ``inplace_grad``),
the eager fp32 reference (``backend="reference"``: the TRL/verl-style computation), that reference under
``torch.compile`` (Liger-Kernel and TRL join with the suite of [6/6]). Reports the median with p20/p80
(``triton.testing.do_bench``), GB/s over an explicit byte count (logits read once + gradient written once)
as a fraction of the copy's, peak memory above the inputs, and the speed-up over the eager reference.
Writes one JSON file per run. The full suite with plots is issue [6/6]; this is the [2/6] measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import torch

import fastgrpo

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def logits_bytes(n: int, v: int, dtype: torch.dtype) -> int:
    """Bytes the fused forward+backward must move: read the logits once, write the gradient once."""
    return 2 * n * v * torch.finfo(dtype).bits // 8


def make_inputs(n: int, v: int, dtype: torch.dtype, device: str, seq_len: int = 512):
    b = max(1, n // seq_len)
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(b, n // b, v, device=device, dtype=dtype, generator=g)
    targets = torch.randint(0, v, (b, n // b), device=device, generator=g)
    lp = torch.randn(b, n // b, device=device, generator=g) - 5.0
    kw = dict(advantages=torch.randn(b, device=device, generator=g), mask=torch.ones(b, n // b, device=device),
              old_logprobs=lp + 0.01, ref_logprobs=lp - 0.01)
    return logits, targets, kw


def providers(config, targets, kw):
    def fastgrpo_loss(backend, **extra):
        def run(logits):
            z = logits.requires_grad_() if not logits.requires_grad else logits
            out = fastgrpo.grpo_loss(z, targets, config=config, backend=backend, **kw, **extra)
            out.loss.backward()
        return run

    found = {
        "fastgrpo (triton)": fastgrpo_loss("triton"),
        "fastgrpo (triton, inplace_grad)": fastgrpo_loss("triton", inplace_grad=True),
        "eager reference": fastgrpo_loss("reference"),
    }
    compiled = torch.compile(lambda z: fastgrpo.reference.grpo_loss(z, targets, config=config, **kw).loss)
    found["torch.compile reference"] = lambda z: compiled(z.requires_grad_()).backward()
    return found


def measure(fn, make, quantiles=(0.5, 0.2, 0.8)):
    import triton.testing

    def step():
        fn(make())

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = triton.testing.do_bench(step, quantiles=list(quantiles), warmup=5, rep=50)
    peak = torch.cuda.max_memory_allocated() - base
    return ms, peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="bf16", choices=DTYPES)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark measures GPU kernels: run it on a CUDA device"
    dtype = DTYPES[args.dtype]
    logits, targets, kw = make_inputs(args.tokens, args.vocab, dtype, "cuda")
    config = fastgrpo.presets.trl(loss_type="dapo", beta=0.04)
    moved = logits_bytes(args.tokens, args.vocab, dtype)

    rows = []
    copy_dst = torch.empty_like(logits)
    (copy_ms, _, _), _ = measure(lambda z: copy_dst.copy_(z), lambda: logits)
    copy_gbps = moved / copy_ms / 1e6
    rows.append(dict(provider="copy (roofline)", median_ms=copy_ms, gbps=copy_gbps, fraction_of_copy=1.0))
    eager_ms = None
    for name, fn in providers(config, targets, kw).items():
        make = (lambda: logits.detach().clone()) if "inplace" in name else (lambda: logits.detach())
        try:
            (med, p20, p80), peak = measure(fn, make)
        except Exception as exc:  # a provider that cannot run at this size (e.g. out of memory) is reported
            rows.append(dict(provider=name, error=f"{type(exc).__name__}: {exc}"[:200]))
            continue
        gbps = moved / med / 1e6
        eager_ms = med if name == "eager reference" else eager_ms
        rows.append(dict(provider=name, median_ms=med, p20_ms=p20, p80_ms=p80, gbps=gbps,
                         fraction_of_copy=gbps / copy_gbps, peak_extra_bytes=peak))
    for row in rows:
        if eager_ms and "median_ms" in row:
            row["speedup_vs_eager"] = eager_ms / row["median_ms"]
        print(row)
    record = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), device=torch.cuda.get_device_name(),
                  torch=torch.__version__, triton=__import__("triton").__version__, tokens=args.tokens,
                  vocab=args.vocab, dtype=args.dtype, bytes_moved=moved, rows=rows)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"grpo_loss_{args.dtype}_{args.tokens}x{args.vocab}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
