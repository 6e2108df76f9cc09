"""The public surface: README example, CLI, module wrapper, backend selection, output contract."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import fastgrpo
from fastgrpo import backends, presets

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["out"].loss)
    assert namespace["logits"].grad is not None


def test_cli_check_passes():
    result = subprocess.run(
        [sys.executable, "-m", "fastgrpo", "check", "--device", "cpu"], capture_output=True, text=True, check=True
    )
    assert "all passed" in result.stdout and "FAIL" not in result.stdout


def test_module_wrapper_matches_function():
    cfg = presets.verl(loss_mode="gspo")
    logits = torch.randn(2, 3, 11)
    targets, adv = torch.randint(0, 11, (2, 3)), torch.tensor([0.5, -1.0])
    module = fastgrpo.GRPOLoss(cfg)
    assert "ratio_level='sequence'" in repr(module)
    torch.testing.assert_close(
        module(logits, targets, adv).loss, fastgrpo.grpo_loss(logits, targets, adv, config=cfg).loss
    )


def test_backend_selection():
    cpu = torch.device("cpu")
    available = backends.available(cpu)
    assert available[-1] == "reference"
    assert backends.select("auto", cpu) is backends.select(available[0], cpu)
    assert isinstance(backends.select("reference", cpu), backends.ReferenceBackend)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cpu tensors"):
        backends.select("cuda", cpu)


def test_cpu_extension_is_built_and_auto_uses_it():
    """CI builds the C++ extension: auto must pick it for CPU tensors, with the CUDA kernels registered too
    wherever a CUDA toolkit was there to compile them (CI's machine has nvcc)."""
    import shutil

    assert backends.available(torch.device("cpu"))[0] == "cpu"
    assert backends._load("cpu") is not None
    toolkit = shutil.which("nvcc") or os.environ.get("CUDA_HOME") or os.path.exists("/usr/local/cuda/bin/nvcc")
    if toolkit and os.environ.get("FASTGRPO_NO_CUDA") != "1":
        assert backends._load("cuda") is not None, "the extension was built without its CUDA kernels"


def test_triton_on_cpu_needs_the_interpreter():
    code = (
        "import os, torch, fastgrpo.backends as b; os.environ.pop('TRITON_INTERPRET', None)\n"
        "try: b.select('triton', torch.device('cpu'))\n"
        "except RuntimeError as e: assert 'TRITON_INTERPRET=1' in str(e); print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "ok"


def test_output_contract():
    logits = torch.randn(2, 4, 9, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 9, (2, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = fastgrpo.grpo_loss(
        logits,
        targets,
        torch.ones(2),
        mask,
        return_entropy=True,
        config=fastgrpo.LossConfig(beta=0.1),
        ref_logprobs=torch.zeros(2, 4),
    )
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (2, 4) and not out.logprobs.requires_grad
    assert out.entropy.shape == (2, 4) and torch.all(out.logprobs[mask == 0] == 0)
    assert all(v.dim() == 0 for v in out.metrics.values())
    assert {
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "clip_ratio/dual",
        "kl",
        "ppo_kl",
        "entropy",
        "ratio/mean",
        "ratio/min",
        "ratio/max",
        "grad_active_fraction",
    } <= set(out.metrics)
    out.loss.backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.all(logits.grad[mask == 0] == 0)


def test_grad_active_fraction_counts_unclipped_tokens():
    # token 0: ρ = 2 with A > 0 is clipped (no gradient); token 1: ρ = 1 is not.
    lp = torch.tensor([[0.0, 0.0]])
    out = fastgrpo.policy_loss(lp, torch.ones(1), old_logprobs=torch.tensor([[-0.6931472, 0.0]]))
    assert out.metrics["grad_active_fraction"].item() == 0.5
