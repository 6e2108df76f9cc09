"""Timing, peak memory, rooflines and the files a benchmark run writes.

A :class:`Case` is one op at one shape: providers (name → callable on a fresh input), the work it must do
(bytes moved or FLOPs, counted explicitly by the op's module) and the roofline that work is judged against
(a device-to-device copy of the same bytes, or a GEMM of the same FLOPs, measured in the same run).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib.util
import json
import pathlib
import platform
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.utils.benchmark

if TYPE_CHECKING:
    from tqdm import tqdm


@dataclasses.dataclass
class Provider:
    run: Callable[[Any], Any]  # the timed call
    make: Callable[[], Any]  # a fresh input for one call (not timed)


@dataclasses.dataclass
class Case:
    op: str
    mode: str  # "fwd" or "fwd+bwd"
    shape: dict[str, int]
    dtype: str
    providers: dict[str, Provider]
    bytes: Optional[int] = None  # work as bytes moved (bandwidth-bound ops) ...
    flops: Optional[int] = None  # ... or as FLOPs (the linear path)
    roofline: Optional[Provider] = None  # the copy or GEMM doing the same work


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def exact_cpu_peaks() -> None:
    """Makes glibc serve every allocation over 128 KiB with mmap and unmap it on free (no dynamic threshold),
    so that the RSS peak of a call measures its own allocations rather than reused heap. Process-wide: only
    the bench CLI calls it."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: peaks may undercount reused memory


class _CpuMeter:
    """Wall time, and the peak RSS above the RSS at the start (reset through /proc/self/clear_refs, Linux)."""

    def __init__(self) -> None:
        self.rss = pathlib.Path("/proc/self/clear_refs").exists()

    def start(self) -> None:
        if self.rss:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak RSS becomes the current RSS
        self.base = _rss_bytes("VmRSS:") if self.rss else 0
        self.t0 = time.perf_counter()

    def stop(self) -> tuple[float, int]:
        ms = (time.perf_counter() - self.t0) * 1e3
        return ms, (_rss_bytes("VmHWM:") - self.base) if self.rss else 0


class _CudaMeter:
    """CUDA events around the call, L2 flushed before it; the caching allocator's peak above the inputs."""

    def __init__(self) -> None:
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")  # larger than any L2 so far

    def start(self) -> None:
        self.flush.zero_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        self.t0, self.t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.t0.record()

    def stop(self) -> tuple[float, int]:
        self.t1.record()
        torch.cuda.synchronize()
        return self.t0.elapsed_time(self.t1), torch.cuda.max_memory_allocated() - self.base


def _metered(meter, run: Callable[[Any], Any], x: Any) -> tuple[float, int]:
    """(ms, peak bytes above the inputs) of one ``run(x)``."""
    meter.start()
    run(x)
    return meter.stop()


def _tensors(x: Any) -> list[torch.Tensor]:
    """The tensors of a provider's input: a tensor, or a tuple or list of them."""
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for item in x for t in _tensors(item)] if isinstance(x, (tuple, list)) else []


def measure(p: Provider, device: str, repeats: int) -> tuple[list[float], int]:
    """([median, p20, p80] ms, peak bytes above the inputs) of ``p.run(x)``, ``x = p.make()`` built outside
    the timed region, after a warm-up call (and torch.compile's compilation).

    ``triton.testing.do_bench`` and ``torch.utils.benchmark`` re-run one closure on one input: they cannot
    give each call a fresh input outside the timed region. They time the providers whose ``make()`` hands
    out the same memory every time (views of the case's tensors: the calls cannot consume it). On CUDA,
    ``do_bench``: L2 flushed before each call, input gradients set to None between calls, about
    ``max(repeats, 10)`` calls or 100 ms. On CPU, ``torch.utils.benchmark`` when no input needs a gradient
    (it runs blocks of calls with nothing between them: gradients would accumulate), for ``repeats`` calls'
    time or 0.2 s. Neither measures memory: the peak comes from one call of our own meter. The providers
    that get a fresh copy per call (the in-place ones), and CPU backward passes, are timed call by call by
    that meter, ``repeats`` calls (at least 10 on CUDA): CUDA events with L2 flushed, or perf_counter."""
    first, second = p.make(), p.make()
    # compared while both are alive: a freed block would come back at the same address
    reusable = [t.untyped_storage().data_ptr() for t in _tensors(first)] == [
        t.untyped_storage().data_ptr() for t in _tensors(second)
    ]
    del second
    p.run(first)
    del first
    meter = _CudaMeter() if device == "cuda" else _CpuMeter()
    x = p.make()
    ms, peak = _metered(meter, p.run, x)
    grads = [t for t in _tensors(x) if t.requires_grad]
    calls = max(repeats, 10) if device == "cuda" else repeats
    if device == "cuda" and reusable and importlib.util.find_spec("triton"):  # Triton is Linux-only
        from triton.testing import do_bench

        # the same signature on Triton 3.2 and 3.9; "all": the quantiles below are computed alike for every path
        times = do_bench(lambda: p.run(x), rep=max(100.0, calls * ms), grad_to_none=grads, return_mode="all")
    elif device == "cpu" and reusable and not grads:
        timer = torch.utils.benchmark.Timer(
            "run(x)", globals={"run": p.run, "x": x}, num_threads=torch.get_num_threads()
        )  # its default is 1 thread
        times = [s * 1e3 for s in timer.blocked_autorange(min_run_time=max(0.2, calls * ms / 1e3)).times]
    else:
        del x
        samples = [(ms, peak)] + [_metered(meter, p.run, p.make()) for _ in range(calls - 1)]
        times, peak = [t for t, _ in samples], max(b for _, b in samples)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return q.tolist(), peak


def run_case(case: Case, device: str, repeats: int, progress: Optional[tqdm] = None) -> list[dict]:
    """One row per provider: times, peak memory, achieved GB/s or TFLOP/s and its fraction of the roofline
    measured here, and the speed-up over the eager reference. A provider that fails (e.g. out of memory)
    gets a row with its error."""
    work = case.bytes if case.bytes is not None else case.flops
    assert work is not None, f"{case.op}: a Case counts its work in bytes or in FLOPs"
    unit = 1e6 if case.bytes is not None else 1e9  # per ms → GB/s or TFLOP/s
    base: dict[str, Any] = dict(
        op=case.op, mode=case.mode, dtype=case.dtype, **case.shape, bytes=case.bytes, flops=case.flops
    )
    roof = None
    rows: list[dict[str, Any]] = []
    entries = ([("roofline", case.roofline)] if case.roofline else []) + list(case.providers.items())
    shape = "x".join(f"{k}{v}" for k, v in case.shape.items())
    for name, provider in entries:
        if progress is not None:  # the bar counts the providers done; its postfix names the one running
            progress.set_postfix_str(f"{case.op} {case.mode} {shape} {name}")
        try:
            (med, p20, p80), peak = measure(provider, device, repeats)
        except Exception as exc:  # reported, not fatal: one provider must not hide the others
            rows.append(dict(base, provider=name, error=f"{type(exc).__name__}: {exc}"[:300]))
        else:
            rate = work / med / unit
            roof = rate if name == "roofline" else roof
            rows.append(
                dict(
                    base,
                    provider=name,
                    median_ms=med,
                    p20_ms=p20,
                    p80_ms=p80,
                    peak_extra_mib=peak / 2**20,
                    rate=rate,
                    rate_unit="GB/s" if case.bytes else "TFLOP/s",
                    fraction_of_roofline=rate / roof if roof else None,
                )
            )
        if device == "cuda":
            torch.cuda.empty_cache()
        if progress is not None:
            progress.update()
    eager = next((r["median_ms"] for r in rows if r["provider"] == "eager reference" and "median_ms" in r), None)
    for r in rows:
        if eager and "median_ms" in r and r["provider"] != "roofline":
            r["speedup_vs_eager"] = eager / r["median_ms"]
    return rows


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def environment(device: str) -> dict[str, str]:
    import importlib.metadata as md

    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device_name(device),
        python=platform.python_version(),
        torch=torch.__version__,
    )
    for pkg in ("triton", "fastgrpo", "liger-kernel", "trl"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if device == "cuda":
        env["cuda"] = str(torch.version.cuda)
    return env


COLUMNS = [
    "op",
    "mode",
    "N",
    "V",
    "H",
    "B",
    "dtype",
    "provider",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "peak_extra_mib",
    "rate",
    "rate_unit",
    "fraction_of_roofline",
    "speedup_vs_eager",
    "bytes",
    "flops",
    "error",
]


def table(rows: list[dict]) -> str:
    """A plain-text table of the rows, one line per provider."""
    head = (
        f"{'op':<17}{'mode':<8}{'shape':<22}{'provider':<34}{'median ms':>10}{'p20-p80':>16}"
        f"{'rate':>16}{'roof':>7}{'vs eager':>9}{'+MiB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(f"{k}{r[k]}" for k in ("N", "H", "V", "B") if r.get(k) is not None)
        if "error" in r:
            lines.append(f"{r['op']:<17}{r['mode']:<8}{shape:<22}{r['provider']:<34}  error: {r['error'][:60]}")
            continue
        frac = f"{r['fraction_of_roofline']:.0%}" if r.get("fraction_of_roofline") else ""
        speed = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else ""
        lines.append(
            f"{r['op']:<17}{r['mode']:<8}{shape:<22}{r['provider']:<34}{r['median_ms']:>10.3f}"
            f"{r['p20_ms']:>8.3f}-{r['p80_ms']:<7.3f}{r['rate']:>9.2f} {r['rate_unit']:<6}{frac:>7}"
            f"{speed:>9}{r['peak_extra_mib']:>8.0f}"
        )
    return "\n".join(lines)


def write(rows: list[dict], env: dict, out: pathlib.Path, stem: str) -> list[pathlib.Path]:
    """``stem``.json (environment + rows), ``stem``.csv and, with matplotlib, ``stem``.png."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.csv"]
    paths[0].write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    png = plot(rows, env, out / f"{stem}.png")
    return paths + ([png] if png else [])


def plot(rows: list[dict], env: dict, path: pathlib.Path) -> Optional[pathlib.Path]:
    """Time and peak memory vs N per provider, one column per (op, mode, V); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if "median_ms" in r and r["provider"] != "roofline"]
    groups = sorted({(r["op"], r["mode"], r.get("V"), r.get("H")) for r in ok}, key=str)
    if not groups:
        return None
    names = sorted({r["provider"] for r in ok})
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    ncols = min(4, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(2 * nrows, ncols, figsize=(3.8 * ncols, 5.6 * nrows), squeeze=False)
    for k, (op, mode, v, h) in enumerate(groups):
        row, col = 2 * (k // ncols), k % ncols
        top, bottom = axes[row][col], axes[row + 1][col]
        sel = [r for r in ok if (r["op"], r["mode"], r.get("V"), r.get("H")) == (op, mode, v, h)]
        for provider in sorted({r["provider"] for r in sel}):
            pts = sorted(
                (r["N"] if r.get("N") is not None else r["B"], r["median_ms"], r["peak_extra_mib"])
                for r in sel
                if r["provider"] == provider
            )
            xs = [p[0] for p in pts]
            style = dict(marker="o", color=colors[provider], label=provider)
            top.plot(xs, [p[1] for p in pts], **style)
            bottom.plot(xs, [p[2] for p in pts], **style)
        top.set_title(f"{op} {mode}" + (f" V={v}" if v else "") + (f" H={h}" if h else ""), fontsize=9)
        top.set_yscale("log")
        top.set_ylabel("median ms (log)")
        bottom.set_ylabel("peak MiB above inputs")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N tokens" if op != "advantages" else "B rewards")
            ax.grid(alpha=0.3)
    for k in range(len(groups), nrows * ncols):  # empty cells of the last row
        axes[2 * (k // ncols)][k % ncols].set_visible(False)
        axes[2 * (k // ncols) + 1][k % ncols].set_visible(False)
    handles = [plt.Line2D([], [], color=colors[n], marker="o", label=n) for n in names]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 4), fontsize=8)
    fig.suptitle(f"fastgrpo bench — {env['device']}, torch {env['torch']}, {env['date'][:10]}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
