"""Extreme but valid inputs on every backend, through the public API, against the fp64 oracle
(tests/fp64_oracle.py): the true value, never NaN, and ±inf exactly where the true value exceeds the fp32 range.

The grid: logits at +1e4 and +1e6 (gradient relative error), bf16 logits at ±max with the target at the max,
importance ratios of e^±100 with no clamp for every policy term, k3 against a reference policy 100 nats away
(plain, clamped, straight-through, and the OpenRLHF preset against the installed openrlhf), an all-masked batch,
one token, NaN/inf at masked positions, rewards near 1e20, and an empty vocabulary (a clear error).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastgrpo
from fastgrpo import LossConfig, presets
from fastgrpo.trajectory import linear_grpo_loss as linear_path

import fp64_oracle as oracle
from conftest import DEVICE

EPS32 = torch.finfo(torch.float32).eps
FP32_MAX = torch.finfo(torch.float32).max


def expect(ours: torch.Tensor, truth: torch.Tensor, what: str, rtol: float = 1e-5, scale: float = 0.0) -> None:
    """ours == truth where the fp64 truth is beyond the fp32 range (±inf), else max|ours − truth| ≤ rtol·max|truth|
    (or rtol·scale, for a value that cancels terms of that size) over the finite part, plus the last bit of a
    bf16/fp16 output and fp32's smallest normal (below 1.2e-38 fp32 has no relative precision left); never NaN."""
    last_bit = torch.finfo(ours.dtype).eps if ours.dtype in (torch.bfloat16, torch.float16) else 0.0
    ours, truth = ours.detach().cpu().double(), truth.detach().cpu().double()
    assert ours.shape == truth.shape, f"{what}: shape {list(ours.shape)}, expected {list(truth.shape)}"
    assert not torch.isnan(truth).any(), f"{what}: the oracle is NaN (a test bug)"
    nan = torch.isnan(ours)
    assert not nan.any(), f"{what}: NaN at {nan.nonzero()[:4].tolist()} (truth there {truth[nan][:4].tolist()})"
    beyond = truth.abs() > FP32_MAX
    wrong = beyond & (ours != truth.sign() * torch.inf)
    assert not wrong.any(), (
        f"{what}: truth {truth[wrong][:4].tolist()} exceeds fp32, expected ±inf, got {ours[wrong][:4].tolist()}"
    )
    finite = ~beyond
    if not finite.any():
        return
    scale = max(scale, truth[finite].abs().max().item())
    err = (ours[finite] - truth[finite]).abs()
    bound = rtol * scale + last_bit * truth[finite].abs() + torch.finfo(torch.float32).tiny
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"{what}: error {err[worst]:.3e} > {bound[worst]:.3e} (ours {ours[finite][worst].item():.6e}, truth "
        f"{truth[finite][worst].item():.6e}, max|truth| {scale:.3e})"
    )


def truth_of(logits: torch.Tensor, targets, adv, mask, cfg, **kw):
    """(loss, ∂loss/∂logits, ℓ) of the fp64 oracle."""
    z = logits.detach().double().requires_grad_()
    loss, lp, _ = oracle.grpo_loss(z, targets, adv, mask, cfg, **kw)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad, lp.detach()


def run_grpo(logits, targets, adv, mask, cfg, backend, **kw):
    z = logits.detach().clone().to(DEVICE).requires_grad_()
    to = lambda x: x.to(DEVICE) if isinstance(x, torch.Tensor) else x  # noqa: E731
    out = fastgrpo.grpo_loss(
        z, to(targets), to(adv), to(mask), config=cfg, backend=backend, **{k: to(v) for k, v in kw.items()}
    )
    out.loss.backward()
    return out, z.grad


def oracle_kw(kw: dict) -> dict:
    names = {
        "old_logprobs": "old",
        "ref_logprobs": "ref",
        "sampling_logprobs": "samp",
        "is_weights": "is_weights",
        "normalizer": "normalizer",
    }
    return {names[k]: v for k, v in kw.items()}


# ------------------------------------------------------------------------------------ large logit offsets
def shift_first_fp32(logits: torch.Tensor, targets, adv, mask, cfg, **kw) -> torch.Tensor:
    """∂loss/∂logits computed in fp32 the way the kernels should: relative to the row max, (z − max z)·(1/τ).
    z − max z is exact for these rows (Sterbenz), so this is the accuracy fp32 can reach."""
    z = logits.detach().float().requires_grad_()
    scaled = (z - z.detach().amax(-1, keepdim=True)) * torch.tensor(1.0 / cfg.temperature, dtype=torch.float32)
    loss, _, _ = oracle.grpo_loss(
        scaled, targets, adv, mask, dataclasses.replace(cfg, temperature=1.0), dtype=torch.float32, **kw
    )
    return torch.autograd.grad(loss, z)[0]


def torch_fp32(logits: torch.Tensor, targets, adv, mask, cfg, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ∂loss/∂logits, ℓ) as PyTorch computes them in fp32 (log_softmax of z/τ): the trainers' own accuracy."""
    z = logits.detach().float().requires_grad_()
    loss, lp, _ = oracle.grpo_loss(z, targets, adv, mask, cfg, dtype=torch.float32, **kw)
    return loss.detach(), torch.autograd.grad(loss, z)[0], lp.detach()


def relative_error(ours: torch.Tensor, truth: torch.Tensor) -> float:
    assert torch.isfinite(ours).all()
    return ((ours.cpu().double() - truth).abs().max() / truth.abs().max()).item()


OFFSET_CFG = LossConfig(entropy_coef=0.01, beta=0.04, kl_estimator="k3")


def offset_inputs(offset: float, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape, vocab = (2, 3), 37
    # integer spreads: exactly representable next to 1e4 (ulp 2^-10) and 1e6 (ulp 2^-4)
    logits = (offset + torch.randint(-12, 13, (*shape, vocab), generator=g).float() / 4).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    return logits, targets, torch.randn(shape[0], generator=g), torch.ones(shape), g


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["tau1", "tau0.7"])
@pytest.mark.parametrize("offset", [1e4, 1e6], ids=["plus1e4", "plus1e6"])
def test_large_logit_offset(offset, temperature, backend):
    """A constant offset changes nothing in exact arithmetic, and fp32 keeps full accuracy relative to the row
    max: z − max z is exact here, then scaled by 1/τ (``shift_first_fp32`` measures what that reaches). Computing
    x/τ − (max + log Σ) loses the digits of max + log Σ (the CPU kernel had that bug). With τ ≠ 1, z/τ is rounded
    at its own magnitude before the max is subtracted, as in PyTorch: judged against PyTorch's fp32 error there."""
    cfg = dataclasses.replace(OFFSET_CFG, temperature=temperature)
    logits, targets, adv, mask, g = offset_inputs(offset)
    lp64, _ = oracle.token_logprobs(logits, targets, temperature)
    kw = dict(
        old_logprobs=(lp64 + 0.1 * torch.randn(lp64.shape, generator=g, dtype=torch.float64)).float(),
        ref_logprobs=(lp64 + 0.3 * torch.randn(lp64.shape, generator=g, dtype=torch.float64)).float(),
    )
    loss64, grad64, lp_true = truth_of(logits, targets, adv, mask, cfg, **oracle_kw(kw))
    # fp32 relative to the row max, or PyTorch's own fp32 error where that is larger: with τ ≠ 1 the contract
    # (and every trainer) rounds z/τ at its own magnitude before the max is subtracted
    loss32, grad32, lp32 = torch_fp32(logits, targets, adv, mask, cfg, **oracle_kw(kw))
    reachable = max(
        relative_error(shift_first_fp32(logits, targets, adv, mask, cfg, **oracle_kw(kw)), grad64),
        relative_error(grad32, grad64),
    )
    out, grad = run_grpo(logits, targets, adv, mask, cfg, backend, **kw)
    assert relative_error(grad, grad64) <= 2 * reachable + 4 * EPS32, (
        f"gradient relative error {relative_error(grad, grad64):.2e}, fp32 reaches {reachable:.2e}"
    )
    expect(out.loss, loss64, "loss", rtol=max(1e-5, 2 * relative_error(loss32, loss64)))
    expect(out.logprobs, lp_true, "logprobs", rtol=max(1e-6, 2 * relative_error(lp32, lp_true)))

    # token_logprobs: the same rows, gradient of Σ ℓ
    z = logits.clone().to(DEVICE).requires_grad_()
    fastgrpo.token_logprobs(z, targets.to(DEVICE), temperature=temperature, backend=backend).sum().backward()
    z64 = logits.double().requires_grad_()
    (g64,) = torch.autograd.grad(oracle.token_logprobs(z64, targets, temperature)[0].sum(), z64)
    assert relative_error(z.grad, g64) <= 2 * reachable + 4 * EPS32, (
        f"token_logprobs gradient relative error {relative_error(z.grad, g64):.2e}, fp32 reaches {reachable:.2e}"
    )


@pytest.mark.parametrize("sliced", [False, True], ids=["chunked", "vocab_sliced"])
@pytest.mark.parametrize("offset", [1e4, 1e6], ids=["plus1e4", "plus1e6"])
def test_large_logit_offset_linear(offset, sliced, backend, monkeypatch):
    """The hidden + LM-head path, whose logits are exact here (small integer products plus an offset bias), on
    both gradient passes (token chunks; vocabulary slices, forced small)."""
    if sliced:
        monkeypatch.setitem(linear_path.DW_ACCUMULATOR_BYTES, torch.device(DEVICE).type, 0)
        monkeypatch.setitem(linear_path.SLICE_BYTES, torch.device(DEVICE).type, 8 * 4 * 4)  # 8 rows a slice
    cfg = OFFSET_CFG
    g = torch.Generator().manual_seed(1)
    shape, vocab, hid = (2, 3), 37, 4
    hidden = torch.randint(-2, 3, (*shape, hid), generator=g).float()
    weight = torch.randint(-4, 5, (vocab, hid), generator=g).float() / 4
    bias = torch.full((vocab,), offset)
    targets = torch.randint(0, vocab, shape, generator=g)
    adv, mask = torch.randn(shape[0], generator=g), torch.ones(shape)
    params64 = [x.double().requires_grad_() for x in (hidden, weight, bias)]
    logits64 = params64[0] @ params64[1].t() + params64[2]
    lp64, _ = oracle.token_logprobs(logits64.detach(), targets)
    kw = dict(
        old_logprobs=(lp64 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).float(),
        ref_logprobs=(lp64 + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).float(),
    )
    loss64, _, _ = oracle.grpo_loss(logits64, targets, adv, mask, cfg, **oracle_kw(kw))
    grads64 = torch.autograd.grad(loss64, params64)
    params = [x.clone().to(DEVICE).requires_grad_() for x in (hidden, weight, bias)]
    out = fastgrpo.linear_grpo_loss(
        params[0],
        params[1],
        targets.to(DEVICE),
        adv.to(DEVICE),
        mask.to(DEVICE),
        bias=params[2],
        config=cfg,
        backend=backend,
        **{k: v.to(DEVICE) for k, v in kw.items()},
    )
    out.loss.backward()
    for name, p, t in zip(("hidden", "weight", "bias"), params, grads64):
        assert relative_error(p.grad, t) <= 1e-5, f"{name} gradient relative error {relative_error(p.grad, t):.2e}"
    expect(out.loss, loss64, "loss", rtol=1e-5)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01], ids=["no_entropy", "entropy"])
def test_bf16_max_magnitude_logits(entropy_coef, backend):
    """bf16 logits at ±3.39e38 with the target at the max: x − max overflows fp32 to −inf for the −max entries
    (p = 0, and p·log p = 0, not NaN), and max + log Σ rounds to max (the CPU kernel's gradient was off 36–100×)."""
    big = torch.finfo(torch.bfloat16).max
    next_below = 3.3687e38  # the bf16 below max: its p = e^(−2.7e36) = 0
    rows = torch.zeros(2, 40)  # 40: both the vectorized body and the scalar tail of a CPU row
    rows[0, [3, 20, 7, 11, 30, 38]] = torch.tensor([big, big, 0.5 * big, -big, next_below, 1e30])
    rows[1, [1, 12, 25, 39, 5, 33]] = torch.tensor([-big, big, big, big, next_below, -0.5 * big])
    logits = rows.to(torch.bfloat16).reshape(1, 2, 40)
    targets = torch.tensor([[3, 39]])  # at the max, which two and three entries share
    adv, mask = torch.tensor([0.7]), torch.ones(1, 2)
    cfg = LossConfig(entropy_coef=entropy_coef)
    old = torch.tensor([[-0.6, -1.2]])
    loss64, grad64, lp64 = truth_of(logits, targets, adv, mask, cfg, old=old)
    out, grad = run_grpo(logits, targets, adv, mask, cfg, backend, old_logprobs=old, return_entropy=True)
    expect(out.logprobs, lp64, "logprobs", rtol=1e-6)
    expect(out.loss, loss64, "loss", rtol=1e-6)
    expect(grad, grad64, "grad")
    _, ent64 = oracle.token_logprobs(logits, targets)
    expect(out.entropy, ent64, "entropy", rtol=1e-6)


# --------------------------------------------------------------------------------------- ratio overflow
RATIO_CONFIGS = {
    "ppo": LossConfig(),
    "ppo_ratio_cap": LossConfig(ratio_cap=1.5),
    "ppo_dual_clip": LossConfig(dual_clip=3.0),
    "gspo": LossConfig(ratio_level="sequence"),
    "cispo_verl": LossConfig(policy_loss="cispo", cispo_low=0.8, cispo_high=1.2),
    "cispo_trl": LossConfig(policy_loss="cispo", cispo_high=5.0),
    "sapo": LossConfig(policy_loss="sapo"),
    "reinforce": LossConfig(policy_loss="reinforce"),
}


def far_target_inputs(seed: int = 3):
    """Logits whose target sits 110 below the others: ℓ ≈ −111, so ℓ ∓ 100 are both valid log-probs, and every
    other p is ≥ 1e-2 (a gradient that overflows fp32 overflows in every entry)."""
    g = torch.Generator().manual_seed(seed)
    shape, vocab = (2, 3), 5
    logits = torch.randn(*shape, vocab, generator=g)
    targets = torch.randint(0, vocab, shape, generator=g)
    logits.scatter_(-1, targets.unsqueeze(-1), -110.0)
    lp64, _ = oracle.token_logprobs(logits, targets)
    return logits, targets, torch.ones(shape), lp64


@pytest.mark.parametrize("entry", ["grpo_loss", "policy_loss"])
@pytest.mark.parametrize("adv_sign", [1.0, -1.0], ids=["A>0", "A<0"])
@pytest.mark.parametrize("log_ratio", [100.0, -100.0], ids=["logr+100", "logr-100"])
@pytest.mark.parametrize("variant", RATIO_CONFIGS)
def test_ratio_overflow(variant, log_ratio, adv_sign, entry, backend):
    """ρ = e^±100, no clamp: e^100 = 2.7e43 is beyond fp32, so exp gives inf. The truth: 0 where the branch is
    clipped (0·inf must not become NaN), ±inf where the true loss or gradient exceeds fp32, else the value.
    ``policy_loss``: the same loss on the log-probs, gradient w.r.t. them."""
    cfg = RATIO_CONFIGS[variant]
    logits, targets, mask, lp64 = far_target_inputs()
    adv = adv_sign * torch.tensor([0.7, 1.3])
    old = (lp64 - log_ratio).float()
    if entry == "grpo_loss":
        loss64, grad64, _ = truth_of(logits, targets, adv, mask, cfg, old=old)
        out, grad = run_grpo(logits, targets, adv, mask, cfg, backend, old_logprobs=old)
    else:
        x = lp64.clone().requires_grad_()
        loss64 = oracle.objective(x, adv, mask, cfg, old=old)
        (grad64,) = torch.autograd.grad(loss64, x)
        lp = lp64.float().to(DEVICE).requires_grad_()
        out = fastgrpo.policy_loss(
            lp, adv.to(DEVICE), mask.to(DEVICE), old_logprobs=old.to(DEVICE), config=cfg, backend=backend
        )
        out.loss.backward()
        grad = lp.grad
    expect(out.loss, loss64.detach(), "loss")
    expect(grad, grad64, "grad")


KL_CONFIGS = {
    "k3": LossConfig(beta=0.1, kl_estimator="k3"),
    "k3_output_clamp": LossConfig(beta=0.1, kl_estimator="k3", kl_output_clamp=10.0),
    "k3_verl_clamps": LossConfig(beta=0.1, kl_estimator="k3", kl_input_clamp=20.0, kl_output_clamp=10.0),
    "k3+": LossConfig(beta=0.1, kl_estimator="k3+"),
    "k2": LossConfig(beta=0.1, kl_estimator="k2"),
}


@pytest.mark.parametrize("d", [100.0, -100.0], ids=["D+100", "D-100"])
@pytest.mark.parametrize("variant", KL_CONFIGS)
def test_k3_far_reference(variant, d, backend):
    """D = ℓ − ℓ^ref = ±100: k3 = e^−D + D − 1 is 99 or 2.7e43 (+inf in fp32); clamped estimates have a zero
    gradient beyond the clamp (never 0·inf = NaN); k3+ keeps the value and takes k2's finite gradient."""
    cfg = KL_CONFIGS[variant]
    logits, targets, mask, lp64 = far_target_inputs()
    adv = torch.tensor([0.7, -1.3])
    ref = (lp64 - d).float()
    loss64, grad64, _ = truth_of(logits, targets, adv, mask, cfg, ref=ref)
    out, grad = run_grpo(logits, targets, adv, mask, cfg, backend, ref_logprobs=ref)
    expect(out.loss, loss64, "loss")
    expect(grad, grad64, "grad")


@pytest.mark.parametrize("d", [100.0, -100.0], ids=["D+100", "D-100"])
def test_openrlhf_preset_far_reference(d, backend):
    """presets.openrlhf with k3 and a reference 100 nats away, against the installed openrlhf (PolicyLoss,
    compute_approx_kl, aggregate_loss) run in fp64: it clamps the log-ratio at −10 before exp, then the estimate
    at ±10, so its gradient is finite (0 from the KL) where an unbounded exp gives 0·inf."""
    from test_integration_packages import openrlhf_modules  # skips without the trainers' packages

    utils, loss_module = openrlhf_modules()
    cfg = presets.openrlhf(use_kl_loss=True, init_kl_coef=0.1, kl_estimator="k3")
    logits, targets, mask, lp64 = far_target_inputs()
    g = torch.Generator().manual_seed(4)
    adv = torch.tensor([0.7, -1.3])
    old = (lp64 + 0.2 * torch.randn(lp64.shape, generator=g, dtype=torch.float64)).float()
    ref = (lp64 - d).float()

    z = logits.double().requires_grad_()
    lp, _ = oracle.token_logprobs(z, targets)
    policy, *_ = loss_module.PolicyLoss()(lp, old.double(), adv.double()[:, None].expand_as(lp), mask.double())
    kl = utils.compute_approx_kl(lp, ref.double(), kl_estimator="k3")
    truth = policy + 0.1 * loss_module.aggregate_loss(kl, mask.double())
    (grad64,) = torch.autograd.grad(truth, z)
    out, grad = run_grpo(logits, targets, adv, mask, cfg, backend, old_logprobs=old, ref_logprobs=ref)
    expect(out.loss, truth.detach(), "loss")
    expect(grad, grad64, "grad")


# ----------------------------------------------------------------------------------- masks and layouts
MASK_CONFIGS = {
    "token_mean": LossConfig(beta=0.1, entropy_coef=0.01),
    "seq_mean_token_mean": LossConfig(aggregation="seq_mean_token_mean", beta=0.1),
    "token_sum_norm": LossConfig(aggregation="token_sum_norm", count_empty_sequences=False),
    "gspo": LossConfig(ratio_level="sequence", aggregation="seq_mean_token_mean"),
    "gmpo": LossConfig(policy_loss="gmpo"),
    "rollout_weights": LossConfig(rollout_correction="sequence_truncate", rollout_min=0.5, rollout_max=2.0),
}


def masked_inputs(mask: torch.Tensor, vocab: int = 11, seed: int = 6, poison: bool = True):
    """Inputs with padding ids and (``poison``) NaN and ±inf at every masked position (advantages per token)."""
    g = torch.Generator().manual_seed(seed)
    shape = mask.shape
    logits = 2 * torch.randn(*shape, vocab, generator=g)
    targets = torch.randint(0, vocab, shape, generator=g)
    lp64, _ = oracle.token_logprobs(logits, targets)
    noise = lambda: 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
    kw = dict(
        old_logprobs=(lp64 + noise()).float(),
        ref_logprobs=(lp64 + noise()).float(),
        sampling_logprobs=(lp64 + noise()).float(),
    )
    adv = torch.randn(shape, generator=g)
    keep = mask > 0
    if poison:
        bad = torch.tensor([float("nan"), float("inf"), float("-inf")]).repeat(shape.numel())[: shape.numel()]
        bad = bad.reshape(shape)
        adv = torch.where(keep, adv, bad)
        kw = {k: torch.where(keep, v, bad) for k, v in kw.items()}
    targets = torch.where(keep, targets, -100)
    return logits, targets, adv, kw


@pytest.mark.parametrize("entry", ["grpo_loss", "policy_loss"])
@pytest.mark.parametrize("variant", MASK_CONFIGS)
def test_nonfinite_values_at_masked_positions(variant, entry, backend):
    """NaN/±inf advantages and log-probs (and, for ``policy_loss``, the log-probs themselves) and padding ids at
    masked positions are never read: the reference multiplied NaN advantages by the mask."""
    cfg = MASK_CONFIGS[variant]
    mask = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    logits, targets, adv, kw = masked_inputs(mask)
    if entry == "grpo_loss":
        loss64, grad64, _ = truth_of(logits, targets, adv, mask, cfg, **oracle_kw(kw))
        out, grad = run_grpo(logits, targets, adv, mask, cfg, backend, return_entropy=True, **kw)
        assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.entropy).all()
    else:
        lp64, ent64 = oracle.token_logprobs(logits, targets)
        x = lp64.clone().requires_grad_()
        loss64 = oracle.objective(x, adv, mask, cfg, entropy=ent64, **oracle_kw(kw))
        (grad64,) = torch.autograd.grad(loss64, x)
        lp = torch.where(mask > 0, lp64, float("nan")).float().to(DEVICE).requires_grad_()
        out = fastgrpo.policy_loss(
            lp,
            adv.to(DEVICE),
            mask.to(DEVICE),
            entropy=ent64.float().to(DEVICE),
            config=cfg,
            backend=backend,
            **{k: v.to(DEVICE) for k, v in kw.items()},
        )
        out.loss.backward()
        grad = lp.grad
    expect(out.loss, loss64.detach(), "loss")
    expect(grad, grad64, "grad")


@pytest.mark.parametrize("variant", MASK_CONFIGS)
def test_all_masked_batch(variant, backend):
    """No token counts: the loss is 0 with a zero gradient, not 0/0."""
    cfg = MASK_CONFIGS[variant]
    mask = torch.zeros(2, 3)
    logits, targets, adv, kw = masked_inputs(mask, poison=False)
    out, grad = run_grpo(logits, targets, adv, mask, cfg, backend, return_entropy=True, **kw)
    expect(out.loss, torch.zeros((), dtype=torch.float64), "loss")
    assert torch.all(grad == 0), "all-masked rows get a zero gradient"


@pytest.mark.parametrize("vocab", [1, 7, 4113], ids=["V1", "V7", "V4113_ragged_block"])
@pytest.mark.parametrize("variant", ["token_mean", "gspo", "gmpo"])
def test_one_token(variant, vocab, backend):
    cfg = MASK_CONFIGS[variant]
    logits, targets, adv, kw = masked_inputs(torch.ones(1, 1), vocab, poison=False)
    loss64, grad64, lp64 = truth_of(logits, targets, adv, torch.ones(1, 1), cfg, **oracle_kw(kw))
    out, grad = run_grpo(logits, targets, adv, torch.ones(1, 1), cfg, backend, **kw)
    expect(out.loss, loss64, "loss")
    expect(grad, grad64, "grad")
    expect(out.logprobs, lp64, "logprobs")


# ------------------------------------------------------------------------------------------ reward side
HUGE_REWARD_CONFIGS = {
    "grpo": fastgrpo.AdvantageConfig(),
    "grpo_batch_std": fastgrpo.AdvantageConfig(scale="batch"),
    "dr_grpo": fastgrpo.AdvantageConfig(scale="none"),
    "rloo": fastgrpo.AdvantageConfig(estimator="rloo"),
    "reinforce_baseline": fastgrpo.AdvantageConfig(estimator="reinforce_baseline"),
}


@pytest.mark.parametrize("entry", ["advantages", "grpo_loss_rewards"])
@pytest.mark.parametrize("variant", HUGE_REWARD_CONFIGS)
def test_rewards_near_1e20(variant, entry, backend):
    """(R − mean)² = 1e40 overflows fp32: the std became inf and every advantage 0. The truth is ≈ ±1 (±1e20
    without the division). ``grpo_loss_rewards``: normalized inside the loss call (the fused launch on the kernel
    backends); the loss is a mean of ±A, so it is judged against max|A|."""
    config = HUGE_REWARD_CONFIGS[variant]
    rewards = 1e20 * torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 0.25, 2.0, 8.0])
    truth = oracle.advantages(rewards, 4, **{k: getattr(config, k) for k in ("estimator", "scale", "eps", "singleton")})
    if entry == "advantages":
        expect(fastgrpo.advantages(rewards.to(DEVICE), 4, config=config, backend=backend), truth, "advantages")
        return
    cfg = LossConfig(advantage=config)
    g = torch.Generator().manual_seed(7)
    logits, targets = torch.randn(8, 2, 5, generator=g), torch.randint(0, 5, (8, 2), generator=g)
    mask = torch.ones(8, 2)
    loss64, grad64, _ = truth_of(logits, targets, truth, mask, cfg)
    z = logits.clone().to(DEVICE).requires_grad_()
    out = fastgrpo.grpo_loss(
        z,
        targets.to(DEVICE),
        mask=mask.to(DEVICE),
        rewards=rewards.to(DEVICE),
        group_size=4,
        config=cfg,
        backend=backend,
    )
    out.loss.backward()
    expect(out.loss, loss64, "loss", scale=truth.abs().max().item())
    expect(z.grad, grad64, "grad")


# ------------------------------------------------------------------------------------- empty vocabulary
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "all_masked"])
@pytest.mark.parametrize("entry", ["grpo_loss", "token_logprobs", "linear_grpo_loss"])
def test_empty_vocabulary_is_a_clear_error(entry, masked, backend):
    """V = 0 has no distribution: one clear ValueError about the empty vocabulary, on every backend, masked or
    not (triton returned 0, the reference an internal IndexError, the CPU op a message about the targets)."""
    targets = torch.zeros(2, 3, dtype=torch.long, device=DEVICE)
    mask = torch.full((2, 3), 0.0 if masked else 1.0, device=DEVICE)
    adv = torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match=r"(?i)vocab|V ?= ?0|empty"):
        if entry == "grpo_loss":
            fastgrpo.grpo_loss(
                torch.zeros(2, 3, 0, device=DEVICE, requires_grad=True), targets, adv, mask, backend=backend
            )
        elif entry == "token_logprobs":
            fastgrpo.token_logprobs(torch.zeros(2, 3, 0, device=DEVICE, requires_grad=True), targets, backend=backend)
        else:
            fastgrpo.linear_grpo_loss(
                torch.ones(2, 3, 4, device=DEVICE, requires_grad=True),
                torch.zeros(0, 4, device=DEVICE, requires_grad=True),
                targets,
                adv,
                mask,
                backend=backend,
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("offset", [1e4, 1e6, 3e9])
def test_confident_target_at_large_logits_and_temperature(offset, dtype, backend):
    """The target at the row max, the rest at least 100 below, τ = 0.7: ℓ = −log(1 + Σ e^(−100/τ)) and H are 0 to
    fp32 (not the rounding of max/τ: 2e-4 at 1e4, 0.04 at 1e6), and the gradient 0 (the other p underflow); at
    |z/τ| ≥ 2^31 the rounding of max/τ alone exceeds 88, so a kernel that subtracts a rounded max/τ from an exact
    product overflows its exponentials. The difference z − max is taken first, exactly."""
    gap = max(100.0, 4 * torch.finfo(dtype).eps * offset)  # distinct values in the dtype
    logits = (offset - gap * torch.arange(5, dtype=torch.float64)).expand(1, 2, 5).to(dtype)
    targets = torch.zeros(1, 2, dtype=torch.long)
    z = logits.clone().to(DEVICE).requires_grad_()
    lp, ent = fastgrpo.token_logprobs(z, targets.to(DEVICE), temperature=0.7, entropy=True, backend=backend)
    (lp + ent).sum().backward()
    assert (lp.abs() <= 1e-6).all(), lp
    assert (ent.abs() <= 1e-6).all(), ent
    assert torch.isfinite(z.grad).all() and (z.grad.float().abs() <= 1e-6).all(), z.grad
