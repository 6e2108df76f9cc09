"""Numerics of every backend against fp64 computations written here: extreme but valid inputs give the true
value (±inf where it exceeds fp32, never NaN), a non-finite input reaches the loss identically on every backend
while anything at a masked position is ignored, and an in-place gradient on a view is scaled where it lies.

Backend-level calls (``backends.select(...).grpo_loss``) bypass the public value checks, so the kernels can be
fed NaN and inf. Shapes are small: the Triton kernels run under the interpreter on CPU.
"""

import math

import pytest
import torch

import fastgrpo
from fastgrpo import LossConfig, backends, presets
from fastgrpo.config import Rewards

from conftest import DEVICE, KERNEL_BACKENDS, backend_grpo_loss, kernel_backend

BACKENDS = ["reference", *KERNEL_BACKENDS]
NAN, INF = float("nan"), float("inf")


@pytest.fixture(params=BACKENDS)
def impl(request):
    """The backend object (a kernel backend missing from this build is skipped)."""
    if request.param == "reference":
        return backends.select("reference", torch.device(DEVICE))
    return kernel_backend(request.param)


def truth(
    z,
    y,
    m,
    adv,
    *,
    old=None,
    ref=None,
    policy="ppo",
    eps_low=0.2,
    eps_high=0.2,
    cap=None,
    dual_clip=None,
    cispo=(None, None),
    sapo=(1.0, 1.05),
    beta=0.0,
    kl_in=None,
    kl_out=None,
    temperature=1.0,
):
    """MATH §2 in fp64 for the configs used here (token ratio, token mean, k3): the loss, differentiable in z.
    Masked positions are selected away, so whatever they hold stays out of the loss and its gradient."""
    z, m = z.double(), m.double()
    keep = m > 0
    logp = torch.log_softmax(torch.where(keep.unsqueeze(-1), z, 0.0) / temperature, -1)
    lp = logp.gather(-1, torch.where(keep, y, 0).unsqueeze(-1)).squeeze(-1)
    a = adv.double()
    a = torch.where(keep, a.unsqueeze(-1).expand_as(lp) if a.dim() < lp.dim() else a, 0.0)
    sel = lambda x: torch.where(keep, x.double(), 0.0)  # noqa: E731
    rho = torch.exp(lp - (lp.detach() if old is None else sel(old)))
    if policy == "ppo":
        unclipped = rho if cap is None else rho.clamp(max=cap)
        p = -torch.minimum(unclipped * a, rho.clamp(1 - eps_low, 1 + eps_high) * a)
        if dual_clip is not None:
            p = torch.where(a < 0, torch.minimum(p, -dual_clip * a), p)
    elif policy == "sapo":
        t = torch.where(a > 0, sapo[0], sapo[1])
        p = -(4 / t) * torch.sigmoid(t * (rho - 1)) * a
    elif policy == "cispo":
        p = -rho.clamp(*cispo).detach() * a * lp
    else:  # reinforce
        p = -a * lp
    if beta:
        d = lp - sel(ref)
        if kl_in is not None:
            d = d.clamp(-kl_in, kl_in)
        k = torch.exp(-d) + d - 1  # fp64: the cancellation costs ~1e-16 absolute
        if kl_out is not None:
            k = k.clamp(max=kl_out)  # k3 ≥ 0
        p = p + beta * k
    return (torch.where(keep, p, 0.0) * m).sum() / m.sum()


def truth_and_grad(logits, targets, mask, adv, **kw):
    """(loss, ∂loss/∂logits) of :func:`truth` in fp64, rounded to fp32 (±inf where beyond fp32)."""
    z = logits.detach().double().requires_grad_()
    loss = truth(z, targets, mask, adv, **kw)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.float(), grad.float()


def run(impl, logits, targets, mask, adv, cfg, **kw):
    """The backend's loss and logit gradient (fp32 logits leaf)."""
    z = logits.detach().clone().requires_grad_()
    out = backend_grpo_loss(impl, z, targets, adv, mask, config=cfg, **kw)
    out.loss.backward()
    return out, z.grad


def data(shape=(2, 3), vocab=11, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(*shape, vocab, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, shape, generator=g)
    lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logits.float(), targets, lp, g


def assert_same_ieee(ours, expected, what, rtol=1e-5, atol=1e-6):
    """NaN where expected is NaN, the same infinity where it is infinite, close where it is finite."""
    ours, expected = ours.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(ours.isnan(), expected.isnan()), f"{what}: NaN pattern {ours} vs {expected}"
    inf = expected.isinf()
    assert torch.equal(ours[inf], expected[inf]) and not ours[~inf & ~expected.isnan()].isinf().any(), (
        f"{what}: infinities {ours} vs {expected}"
    )
    fin = expected.isfinite()
    torch.testing.assert_close(ours[fin], expected[fin], rtol=rtol, atol=atol, msg=what)


# ------------------------------------------------------------------------------ in place on a view, scaled
@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_inplace_grad_on_a_view_with_scaled_backward(name):
    """TRL's logits[:, :-1] of a larger buffer with inplace_grad=True and gradient accumulation ((loss/k).backward):
    the scale step must scale the view's rows where they lie (not the buffer's first numel elements) and leave
    the logits outside the view untouched."""
    kernel_backend(name)
    B, T, V, k = 2, 3, 40, 4.0
    logits, targets, lp, g = data((B, T + 1), V)
    targets, lp = targets[:, :-1].contiguous(), lp[:, :-1]
    mask = torch.ones(B, T)
    mask[1, -1] = 0
    adv = torch.tensor([0.7, -1.3])
    old, ref = lp + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64), lp + 0.3
    old, ref = old.float(), ref.float()
    cfg = LossConfig(epsilon_high=0.28, beta=0.04, kl_estimator="k3")
    loss_true, grad_true = truth_and_grad(
        logits[:, :-1], targets, mask, adv, old=old, ref=ref, eps_high=0.28, beta=0.04
    )

    leaf = logits.clone().to(DEVICE).requires_grad_()
    buffer = leaf * 1  # a model's logits: a non-leaf [B, T + 1, V]
    view = buffer[:, :-1]
    out = fastgrpo.grpo_loss(
        view,
        targets.to(DEVICE),
        adv.to(DEVICE),
        mask.to(DEVICE),
        old_logprobs=old.to(DEVICE),
        ref_logprobs=ref.to(DEVICE),
        config=cfg,
        backend=name,
        inplace_grad=True,
    )
    (out.loss / k).backward()
    torch.testing.assert_close(out.loss.cpu(), loss_true, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(leaf.grad[:, :-1].cpu(), grad_true / k, rtol=1e-4, atol=1e-7)
    assert torch.equal(leaf.grad[:, -1].cpu(), torch.zeros(B, V))
    assert torch.equal(buffer[:, -1].detach().cpu(), logits[:, -1]), "logits outside the view were modified"


VIEWS = {
    "[:, :-1]": lambda x: x[:, :-1],
    "[1:, 2:]": lambda x: x[1:, 2:],
    "[:, 2] (strided rows)": lambda x: x[:, 2],
    "[0] (contiguous)": lambda x: x[0],
    "flat (a bias)": lambda x: x.view(-1),
}


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_scale_grad_op_touches_only_the_view(name, view):
    """The op behind every scaled backward: exactly the view's elements are scaled (the linear path also hands
    it contiguous hidden, weight and 1-D bias gradients)."""
    ops = kernel_backend(name).ops
    base = torch.randn(3, 5, 7, device=DEVICE)
    buf = base.clone()
    ops.scale_grad_(VIEWS[view](buf), torch.tensor(0.5, device=DEVICE))
    expected = base.clone()
    VIEWS[view](expected).mul_(0.5)
    assert torch.equal(buf, expected)


# ------------------------------------------------------------------------------------------ non-finite inputs
CONFIGS = {
    "trl_no_clamps": LossConfig(beta=0.04, kl_estimator="k3"),  # unused bounds are ±inf in the kernels
    "verl_clamps": presets.verl(use_kl_loss=True),  # log-ratio ±20, dual clip, k3 clamped in and out
    "cispo": LossConfig(
        policy_loss="cispo", cispo_low=0.8, cispo_high=1.2, beta=0.1, kl_estimator="k3", kl_output_clamp=10.0
    ),
    "sapo": LossConfig(policy_loss="sapo", beta=0.1, kl_estimator="k2", log_ratio_clamp=20.0),
}
POISON = [
    ("logits", NAN),
    ("logits", INF),
    ("old", NAN),
    ("old", INF),
    ("ref", NAN),
    ("ref", INF),
    ("advantages", NAN),
    ("advantages", INF),
]


def poisoned(where, value, masked):
    """Inputs with ``value`` at token (0, 1) of ``where``; that token is masked out when ``masked``."""
    logits, targets, lp, g = data()
    old, ref = (lp + 0.2 * torch.randn(2, 3, generator=g, dtype=torch.float64)).float(), (lp - 0.1).float()
    adv = torch.tensor([[0.5, -1.0, 1.5], [-0.3, 0.8, -1.2]])
    mask = torch.ones(2, 3)
    x = dict(logits=logits, old=old, ref=ref, advantages=adv)
    x[where] = x[where].clone()
    if where == "logits":
        x[where][0, 1, 4] = value
    else:
        x[where][0, 1] = value
    if masked:
        mask[0, 1] = 0
        targets = targets.clone()
        targets[0, 1] = -100  # padding id
    return x, targets, mask


@pytest.mark.parametrize("where, value", POISON, ids=[f"{w}={v}" for w, v in POISON])
@pytest.mark.parametrize("config", CONFIGS)
def test_non_finite_input_reaches_the_loss_on_every_backend(where, value, config, impl):
    """An unmasked NaN is never hidden: the loss is NaN on every backend (fminf/clamps used to drop it in the
    kernels); +inf gives what the reference's IEEE arithmetic gives (ρ = 0 for old = +inf), the same everywhere."""
    x, targets, mask = poisoned(where, value, masked=False)
    cfg = CONFIGS[config]
    to = lambda t: t.to(DEVICE)  # noqa: E731
    ours, _ = run(
        impl,
        to(x["logits"]),
        to(targets),
        to(mask),
        to(x["advantages"]),
        cfg,
        old_logprobs=to(x["old"]),
        ref_logprobs=to(x["ref"]),
    )
    ref_out, _ = run(
        backends.select("reference", torch.device(DEVICE)),
        x["logits"],
        targets,
        mask,
        x["advantages"],
        cfg,
        old_logprobs=x["old"],
        ref_logprobs=x["ref"],
    )
    if math.isnan(value) or where == "logits":  # a NaN or +inf logit makes log_softmax NaN
        assert ours.loss.isnan(), f"{where}={value} hidden: loss {ours.loss}"
    assert_same_ieee(ours.loss, ref_out.loss, "loss")


@pytest.mark.parametrize("where, value", POISON, ids=[f"{w}={v}" for w, v in POISON])
def test_non_finite_input_at_a_masked_position_is_ignored(where, value, impl):
    """Padding may hold anything (NaN log-probs, advantages or importance weights, a NaN logit row, id −100): loss
    and gradient equal the fp64 truth computed without that token, its gradient row is 0, the metrics finite."""
    x, targets, mask = poisoned(where, value, masked=True)
    is_weights = torch.ones(2, 3)
    is_weights[0, 1] = value
    cfg = CONFIGS["verl_clamps"]
    kw = dict(old=x["old"], ref=x["ref"], dual_clip=3.0, beta=cfg.beta, kl_in=20.0, kl_out=10.0)
    loss_true, grad_true = truth_and_grad(x["logits"], targets, mask, x["advantages"], **kw)
    assert loss_true.isfinite()
    to = lambda t: t.to(DEVICE)  # noqa: E731
    ours, grad = run(
        impl,
        to(x["logits"]),
        to(targets),
        to(mask),
        to(x["advantages"]),
        cfg,
        old_logprobs=to(x["old"]),
        ref_logprobs=to(x["ref"]),
        is_weights=to(is_weights),
    )
    torch.testing.assert_close(ours.loss.cpu(), loss_true, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.cpu(), grad_true, rtol=1e-4, atol=1e-7)
    assert torch.equal(grad[0, 1].cpu(), torch.zeros(11))
    for key, metric in ours.metrics.items():
        assert metric.isfinite(), f"metric {key} = {metric}"


# ---------------------------------------------------------------------------------- extreme but valid values
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
def test_gradient_relative_to_the_row_max(offset, impl):
    """Logits far from 0: log p must be (x − M) − log Σ; x − (M + log Σ) loses log Σ to the rounding of M + log Σ
    (the C++ kernel was off by 2.8e-3 relative at 1e6). The truth is computed from the same fp32 logits, at τ = 1
    (z/τ itself is rounded at the magnitude of z/τ, in every backend as in torch)."""
    logits, targets, _, _ = data((2, 3), 50, scale=2.0)
    logits = logits + offset  # rounded to fp32 here: the truth uses these values
    mask, adv = torch.ones(2, 3), torch.tensor([1.0, -2.0])
    cfg = LossConfig(policy_loss="reinforce")
    loss_true, grad_true = truth_and_grad(logits, targets, mask, adv, policy="reinforce")
    out, grad = run(impl, logits.to(DEVICE), targets.to(DEVICE), mask.to(DEVICE), adv.to(DEVICE), cfg)
    scale = grad_true.abs().max()
    assert (grad.cpu() - grad_true).abs().max() <= 2e-5 * scale
    torch.testing.assert_close(out.loss.cpu(), loss_true, rtol=2e-5, atol=0.0)


def test_bf16_maximum_logits_tied_at_the_target(impl):
    """bf16 logits at ±max with the target tied at the max: p = 1/2 each, so the target's gradient is c·(1 − 1/2);
    M + log 2 rounds to M, and the old C++ gradient took p = 1 (off by orders of magnitude)."""
    big = torch.finfo(torch.bfloat16).max
    logits = torch.full((1, 2, 16), -big, dtype=torch.bfloat16)
    logits[:, :, 3] = logits[:, :, 9] = big
    logits[0, 1, 5] = 0.0
    targets = torch.tensor([[3, 9]])
    mask, adv = torch.ones(1, 2), torch.tensor([1.0])
    cfg = LossConfig(policy_loss="reinforce")
    loss_true, grad_true = truth_and_grad(logits.float(), targets, mask, adv, policy="reinforce")
    out, grad = run(impl, logits.to(DEVICE), targets.to(DEVICE), mask.to(DEVICE), adv.to(DEVICE), cfg)
    torch.testing.assert_close(out.loss.cpu(), loss_true, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grad.float().cpu(), grad_true, rtol=1e-2, atol=0.0)  # bf16 output rounding


# (config, truth keywords, advantages): log-ratio 100 (ρ = e^100 = 2.7e43, inf in fp32) and no log-ratio clamp
OVERFLOW = {
    "ppo_clipped": (LossConfig(), dict(), [1.0, 0.5]),  # clipped branch: gradient 0, not 0·inf
    "ppo_dual_clip": (LossConfig(dual_clip=3.0), dict(dual_clip=3.0), [-1.0, -0.5]),
    "ppo_ratio_cap": (LossConfig(ratio_cap=2.0), dict(cap=2.0), [1.0, -0.5]),  # TRL delta caps ρ·A at A < 0
    "sapo": (LossConfig(policy_loss="sapo"), dict(policy="sapo"), [1.0, -0.5]),  # σ'·ρ = e^(−τρ)·ρ → 0
    "cispo_bounded": (
        LossConfig(policy_loss="cispo", cispo_low=0.8, cispo_high=1.2),
        dict(policy="cispo", cispo=(0.8, 1.2)),
        [1.0, -0.5],
    ),
    # OpenRLHF with a far reference policy: k3 of D = −100 is e^100 (inf in fp32), clamped to 10: gradient 0
    "openrlhf_k3_far_ref": (
        presets.openrlhf(use_kl_loss=True, init_kl_coef=0.1, kl_estimator="k3"),
        dict(beta=0.1, kl_out=10.0),
        [1.0, -0.5],
    ),
}


@pytest.mark.parametrize("case", OVERFLOW)
def test_ratio_overflow_gives_the_true_value(case, impl):
    cfg, kw, adv = OVERFLOW[case]
    logits, targets, lp, _ = data()
    mask, adv = torch.ones(2, 3), torch.tensor(adv)
    far = "far_ref" in case
    old = lp.float() if far else (lp - 100.0).float()
    ref = (lp + 100.0).float()
    loss_true, grad_true = truth_and_grad(logits, targets, mask, adv, old=old, ref=ref, **kw)
    out, grad = run(
        impl,
        logits.to(DEVICE),
        targets.to(DEVICE),
        mask.to(DEVICE),
        adv.to(DEVICE),
        cfg,
        old_logprobs=old.to(DEVICE),
        ref_logprobs=ref.to(DEVICE),
    )
    assert loss_true.isfinite() and grad_true.isfinite().all()
    torch.testing.assert_close(out.loss.cpu(), loss_true, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.cpu(), grad_true, rtol=1e-4, atol=1e-6)


def test_ratio_overflow_beyond_fp32_is_inf_not_nan(impl):
    """PPO at A < 0 without dual clip: P = −ρ·A with ρ = e^100 exceeds fp32, so the loss is +inf. (Its logit
    gradient is c·(1[v = y] − p_v) with c = +inf: not representable, and not checked.)"""
    logits, targets, lp, _ = data()
    mask, adv = torch.ones(2, 3), torch.tensor([-1.0, 0.5])
    old = lp.float()
    old[0, 1] -= 100.0
    loss_true, _ = truth_and_grad(logits, targets, mask, adv, old=old)
    assert loss_true == INF
    out, _ = run(
        impl,
        logits.to(DEVICE),
        targets.to(DEVICE),
        mask.to(DEVICE),
        adv.to(DEVICE),
        LossConfig(),
        old_logprobs=old.to(DEVICE),
    )
    assert out.loss.item() == INF


@pytest.mark.parametrize("d", [-0.5, -0.086, -1e-2, -1e-3, 1e-3, 1e-2, 0.3])
def test_k3_has_no_cancellation(d, impl):
    """k3 = expm1(−D) + D: at D = 1e-3 (k3 = 5e-7) exp(−D) + D − 1 keeps ~1 correct digit in fp32. The loss of
    one token with A = 0 and β = 1 is k3 itself; its truth is taken at the D the backend saw (ℓ from its output
    minus ℓ^ref, exact in fp32 since both are close), and ∂k3/∂ℓ = −expm1(−D) shows in the target's gradient."""
    logits, targets, lp, _ = data((1, 1), 7)
    ref = (lp - d).float()
    mask, adv = torch.ones(1, 1), torch.zeros(1)
    cfg = LossConfig(policy_loss="reinforce", beta=1.0, kl_estimator="k3")
    out, grad = run(
        impl, logits.to(DEVICE), targets.to(DEVICE), mask.to(DEVICE), adv.to(DEVICE), cfg, ref_logprobs=ref.to(DEVICE)
    )
    d_seen = out.logprobs.double().cpu() - ref.double()
    k3 = (torch.exp(-d_seen) + d_seen - 1).sum()
    # 4 fp32 ulps of the terms summed (|expm1(−D)| ≈ |D| and D): the old order's terms were ~1, its error ~ulp(1)
    bound = 4 * 2.0**-24 * (abs(d) + k3.item())
    assert abs(out.loss.double().cpu() - k3) <= bound, f"k3 {out.loss.item():.9e} vs {k3.item():.9e}"
    p = torch.softmax(logits.double(), -1)[0, 0, targets[0, 0]]
    dk = -torch.expm1(-d_seen).sum()
    torch.testing.assert_close(grad[0, 0, targets[0, 0]].double().cpu(), dk * (1 - p), rtol=2e-5, atol=0.0)


@pytest.mark.parametrize("group", [2, 4])
def test_group_std_of_huge_rewards(group, impl):
    """Rewards near 1e20: (r − mean)² overflows fp32, so the unscaled std was inf and every advantage 0."""
    r = torch.tensor([1e20, 3e20, -2e20, 0.5e20, 7e19, -1e19, 2.5e20, 1e18])
    adv, _ = impl.advantages(Rewards(r.to(DEVICE), group), metrics=False)
    rd = r.double().view(-1, group)
    expected = (rd - rd.mean(1, keepdim=True)) / (rd.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(adv.double().cpu(), expected.reshape(-1), rtol=1e-5, atol=1e-6)


def test_group_std_of_subnormal_rewards(impl):
    """A group spread below ~3e-39: 1/spread overflows, so scaling by it (0·inf at a reward equal to the mean)
    made the std and every advantage NaN on the kernel backends."""
    r = torch.tensor([0.0, 1e-39, 2e-39])
    adv, _ = impl.advantages(Rewards(r.to(DEVICE), 3), metrics=False)
    rd = r.double()
    expected = (rd - rd.mean()) / (rd.std() + 1e-4)  # ≈ ±1e-35
    assert torch.isfinite(adv).all(), adv
    torch.testing.assert_close(adv.double().cpu(), expected, rtol=1e-3, atol=1e-40)


def test_k3_beyond_an_input_clamp_above_88(impl):
    """kl_input_clamp = 100 and D = −150: the clamped D gives k3 = expm1(100) − 100 = inf (the loss is +inf, the
    true value beyond fp32) and a derivative of 0 (clamped input), never 0·inf = NaN in the gradient."""
    z = torch.randn(1, 2, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y, m = torch.tensor([[1, 4]]), torch.ones(1, 2)
    lp = torch.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    cfg = LossConfig(beta=0.1, kl_estimator="k3", kl_input_clamp=100.0)
    ref = (lp + torch.tensor([[150.0, 0.5]])).float()
    logits = z.float().to(DEVICE).requires_grad_()
    out = backend_grpo_loss(
        impl, logits, y.to(DEVICE), torch.ones(1, device=DEVICE), m.to(DEVICE), config=cfg, ref_logprobs=ref.to(DEVICE)
    )
    out.loss.backward()
    assert out.loss.item() == INF
    # the gradient is the policy term's and the second token's k3: as without the first token's KL
    z64 = z.clone().requires_grad_()
    lp64 = torch.log_softmax(z64, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    d = lp64[0, 1] - ref[0, 1].double()
    k3 = torch.expm1(-d) + d
    policy = -(torch.exp(lp64 - lp64.detach()) * 1.0).mean()
    (grad64,) = torch.autograd.grad(policy + 0.1 * k3 / 2, z64)
    torch.testing.assert_close(logits.grad.double().cpu(), grad64, rtol=1e-5, atol=1e-6)
