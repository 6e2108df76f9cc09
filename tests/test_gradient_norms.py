"""The loss's gradient norms (issue #15, MATH §8.7): ‖∂loss/∂logits‖ of each sequence, computed from ∂L/∂ℓ, ∂L/∂H
and the row statistics of the log-prob pass, never from the gradient. Checked against an fp64 gradient written
here, at the values where a formula could lose it (p_y → 1, logits ±1e4, banned tokens, all masked, one token,
packed sequences); the statistics themselves against fp64 sums (property test). The variant × dtype × shape grid
against the materialized gradient is in test_grpo_loss.py / test_linear_grpo_loss.py, tensor and context
parallel in test_distributed.py."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastgrpo
from fastgrpo import LossConfig
from fastgrpo.kernels import params as P

import fp64_oracle
from conftest import DEVICE, KERNEL_BACKENDS, kernel_backend


def fp64_norms(logits, targets, adv, mask, cfg, cu_seqlens=None, **kw):
    """Each sequence's ‖∂loss/∂logits‖ from the fp64 reference loss differentiated by autograd (the reference is
    exact in fp64), summed over the sequence's rows here."""
    z = logits.double().clone().requires_grad_()
    out = fastgrpo.grpo_loss(
        z, targets, adv, mask, cu_seqlens=cu_seqlens, config=cfg, backend="reference", check_values=False, **kw
    )
    (g,) = torch.autograd.grad(out.loss, z)
    rows = g.square().sum(-1).reshape(-1)
    if cu_seqlens is None:
        return rows.reshape(logits.shape[0], -1).sum(-1).sqrt()
    return torch.stack([rows[a:b].sum() for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]).sqrt()


def fp32_resolution(logits, targets, adv, mask, cfg, **kw):
    """Per sequence, ε₃₂·(Σ_t c_t² + g_t²)^½ / τ with c = ∂L/∂ℓ, g = ∂L/∂H in fp64: what fp32 log-probs can resolve
    of a gradient row c·(e_y − p) − g·u (the fp32 ℓ of a confident token is only known to ~ε₃₂, so 1 − p_y is too)."""
    lp, ent = fastgrpo.reference.token_logprobs(logits.double(), targets, cfg.temperature, entropy=True)
    lp, ent = lp.requires_grad_(), ent.requires_grad_()
    loss = fastgrpo.reference.policy_loss(lp, adv, mask, entropy=ent, config=cfg, **kw).loss
    c, g = torch.autograd.grad(loss, [lp, ent], allow_unused=True, materialize_grads=True)
    return torch.finfo(torch.float32).eps * (c.square() + g.square()).sum(-1).sqrt() / cfg.temperature


def run(backend, logits, targets, adv, mask, cfg, **kw):
    to = lambda x: x.to(DEVICE) if isinstance(x, torch.Tensor) else x  # noqa: E731
    kw = {k: to(v) for k, v in kw.items()}
    return fastgrpo.grpo_loss(to(logits), to(targets), to(adv), to(mask), config=cfg, backend=backend, **kw)


CONFIGS = {
    "grpo": LossConfig(),
    # τ = 0.5: 1/τ is exact, so z·(1/τ) (kernels) and z/τ (oracle) round alike at ±1e4
    "kl_entropy_temperature": LossConfig(beta=0.1, kl_estimator="k3", entropy_coef=0.05, temperature=0.5),
    "two_phase_entropy": LossConfig(top_entropy_quantile=0.5, entropy_coef=0.2),
}


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_confident_and_extreme_tokens(cfg, backend):
    """p_y → 1, logits at ±1e4, banned (−inf) entries, against fp64, per sequence: within twice the error of the fp32
    oracle (which materializes the gradient), 1e-5 relative, and 16× what fp32 log-probs resolve (see
    fp32_resolution). A formula that formed 1 − 2p_y + Σ p² would lose up to √ε₃₂·|∂L/∂ℓ| ≈ 3e-4·|c| per token to
    cancellation, a few % of the confident sequence's norm: it fails this test (1 − p_y is −expm1(ℓ) here, and
    Σ p² leaves the target's own term out)."""
    g = torch.Generator().manual_seed(0)
    b, t, v = 3, 4, 40
    logits = 2 * torch.randn(b, t, v, generator=g)
    targets = torch.randint(0, v, (b, t), generator=g)
    logits[0, :, :] = -5.0
    # confident targets: 1 − p_y ≈ 39·e^−(top + 5) = 1.6e-6, 3.2e-5, 2.4e-4, 1.8e-3
    logits[0, torch.arange(t), targets[0]] = torch.tensor([12.0, 9.0, 7.0, 5.0])
    logits[1] *= 5e3  # ±1e4
    logits[2, :, :7] = float("-inf")  # banned tokens
    targets[2] = targets[2].clamp(min=7)
    adv, mask = torch.randn(b, generator=g), torch.ones(b, t)
    lp = torch.log_softmax(logits.double() / cfg.temperature, -1).gather(-1, targets[..., None])[..., 0]
    ref = (lp + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()  # a finite KL at ±1e4
    out = run(backend, logits, targets, adv, mask, cfg, ref_logprobs=ref)
    oracle = run("reference", logits, targets, adv, mask, cfg, ref_logprobs=ref)
    exact = fp64_norms(logits, targets, adv, mask, cfg, ref_logprobs=ref)
    assert out.grad_norms.dtype == torch.float32 and torch.isfinite(out.grad_norms).all()
    resolution = fp32_resolution(logits, targets, adv, mask, cfg, ref_logprobs=ref)
    err = (out.grad_norms.cpu().double() - exact).abs()
    bound = 2 * (oracle.grad_norms.double() - exact).abs() + 1e-5 * exact + 16 * resolution
    assert (err <= bound).all(), (out.grad_norms, exact, oracle.grad_norms, bound)
    for key, value in (("max", exact.max()), ("mean", exact.mean())):
        assert abs(out.metrics[f"gradient/seq_norm_{key}"].item() - value.item()) <= bound.max().item(), key


def test_packed_sequences_all_masked_and_one_token(backend):
    """Packed [N, V] with cu_seqlens: norms per packed sequence (a one-token sequence among them); a fully masked
    sequence has norm 0 and is left out of the mean; a call with every token masked reports zeros, not NaN."""
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 4, 5, 9])
    logits, targets = torch.randn(9, 30, generator=g), torch.randint(0, 30, (9,), generator=g)
    adv, mask = torch.randn(3, generator=g), torch.ones(9)
    mask[5:9] = 0
    cfg = CONFIGS["kl_entropy_temperature"]
    ref = torch.randn(9, generator=g) * 0.1 - 3.0
    out = run(backend, logits, targets, adv, mask, cfg, cu_seqlens=cu, ref_logprobs=ref)
    exact = fp64_norms(logits, targets, adv, mask, cfg, cu_seqlens=cu, ref_logprobs=ref)
    torch.testing.assert_close(out.grad_norms.cpu().double(), exact, rtol=2e-4, atol=1e-9)
    assert out.grad_norms[2].item() == 0.0
    assert out.metrics["gradient/seq_norm_mean"].item() == pytest.approx(exact[:2].mean().item(), rel=2e-4)
    none = run(backend, logits, targets, adv, torch.zeros(9), cfg, cu_seqlens=cu, ref_logprobs=ref)
    assert none.grad_norms.abs().sum().item() == 0.0
    assert none.metrics["gradient/seq_norm_mean"].item() == 0.0 and none.metrics["gradient/seq_norm_max"].item() == 0.0


def test_only_from_logits_and_no_host_sync(monkeypatch):
    """Given log-probs there are no logits to differentiate: no norms. From logits they cost no host sync."""
    from test_value_checks import HostSyncs

    kernel_backend("cpu")
    g = torch.Generator().manual_seed(2)
    logits, targets = torch.randn(2, 3, 17, generator=g), torch.randint(0, 17, (2, 3), generator=g)
    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    out = fastgrpo.policy_loss(lp, torch.ones(2), backend="cpu")
    assert out.grad_norms is None and not any(k.startswith("gradient/") for k in out.metrics)
    for cfg in (LossConfig(), CONFIGS["two_phase_entropy"]):
        counter = HostSyncs(monkeypatch)
        with counter:
            out = fastgrpo.grpo_loss(logits, targets, torch.ones(2), config=cfg, backend="cpu", check_values=False)
        assert out.grad_norms.shape == (2,) and counter.count == 0


def fp64_row_sums(logits, targets, temperature):
    """Σ_{v≠y} p², Σ_{v≠y} p² log p, Σ_{v≠y} p² log² p per row in fp64 (banned entries add 0)."""
    logp = torch.log_softmax(logits.double() / temperature, -1)
    p = logp.exp()
    others = torch.ones_like(p, dtype=torch.bool).scatter_(-1, targets[..., None], False) & (p > 0)
    logp = torch.where(others, logp, 0.0)
    p_sq = torch.where(others, p.square(), 0.0)
    return torch.stack([p_sq.sum(-1), (p_sq * logp).sum(-1), (p_sq * logp.square()).sum(-1)], -1)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@settings(max_examples=15, deadline=None)
@given(
    vocab=st.integers(1, 300),
    scale=st.sampled_from([0.1, 3.0, 30.0, 1e4]),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    banned=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_row_statistics_property(backend_name, vocab, scale, temperature, banned, seed):
    """The token_logprobs op's statistics (ROW_STATS) against fp64, entropy on (all five) and off (the last two 0)."""
    impl = kernel_backend(backend_name)
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(5, vocab, generator=g)
    targets = torch.randint(0, vocab, (5,), generator=g)
    if banned and vocab > banned:
        logits[:, :banned] = float("-inf")
        targets = targets.clamp(min=banned)
    inv_t = torch.tensor([1.0 / temperature], device=DEVICE)
    exact = fp64_row_sums(logits, targets, temperature)
    for entropy in (True, False):
        _, stats, _ = impl.ops.token_logprobs(logits.to(DEVICE), targets.to(DEVICE), None, inv_t, entropy)
        assert stats.shape == (5, len(P.ROW_STATS))
        got = stats[:, 2:].cpu().double()
        want = exact if entropy else torch.cat([exact[:, :1], torch.zeros(5, 2, dtype=torch.float64)], -1)
        # fp32 statistics: the sums are relative to their own size (Σ p² ≤ 1, |Σ p² log p| bounded by its terms)
        scale_of = torch.stack(
            [exact[:, 0], exact[:, 0] * (1 + exact[:, 1].abs()), exact[:, 0] * (1 + exact[:, 2])], -1
        ).clamp(min=1e-30)
        assert ((got - want).abs() <= 2e-5 * scale_of + 1e-12).all(), (entropy, got, want)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("vocab", [1024, 8229])  # one full tile of the Triton kernels; two and a partial one
def test_rows_across_tiles(backend_name, vocab):
    """Rows longer than a tile, the target in the first, a middle or the last full tile, in the partial one, at a
    tile's edges, confident (p_y ≈ 1: only the target's exclusion keeps Σ' p² right) or not: ℓ, H, the statistics
    and the gradient of ℓ and H against fp64, entropy on and off."""
    impl = kernel_backend(backend_name)
    g = torch.Generator().manual_seed(vocab)
    edges = [0, 4095, 4096, 5000, 8191, 8192, vocab - 1] if vocab > 4096 else [0, 511, 512, 1023]
    targets = torch.tensor(edges + edges[:2])
    logits = 2.0 * torch.randn(len(targets), vocab, generator=g)
    confident = torch.arange(len(targets)) % 2 == 1
    logits[confident, targets[confident]] += 25.0  # p_y = 1 − O(e^-20)
    exact = fp64_row_sums(logits, targets, 1.0)
    z = logits.double().requires_grad_()
    lp64, ent64 = fp64_oracle.token_logprobs(z, targets)
    w, u = torch.randn(len(targets), generator=g).double(), torch.randn(len(targets), generator=g).double()
    (grad64,) = torch.autograd.grad((w * lp64 + u * ent64).sum(), z)
    inv_t = torch.ones(1, device=DEVICE)
    for entropy in (True, False):
        lp, stats, ent = impl.ops.token_logprobs(logits.to(DEVICE), targets.to(DEVICE), None, inv_t, entropy)
        stats = stats.cpu().double()
        assert (lp.cpu().double() - lp64).abs().max() < 2e-5
        assert (stats[:, 0] + stats[:, 1] - torch.logsumexp(logits.double(), -1)).abs().max() < 2e-5
        sums = stats[:, 2:] if entropy else stats[:, 2:3]
        want = exact if entropy else exact[:, :1]
        assert ((sums - want).abs() <= 2e-5 * want.abs() + 1e-12).all(), (entropy, sums, want)
        if entropy:
            assert (ent.cpu().double() - ent64).abs().max() < 2e-5
            grad = impl.ops.token_logprobs_backward(
                w.float().to(DEVICE),
                u.float().to(DEVICE),
                logits.to(DEVICE),
                targets.to(DEVICE),
                None,
                stats.float().to(DEVICE),
                ent,
                inv_t,
            )
            err = (grad.cpu().double() - grad64).abs().max()
            assert err < 1e-5 * grad64.abs().max(), err


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_row_statistics_of_masked_and_nan_rows(backend_name):
    """A masked row: all zeros. A NaN or +inf logit: Σ p² is NaN (never hidden), the entropy's two sums NaN with
    the entropy and 0 without it, as ROW_STATS says, on every kernel backend."""
    impl = kernel_backend(backend_name)
    logits = torch.randn(3, 50)
    logits[1, 7], logits[2, 30] = float("nan"), float("inf")
    targets, inv_t = torch.tensor([3, 3, 3]), torch.ones(1)
    mask = torch.tensor([0.0, 1.0, 1.0])
    for entropy in (True, False):
        _, stats, _ = impl.ops.token_logprobs(logits.to(DEVICE), targets.to(DEVICE), mask.to(DEVICE), inv_t, entropy)
        stats = stats.cpu()
        assert (stats[0] == 0).all()
        assert stats[1:, 2].isnan().all()
        assert stats[1:, 3:].isnan().all() if entropy else (stats[1:, 3:] == 0).all()
