"""The static cost model (``python -m fastgrpo static``): SASS parsing and loop costs on code counted by hand, a
small CUDA kernel compiled here, the occupancy and the bounds on figures worked out by hand, and the report of the
real kernels (the issue's acceptance: the fused loss at V = 151936 bf16 is memory-bound on an H100 with one read
and one write of the logits)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fastgrpo.bench import static as S

# A loop as cuobjdump prints it: 12 instructions from 0x0100 to the backward branch at 0x01b0, one 128-bit load of
# 8 bf16 logits, two exponentials, one of them ex2, one FFMA; then a store-only loop (not a row pass) and the exit.
SASS = """
        code for sm_90a
                Function : toy_kernel
        .headerflags    @"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                               /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_TID.X ;                                   /* 0x0000000000007919 */
        /*0100*/                   LDG.E.128 R4, desc[UR4][R2.64] ;                     /* 0x0000000402047981 */
        /*0110*/                   PRMT R8, RZ, 0x5410, R4 ;                            /* 0x00005410ff087816 */
        /*0120*/                   FFMA R8, R8, R10, -R11 ;                             /* 0x0000000a08087223 */
        /*0130*/                   MUFU.EX2 R8, R8 ;                                    /* 0x0000000800087308 */
        /*0140*/                   MUFU.RCP R9, R8 ;                                    /* 0x0000000800097308 */
        /*0150*/                   FADD R12, R12, R8 ;                                  /* 0x0000000c0c0c7221 */
        /*0160*/                   FMNMX R13, R13, R8, !PT ;                            /* 0x000000080d0d7209 */
        /*0170*/                   IADD3 R2, P0, R2, 0x10, RZ ;                         /* 0x0000001002027810 */
        /*0180*/                   ISETP.GE.AND P1, PT, R2, R14, PT ;                   /* 0x0000000e0200720c */
        /*0190*/                   IADD3.X R3, RZ, R3, RZ, P0, !PT ;                    /* 0x0000000303037210 */
        /*01a0*/                   NOP ;                                                /* 0x0000000000007918 */
        /*01b0*/              @!P1 BRA 0x100 ;                                          /* 0xfffffffc00d09947 */
        /*01c0*/                   STG.E.U16 desc[UR4][R2.64], RZ ;                     /* 0x000000ff02007986 */
        /*01d0*/               @P2 BRA 0x1c0 ;                                          /* 0xfffffffc00f82947 */
        /*01e0*/                   EXIT ;                                               /* 0x000000000000794d */
"""


def test_parse_and_count_by_hand():
    ((name, code),) = S.parse_sass(SASS).items()
    assert name == "toy_kernel" and len(code) == 17
    bodies = S.loops(code)
    assert [len(b) for b in bodies] == [2, 12]  # the store loop, the row loop
    cost = S.loop_cost(bodies[1], element_bytes=2)
    assert cost.instructions == 12 and cost.elements == 8.0  # 16 bytes of bf16
    assert (cost.ex2, cost.mufu, cost.fma) == (1, 2, 1)
    assert cost.loads == {16: 1} and not cost.stores
    found = S.hot_loops(code, element_bytes=2)
    assert set(found) == {"stats"}  # the store loop has no load and no exponential: not a pass
    assert found["stats"].per_element(found["stats"].instructions) == 12 / 8


def test_loops_are_innermost():
    """A persistent kernel's loop over rows holds the passes' loops: only those count."""
    lines = [f"/*{16 * i:04x}*/ FADD R1, R1, R2 ;" for i in range(8)]
    lines[3] = "/*0030*/ @P0 BRA 0x10 ;"  # inner loop 0x10..0x30
    lines[7] = "/*0070*/ @P1 BRA 0x0 ;"  # outer loop 0x0..0x70
    ((_, code),) = S.parse_sass("Function : k\n" + "\n".join(lines)).items()
    assert [(b[0].address, b[-1].address) for b in S.loops(code)] == [(0x10, 0x30)]


def test_occupancy_and_bounds_by_hand():
    h100 = S.GPUS["h100"]
    # 256 threads × 128 registers = 32 K of 64 K: 2 blocks; × 64: 4; × 40 = 1280 per warp (a multiple of the 256 of
    # the allocation unit): 65536 / (1280 · 8) = 6; × 41 = 1312 → 1536 per warp: 65536 / (1536 · 8) = 5; 512-thread
    # blocks of 32 registers: capped by 2048 threads at 4; 100 KB of shared memory: 228 KB / 100 KB = 2
    assert S.blocks_per_sm(h100, 256, 128, 0) == 2
    assert S.blocks_per_sm(h100, 256, 64, 0) == 4
    assert S.blocks_per_sm(h100, 256, 40, 0) == 6
    assert S.blocks_per_sm(h100, 256, 41, 0) == 5
    assert S.blocks_per_sm(h100, 512, 32, 0) == 4
    assert S.blocks_per_sm(h100, 128, 32, 100 * 1024) == 2
    # 1000 tokens × 1e6 elements: 4 instructions per element on 132 SMs = 4e9 / (132 · 128 · 1.98e9) s
    ms, bound = S.predict(h100, 1000, 10**6, {"stats": 4.0}, 0.5, 100.0, 1000)
    assert bound == "issue" and ms == pytest.approx(4e9 / (132 * 128 * 1.98e9) * 1e3)
    ms, bound = S.predict(h100, 1000, 10**6, {"stats": 4.0}, 16.0, 100.0, 1000)  # 16 MUFU per element
    assert bound == "mufu" and ms == pytest.approx(16e9 / (132 * 16 * 1.98e9) * 1e3)
    ms, bound = S.predict(h100, 1000, 10**6, {"stats": 4.0}, 0.5, 4e6, 1000)  # 4 MB per token
    assert bound == "memory" and ms == pytest.approx(4e9 / 3.35e12 * 1e3)
    # 10 rows in flight: only 10 SMs issue
    ms10, _ = S.predict(h100, 1000, 10**6, {"stats": 4.0}, 0.5, 100.0, 10)
    assert ms10 == pytest.approx(4e9 / (10 * 128 * 1.98e9) * 1e3)


def _toolkit():
    if S.cuobjdump() is None or shutil.which("nvcc") is None:
        pytest.skip("needs nvcc and cuobjdump (CUDA toolkit, or Triton's bundled cuobjdump)")


# Four fp32 elements per thread and iteration: a float4 load, four ex2, a float4 store.
TOY_CUDA = r"""
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
extern "C" __global__ void toy_exp2(const float4* x, float4* y, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    float4 v = x[i];
    v.x = ex2(v.x); v.y = ex2(v.y); v.z = ex2(v.z); v.w = ex2(v.w);
    y[i] = v;
  }
}
"""


def test_a_cuda_kernel_counted_by_hand(tmp_path):
    _toolkit()
    src = tmp_path / "toy.cu"
    src.write_text(TOY_CUDA)
    cubin = tmp_path / "toy.cubin"
    subprocess.run(["nvcc", "-cubin", "-O3", "-arch=sm_90a", str(src), "-o", str(cubin)], check=True)
    functions, usage = S.disassemble(str(cubin))
    code = functions["toy_exp2"]
    assert usage["toy_exp2"]["local"] == 0
    found = S.hot_loops(code, element_bytes=4)
    assert set(found) == {"grad"}  # loads, stores and exponentials: a gradient-like pass
    loop = found["grad"]
    # by hand: per iteration one 128-bit load, four MUFU.EX2, one 128-bit store, for 4 fp32 elements (an unrolled
    # loop keeps the ratios)
    n = loop.loads[16]
    assert loop.loads == {16: n} and loop.stores == {16: n} and loop.elements == 4 * n
    assert loop.ex2 == loop.mufu == 4 * n
    # and the bookkeeping: index, bound test, branch, address arithmetic; a handful per iteration, not more
    assert 6 * n <= loop.instructions <= 6 * n + 12


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    _toolkit()
    out = tmp_path_factory.mktemp("static") / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "fastgrpo", "static", "--vocab", "151936", "--no-cuda", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())


def test_report_of_the_kernels(report):
    required = (
        "kernel backend arch dtype vocab entropy write_grad registers spills instructions_per_element "
        "exp_per_element hbm_bytes_per_token rows_in_flight predicted_ms_h100 predicted_ms_h200 bound"
    ).split()
    assert len(report) == 8  # 2 token_logprobs × 2 + grpo_loss 2 × 2, at one vocabulary
    for r in report:
        assert all(k in r for k in required), r
        assert r["backend"] == "triton" and r["dtype"] == "bf16" and r["vocab"] == 151936
        assert r["spills"] == 0 and r["bound"] in ("memory", "issue", "mufu")
        # one exponential per element per pass, plus the rescales: one per group of 8 bf16 in the statistics pass
        passes = len(r["passes"])
        assert passes <= r["exp_per_element"] <= passes + 0.125 + 1e-9
        if passes == 2:  # the rows in flight fit in half of L2: the second read hits it
            assert r["rows_in_flight"] * 151936 * 2 <= 0.5 * S.GPUS["h100"].l2_bytes
    fused = next(r for r in report if r["kernel"] == "grpo_loss_fwd_kernel" and r["write_grad"] and not r["entropy"])
    row = 151936 * 2
    assert fused["bound"] == "memory"
    assert row * 2 <= fused["hbm_bytes_per_token"] <= row * 2 + 256  # 1 read + 1 write (+ the token's scalars)


def test_skips_cleanly_without_a_toolkit(monkeypatch, capsys):
    monkeypatch.setattr(S, "cuobjdump", lambda: None)
    import argparse

    parser = argparse.ArgumentParser()
    S.add_arguments(parser)
    assert S.run(parser.parse_args([])) == 2
    assert "no cuobjdump" in capsys.readouterr().err


def test_the_launch_grid_bounds_the_rows_in_flight(monkeypatch):
    """What the launchers run: on an H100-sized L2 the fused loss with its gradient gets ⌊25 MiB / row⌋ programs,
    the single-pass kernels a program per row; under the interpreter several rows per program (the persistent loop
    is what the tests run)."""
    import types

    import torch

    from fastgrpo import _library

    props = types.SimpleNamespace(L2_cache_size=50 * 1024**2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda, row = torch.device("cuda"), 151936 * 2
    assert _library.programs_for(cuda, 16384, row, reread=True) == 86
    assert _library.programs_for(cuda, 16384, 256000 * 2, reread=True) == 51
    assert _library.programs_for(cuda, 40, row, reread=True) == 40  # fewer rows than the bound
    assert _library.programs_for(cuda, 16384, row, reread=False) == 16384
    assert 1 < _library.programs_for(torch.device("cpu"), 64, 1000 * 4, reread=False) < 64


def test_nvcc_flags_are_the_builds():
    """The report compiles csrc/cuda with setup.py's code-generation flags: a flag added to the build (fast math,
    another -O) changes the SASS the report must describe."""
    import ast
    import pathlib

    tree = ast.parse((pathlib.Path(__file__).parents[1] / "setup.py").read_text())
    (flags,) = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets)
    ]
    assert tuple(flags) == S.NVCC_FLAGS
