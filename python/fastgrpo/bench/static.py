"""``python -m fastgrpo static``: the GPU kernels judged from the code the compilers produce, with no GPU.

For each kernel specialization the launchers produce at a model shape (bf16 logits of [16, 1024, V], V of Qwen 2.5
and Gemma), the Triton kernels are compiled ahead of time for the target (``triton.compile``, as the launch would,
with the launch's 16-byte divisibility of pointers, V and the strides) and the CUDA kernels with nvcc
(``csrc/cuda/*.cu`` to a cubin with the build's flags). ``cuobjdump`` gives the registers, shared and local memory
of each function and its SASS. In the SASS the hot loops are the loops (backward branches) that load logits: the
statistics pass (loads, exponentials, no stores) and the gradient pass (loads and stores). Every instruction of a
loop's body counts as issued once per iteration (an upper bound: a branch inside the body is assumed to skip
nothing, e.g. a rare rescale on a new maximum), and an iteration handles as many elements per thread as its global
loads bring (bytes loaded / element size), so the figures are per vocabulary element and per thread.

The model, for N = 16384 tokens, takes the largest of three bounds and names it:
- memory: the HBM bytes per token over the bandwidth. The logits are read once and the gradient written once; the
  second read of the gradient pass comes from L2 only when the rows in flight fit in half of L2 (the other half
  holds the gradient rows being written back and everything else), and otherwise, conservatively, from HBM
  again (a working set streamed in LRU order that does not fit is evicted before it is read again);
- issue: instructions per element × N·V over 4 warp schedulers × 32 lanes per SM per clock, on the SMs that have a
  row (fewer than all when the schedule bounds the rows in flight below the SM count);
- MUFU: MUFU operations (ex2, lg2, rcp) per element over 16 per SM per clock.
Rows in flight are what the launcher's schedule gives for the GPU (``kernels.token_logprobs.row_programs`` when the
kernels have a persistent schedule, else one program per row: every resident program holds a row), bounded by the
occupancy computed from registers, threads and shared memory.

Not modeled: latency, the tail of the last wave, launch overhead, L2 bandwidth. For latency the report gives the
loads in flight (``mb_in_flight``: rows in flight × threads × the bytes one loop iteration loads per thread), to
be compared with what the bandwidth asks for by Little's law, bandwidth × loaded latency: about 3.4 MB on an H100
at an assumed ~1 µs under load (an assumption, not a sourced figure). The prediction is a floor that a GPU run
must be compared with, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Any, Iterator, Optional

BATCH, SEQ = 16, 1024
TOKENS = BATCH * SEQ  # N of the prediction
VOCABS = (151936, 256000)  # Qwen 2.5/3 and Gemma 2/3


@dataclasses.dataclass(frozen=True)
class GPU:
    """The figures of one GPU the model uses, each with its source."""

    name: str
    sms: int
    clock_hz: float
    hbm_bytes_per_s: float
    l2_bytes: int
    # Hopper (and Ampere) SM: 4 partitions, each a warp scheduler issuing one warp instruction per clock (NVIDIA
    # H100 Tensor Core GPU Architecture whitepaper, "H100 SM architecture"): 4 × 32 thread-instructions per clock
    issue_per_clock: int = 128
    # 16 results per clock per SM for ex2, lg2, rcp, rsqrt, sin, cos on compute capability 8.x and 9.0 (CUDA C++
    # Programming Guide, "Arithmetic Instructions", throughput table)
    mufu_per_clock: int = 16
    # per SM: 64 K 32-bit registers, 2048 threads, 32 blocks, 228 KB shared memory (CUDA C++ Programming Guide,
    # "Technical Specifications per Compute Capability", 9.0)
    registers: int = 65536
    threads: int = 2048
    blocks: int = 32
    shared_bytes: int = 228 * 1024


# H100 SXM5: 132 SMs (H100 whitepaper, table "H100 SXM5"); HBM3 3.35 TB/s (H100 datasheet); 50 MB L2 (whitepaper);
# the boost clock from the datasheet's 67 TFLOPS fp32 = 132 SMs × 128 FP32 lanes × 2 flops × clock → 1.98 GHz.
# H200 SXM: the same GH100 die and clocks (H200 datasheet: 67 TFLOPS fp32, 132 SMs' worth), HBM3e 4.8 TB/s.
GPUS = {
    "h100": GPU("H100 SXM5", 132, 1.98e9, 3.35e12, 50 * 1024**2),
    "h200": GPU("H200 SXM", 132, 1.98e9, 4.8e12, 50 * 1024**2),
}


# -- SASS ---------------------------------------------------------------------------------------------------------

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_FUNCTION = re.compile(r"Function : (\S+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers, e.g. LDG.E.128
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """cuobjdump -sass output → the instructions of each function."""
    functions: dict[str, list[Instruction]] = {}
    current: Optional[list[Instruction]] = None
    for line in text.splitlines():
        found = _FUNCTION.search(line)
        if found:
            current = functions.setdefault(found.group(1), [])
            continue
        m = _LINE.search(line)
        if m and current is not None:
            current.append(Instruction(int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return functions


def loops(code: list[Instruction]) -> list[list[Instruction]]:
    """The bodies of the innermost loops: from the target of a backward branch to the branch, holding no other
    loop (a persistent kernel's loop over rows holds the passes' loops)."""
    index = {ins.address: i for i, ins in enumerate(code)}
    spans = []
    for i, ins in enumerate(code):
        if ins.base == "BRA":
            target = re.search(r"0x([0-9a-f]+)", ins.operands)
            if target and int(target.group(1), 16) < ins.address and int(target.group(1), 16) in index:
                spans.append((index[int(target.group(1), 16)], i))
    inner = [(a, b) for a, b in spans if not any((a, b) != (c, d) and a <= c and d <= b for c, d in spans)]
    return sorted((code[a : b + 1] for a, b in inner), key=len)


def _width(opcode: str) -> int:
    """Bytes moved per thread by a memory instruction (LDG.E.128 → 16; .U16/.S16 → 2; .U8 → 1; .64 → 8; else 4)."""
    mods = opcode.split(".")[1:]
    for mod, width in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if mod in mods:
            return width
    return 4


@dataclasses.dataclass
class LoopCost:
    """One hot loop, per thread and iteration, and per vocabulary element."""

    instructions: int
    elements: float  # logits handled per thread and iteration
    counts: Counter  # instructions by base opcode
    loads: Counter  # global loads by width in bytes
    stores: Counter  # global stores by width in bytes
    ex2: int

    def per_element(self, what: int) -> float:
        return what / self.elements

    @property
    def mufu(self) -> int:
        return self.counts["MUFU"]

    @property
    def fma(self) -> int:
        return self.counts["FFMA"] + self.counts["HFMA2"]


def loop_cost(body: list[Instruction], element_bytes: int) -> LoopCost:
    loads = Counter(_width(i.opcode) for i in body if i.base == "LDG")
    stores = Counter(_width(i.opcode) for i in body if i.base == "STG")
    return LoopCost(
        instructions=len(body),
        elements=sum(w * n for w, n in loads.items()) / element_bytes,
        counts=Counter(i.base for i in body),
        loads=loads,
        stores=stores,
        ex2=sum(i.opcode.startswith("MUFU.EX2") for i in body),
    )


def _preference(cost: LoopCost) -> tuple[float, float]:
    return (-sum(w * n for w, n in cost.loads.items()), cost.instructions / cost.elements)


def hot_loops(code: list[Instruction], element_bytes: int) -> dict[str, LoopCost]:
    """The statistics pass (loads logits, exponentials, no store) and the gradient pass (loads and stores, with
    exponentials) of a function. Of several candidates, the one moving the most bytes per iteration (the vectorized
    main loop rather than a remainder loop), then the shortest (a kernel's usual copy of a pass rather than the
    one for saturated rows)."""
    found: dict[str, LoopCost] = {}
    for body in loops(code):
        cost = loop_cost(body, element_bytes)
        if not cost.loads or not cost.ex2:  # a row pass takes an exponential per element; other loops do not
            continue
        kind = "grad" if cost.stores else "stats"
        if kind not in found or _preference(cost) < _preference(found[kind]):
            found[kind] = cost
    return found


_RESOURCES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resources(text: str) -> dict[str, dict[str, int]]:
    """cuobjdump -res-usage output → registers, stack, static shared and local memory of each function."""
    return {
        m.group(1): dict(
            registers=int(m.group(2)), stack=int(m.group(3)), shared=int(m.group(4)), local=int(m.group(5))
        )
        for m in _RESOURCES.finditer(text)
    }


# -- toolkit ------------------------------------------------------------------------------------------------------


def cuobjdump() -> Optional[str]:
    """cuobjdump: on PATH, in the CUDA toolkit, or the one Triton ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates = [os.path.join(home, "bin", "cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if os.path.exists(c)), None)


def disassemble(cubin: bytes | str) -> tuple[dict[str, list[Instruction]], dict[str, dict[str, int]]]:
    """(SASS, resources) of each function of a cubin (bytes, or the path of a cubin, object or shared library)."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("no cuobjdump found (CUDA toolkit, or Triton's bundled one)")
    with tempfile.TemporaryDirectory() as tmp:
        path = cubin if isinstance(cubin, str) else os.path.join(tmp, "kernel.cubin")
        if not isinstance(cubin, str):
            pathlib.Path(path).write_bytes(cubin)
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    return parse_sass(sass), resources(usage)


# -- occupancy and the model --------------------------------------------------------------------------------------


def blocks_per_sm(gpu: GPU, threads: int, registers: int, shared: int) -> int:
    """Resident blocks per SM: registers (allocated per warp in units of 256), threads, blocks, shared memory."""
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    limits = [gpu.registers // (per_warp * warps), gpu.threads // threads, gpu.blocks]
    if shared:
        limits.append(gpu.shared_bytes // shared)
    return max(0, min(limits))


def predict(
    gpu: GPU, tokens: int, vocab: int, passes: dict[str, float], mufu: float, hbm_bytes: float, rows_in_flight: int
) -> tuple[float, str]:
    """(milliseconds, bound) of one launch over ``tokens`` rows. ``passes``: instructions per element of each pass
    the launch runs; ``mufu``: MUFU operations per element over those passes."""
    sms = min(gpu.sms, rows_in_flight)
    elements = tokens * vocab
    bounds = {
        "memory": tokens * hbm_bytes / gpu.hbm_bytes_per_s,
        "issue": elements * sum(passes.values()) / (sms * gpu.issue_per_clock * gpu.clock_hz),
        "mufu": elements * mufu / (sms * gpu.mufu_per_clock * gpu.clock_hz),
    }
    bound = max(bounds, key=lambda k: bounds[k])
    return bounds[bound] * 1e3, bound


# -- the kernels --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel specialization as a launcher runs it: which passes over the row, and the bytes per token besides
    the logits (token inputs and outputs, statistics)."""

    kernel: str
    backend: str
    entropy: bool
    passes: tuple[str, ...]
    side_bytes: int
    threads: int = 0
    code: Any = None  # Triton: (fn, signature, constexprs, num_warps)

    @property
    def write_grad(self) -> bool:
        return "grad" in self.passes


_SOURCE: Optional[pathlib.Path] = None  # --source: another checkout's kernels/ and csrc/ (a before/after report)


def _kernels(name: str) -> Any:
    """A module of the kernels package: this installation's, or that of the checkout given by --source."""
    if _SOURCE is None:
        return importlib.import_module(f"fastgrpo.kernels.{name}")
    if str(_SOURCE) not in sys.path:
        sys.path.insert(0, str(_SOURCE))
    return importlib.import_module(f"kernels.{name}")


def _token_bytes() -> dict[str, int]:
    P = _kernels("params")

    stats = 4 * len(P.ROW_STATS)
    return {
        # target id, ℓ, the row statistics, H
        "token_logprobs_fwd": 8 + 4 + stats + 4,
        # target id, M and log Σ, H, ∂/∂ℓ, ∂/∂H
        "token_logprobs_bwd": 8 + 8 + 4 + 4 + 4,
        # target id, the token inputs and outputs (fp32 rows)
        "grpo_loss": 8 + 4 * len(P.TOKEN_INPUTS) + 4 * len(P.TOKEN_OUTPUTS),
    }


def triton_launches(vocab: int, dtype: str = "bf16") -> Iterator[Launch]:
    """The Triton specializations the launchers produce for bf16 logits of vocabulary ``vocab``: the compile gate's
    list (``aot_specializations``), at the launch's block for ``vocab``."""
    token_logprobs, grpo_loss = _kernels("token_logprobs"), _kernels("grpo_loss")
    side = _token_bytes()
    for module in (token_logprobs, grpo_loss):
        block = module.block_v(vocab)  # each op's own launch table
        for fn, signature, constexprs, warps in module.aot_specializations():
            if constexprs.get("BLOCK_V") != block or signature.get("logits_ptr") != f"*{dtype}":
                continue
            if "N" in constexprs or constexprs.get("HAS_MASK"):  # the one-token and masked forms: not the model's
                continue
            name = fn.__name__
            code = (fn, signature, constexprs, warps)
            if name == "token_logprobs_fwd_kernel":
                yield Launch(name, "triton", constexprs["HAS_ENTROPY"], ("stats",), side["token_logprobs_fwd"], 0, code)
            elif name == "token_logprobs_bwd_kernel":
                yield Launch(
                    name, "triton", constexprs["HAS_GRAD_ENTROPY"], ("grad",), side["token_logprobs_bwd"], 0, code
                )
            elif name == "grpo_loss_fwd_kernel":
                passes = ("stats", "grad") if constexprs["WRITE_GRAD"] else ("stats",)
                yield Launch(name, "triton", constexprs["HAS_ENTROPY"], passes, side["grpo_loss"], 0, code)


def _divisible_attrs(fn, signature: dict[str, str], values: dict[str, int]) -> dict:
    """The launch's specialization: pointers (torch allocations) and the integer arguments divisible by 16 get
    tt.divisibility 16, which is what lets the compiler vectorize the row loads."""
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        kind = signature.get(name, "constexpr")
        if kind.startswith("*") or (kind in ("i32", "i64") and values.get(name, 0) % 16 == 0 and name in values):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def compile_triton(launch: Launch, vocab: int, arch: int) -> tuple[bytes, int, int]:
    """(cubin, threads per block, dynamic shared bytes) of a Triton specialization."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, warps = launch.code
    values = dict(
        T=SEQ,
        V=vocab,
        N=TOKENS,
        stride_b=SEQ * vocab,
        stride_t=vocab,
        grad_stride_b=SEQ * vocab,
        grad_stride_t=vocab,
    )
    sig = {name: "constexpr" if name in constexprs else signature[name] for name in fn.arg_names}
    try:
        src = ASTSource(fn, sig, constexprs, _divisible_attrs(fn, signature, values))
    except TypeError:  # Triton < 3.3 takes an AttrsDescriptor: compile without the hints (scalar loads)
        src = ASTSource(fn, sig, constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    return kernel.asm["cubin"], 32 * warps, int(getattr(kernel.metadata, "shared", 0))


def repository() -> Optional[pathlib.Path]:
    """The source checkout holding csrc/ (--source, a source tree or an editable install), if any."""
    if _SOURCE is not None:
        return _SOURCE
    here = pathlib.Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "csrc" / "cuda").is_dir():
            return parent
    return None


# setup.py's NVCC_FLAGS (a test pins the two), so that the report reads the SASS the build makes
NVCC_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr")


def compile_cuda(root: pathlib.Path, arch: str, out: pathlib.Path) -> list[pathlib.Path]:
    """nvcc each csrc/cuda/*.cu to a cubin for ``arch`` (e.g. 90a), with the flags of setup.py."""
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc):
        raise RuntimeError("no nvcc found")
    cubins = []
    for src in sorted(glob.glob(str(root / "csrc" / "cuda" / "*.cu"))):
        cubin = out / (pathlib.Path(src).stem + f"_sm{arch}.cubin")
        cmd = [
            nvcc,
            "-cubin",
            src,
            "-o",
            str(cubin),
            *NVCC_FLAGS,
            f"-arch=sm_{arch}",
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        cubins.append(cubin)
    return cubins


# CUDA kernels by (mangled) name: kernel, logits dtype, entropy; the threads per block of rows.cuh (kThreads)
_CUDA_KERNEL = re.compile(
    r"(token_logprobs_backward_kernel|token_logprobs_kernel|grpo_loss_fused_kernel)I(\w+?)(?:Lb([01]))?E"
)
_CUDA_DTYPE = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}
CUDA_THREADS = 512


def cuda_launches(dtype: str = "bf16") -> Iterator[tuple[Launch, str]]:
    """(launch, "name:entropy flag") of each CUDA row kernel: the fused loss with and without the gradient (one
    instantiation; the gradient is a runtime pointer), the log-prob forward and backward with and without the
    entropy (a kernel without that template flag serves both)."""
    side = _token_bytes()
    for entropy in (False, True):
        yield (
            Launch("token_logprobs_kernel", "cuda", entropy, ("stats",), side["token_logprobs_fwd"], CUDA_THREADS),
            f"token_logprobs_kernel:{int(entropy)}",
        )
        for write in (False, True):
            passes = ("stats", "grad") if write else ("stats",)
            yield (
                Launch("grpo_loss_fused_kernel", "cuda", entropy, passes, side["grpo_loss"], CUDA_THREADS),
                f"grpo_loss_fused_kernel:{int(entropy)}",
            )
        yield (
            Launch(
                "token_logprobs_backward_kernel",
                "cuda",
                entropy,
                ("grad",),
                side["token_logprobs_bwd"],
                CUDA_THREADS,
            ),
            f"token_logprobs_backward_kernel:{int(entropy)}",
        )


def _cuda_key(mangled: str, dtype: str) -> Optional[str]:
    m = _CUDA_KERNEL.search(mangled)
    if not m or _CUDA_DTYPE.get(m.group(2).removesuffix("Lb0").removesuffix("Lb1")) != dtype:
        return None
    return f"{m.group(1)}:{m.group(3) or ''}"


def rows_in_flight(tokens: int, vocab: int, element_bytes: int, resident: int, gpu: GPU, reread: bool) -> int:
    """Rows being streamed at once: for a kernel reading each row twice, the launcher's schedule (row_programs) if
    the kernels have one; else every resident program holds one row."""
    schedule = getattr(_kernels("token_logprobs"), "row_programs", None)
    if schedule is None or not reread:
        return min(tokens, resident)
    return min(schedule(tokens, vocab * element_bytes, gpu.l2_bytes), resident)


def record(
    launch: Launch,
    arch: str,
    dtype: str,
    vocab: int,
    code: list[Instruction],
    usage: dict[str, int],
    threads: int,
    dynamic_shared: int,
) -> dict[str, Any]:
    element_bytes = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    loops_found = hot_loops(code, element_bytes)
    missing = [p for p in launch.passes if p not in loops_found]
    if missing:
        raise RuntimeError(f"{launch.kernel}: no {', '.join(missing)} loop found in the SASS")
    used = {p: loops_found[p] for p in launch.passes}
    per = {p: c.per_element(c.instructions) for p, c in used.items()}
    mufu = sum(c.per_element(c.mufu) for c in used.values())
    shared = usage["shared"] + dynamic_shared
    row_bytes = vocab * element_bytes
    out: dict[str, Any] = dict(
        kernel=launch.kernel,
        backend=launch.backend,
        arch=f"sm_{arch}",
        dtype=dtype,
        vocab=vocab,
        entropy=launch.entropy,
        write_grad=launch.write_grad,
        registers=usage["registers"],
        spills=sum(i.base in ("STL", "LDL") for i in code),
        local_bytes=usage["local"],
        shared_bytes=shared,
        threads=threads,
        instructions_per_element=round(sum(per.values()), 2),
        exp_per_element=round(sum(c.per_element(c.ex2) for c in used.values()), 3),
        mufu_per_element=round(mufu, 3),
        fma_per_element=round(sum(c.per_element(c.fma) for c in used.values()), 2),
        passes={
            p: dict(
                instructions_per_element=round(per[p], 2),
                elements_per_iteration=c.elements,
                instructions_per_iteration=c.instructions,
                ex2=c.ex2,
                mufu=c.mufu,
                fma=c.fma,
                loads={f"{w * 8}b": n for w, n in sorted(c.loads.items())},
                stores={f"{w * 8}b": n for w, n in sorted(c.stores.items())},
                top=dict(c.counts.most_common(8)),
            )
            for p, c in used.items()
        },
    )
    # "fits" is the schedule's own criterion (a checkout without one: the same half of L2)
    l2_fraction = getattr(_kernels("token_logprobs"), "L2_ROW_FRACTION", 0.5)
    reread = len(launch.passes) > 1
    for key, gpu in GPUS.items():
        resident = blocks_per_sm(gpu, threads, usage["registers"], shared)
        flight = rows_in_flight(TOKENS, vocab, element_bytes, resident * gpu.sms, gpu, reread)
        fits = flight * row_bytes <= l2_fraction * gpu.l2_bytes
        reads = 2 if reread and not fits else 1
        hbm = row_bytes * (reads + (1 if launch.write_grad else 0)) + launch.side_bytes
        ms, bound = predict(gpu, TOKENS, vocab, per, mufu, hbm, flight)
        if key == "h100":
            out.update(blocks_per_sm=resident, rows_in_flight=flight, l2_rows_mb=round(flight * row_bytes / 2**20, 1))
            out.update(second_read_from_l2=fits if reread else None, hbm_bytes_per_token=hbm)
            # loads in flight over the GPU: each resident program's threads, one loop iteration's loads each
            per_thread = max(sum(w * n for w, n in c.loads.items()) for c in used.values())
            out.update(mb_in_flight=round(flight * threads * per_thread / 2**20, 2))
        out[f"predicted_ms_{key}"] = round(ms, 3)
        out["bound" if key == "h100" else f"bound_{key}"] = bound
    return out


def analyze(arch: str = "90a", dtype: str = "bf16", vocabs=VOCABS, cuda: bool = True) -> list[dict[str, Any]]:
    """Records of every Triton specialization (and, with ``cuda`` and a toolkit, every CUDA row kernel)."""
    records = []
    cap = int(re.sub(r"\D", "", arch))
    for vocab in vocabs:
        for launch in triton_launches(vocab, dtype):
            cubin, threads, dynamic = compile_triton(launch, vocab, cap)
            functions, usage = disassemble(cubin)
            ((name, code),) = functions.items()
            records.append(record(launch, arch, dtype, vocab, code, usage[name], threads, dynamic))
    root = repository()
    if cuda and root is not None:
        with tempfile.TemporaryDirectory() as tmp:
            functions, usage = {}, {}
            for path in compile_cuda(root, arch, pathlib.Path(tmp)):
                f, u = disassemble(str(path))
                functions.update(f)
                usage.update(u)
        by_key = {_cuda_key(name, dtype): name for name in functions}
        for vocab in vocabs:
            for launch, key in cuda_launches(dtype):
                found = by_key.get(key) or by_key.get(key.rsplit(":", 1)[0] + ":")
                if found is None:
                    raise RuntimeError(f"no CUDA kernel {key} for {dtype} in the cubins")
                records.append(record(launch, arch, dtype, vocab, functions[found], usage[found], launch.threads, 0))
    return records


def table(records: list[dict[str, Any]]) -> str:
    head = (
        f"{'kernel':<31} {'backend':<7} {'V':>6} {'ent':>3} {'grad':>4} {'regs':>4} {'spill':>5} {'blk/SM':>6} "
        f"{'inst/el':>7} {'exp/el':>6} {'mufu/el':>7} {'rows':>5} {'L2 MB':>6} {'HBM B/tok':>9} {'H100 ms':>8} "
        f"{'bound':>6} {'H200 ms':>8} {'bound':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(
            f"{r['kernel']:<31} {r['backend']:<7} {r['vocab']:>6} {'y' if r['entropy'] else 'n':>3} "
            f"{'y' if r['write_grad'] else 'n':>4} {r['registers']:>4} {r['spills']:>5} {r['blocks_per_sm']:>6} "
            f"{r['instructions_per_element']:>7.2f} {r['exp_per_element']:>6.3f} {r['mufu_per_element']:>7.3f} "
            f"{r['rows_in_flight']:>5} {r['l2_rows_mb']:>6.1f} {r['hbm_bytes_per_token']:>9} "
            f"{r['predicted_ms_h100']:>8.3f} {r['bound']:>6} {r['predicted_ms_h200']:>8.3f} {r['bound_h200']:>6}"
        )
    return "\n".join(lines)


def _key(r: dict[str, Any]) -> tuple:
    return (r["backend"], r["kernel"], r["vocab"], r["entropy"], r["write_grad"])


def markdown(records: list[dict[str, Any]], before: Optional[list[dict[str, Any]]] = None) -> str:
    """The records as a markdown table; with ``before`` (an earlier report), each figure as before → after."""
    old = {_key(r): r for r in before or []}
    fields = (
        ("registers", "regs", "{}"),
        ("spills", "spills", "{}"),
        ("rows_in_flight", "rows in flight", "{}"),
        ("mb_in_flight", "MB in flight", "{}"),
        ("instructions_per_element", "instr/elem", "{:.1f}"),
        ("exp_per_element", "exp/elem", "{:.3g}"),
        ("hbm_bytes_per_token", "HBM B/token", "{}"),
        ("predicted_ms_h100", "H100 ms", "{:.2f}"),
        ("bound", "H100 bound", "{}"),
        ("predicted_ms_h200", "H200 ms", "{:.2f}"),
        ("bound_h200", "H200 bound", "{}"),
    )
    head = ["backend", "kernel", "V", "entropy", "grad"] + [f[1] for f in fields]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        was = old.get(_key(r))
        cells = [r["backend"], f"`{r['kernel']}`", str(r["vocab"]), "y" if r["entropy"] else "n"]
        cells.append("y" if r["write_grad"] else "n")
        for key, _, fmt in fields:
            now = fmt.format(r[key])
            then = None if was is None or was.get(key) is None else fmt.format(was[key])
            cells.append(now if then is None or then == now else f"{then} → {now}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="sm_90a", help="target: sm_80, sm_90 or sm_90a (default: %(default)s)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the records (a JSON list) here")
    parser.add_argument("--no-cuda", action="store_true", help="only the Triton kernels")
    parser.add_argument(
        "--vocab", default=None, help="comma-separated vocabulary sizes (default: " + ",".join(map(str, VOCABS)) + ")"
    )
    parser.add_argument("--source", default=None, help="read the kernels of this checkout instead (before/after)")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="write the table as markdown here")
    parser.add_argument("--before", default=None, metavar="JSON", help="an earlier --json: the markdown shows a → b")


def run(args: argparse.Namespace) -> int:
    global _SOURCE
    arch = args.arch.removeprefix("sm_")
    _SOURCE = pathlib.Path(args.source).resolve() if args.source else None
    if cuobjdump() is None:
        print("fastgrpo static: no cuobjdump (CUDA toolkit, or Triton's bundled one): nothing to read", file=sys.stderr)
        return 2
    vocabs = tuple(int(v) for v in args.vocab.split(",")) if args.vocab else VOCABS
    records = analyze(arch, vocabs=vocabs, cuda=not args.no_cuda and shutil.which("nvcc") is not None)
    print(f"fastgrpo static: sm_{arch}, bf16, N = {TOKENS} ([{BATCH}, {SEQ}, V]); per vocabulary element per thread")
    print(table(records))
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        before = json.loads(pathlib.Path(args.before).read_text()) if args.before else None
        pathlib.Path(args.markdown).write_text(markdown(records, before) + "\n")
        print(f"wrote {args.markdown}")
    return 0
