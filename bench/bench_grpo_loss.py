"""Benchmark: GRPO loss on logits, forward + backward, against the bandwidth roofline and the peers.

    python bench/bench_grpo_loss.py [--device cuda|cpu] [--tokens N] [--vocab V] [--dtype bf16] [--out DIR]

Providers, all in one run on one device: a copy of the logits (the roofline: 1 read + 1 write is what the
fused kernel must move), each fastgrpo kernel backend present (``triton``, ``cuda``, ``cpu``; ``inplace_grad``
too), the eager fp32 reference (``backend="reference"``: the TRL/verl-style computation) and that reference
under ``torch.compile`` (Liger-Kernel and TRL join with the suite of [6/6]). Reports the median with p20/p80,
GB/s over an explicit byte count (logits read once + gradient written once) as a fraction of the copy's, peak
memory above the inputs (CUDA allocator stats; on CPU the process's peak RSS, reset through
/proc/self/clear_refs) and the speed-up over the eager reference. Writes one JSON file per run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import time

import torch

import fastgrpo
from fastgrpo import backends

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


def providers(config, targets, kw, device):
    def fastgrpo_loss(backend, **extra):
        def run(logits):
            z = logits.requires_grad_() if not logits.requires_grad else logits
            out = fastgrpo.grpo_loss(z, targets, config=config, backend=backend, **kw, **extra)
            out.loss.backward()
        return run

    found = {}
    for name in backends.available(torch.device(device)):
        if name != "reference":
            found[f"fastgrpo ({name})"] = fastgrpo_loss(name)
            found[f"fastgrpo ({name}, inplace_grad)"] = fastgrpo_loss(name, inplace_grad=True)
    found["eager reference"] = fastgrpo_loss("reference")
    compiled = torch.compile(lambda z: fastgrpo.reference.grpo_loss(z, targets, config=config, **kw).loss)
    found["torch.compile reference"] = lambda z: compiled(z.requires_grad_()).backward()
    return found


def _rss_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def measure(fn, make, device, repeats=10):
    """((median, p20, p80) ms, peak bytes above the inputs) of fn(make())."""
    if device == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = triton.testing.do_bench(lambda: fn(make()), quantiles=[0.5, 0.2, 0.8], warmup=5, rep=50)
        return ms, torch.cuda.max_memory_allocated() - base
    fn(make())  # warm-up (and torch.compile's compilation)
    times = []
    peak = 0
    for _ in range(repeats):
        x = make()
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
        base = _rss_bytes("VmRSS:")
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
        peak = max(peak, _rss_bytes("VmHWM:") - base)
        del x
    q = torch.tensor(times).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
    return q, peak


def save(out_dir: str, name: str, cuda: bool, **fields) -> None:
    """Writes one run's JSON record (date, device, torch version and ``fields``) as ``out_dir/name.json``."""
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    record = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), device=device,
                  torch=torch.__version__, config="presets.trl(loss_type='dapo', beta=0.04)", **fields)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=None, help="default: 16384 on CUDA, 4096 on CPU")
    parser.add_argument("--vocab", type=int, default=None, help="default: 151936 on CUDA, 32000 on CPU")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES)
    parser.add_argument("--repeats", type=int, default=10, help="CPU timing repeats")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.tokens = args.tokens or (16384 if cuda else 4096)
    args.vocab = args.vocab or (151936 if cuda else 32000)
    dtype = DTYPES[args.dtype]
    logits, targets, kw = make_inputs(args.tokens, args.vocab, dtype, args.device)
    config = fastgrpo.presets.trl(loss_type="dapo", beta=0.04)
    moved = logits_bytes(args.tokens, args.vocab, dtype)

    rows = []
    copy_dst = torch.empty_like(logits)
    (copy_ms, copy_p20, copy_p80), _ = measure(lambda z: copy_dst.copy_(z), lambda: logits, args.device, args.repeats)
    copy_gbps = moved / copy_ms / 1e6
    rows.append(dict(provider="copy (roofline)", median_ms=copy_ms, p20_ms=copy_p20, p80_ms=copy_p80, gbps=copy_gbps,
                     fraction_of_copy=1.0))
    eager_ms = None
    for name, fn in providers(config, targets, kw, args.device).items():
        # inplace_grad overwrites its input: a fresh copy each time, seen through a view so that, as with a
        # model's logits, the input is not a leaf (a leaf's .grad would have to be a copy of the buffer)
        make = ((lambda: logits.detach().clone().requires_grad_().view_as(logits)) if "inplace" in name
                else (lambda: logits.detach()))
        try:
            (med, p20, p80), peak = measure(fn, make, args.device, args.repeats)
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
    save(args.out, f"grpo_loss_{args.device}_{args.dtype}_{args.tokens}x{args.vocab}", cuda, tokens=args.tokens,
         vocab=args.vocab, dtype=args.dtype, logits_bytes=moved // 2, bytes_moved=moved, rows=rows)


if __name__ == "__main__":
    main()
