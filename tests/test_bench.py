"""Byte counts of the benchmarks against hand-computed values."""

import importlib.util
import pathlib

import torch

spec = importlib.util.spec_from_file_location(
    "bench_grpo_loss", pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_grpo_loss.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_logits_bytes():
    # 16384 × 151936 = 2,489,319,424 entries × 2 bytes (bf16), read once + written once: 9,957,277,696 bytes
    assert bench.logits_bytes(16384, 151936, torch.bfloat16) == 9_957_277_696
    assert bench.logits_bytes(4, 10, torch.float32) == 320
