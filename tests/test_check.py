"""``python -m fastgrpo check`` (fastgrpo/check.py): the small grid passes on this machine's backends (C++ CPU and
Triton under the interpreter here), the full grid covers every axis, and a backend whose results are perturbed
fails (a checker that cannot fail checks nothing)."""

import dataclasses

import pytest
import torch

from fastgrpo import __main__ as cli
from fastgrpo import backends
from fastgrpo import check as grid_check

from conftest import DEVICE, KERNEL_BACKENDS, kernel_backend


@pytest.fixture
def one_thread():
    """The small grid's tensors are too small for intra-op threads, which only spin against the other test workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_small_grid_passes(capsys, one_thread):
    for name in KERNEL_BACKENDS:
        kernel_backend(name)  # skips, naming why, when one is not built
    passed = grid_check.check(torch.device(DEVICE), "small", KERNEL_BACKENDS)  # triton: interpreted on a CPU machine
    out = capsys.readouterr().out
    failures = [line for line in out.splitlines() if "FAIL" in line]
    assert passed and not failures, "\n".join(failures)
    rows = len(grid_check.grid("small")) * len(KERNEL_BACKENDS)
    assert f"{rows} checks" in out and "all passed" in out


def test_full_grid_covers_every_axis():
    cases = grid_check.grid("full")
    qwen, llama, gemma = 151936, 128256, 256000
    assert len(cases) == len(set(cases)) and len(cases) <= 300  # the runtime budget of the module docstring
    loss = [c for c in cases if c.op == "grpo_loss"]
    for variant in grid_check.LOSS_VARIANTS:
        assert {c.dtype for c in loss if c.variant == variant and c.vocab == qwen} == set(grid_check.DTYPES)
    assert {c.variant for c in loss if c.rewards} == set(grid_check.ADVANTAGE_CONFIGS)
    for op in ("grpo_loss", "token_logprobs", "linear_grpo_loss"):
        assert {c.vocab for c in cases if c.op == op} == {qwen, llama, gemma}
        assert {(c.vocab, c.dtype) for c in cases if c.op == op} >= {
            (v, d) for v in (qwen, llama, gemma) for d in grid_check.DTYPES
        }
    assert {c.layout for c in loss} == set(grid_check.LAYOUTS)
    assert {c.vocab for c in loss if c.inplace} == {qwen, llama, gemma}
    assert {c.variant for c in loss if c.compiled} == {grid_check.FUSED, grid_check.TWO_PHASE}
    assert {c.variant for c in cases if c.op == "token_logprobs"} == set(grid_check.TOKEN_LOGPROBS_VARIANTS)
    assert {c.variant for c in cases if c.op == "advantages"} == set(grid_check.ADVANTAGE_CONFIGS)
    assert {c.op for c in grid_check.grid("small")} == {c.op for c in cases}


# One fp32 case of the fused loss: the bound is the rounding floor, so each perturbation below is far outside it.
FP32_CASE = grid_check.Case("grpo_loss", grid_check.FUSED, torch.float32, grid_check.GRIDS["small"].vocabs[0])


def _plus_loss(out, logits):
    return dataclasses.replace(out, loss=out.loss + 1e-3)


def _plus_gradient(out, logits):
    """+1e-3 on ∂loss/∂logits[..., 0] of every token, the loss value unchanged."""
    first = logits[..., 0].float()
    return dataclasses.replace(out, loss=out.loss + 1e-3 * (first - first.detach()).sum())


def _nan_logprob(out, logits):
    logprobs = out.logprobs.clone()
    logprobs.view(-1)[0] = float("nan")  # an unmasked token: the reference's value there is finite
    return dataclasses.replace(out, logprobs=logprobs)


def _raises(out, logits):
    raise RuntimeError("a kernel that crashed")


@pytest.mark.parametrize(
    "mutation, named",
    [(_plus_loss, "FAIL loss"), (_plus_gradient, "FAIL ∂logits"), (_nan_logprob, "logprobs infx"), (_raises, "raised")],
    ids=["loss", "gradient", "nan", "exception"],
)
def test_a_perturbed_backend_fails(mutation, named, monkeypatch, capsys):
    name = KERNEL_BACKENDS[-1]  # the C++ (or CUDA) backend: the fastest here
    kernel_backend(name)
    assert grid_check.check(torch.device(DEVICE), "small", [name], [FP32_CASE])  # passes unperturbed
    original = backends.KernelBackend.grpo_loss

    def perturbed(self, logits, *args):
        return mutation(original(self, logits, *args), logits)

    monkeypatch.setattr(backends.KernelBackend, "grpo_loss", perturbed)
    assert not grid_check.check(torch.device(DEVICE), "small", [name], [FP32_CASE])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "FAIL" in line and "FAILED" not in line]
    assert len(rows) == 1 and named in rows[0] and "1 FAILED" in out, out


def test_no_backend_to_check_fails(capsys):
    """Without a compiled backend there is nothing to compare with the reference: the check fails, never '0 checks:
    all passed'."""
    assert not grid_check.check(torch.device("cpu"), "small", [], [FP32_CASE])
    assert "no compiled backend to check" in capsys.readouterr().out


@pytest.mark.parametrize(
    "options, grid, names",
    [([], "small", None), (["--grid", "full", "--backend", "cpu", "--backend", "triton"], "full", ["cpu", "triton"])],
)
@pytest.mark.parametrize("passed", [True, False])
def test_cli_picks_the_grid_and_exit_code(options, grid, names, passed, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "check", lambda *args: calls.append(args) or passed)
    assert cli.main(["check", "--device", "cpu", *options]) == (0 if passed else 1)
    assert calls == [(torch.device("cpu"), grid, names)]
