"""The suite's cases under pytest-benchmark: ``pytest bench/ [--benchmark-json out.json]``.

The same cases as ``python -m fastgrpo bench --quick`` (module per op in ``fastgrpo.bench``), one benchmark
per (case, provider), grouped by case so each group compares the providers and the roofline side by side.
The CLI adds the roofline fractions, peak memory, CSV/JSON and the plot.
"""

import pytest
import torch

from fastgrpo.bench import advantages, grpo_loss, linear_grpo_loss, token_logprobs
from fastgrpo.bench.common import sizes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = "bf16" if DEVICE == "cuda" else "fp32"
N, V = sizes(DEVICE, quick=True)
LN, LH, LV = linear_grpo_loss.sizes(DEVICE, quick=True)
BUILDERS = {
    "token_logprobs": lambda: token_logprobs.cases(DEVICE, DTYPE, N[:1], V, ["fwd+bwd"]),
    "grpo_loss": lambda: grpo_loss.cases(DEVICE, DTYPE, N[:1], V, ["fwd+bwd"]),
    "linear_grpo_loss": lambda: linear_grpo_loss.cases(DEVICE, DTYPE, LN[:1], LH, LV, ["fwd+bwd"]),
    "advantages": lambda: advantages.cases(DEVICE, advantages.sizes(DEVICE, quick=True)[1:]),
}
PROVIDERS = ["roofline", "fastgrpo", "eager reference", "torch.compile reference"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", list(BUILDERS))
def test_op(benchmark, op, provider):
    (case,) = BUILDERS[op]()
    candidates = {"roofline": case.roofline, **case.providers}
    name = next((k for k in candidates if k == provider or k.startswith(provider + " (")), None)
    if name is None or candidates[name] is None:
        pytest.skip(f"{provider} not available for {op} on {DEVICE}")
    p = candidates[name]
    shape = "x".join(f"{k}{v}" for k, v in case.shape.items())
    benchmark.group = f"{op} {case.mode} {shape}"
    benchmark.extra_info.update(case.shape, bytes=case.bytes, flops=case.flops, provider=name)
    p.run(p.make())  # warm-up (torch.compile)
    benchmark.pedantic(p.run, setup=lambda: ((p.make(),), {}), rounds=5, iterations=1)
