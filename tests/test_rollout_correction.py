"""Rollout correction (``fastgrpo.trajectory.rollout_correction`` and LossConfig's rollout options) against the
installed trainers (versions pinned in tests/requirements-trainers.txt):

- verl 0.9.1 ``rollout_corr_helper``: the drop-in's IS weights, rejection mask and every metric, each filter alone
  and chained, every threshold form, and the errors; the loss with ``verl_loss_options`` against verl's bypass-mode
  loss (``loss_type="reinforce"``) and decoupled-mode loss (vanilla PPO given verl's weights and rejected mask);
- OpenRLHF 0.11.2 ``PolicyLoss`` with ``is_correction_gating`` ratio / binary_kl / tv at token and sequence level:
  fastgrpo's wrapper (loss, gradient, vllm_kl, is_filter_ratio) and ``presets.openrlhf`` through the loss;

on random inputs with masked tokens (holding garbage), an all-masked sequence and log-ratios of ±50, on the
reference backend and the compiled kernel backend (fused and two-phase paths), values and gradients."""

import dataclasses
import math

import pytest
import torch

import fastgrpo
from fastgrpo import LossConfig, presets
from fastgrpo.integrations import openrlhf as fg_openrlhf
from fastgrpo.trajectory import rollout_correction as rc

from conftest import DEVICE, KERNEL_BACKENDS, kernel_backend

vh = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper", reason="install tests/requirements-trainers.txt")
from test_integration_packages import openrlhf_modules  # noqa: E402
from verl.trainer.ppo import core_algos as verl_core  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402

B, T, V = 6, 9, 13
KERNEL = KERNEL_BACKENDS[1]  # the C++ CPU extension (CUDA on a GPU machine)
MASKED_ROWS = {0: 6, 2: 4, 4: 0}  # sequence → its length; sequence 4 is all masked


def mismatch(old, g, scale=(0.05, 0.3, 0.02, 0.6, 0.1, 0.15)):
    """Rollout log-probs off ``old`` by a per-sequence amount, with log-ratios ℓ^old − ℓ^rollout of +50 and −50 at
    two unmasked tokens (the latter a rollout "log-prob" above 0: only finiteness is required) and garbage (−30) at
    a masked one."""
    s = torch.tensor(scale, dtype=old.dtype)[:, None]
    rollout = (old + s * torch.randn(old.shape, generator=g, dtype=old.dtype)).clamp(max=-1e-3)
    rollout[1, 2] = old[1, 2] - 50.0
    rollout[3, 4] = old[3, 4] + 50.0
    rollout[0, 7] = old[0, 7] + 30.0
    return rollout


def token_mask():
    mask = torch.ones(B, T, dtype=torch.bool)
    for row, length in MASKED_ROWS.items():
        mask[row, length:] = False
    return mask


def batch(dtype=torch.float64, seed=0):
    """(old, rollout, mask, advantages [B, T])."""
    g = torch.Generator().manual_seed(seed)
    old = -0.5 - 3.0 * torch.rand(B, T, generator=g, dtype=dtype)
    rollout = mismatch(old, g)
    adv = torch.tensor([1.2, -0.7, -1.5, 0.4, -0.2, 0.9], dtype=dtype)[:, None].expand(B, T)
    return old, rollout, token_mask(), adv


def assert_metrics(ours, theirs, rtol=1e-6):
    assert ours.keys() == theirs.keys(), set(ours) ^ set(theirs)
    for key, value in theirs.items():
        a, b = torch.tensor(float(ours[key]), dtype=torch.float64), torch.tensor(float(value), dtype=torch.float64)
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-9, equal_nan=True, msg=key)


# ------------------------------------------------------------------------------------------- verl's helper itself
HELPER_CASES = [
    dict(rollout_is="token", rollout_is_threshold=2.0),
    dict(rollout_is="token", rollout_is_threshold="0.5_2.0", rollout_is_batch_normalize=True),
    dict(rollout_is="sequence", rollout_is_threshold=5.0, rollout_is_batch_normalize=True),
    dict(rollout_is="sequence", rollout_is_threshold="0.2_5"),
    dict(rollout_rs="token_k1", rollout_rs_threshold="0.8_1.3"),
    dict(rollout_rs="token_k2", rollout_rs_threshold=0.02),
    dict(rollout_rs="token_k3", rollout_rs_threshold="0.02"),
    dict(rollout_rs="seq_sum_k1", rollout_rs_threshold="0.5_2.0"),
    dict(rollout_rs="seq_sum_k2", rollout_rs_threshold=0.1),
    dict(rollout_rs="seq_sum_k3", rollout_rs_threshold=0.1),
    dict(rollout_rs="seq_mean_k1", rollout_rs_threshold=1.05),  # one bound: the lower one is its inverse
    dict(rollout_rs="seq_mean_k2", rollout_rs_threshold=0.005),
    dict(rollout_rs="seq_mean_k3", rollout_rs_threshold=0.005),
    dict(rollout_rs="seq_max_k2", rollout_rs_threshold=0.05),
    dict(rollout_rs="seq_max_k3", rollout_rs_threshold=0.05),
    dict(rollout_rs="token_k1,seq_max_k3", rollout_rs_threshold="0.7_1.4,0.1"),
    dict(rollout_rs="seq_sum_k1, seq_mean_k2 ,token_k3,token_k3", rollout_rs_threshold="2.0"),  # one for all
    dict(
        rollout_is="token",
        rollout_is_threshold=2.0,
        rollout_is_batch_normalize=True,
        rollout_rs="seq_mean_k3,token_k1",
        rollout_rs_threshold="0.05,0.5_2.0",
    ),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("options", HELPER_CASES, ids=str)
def test_verl_helper(options, dtype):
    """The drop-in returns verl's weights, rejected mask and every metric (the same keys, values to fp rounding)."""
    old, rollout, mask, _ = batch(dtype)
    theirs = vh.compute_rollout_correction_and_rejection_mask(old, rollout, mask, **options)
    ours = rc.compute_rollout_correction_and_rejection_mask(old, rollout, mask, **options)
    if theirs[0] is None:
        assert ours[0] is None
    else:
        w_theirs, w_ours = theirs[0].batch["rollout_is_weights"], ours[0].batch["rollout_is_weights"]
        assert w_ours.dtype == w_theirs.dtype
        torch.testing.assert_close(w_ours, w_theirs, rtol=1e-6, atol=0.0)
    assert ours[1].dtype == theirs[1].dtype and torch.equal(ours[1], theirs[1])
    assert_metrics(ours[2], theirs[2], rtol=1e-6 if dtype == torch.float64 else 2e-6)
    if "rollout_rs" in options:  # the filters act: some tokens rejected, some kept
        assert 0 < ours[1].sum() < mask.sum()


def test_verl_helper_float_mask_and_parts():
    """A float mask, verl's weight-only and mask-only entry points and the metrics of the current log-probs."""
    old, rollout, mask, _ = batch()
    fmask = mask.double()
    log_ratio = old - rollout
    for fn, kwargs in (
        ("compute_rollout_correction_weights", dict(rollout_is="sequence", rollout_is_threshold="0.5_3.0")),
        ("compute_rollout_rejection_mask", dict(rollout_rs="seq_max_k2,token_k1", rollout_rs_threshold="0.1,1.5")),
    ):
        theirs, ours = (getattr(module, fn)(log_ratio, fmask, **kwargs) for module in (vh, rc))
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=0.0)
        assert_metrics(ours[1], theirs[1])
    for fn in ("compute_offpolicy_metrics", "compute_rollout_corr_metrics_from_logprobs"):
        assert_metrics(getattr(rc, fn)(old, rollout, fmask), getattr(vh, fn)(old, rollout, fmask))
    assert_metrics(rc.compute_offpolicy_metrics(old, None, mask), vh.compute_offpolicy_metrics(old, None, mask))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_verl_helper_batch_normalize_distributed(level, tmp_path):
    """With torch.distributed initialized verl's batch mean is all-reduced (and has no epsilon): so is the
    drop-in's (one gloo rank here)."""
    import torch.distributed as dist

    old, rollout, mask, _ = batch()
    options = dict(rollout_is=level, rollout_is_threshold=3.0, rollout_is_batch_normalize=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        theirs = vh.compute_rollout_correction_and_rejection_mask(old, rollout, mask, **options)
        ours = rc.compute_rollout_correction_and_rejection_mask(old, rollout, mask, **options)
    finally:
        dist.destroy_process_group()
    w_theirs, w_ours = theirs[0].batch["rollout_is_weights"], ours[0].batch["rollout_is_weights"]
    torch.testing.assert_close(w_ours, w_theirs, rtol=1e-12, atol=0.0)
    assert_metrics(ours[2], theirs[2])


BAD_OPTIONS = [
    dict(rollout_is="seq"),
    dict(rollout_is="token", rollout_is_threshold=True),
    dict(rollout_is="token", rollout_is_threshold=""),
    dict(rollout_is="token", rollout_is_threshold="two"),
    dict(rollout_is="token", rollout_is_threshold="2_1"),
    dict(rollout_is="token", rollout_is_threshold=-1.0),
    dict(rollout_is="token", rollout_is_threshold="0_2"),
    dict(rollout_rs="token_k4", rollout_rs_threshold=1.0),
    dict(rollout_rs=" , ", rollout_rs_threshold=1.0),
    dict(rollout_rs="token_k2"),
    dict(rollout_rs="token_k2", rollout_rs_threshold="0.1_0.2"),
    dict(rollout_rs="token_k3", rollout_rs_threshold=-0.1),
    dict(rollout_rs="token_k1,token_k2,seq_max_k3", rollout_rs_threshold="0.5_2,0.1"),
    dict(rollout_rs="token_k1", rollout_rs_threshold="2_0.5"),
    dict(rollout_rs="token_k1", rollout_rs_threshold=[0.5]),
]


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=str)
def test_verl_helper_errors(options):
    """Invalid options raise what verl raises, from the drop-in and from verl_loss_options."""
    old, rollout, mask, _ = batch()
    with pytest.raises((ValueError, TypeError)) as theirs:
        vh.compute_rollout_correction_and_rejection_mask(old, rollout, mask, **options)
    with pytest.raises(type(theirs.value)):
        rc.compute_rollout_correction_and_rejection_mask(old, rollout, mask, **options)
    if options.get("rollout_rs", "") != "token_k2" or "rollout_rs_threshold" in options:
        with pytest.raises(type(theirs.value)):
            rc.verl_loss_options(**options)


@pytest.mark.parametrize("kind", ["token_k1", "token_k2", "token_k3", "seq_max_k2", "seq_max_k3"])
def test_verl_filters_at_their_boundaries(kind):
    """Thresholds placed on the statistic's own values (float → str → float is exact): a statistic that differs
    from verl's by a rounding step keeps or rejects differently somewhere."""
    old, rollout, mask, _ = batch()
    x = (old - rollout).clamp(-20.0, 20.0)[mask]
    k = {"k1": -x, "k2": 0.5 * x**2, "k3": torch.exp(x) - 1.0 - x}[kind[-2:]]
    for value in k.unique()[1:-1:3].tolist():
        spec = f"{math.exp(value)}_{math.exp(value) * 2}" if kind == "token_k1" else str(value)
        theirs = vh.compute_rollout_rejection_mask(old - rollout, mask, kind, spec)
        ours = rc.compute_rollout_rejection_mask(old - rollout, mask, kind, spec)
        assert torch.equal(ours[0], theirs[0]), spec
        assert_metrics(ours[1], theirs[1])


def test_verl_k1_bounds_apply_to_the_inverse_ratio():
    """verl compares k1 = −x with [log L, log U], so its "L_U" bounds π_rollout/π_train: an importance ratio of 1.5 is
    kept by "0.5_0.8" and rejected by "1.25_2". The drop-in does the same; LossConfig bounds the ratio itself and
    verl_loss_options turns (L, U) into (1/U, 1/L)."""
    old = torch.tensor([[math.log(0.3), math.log(0.3)]])
    rollout = torch.tensor([[math.log(0.2), math.log(0.3)]])  # ratios 1.5 and 1
    mask = torch.ones(1, 2, dtype=torch.bool)
    for spec, kept in (("0.5_0.8", [1, 0]), ("1.25_2", [0, 0]), ("0.6_1.1", [1, 1])):
        for module in (vh, rc):
            out = module.compute_rollout_rejection_mask(old - rollout, mask, "token_k1", spec)[0]
            assert out.long().tolist() == [kept], (module.__name__, spec)
    assert rc.verl_loss_options(rollout_rs="token_k1", rollout_rs_threshold="0.5_0.8")["rollout_rejection"] == (
        ("token_k1", 1.25, 2.0),
    )
    seg = rc.Segments.rows(1, 2, old.device)
    x = rc.log_ratios(old.reshape(-1), rollout.reshape(-1), mask.reshape(-1))
    assert rc.rejection_keep(x, mask.reshape(-1), seg, (("token_k1", 0.5, 0.8),)).tolist() == [False, False]
    assert rc.rejection_keep(x, mask.reshape(-1), seg, (("token_k1", 1.25, 2.0),)).tolist() == [True, False]


# --------------------------------------------------------------------------------------------- verl, in the loss
class _ActorConfig(dict):
    """What verl's bypass-mode loss reads of an actor config: policy_loss.rollout_correction, global_batch_info."""

    def __getattr__(self, name):
        return self[name]


VERL_LOSS_CASES = [
    dict(
        rollout_is="token",
        rollout_is_threshold=2.0,
        rollout_rs="token_k1,seq_max_k3",
        rollout_rs_threshold="0.7_1.4,0.1",
    ),
    dict(
        rollout_is="sequence",
        rollout_is_threshold="0.2_5.0",
        rollout_is_batch_normalize=True,
        rollout_rs="seq_mean_k1",
        rollout_rs_threshold="0.9_1.1",
    ),
    dict(rollout_rs="seq_sum_k3,token_k2", rollout_rs_threshold="0.2,0.02"),
]
VERL_AGG = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def verl_batch_info(agg, info, mask):
    """verl's global_batch_info and the fastgrpo normalizer equal to it: the trainer's own counts on one rank
    (the unmodified mask's tokens, its non-empty sequences: fastgrpo's defaults), or a data-parallel split."""
    if info == "trainer":
        return dict(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=int((mask.sum(-1) > 0).sum())), None
    normalizer = {"token-mean": 50 / 2, "seq-mean-token-mean": 12 / 2, "seq-mean-token-sum-norm": 12 / 2 * T}[agg]
    return dict(dp_size=2, batch_num_tokens=50, global_batch_size=12), normalizer


def logits_and_logprobs(seed, dtype=torch.float32):
    """Leaf logits [B, T, V] (one copy per side), the targets and the log-probs ℓ [B, T] of the first copy."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype).to(DEVICE)
    targets = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    lp = torch.log_softmax(theirs, -1).gather(-1, targets[..., None]).squeeze(-1)
    return ours, theirs, targets, lp


@pytest.mark.parametrize("backend", ["reference", KERNEL])
@pytest.mark.parametrize("info", ["trainer", "global"])
@pytest.mark.parametrize("agg", VERL_AGG)
@pytest.mark.parametrize("options", VERL_LOSS_CASES, ids=str)
def test_verl_bypass_reinforce_loss(options, agg, info, backend):
    """verl's bypass mode with loss_type="reinforce": IS weights and filters from the current log-probs (detached)
    vs the rollout's, −A·ℓ·w over the policy term's rejected mask = the verl preset's gpg loss with
    verl_loss_options and no old_logprobs (ℓ^old = sg[ℓ]); loss and gradient."""
    if backend != "reference":
        kernel_backend(backend)
    ours_leaf, theirs_leaf, targets, lp = logits_and_logprobs(seed=3)
    g = torch.Generator().manual_seed(4)
    rollout = mismatch(lp.detach().cpu(), g).to(DEVICE)
    mask, adv = token_mask().to(DEVICE), batch()[3].float().to(DEVICE)
    global_info, normalizer = verl_batch_info(agg, info, mask)
    config = _ActorConfig(
        policy_loss={"rollout_correction": dict(loss_type="reinforce", **options)}, global_batch_info=global_info
    )
    theirs, _ = verl_core.compute_policy_loss_bypass_mode(rollout, lp, adv, mask, loss_agg_mode=agg, config=config)
    kept = vh.compute_rollout_correction_and_rejection_mask(lp.detach(), rollout, mask, **options)[1]
    assert 0 < kept.sum() < mask.sum()  # the filters reject some tokens, not all
    cfg = dataclasses.replace(presets.verl(loss_mode="gpg", loss_agg_mode=agg), **rc.verl_loss_options(**options))
    out = fastgrpo.grpo_loss(
        ours_leaf, targets, adv, mask, sampling_logprobs=rollout, normalizer=normalizer, config=cfg, backend=backend
    )
    torch.testing.assert_close(out.loss, theirs, rtol=2e-5, atol=1e-6)
    (g_theirs,) = torch.autograd.grad(theirs, theirs_leaf)
    (g_ours,) = torch.autograd.grad(out.loss, ours_leaf)
    torch.testing.assert_close(g_ours, g_theirs, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", KERNEL])
@pytest.mark.parametrize("agg", VERL_AGG)
@pytest.mark.parametrize("options", VERL_LOSS_CASES, ids=str)
def test_verl_decoupled_vanilla_loss(options, agg, backend):
    """verl's decoupled mode: the helper's weights and rejected mask from ℓ^old vs ℓ^rollout, then vanilla PPO over
    that mask with the trainer's counts of it = the verl vanilla preset with verl_loss_options, old_logprobs and the
    same counts as normalizer (fused kernel path); loss and gradient. (verl's rejected mask also drops those tokens
    from the KL and entropy terms, which LossConfig's filters leave alone: pass the helper's mask for those.)"""
    if backend != "reference":
        kernel_backend(backend)
    ours_leaf, theirs_leaf, targets, lp = logits_and_logprobs(seed=5)
    g = torch.Generator().manual_seed(6)
    old = mismatch(lp.detach().cpu(), g, scale=(0.1,) * B).to(DEVICE)
    rollout = mismatch(old.cpu(), g).to(DEVICE)
    mask, adv = token_mask().to(DEVICE), batch()[3].float().to(DEVICE)
    proto, kept, _ = vh.compute_rollout_correction_and_rejection_mask(old, rollout, mask, **options)
    assert 0 < kept.sum() < mask.sum()
    counts = dict(dp_size=1, batch_num_tokens=int(kept.sum()), global_batch_size=int((kept.sum(-1) > 0).sum()))
    actor = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
    actor.global_batch_info.update(counts)
    weights = None if proto is None else proto.batch["rollout_is_weights"]
    theirs, _ = verl_core.compute_policy_loss_vanilla(
        old, lp, adv, kept, loss_agg_mode=agg, config=actor, rollout_is_weights=weights
    )
    cfg = dataclasses.replace(presets.verl(loss_mode="vanilla", loss_agg_mode=agg), **rc.verl_loss_options(**options))
    normalizer = counts["batch_num_tokens"] if agg == "token-mean" else counts["global_batch_size"]
    normalizer *= T if agg == "seq-mean-token-sum-norm" else 1
    kw = dict(old_logprobs=old, sampling_logprobs=rollout, normalizer=float(normalizer), config=cfg)
    out = fastgrpo.grpo_loss(ours_leaf, targets, adv, mask, backend=backend, **kw)
    torch.testing.assert_close(out.loss, theirs, rtol=2e-5, atol=1e-6)
    (g_theirs,) = torch.autograd.grad(theirs, theirs_leaf)
    (g_ours,) = torch.autograd.grad(out.loss, ours_leaf)
    torch.testing.assert_close(g_ours, g_theirs, rtol=2e-5, atol=1e-7)


def test_verl_bypass_ppo_clip_through_is_weights():
    """verl's bypass ppo_clip (ratio against the rollout, filters on the current policy, no IS weight) is not a
    config: the rollout log-probs as old_logprobs and rejection_keep of the current log-probs as is_weights."""
    old, rollout, mask, adv = batch()
    lp = old.clone().requires_grad_()
    options = dict(rollout_rs="seq_max_k2,token_k1", rollout_rs_threshold="0.05,0.7_1.4")
    config = _ActorConfig(
        policy_loss={"rollout_correction": dict(loss_type="ppo_clip", **options)},
        global_batch_info=dict(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=5),
        clip_ratio=0.2,
        clip_ratio_low=None,
        clip_ratio_high=None,
    )
    theirs, _ = verl_core.compute_policy_loss_bypass_mode(
        rollout, lp, adv, mask, loss_agg_mode="token-mean", config=config
    )
    filters = rc.verl_loss_options(**options)["rollout_rejection"]
    seg, m = rc.Segments.rows(B, T, lp.device), mask.reshape(-1)
    keep = rc.rejection_keep(rc.log_ratios(lp.reshape(-1), rollout.reshape(-1), m), m, seg, filters, rc.SAFETY_BOUND)
    assert 0 < (keep & m).sum() < m.sum()
    ours = fastgrpo.policy_loss(
        lp, adv, mask, old_logprobs=rollout, is_weights=keep.double().reshape(B, T), config=presets.verl()
    ).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(*(torch.autograd.grad(x, lp)[0] for x in (ours, theirs)), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------------ OpenRLHF
OPENRLHF_GATES = [
    dict(is_correction_level="token", is_correction_gating="binary_kl", is_correction_threshold=[0.0, 2e-3]),
    dict(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=[-1.0, 0.03]),
    dict(is_correction_level="seq", is_correction_gating="binary_kl", is_correction_threshold=[0.0, 2e-3]),
    dict(is_correction_level="seq", is_correction_gating="tv", is_correction_threshold=[0.0, 0.03]),
    dict(is_correction_level="seq", is_correction_mode="mask", is_correction_threshold=[0.8, 1.25]),
    dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=[0.8, 1.25]),
]


def openrlhf_batch():
    """OpenRLHF's inputs (fp64): its PolicyLoss multiplies the masked tokens' IS weight by the loss before the mask,
    so their garbage stays finite here (e^30)."""
    old, rollout, mask, adv = batch(seed=7)
    lp = (old + 0.1 * torch.randn(B, T, generator=torch.Generator().manual_seed(8), dtype=old.dtype)).requires_grad_()
    return lp, old, rollout, mask.double(), adv


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("opts", OPENRLHF_GATES, ids=str)
def test_openrlhf_gating_wrapper(opts, token_level_loss):
    """fastgrpo's PolicyLoss (the gate inside the loss) against OpenRLHF's: loss, gradient, vllm_kl and
    is_filter_ratio (which counts the all-masked sequence at sequence level)."""
    _, loss_module = openrlhf_modules()
    lp, old, rollout, mask, adv = openrlhf_batch()
    kw = dict(token_level_loss=token_level_loss, **opts)
    theirs = loss_module.PolicyLoss(**kw)(lp, old, adv, mask, rollout_log_probs=rollout)
    ours = fg_openrlhf.PolicyLoss(**kw)(lp, old, adv, mask, rollout_log_probs=rollout)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(*(torch.autograd.grad(x[0], lp)[0] for x in (ours, theirs)), rtol=1e-6, atol=1e-9)
    for name, a, b in zip(("clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), ours[1:], theirs[1:]):
        torch.testing.assert_close(a.double(), b.detach().double(), msg=name)
    assert 0 < float(theirs[4]) < 1  # the gate filters some units, not all


@pytest.mark.parametrize("backend", ["reference", KERNEL])
@pytest.mark.parametrize("opts", OPENRLHF_GATES[:4], ids=str)
def test_openrlhf_gating_preset(opts, backend):
    """presets.openrlhf with a divergence gate: the loss itself (fused kernel path, and the reference) against
    OpenRLHF's PolicyLoss, with a normalizer as batch_num_tokens; loss and gradient w.r.t. the logits."""
    if backend != "reference":
        kernel_backend(backend)
    _, loss_module = openrlhf_modules()
    ours_leaf, theirs_leaf, targets, lp = logits_and_logprobs(seed=9)
    g = torch.Generator().manual_seed(10)
    old = mismatch(lp.detach().cpu(), g, scale=(0.1,) * B).to(DEVICE)
    rollout = mismatch(old.cpu(), g).to(DEVICE)
    rollout[0, 7] = old[0, 7]  # OpenRLHF multiplies a masked token's IS weight into its loss before the mask
    mask, adv = token_mask().float().to(DEVICE), batch()[3].float().to(DEVICE)
    theirs = loss_module.PolicyLoss(**opts)(lp, old, adv, mask, rollout_log_probs=rollout, batch_num_tokens=40.0)[0]
    config = presets.openrlhf(**{k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()})
    assert config.rollout_correction.endswith(("_binary_kl_mask", "_tv_mask"))
    kw = dict(old_logprobs=old, sampling_logprobs=rollout, normalizer=40.0, config=config, backend=backend)
    out = fastgrpo.grpo_loss(ours_leaf, targets, adv, mask, **kw)
    torch.testing.assert_close(out.loss, theirs, rtol=2e-5, atol=1e-6)
    (g_theirs,) = torch.autograd.grad(theirs, theirs_leaf)
    (g_ours,) = torch.autograd.grad(out.loss, ours_leaf)
    torch.testing.assert_close(g_ours, g_theirs, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("gating", ["binary_kl", "tv"])
def test_openrlhf_gates_at_their_boundaries(gating):
    """Token gates with the band's upper bound on the divergence's own values: a divergence that differs from
    OpenRLHF's by a rounding step filters differently somewhere (loss and is_filter_ratio)."""
    _, loss_module = openrlhf_modules()
    lp, old, rollout, mask, adv = openrlhf_batch()
    p, q = rollout.exp().clamp(1e-6, 1 - 1e-6), old.exp().clamp(1e-6, 1 - 1e-6)
    stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log() if gating == "binary_kl" else (p - q).abs()
    for value in stat[mask > 0].unique()[1:-1:3].tolist():
        kw = dict(is_correction_level="token", is_correction_gating=gating, is_correction_threshold=[0.0, value])
        theirs = loss_module.PolicyLoss(**kw)(lp, old, adv, mask, rollout_log_probs=rollout)
        ours = fg_openrlhf.PolicyLoss(**kw)(lp, old, adv, mask, rollout_log_probs=rollout)
        torch.testing.assert_close(ours[4].double(), theirs[4].double(), rtol=0, atol=0)
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-9)


def test_openrlhf_preset_gating_errors():
    """OpenRLHF's constructor checks, by the preset: clip needs token level and ratio gating; a divergence gate
    takes (low <= 0, delta)."""
    with pytest.raises(ValueError, match=r"^presets\.openrlhf: is_correction_mode"):
        presets.openrlhf(is_correction_level="token", is_correction_mode="clip", is_correction_gating="tv")
    with pytest.raises(ValueError, match=r"^presets\.openrlhf: is_correction_gating='binary_kl' bounds"):
        presets.openrlhf(is_correction_level="seq", is_correction_gating="binary_kl", is_correction_threshold=(0.1, 1))
    with pytest.raises(ValueError, match=r"^presets\.openrlhf: is_correction_threshold"):
        presets.openrlhf(is_correction_level="seq", is_correction_gating="tv", is_correction_threshold=(0.0, math.nan))
    cfg = presets.openrlhf(is_correction_level="seq", is_correction_gating="tv", is_correction_threshold=(-1.0, 0.1))
    assert (cfg.rollout_correction, cfg.rollout_min, cfg.rollout_max) == ("sequence_tv_mask", -1.0, 0.1)


# ------------------------------------------------------------------------------ the backends agree on each option
CONFIG_CASES = {
    "tv_seq_clamped_normalized": LossConfig(
        rollout_correction="sequence_tv_mask",
        rollout_max=0.03,
        rollout_log_ratio_clamp=5.0,
        rollout_batch_normalize=True,
    ),
    "binary_kl_token_filters_seqmean": LossConfig(
        rollout_correction="token_binary_kl_mask",
        rollout_min=0.0,
        rollout_max=2e-3,
        rollout_rejection=(("seq_mean_k1", 0.9, None), ("token_k2", None, 0.05)),
        aggregation="seq_mean_token_mean",
    ),
    "unweighted_each_filter": LossConfig(
        rollout_correction="unweighted",
        rollout_rejection=(("token_k3", None, 0.1), ("seq_sum_k2", None, 0.5), ("seq_max_k2", None, 0.3)),
        aggregation="seq_mean_token_mean",
    ),
    "sequence_truncate_normalized_k1": LossConfig(
        rollout_correction="sequence_truncate",
        rollout_max=3.0,
        rollout_batch_normalize=True,
        rollout_log_ratio_clamp=20.0,
        rollout_rejection=(("seq_sum_k1", 0.3, 3.0), ("token_k1", 0.5, None)),
        aggregation="seq_mean_token_sum",
        policy_loss="cispo",
        cispo_high=1.3,
    ),
    "geomean_mask_filters": LossConfig(
        rollout_correction="sequence_geomean_mask",
        rollout_min=0.8,
        rollout_max=1.25,
        rollout_rejection=(("seq_mean_k3", None, 0.02),),
        beta=0.05,
        entropy_coef=0.01,
    ),
}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("bypass", [False, True], ids=["old", "bypass"])
@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_backends_agree(name, bypass, layout):
    """The reference's independent statement of the rollout options against the kernel backend (fused path with
    old_logprobs, two-phase without) and objective.policy_loss on given log-probs: loss, gradient, is_weight
    metrics; padded and packed, with extreme log-ratios and an all-masked sequence."""
    impl = kernel_backend(KERNEL)
    cfg = CONFIG_CASES[name]
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    old = mismatch(lp, g, scale=(0.1,) * B)
    rollout = mismatch(lp if bypass else old, g)
    mask, adv = token_mask(), batch()[3][:, 0].float()
    ref_lp = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).gather(-1, targets[..., None]).squeeze(-1)
    kw = dict(sampling_logprobs=rollout, ref_logprobs=ref_lp)
    if not bypass:
        kw["old_logprobs"] = old
    if layout == "packed":  # each sequence's unmasked tokens one after the other; the all-masked one keeps one
        rows = mask.clone()
        rows[4, 0] = True
        logits, targets, mask = logits[rows], targets[rows], mask[rows]
        kw = {k: v[rows] for k, v in kw.items()}
        kw["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.long), rows.sum(-1).cumsum(0)]).int()
    mask = mask.float()
    kw = {k: v.to(DEVICE) for k, v in kw.items()}
    results = []
    for backend, level in (("reference", "logits"), (impl.name, "logits"), (impl.name, "logprobs")):
        leaf = logits.clone().to(DEVICE).requires_grad_()
        if level == "logits":
            out = fastgrpo.grpo_loss(
                leaf, targets.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE), config=cfg, backend=backend, **kw
            )
        else:
            lp_leaf = torch.log_softmax(leaf, -1).gather(-1, targets.to(DEVICE)[..., None]).squeeze(-1)
            ent = -(torch.softmax(leaf, -1) * torch.log_softmax(leaf, -1)).sum(-1) if cfg.needs_entropy else None
            out = fastgrpo.policy_loss(
                lp_leaf, adv.to(DEVICE), mask.to(DEVICE), entropy=ent, config=cfg, backend=backend, **kw
            )
        (grad,) = torch.autograd.grad(out.loss, leaf)
        results.append((out, grad))
    (expected, g_expected), *others = results
    assert expected.loss.abs() > 0 and g_expected.abs().sum() > 0
    assert 0 < float(expected.metrics["is_weight/mean"]) and float(expected.metrics["is_weight/min"]) == 0.0
    for out, grad in others:
        torch.testing.assert_close(out.loss, expected.loss, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(grad, g_expected, rtol=2e-5, atol=1e-7)
        for key in ("is_weight/mean", "is_weight/min", "is_weight/max"):
            torch.testing.assert_close(out.metrics[key], expected.metrics[key], rtol=2e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------------- the config
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rollout_rejection=(("token_k1", 0.5, 2.0),)), ValueError, "need a rollout_correction"),
        (dict(rollout_batch_normalize=True), ValueError, "need a rollout_correction"),
        (dict(rollout_correction="unweighted", rollout_max=2.0), ValueError, "no importance weight"),
        (dict(rollout_correction="token_mask", rollout_rejection=[("token_k1", 0.5, 2.0)]), TypeError, "tuple"),
        (dict(rollout_correction="token_mask", rollout_rejection=(("token_k1", 0.5),)), TypeError, "triples|tuples"),
        (dict(rollout_correction="token_mask", rollout_rejection=(("seq_max_k1", None, 2.0),)), ValueError, "kind"),
        (dict(rollout_correction="token_mask", rollout_rejection=(("token_k2", 0.1, 2.0),)), ValueError, "from above"),
        (dict(rollout_correction="token_mask", rollout_rejection=(("token_k3", None, None),)), ValueError, "above"),
        (dict(rollout_correction="token_mask", rollout_rejection=(("token_k1", 2.0, 0.5),)), ValueError, "low <= high"),
        (dict(rollout_correction="token_mask", rollout_rejection=(("token_k1", None, None),)), ValueError, "at least"),
        (dict(rollout_correction="token_mask", rollout_rejection=(("token_k1", "1", 2.0),)), TypeError, "numbers"),
        (
            dict(rollout_correction="token_mask", rollout_rejection=(("token_k2", None, math.inf),)),
            ValueError,
            "finite",
        ),
        (dict(rollout_correction="token_mask", rollout_log_ratio_clamp=0.0), ValueError, "rollout_log_ratio_clamp"),
        (dict(rollout_correction="token_mask", rollout_batch_normalize=1), TypeError, "rollout_batch_normalize"),
        (dict(rollout_correction="token_mask", rollout_min=-0.5), ValueError, "rollout_min"),
        (
            dict(policy_loss="gmpo", rollout_correction="unweighted", rollout_rejection=(("token_k3", None, 0.1),)),
            ValueError,
            "not supported with policy_loss='gmpo'",
        ),
    ],
)
def test_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        LossConfig(**kwargs)
    assert info.value.fields  # names the field


def test_config_values():
    """Divergence gates take bounds of any sign; configs with filters are hashable; verl_loss_options maps each
    IS form."""
    cfg = LossConfig(rollout_correction="token_tv_mask", rollout_min=-1.0, rollout_max=0.1)
    assert hash(cfg) == hash(dataclasses.replace(cfg))
    assert rc.verl_loss_options() == {}
    assert rc.verl_loss_options(rollout_is="token", rollout_is_threshold=None) == {}
    opts = rc.verl_loss_options(rollout_is="sequence", rollout_is_threshold="0.5_2", rollout_is_batch_normalize=True)
    assert opts == dict(
        rollout_correction="sequence_mask",
        rollout_min=0.5,
        rollout_max=2.0,
        rollout_batch_normalize=True,
        rollout_log_ratio_clamp=20.0,
    )
    opts = rc.verl_loss_options(rollout_rs="seq_max_k3,seq_mean_k1", rollout_rs_threshold="0.1,2")
    assert opts["rollout_correction"] == "unweighted"
    assert opts["rollout_rejection"] == (("seq_max_k3", None, 0.1), ("seq_mean_k1", 0.5, 2.0))
    hash(LossConfig(**opts))
