"""Property tests: the public API (``grpo_loss``, ``policy_loss``, ``token_logprobs``, ``advantages``) on every
backend, on random shapes, dtypes, scales, masks, temperatures and configs, against the fp64 oracle
(tests/fp64_oracle.py, written from docs/MATH.md, not from fastgrpo.reference).

Accuracy is judged against PyTorch's own error, elementwise:
    |ours − truth| ≤ K·max|torch − truth| + 2·floor + ε(output dtype)·|truth| + 1e-6·max(1, max|truth|)
- "torch" is the same formula in fp32 on the same inputs (MATH §6 promises fp32 accumulation whatever the input
  dtype), its gradient rounded to the input dtype as autograd would;
- "floor" is the rounding no fp32 implementation avoids, propagated to first order through the fp64 truth
  (its gradient and Hessian): ℓ and H are fp32 values (ε·|ℓ|), and with τ ≠ 1 each z/τ is rounded (ε·|z/τ|,
  cancelling for the row max). Without it a single lucky rounding of PyTorch's on a one-token example would
  fail a correct kernel at |z/τ| ~ 1e4; with it, the CPU kernel's x/τ − (max + log Σ) still fails (its error
  sits where the truth, and so the floor, is ~0).
Outputs must be finite: every input here has a finite truth (asserted, so a failure blames the right side).

Inputs are built so that no value sits within ``MARGIN`` of a kink of the loss (a clip bound, a clamp, |D| = 0
for ``abs``, a rollout-mask bound): there the gradient of the fp32 and fp64 computations may legitimately take
different branches. Kinks themselves are covered by tests/test_extreme_values.py and the hand-worked values.

Reproducible: ``derandomize=True`` and no example database, so CI runs the same examples every time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import pytest
import torch

import fastgrpo
from fastgrpo import LossConfig

import fp64_oracle as oracle
from conftest import DEVICE, KERNEL_BACKENDS, kernel_backend

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BACKENDS = ["reference", *KERNEL_BACKENDS]
K = 2.0
ROUNDING = 1e-6  # fp32 arithmetic on O(1) values, relative to max(1, max|truth|)
EPS32 = torch.finfo(torch.float32).eps
MARGIN = 0.05  # in log-ratio units: 5× the fp32 error of ℓ at |z/τ| = 6e4 (ε·6e4 = 7e-3)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
AGGREGATIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"]


def examples(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------------------------------------------ bounds
def check(ours: torch.Tensor, truth: torch.Tensor, same: torch.Tensor, what: str, floor=0.0) -> None:
    """ours finite and within the bound of the module docstring of the fp64 truth, elementwise."""
    assert torch.isfinite(truth).all(), f"{what}: the oracle itself is not finite (a test bug)"
    assert ours.shape == truth.shape, f"{what}: shape {list(ours.shape)}, expected {list(truth.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite output {ours.flatten()[:8].tolist()}"
    if ours.numel() == 0:
        return
    truth = truth.double()
    err = (ours.double() - truth).abs()
    torch_err = (same.double() - truth).abs().max().item()
    bound = (
        K * torch_err
        + 2 * torch.as_tensor(floor, dtype=torch.float64)
        + torch.finfo(ours.dtype).eps * truth.abs()
        + ROUNDING * max(1.0, truth.abs().max().item())
    )
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"{what}: error {err.flatten()[worst]:.3e} > bound {bound.flatten()[worst]:.3e} at flat index {int(worst)} "
        f"(ours {ours.flatten()[worst].item():.6e}, truth {truth.flatten()[worst].item():.6e}; "
        f"PyTorch fp32 max error {torch_err:.3e})"
    )


@dataclasses.dataclass
class Floors:
    """What fp32 rounding of ℓ, H and p costs at least, propagated to first order (fp64 tensors)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    loss: torch.Tensor
    grad_logprobs: torch.Tensor
    grad_entropy: torch.Tensor
    grad: Optional[torch.Tensor]  # ∂loss/∂logits


def rounding_floors(
    objective,
    lp: torch.Tensor,
    ent: torch.Tensor,
    err_lp: torch.Tensor,
    err_ent: torch.Tensor,
    probs: Optional[tuple] = None,
    temperature: float = 1.0,
) -> Floors:
    """Propagates the unavoidable errors err_lp, err_ent of the fp32 log-probs and entropies through the loss
    ``objective(lp, ent)`` (its gradient and Hessian at the fp64 truth) and, given ``probs`` = (log p [.., V],
    relative error of p [.., V], targets), into ∂loss/∂logits = [g_ℓ·(1[v = y] − p) − g_H·p·(log p + H)]/τ."""
    lp, ent = lp.detach().requires_grad_(), ent.detach().requires_grad_()
    g_lp, g_ent = torch.autograd.grad(objective(lp, ent), (lp, ent), allow_unused=True, materialize_grads=True)
    n = lp.numel()
    hess = torch.autograd.functional.hessian(objective, (lp.detach(), ent.detach()))
    block = lambda i, j: hess[i][j].reshape(n, n).abs()  # noqa: E731
    e_lp, e_ent = err_lp.reshape(n), err_ent.reshape(n)
    err_g_lp = (block(0, 0) @ e_lp + block(0, 1) @ e_ent).reshape(lp.shape)
    err_g_ent = (block(1, 0) @ e_lp + block(1, 1) @ e_ent).reshape(lp.shape)
    loss = (g_lp.abs() * err_lp + g_ent.abs() * err_ent).sum()
    grad = None
    if probs is not None:
        logp, rel, targets = probs
        p = logp.exp()
        onehot = torch.nn.functional.one_hot(targets.long().clamp(min=0), logp.shape[-1]).double()
        c = lambda x: x.unsqueeze(-1)  # noqa: E731
        spread = (logp + c(ent.detach())).abs()
        grad = (
            c(err_g_lp) * (onehot - p).abs()
            + c(g_lp.abs()) * p * rel
            + c(err_g_ent) * p * spread
            + c(g_ent.abs()) * p * (rel * (spread + 1) + c(err_ent))
        ) / temperature
    return Floors(err_lp, err_ent, loss, err_g_lp, err_g_ent, grad)


def logit_errors(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple:
    """(log p, relative error of p, error of ℓ, error of H) that every fp32 implementation of MATH §1 carries:
    with τ ≠ 1 each z/τ is rounded (δ = ε·max|z/τ|), which cancels only for the row max (everything relative to
    it); then the fp32 rounding of each log p."""
    z = logits.double() / temperature
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    delta = EPS32 * z.abs().amax(-1, keepdim=True) if temperature != 1.0 else torch.zeros_like(z[..., :1])
    is_max = z == z.amax(-1, keepdim=True)
    rel = delta * ((~is_max).double() + 1 - p.amax(-1, keepdim=True)) + EPS32 * (2 + logp.abs().clamp(max=100))
    y = targets.long().clamp(min=0).unsqueeze(-1)
    err_lp = rel.gather(-1, y).squeeze(-1)
    err_ent = ((logp + 1).abs() * p * rel).sum(-1) + EPS32 * (1 + (-(p * logp).sum(-1)).abs())
    return logp, rel, err_lp, err_ent


# -------------------------------------------------------------------------------------- kinks and inputs
def _clear_of(x: torch.Tensor, kinks: list[float]) -> torch.Tensor:
    """x moved by steps of 2·MARGIN until no entry lies within MARGIN of a kink."""
    for _ in range(200):
        near = torch.zeros_like(x, dtype=torch.bool)
        for k in kinks:
            near |= (x - k).abs() < MARGIN
        if not near.any():
            return x
        x = torch.where(near, x + 2 * MARGIN, x)
    raise AssertionError("could not move the inputs off the kinks")


def _rows_clear_of(x: torch.Tensor, m: torch.Tensor, kinks: list[float], mean: bool) -> torch.Tensor:
    """Shift each row of x so that its statistic Σ m·x / (max(Σ m, 1) if mean else 1) is clear of the kinks."""
    count = m.sum(1, keepdim=True)
    denom = count.clamp(min=1) if mean else torch.ones_like(count)
    stat = (x * m).sum(1, keepdim=True) / denom
    shift = _clear_of(stat, kinks) - stat
    return x + torch.where(count > 0, shift * denom / count.clamp(min=1e-12), 0.0)


def _k_inverse(estimator: str, c: float) -> list[float]:
    """The D where the KL estimate k(D) equals ±c (the output clamp's kinks)."""
    name = estimator.rstrip("+")
    if name in ("k1", "abs"):
        return [-c, c]
    if name == "k2":
        return [-math.sqrt(2 * c), math.sqrt(2 * c)]

    def solve(lo, hi):  # k3 is monotone on each side of 0
        f = lambda d: math.expm1(-d) + d - c  # noqa: E731
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if (f(mid) > 0) == (f(lo) > 0) else (lo, mid)
        return 0.5 * (lo + hi)

    return [solve(-60.0, 0.0), solve(0.0, c + 2.0)]


def ratio_kinks(cfg: LossConfig) -> list[float]:
    """Log-ratio values where the loss's gradient jumps (token log r, or log s for sequence ratios)."""
    kinks = []
    if cfg.log_ratio_clamp is not None:
        kinks += [-cfg.log_ratio_clamp, cfg.log_ratio_clamp]
    if cfg.seq_log_ratio_max is not None:
        kinks.append(cfg.seq_log_ratio_max)
    if cfg.policy_loss == "ppo":
        kinks += [math.log(1 - cfg.epsilon_low), math.log(1 + cfg.epsilon_high)]
        kinks += [math.log(c) for c in (cfg.ratio_cap, cfg.dual_clip) if c is not None]
    if cfg.policy_loss == "gmpo":
        kinks += [-cfg.epsilon_low, cfg.epsilon_high]
    return kinks


def kl_kinks(cfg: LossConfig) -> list[float]:
    kinks = [0.0] if cfg.kl_estimator.startswith("abs") else []
    if cfg.kl_input_clamp is not None:
        kinks += [-cfg.kl_input_clamp, cfg.kl_input_clamp]
    if cfg.kl_output_clamp is not None:
        kinks += _k_inverse(cfg.kl_estimator, cfg.kl_output_clamp)
    return kinks


def make_mask(kind: str, shape: tuple, g: torch.Generator) -> torch.Tensor:
    b, t = shape
    if kind == "ones":
        return torch.ones(shape)
    if kind == "none":  # every token masked
        return torch.zeros(shape)
    if kind == "single":  # one unmasked token in the batch
        m = torch.zeros(shape)
        m[torch.randint(0, b, (), generator=g), torch.randint(0, t, (), generator=g)] = 1
        return m
    m = (torch.rand(shape, generator=g) < 0.7).float()
    if kind == "empty_row":
        m[0] = 0
    if kind == "soft":  # fractional masks are soft weights (TRL multiplies by the mask)
        m = m * torch.rand(shape, generator=g).clamp(min=0.1)
    return m


def per_token_inputs(lp64: torch.Tensor, m: torch.Tensor, cfg: LossConfig, case: dict, g: torch.Generator) -> dict:
    """old/ref/sampling log-probs, advantages, weights and normalizer for a config, built around the true
    log-probs lp64 so that the ratios and D avoid the kinks."""
    shape = lp64.shape
    randn = lambda: torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
    kw = {}
    adv = torch.randn(shape if case["token_adv"] else shape[:1], generator=g)
    if case["old"]:
        log_r = case["ratio_spread"] * randn()
        if cfg.ratio_level == "sequence":
            log_r = _rows_clear_of(log_r, m.double(), ratio_kinks(cfg), mean=True)
        else:
            log_r = _clear_of(log_r, ratio_kinks(cfg))
        kw["old_logprobs"] = (lp64 - log_r).float()
    if cfg.beta != 0.0:
        d = _clear_of(case["kl_spread"] * randn(), kl_kinks(cfg))
        kw["ref_logprobs"] = (lp64 - d).float()
    behaviour = kw.get("old_logprobs", lp64.float()).double()
    if cfg.rollout_correction is not None:
        log_w = 0.3 * randn()
        kinks = [math.log(cfg.rollout_min), math.log(cfg.rollout_max)]
        mode = cfg.rollout_correction
        if mode.startswith("token"):
            log_w = _clear_of(log_w, kinks)
        else:
            log_w = _rows_clear_of(log_w, m.double(), kinks, mean=mode == "sequence_geomean_mask")
        kw["sampling_logprobs"] = (behaviour - log_w).float()
    if cfg.off_policy_mask_threshold is not None:
        gap = _rows_clear_of(0.2 * randn(), m.double(), [cfg.off_policy_mask_threshold], mean=True)
        kw["sampling_logprobs"] = (lp64 + gap).float()
    if case["is_weights"]:
        kw["is_weights"] = 0.5 + torch.rand(shape if case["token_adv"] else shape[:1], generator=g)
    if case["normalizer"] is not None:
        kw["normalizer"] = (
            case["normalizer"] if isinstance(case["normalizer"], float) else torch.tensor(case["normalizer"][0])
        )
    return adv, kw


# --------------------------------------------------------------------------------------------- strategies
@st.composite
def configs(draw, logprobs_level: bool) -> LossConfig:
    """A valid LossConfig; ``logprobs_level`` adds the options that compare computed values against a
    threshold (entropy quantile, off-policy mask), which only inputs given as values keep off their kinks."""
    policy = draw(st.sampled_from(["ppo", "cispo", "sapo", "reinforce", "gmpo"]))
    kw = dict(
        policy_loss=policy,
        epsilon_low=draw(st.sampled_from([0.2, 0.1])),
        epsilon_high=draw(st.sampled_from([0.2, 0.28])),
    )
    sequence = policy in ("ppo", "sapo") and draw(st.booleans())
    if sequence:
        kw.update(
            ratio_level="sequence",
            sequence_ratio_grad=draw(st.sampled_from(["sequence", "token"])),
            seq_log_ratio_max=draw(st.sampled_from([None, 0.1])),
        )
    else:
        kw.update(log_ratio_clamp=draw(st.sampled_from([None, None, 0.5, 20.0])))
    if policy == "ppo":
        kw.update(ratio_cap=draw(st.sampled_from([None, 1.5])), dual_clip=draw(st.sampled_from([None, 3.0])))
    if policy == "cispo":
        kw.update(cispo_low=draw(st.sampled_from([None, 0.8])), cispo_high=draw(st.sampled_from([None, 1.2, 5.0])))
    if policy == "sapo":
        kw.update(sapo_tau_pos=draw(st.sampled_from([1.0, 2.0])))
    if draw(st.booleans()):
        kw.update(
            beta=draw(st.sampled_from([0.04, 1.0])),
            kl_estimator=draw(st.sampled_from(["k1", "abs", "k2", "k3", "k1+", "abs+", "k3+"])),
            kl_input_clamp=draw(st.sampled_from([None, 1.0])),
            kl_output_clamp=draw(st.sampled_from([None, 0.5, 10.0])),
            kl_ratio_weighted=draw(st.booleans()),
            kl_aggregation=draw(st.sampled_from([None, "token_mean"])),
        )
    kw.update(
        aggregation=draw(st.sampled_from(AGGREGATIONS)),
        max_length=draw(st.sampled_from([None, 7])),
        divide_by_num_sequences=draw(st.booleans()),
        count_empty_sequences=draw(st.booleans()),
        entropy_coef=draw(st.sampled_from([0.0, 0.0, 0.01, -0.5])),
        entropy_aggregation=draw(st.sampled_from([None, "token_mean"])),
        temperature=draw(st.sampled_from([0.5, 1.0, 1.7])),
        loss_scale=draw(st.sampled_from([1.0, 0.25])),
    )
    weights = draw(st.sampled_from(["none", "is_weights", "rollout"] + (["off_policy"] if logprobs_level else [])))
    if weights == "rollout":
        kw.update(
            rollout_correction=draw(
                st.sampled_from(
                    ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "sequence_geomean_mask"]
                )
            ),
            rollout_min=0.8,
            rollout_max=1.25,
        )
    if weights == "off_policy":
        kw.update(off_policy_mask_threshold=0.1)
    if logprobs_level and policy != "gmpo":
        kw.update(top_entropy_quantile=draw(st.sampled_from([1.0, 1.0, 0.5, 0.2])))
    return LossConfig(**kw)


@st.composite
def cases(draw, logprobs_level: bool) -> dict:
    cfg = draw(configs(logprobs_level))
    # old log-probs are needed by rollout weights (the library's behaviour policy defaults to sg[ℓ] otherwise)
    needs_old = cfg.rollout_correction is not None
    return dict(
        cfg=cfg,
        seed=draw(st.integers(0, 2**31 - 1)),
        shape=(draw(st.integers(1, 3)), draw(st.integers(1, 4))),
        vocab=draw(st.sampled_from([1, 2, 5, 16, 17, 100])),
        dtype=draw(st.sampled_from(DTYPES)),
        scale=draw(st.sampled_from([0.1, 1.0, 30.0, 1e4])),
        mask=draw(st.sampled_from(["ones", "random", "empty_row", "single", "none", "soft"])),
        token_adv=draw(st.booleans()),
        old=needs_old or draw(st.booleans()),
        ratio_spread=draw(st.sampled_from([0.05, 0.3, 2.0])),
        kl_spread=draw(st.sampled_from([0.1, 1.0, 5.0])),
        is_weights=cfg.rollout_correction is None and draw(st.booleans()),
        normalizer=draw(st.sampled_from([None, None, 3.0, (5.0,)])),  # (x,): a 0-d tensor
    )


def case_of(cfg: LossConfig, **fields) -> dict:
    """A hand-written case: the failures found so far run on every CI run, whatever hypothesis draws."""
    base = dict(
        seed=0,
        shape=(2, 3),
        vocab=17,
        dtype=torch.float32,
        scale=1.0,
        mask="random",
        token_adv=False,
        old=True,
        ratio_spread=0.3,
        kl_spread=1.0,
        is_weights=False,
        normalizer=None,
    )
    return dict(base, cfg=cfg, **fields)


# a soft mask weights the loss, not a token's rollout ratio: w = exp(ℓ^old − ℓ^samp), not exp(m·(ℓ^old − ℓ^samp))
SOFT_MASK_ROLLOUT = case_of(
    LossConfig(rollout_correction="token_truncate", rollout_min=0.8, rollout_max=1.25), mask="soft"
)
# cispo_low = cispo_high = None is a valid, unbounded CISPO weight
CISPO_UNBOUNDED = case_of(LossConfig(policy_loss="cispo"))
# |z/τ| ~ 2e4: x/τ − (max + log Σ) loses the digits of max + log Σ (for ppo, the z/τ rounding every backend
# shares reaches the gradient through ρ too, and hides it)
LARGE_SCALED_LOGITS = case_of(LossConfig(policy_loss="reinforce", temperature=1.7), scale=1e4, vocab=16, mask="ones")


def _to(kw: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


# ---------------------------------------------------------------------------------------------- grpo_loss
@pytest.mark.parametrize("backend", BACKENDS)
@examples(25)
@given(case=cases(logprobs_level=False))
@example(case=SOFT_MASK_ROLLOUT)
@example(case=CISPO_UNBOUNDED)
@example(case=LARGE_SCALED_LOGITS)
def test_grpo_loss(case, backend):
    """Loss, ∂loss/∂logits, ℓ and H of fastgrpo.grpo_loss against the fp64 oracle."""
    kernel_backend(backend)  # skips, naming why, when a compiled backend is not built
    cfg, shape, vocab, dtype = case["cfg"], case["shape"], case["vocab"], case["dtype"]
    note(f"{cfg}")
    g = torch.Generator().manual_seed(case["seed"])
    limit = torch.finfo(dtype).max / 2
    logits = (case["scale"] * torch.randn(*shape, vocab, generator=g)).clamp(-limit, limit).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    m = make_mask(case["mask"], shape, g)
    targets = torch.where(m > 0, targets, -100)  # padding ids where masked
    lp64, _ = oracle.token_logprobs(logits, targets, cfg.temperature)
    adv, kw = per_token_inputs(lp64, m, cfg, case, g)
    given_kw = dict(
        old=kw.get("old_logprobs"),
        ref=kw.get("ref_logprobs"),
        samp=kw.get("sampling_logprobs"),
        is_weights=kw.get("is_weights"),
        normalizer=kw.get("normalizer"),
    )

    def oracle_run(dt):
        z = logits.detach().to(dt).requires_grad_()
        loss, lp, ent = oracle.grpo_loss(z, targets, adv, m, cfg, dtype=dt, **given_kw)
        (grad,) = torch.autograd.grad(loss, z)
        return loss, grad, lp.detach(), ent.detach()

    truth, same = oracle_run(torch.float64), oracle_run(torch.float32)
    logp, rel, err_lp, err_ent = logit_errors(logits, targets, cfg.temperature)
    floors = rounding_floors(
        lambda lp, ent: oracle.objective(lp, adv, m, cfg, entropy=ent, **given_kw),
        truth[2],
        truth[3],
        err_lp,
        err_ent,
        (logp, rel, targets),
        cfg.temperature,
    )
    z = logits.detach().clone().to(DEVICE).requires_grad_()
    out = fastgrpo.grpo_loss(
        z, targets.to(DEVICE), adv.to(DEVICE), m.to(DEVICE), return_entropy=True, config=cfg, backend=backend, **_to(kw)
    )
    out.loss.backward()
    keep = m > 0
    check(out.loss.cpu(), truth[0], same[0], "loss", floors.loss)
    check(z.grad.cpu(), truth[1], same[1].to(dtype), "grad", floors.grad)
    check(out.logprobs.cpu()[keep], truth[2][keep], same[2][keep], "logprobs", floors.logprobs[keep])
    check(out.entropy.cpu()[keep], truth[3][keep], same[3][keep], "entropy", floors.entropy[keep])
    assert z.grad.dtype == dtype
    assert torch.all(z.grad.cpu()[~keep] == 0), "masked rows get a zero gradient"


# -------------------------------------------------------------------------------------------- policy_loss
@pytest.mark.parametrize("backend", BACKENDS)
@examples(30)
@given(case=cases(logprobs_level=True), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
@example(case=SOFT_MASK_ROLLOUT, dtype=torch.float32)
@example(case=CISPO_UNBOUNDED, dtype=torch.float32)
def test_policy_loss(case, dtype, backend):
    """Loss and ∂loss/∂ℓ, ∂loss/∂H of fastgrpo.policy_loss (every weight mode, entropy quantile, off-policy
    mask, normalizers) against the fp64 oracle."""
    kernel_backend(backend)  # skips, naming why, when a compiled backend is not built
    cfg, shape = case["cfg"], case["shape"]
    note(f"{cfg}")
    g = torch.Generator().manual_seed(case["seed"])
    lp = (-(case["scale"] ** 0.5) * torch.rand(shape, generator=g)).to(dtype)  # log-probs ≤ 0, up to −100
    m = make_mask(case["mask"], shape, g)
    adv, kw = per_token_inputs(lp.double(), m, cfg, case, g)
    ent = 3 * torch.rand(shape, generator=g)
    given_kw = dict(
        old=kw.get("old_logprobs"),
        ref=kw.get("ref_logprobs"),
        samp=kw.get("sampling_logprobs"),
        is_weights=kw.get("is_weights"),
        normalizer=kw.get("normalizer"),
    )
    objective = lambda x, h: oracle.objective(x, adv, m, cfg, entropy=h, **given_kw)  # noqa: E731

    def oracle_run(dt):
        x, h = lp.detach().to(dt).requires_grad_(), ent.to(dt).requires_grad_()
        loss = objective(x, h)
        return (loss, *torch.autograd.grad(loss, (x, h), allow_unused=True, materialize_grads=True))

    truth, same = oracle_run(torch.float64), oracle_run(torch.float32)
    lp64, ent64 = lp.double(), ent.double()
    floors = rounding_floors(objective, lp64, ent64, EPS32 * (1 + lp64.abs()), EPS32 * (1 + ent64), None)
    x, h = lp.clone().to(DEVICE).requires_grad_(), ent.clone().to(DEVICE).requires_grad_()
    out = fastgrpo.policy_loss(x, adv.to(DEVICE), m.to(DEVICE), entropy=h, config=cfg, backend=backend, **_to(kw))
    gx, gh = torch.autograd.grad(out.loss, (x, h), allow_unused=True, materialize_grads=True)
    check(out.loss.cpu(), truth[0], same[0], "loss", floors.loss)
    check(gx.cpu(), truth[1], same[1].to(dtype), "grad logprobs", floors.grad_logprobs)
    check(gh.cpu(), truth[2], same[2], "grad entropy", floors.grad_entropy)


# ----------------------------------------------------------------------------------------- token_logprobs
@pytest.mark.parametrize("backend", BACKENDS)
@examples(20)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(1, 1), (2, 3), (7,), (3, 1)]),
    vocab=st.sampled_from([1, 2, 5, 17, 100]),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([0.1, 1.0, 30.0, 1e4]),
    offset=st.sampled_from([0.0, 0.0, 100.0]),
    temperature=st.sampled_from([0.3, 1.0, 1.7]),
)
@example(seed=0, shape=(2, 3), vocab=17, dtype=torch.float32, scale=1e4, offset=0.0, temperature=0.3)
def test_token_logprobs(seed, shape, vocab, dtype, scale, offset, temperature, backend):
    """ℓ, H and the gradient of a random combination of both, against the fp64 oracle."""
    kernel_backend(backend)  # skips, naming why, when a compiled backend is not built
    g = torch.Generator().manual_seed(seed)
    limit = torch.finfo(dtype).max / 4
    logits = (offset + scale * torch.randn(*shape, vocab, generator=g)).clamp(-limit, limit).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    w_lp, w_ent = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))

    def oracle_run(dt):
        z = logits.detach().to(dt).requires_grad_()
        lp, ent = oracle.token_logprobs(z, targets, temperature, dt)
        (grad,) = torch.autograd.grad((w_lp.to(dt) * lp + w_ent.to(dt) * ent).sum(), z)
        return lp.detach(), ent.detach(), grad

    truth, same = oracle_run(torch.float64), oracle_run(torch.float32)
    logp, rel, err_lp, err_ent = logit_errors(logits, targets, temperature)
    floors = rounding_floors(
        lambda lp, ent: (w_lp * lp + w_ent * ent).sum(),
        truth[0],
        truth[1],
        err_lp,
        err_ent,
        (logp, rel, targets),
        temperature,
    )
    z = logits.clone().to(DEVICE).requires_grad_()
    lp, ent = fastgrpo.token_logprobs(z, targets.to(DEVICE), temperature=temperature, entropy=True, backend=backend)
    (w_lp.float().to(DEVICE) * lp + w_ent.float().to(DEVICE) * ent).sum().backward()
    check(lp.cpu(), truth[0], same[0], "logprobs", floors.logprobs)
    check(ent.cpu(), truth[1], same[1], "entropy", floors.entropy)
    check(z.grad.cpu(), truth[2], same[2].to(dtype), "grad", floors.grad)


# --------------------------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("backend", BACKENDS)
@examples(20)
@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.integers(1, 3),
    group_size=st.sampled_from([1, 2, 3, 8]),
    kind=st.sampled_from(["normal", "binary", "two_functions"]),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
    config=st.builds(
        fastgrpo.AdvantageConfig,
        estimator=st.sampled_from(["grpo", "rloo", "reinforce_baseline"]),
        scale=st.sampled_from(["group", "batch", "none"]),
        eps=st.sampled_from([1e-4, 1e-6]),
        singleton=st.sampled_from(["zero", "raw"]),
    ),
)
def test_advantages(seed, groups, group_size, kind, scale, config, backend):
    """fastgrpo.advantages against the fp64 oracle, for every estimator and scale, binary rewards (groups of
    zero std) and weighted reward functions."""
    kernel_backend(backend)  # skips, naming why, when a compiled backend is not built
    g = torch.Generator().manual_seed(seed)
    b = groups * group_size
    weights = None
    if kind == "binary":
        rewards = (torch.rand(b, generator=g) < 0.5).float()
    elif kind == "two_functions":
        rewards, weights = scale * torch.randn(b, 2, generator=g), torch.tensor([1.0, 0.5])
    else:
        rewards = scale * torch.randn(b, generator=g)
    opts = {k: getattr(config, k) for k in ("estimator", "scale", "eps", "singleton")}
    truth, same = (
        oracle.advantages(rewards, group_size, reward_weights=weights, dtype=dt, **opts)
        for dt in (torch.float64, torch.float32)
    )
    ours = fastgrpo.advantages(
        rewards.to(DEVICE),
        group_size,
        config=config,
        backend=backend,
        reward_weights=None if weights is None else weights.to(DEVICE),
    )
    check(ours.cpu(), truth, same, "advantages")
