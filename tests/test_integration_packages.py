"""The verl and OpenRLHF drop-ins against the installed packages' own functions (versions pinned in
tests/requirements-trainers.txt), on random inputs for every mode: loss, gradients and metrics.

OpenRLHF: ``import openrlhf.models`` needs flash_attn (a CUDA-only build) and its ``models/utils.py`` imports
deepspeed at the top (whose build needs a CUDA toolkit torch). So the test loads the installed
``openrlhf/models/loss.py`` and ``models/utils.py`` files themselves under a bare package, with ``deepspeed``
stubbed: only ``set_z3_leaf_modules`` uses it, which nothing here calls. The code under test is the package's."""

import contextlib
import importlib.util
import pathlib
import sys
import types

import pytest
import torch

from fastgrpo import policy_loss, presets

verl_core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="install tests/requirements-trainers.txt")
from verl.utils import torch_functional as verl_F  # noqa: E402
from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402

from fastgrpo.integrations import openrlhf as fg_openrlhf  # noqa: E402
from fastgrpo.integrations import verl as fg_verl  # noqa: E402

B, T = 5, 7
VERL_AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def openrlhf_modules():
    spec = importlib.util.find_spec("openrlhf")
    if spec is None:
        pytest.skip("install tests/requirements-trainers.txt")
    root = pathlib.Path(spec.submodule_search_locations[0]) / "models"
    saved = {k: sys.modules.get(k) for k in ("deepspeed", "_orlhf", "_orlhf.utils", "_orlhf.loss")}
    try:
        sys.modules["deepspeed"] = types.ModuleType("deepspeed")
        package = types.ModuleType("_orlhf")
        package.__path__ = [str(root)]
        sys.modules["_orlhf"] = package
        loaded = []
        for name in ("utils", "loss"):
            spec = importlib.util.spec_from_file_location(f"_orlhf.{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            loaded.append(module)
        return loaded
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(5)
    lp = (-2.0 * torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    adv = torch.tensor([1.2, -0.7, -1.5, 0.4, -0.2], dtype=torch.float64)[:, None].expand(B, T)
    return dict(
        lp=lp,
        old=lp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
        ref=lp.detach() + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64),
        rollout=lp.detach() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64),
        adv=adv,
        mask=mask,
        weights=torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5,
    )


def assert_same(ours, theirs, lp):
    (g_ours,) = torch.autograd.grad(ours, lp, retain_graph=True)
    (g_theirs,) = torch.autograd.grad(theirs, lp)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss_mode", fg_verl.LOSS_MODES)
@pytest.mark.parametrize("loss_agg_mode", VERL_AGG_MODES)
@pytest.mark.parametrize("batch_info", ["local", "global"])
def test_verl_policy_losses(data, loss_mode, loss_agg_mode, batch_info):
    d = data
    config = FSDPActorConfig(
        strategy="fsdp",
        clip_ratio=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=2.0,
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        tau_pos=1.2,
        tau_neg=0.9,
    )
    if loss_mode == "gspo":
        config = FSDPActorConfig(
            strategy="fsdp", clip_ratio=3e-4, clip_ratio_high=4e-4, rollout_n=1, ppo_micro_batch_size_per_gpu=1
        )
    if batch_info == "global":
        config.global_batch_info.update(dp_size=2, batch_num_tokens=50, global_batch_size=12, loss_scale_factor=16)
    # clip_cov draws a few of the tokens, kl_cov takes a few
    object.__setattr__(
        config, "policy_loss", PolicyLossConfig(dro_beta=0.7, clip_cov_lb=-1.0, clip_cov_ratio=0.2, kl_cov_ratio=0.15)
    )
    torch.manual_seed(11)  # clip_cov draws from torch's global generator
    theirs, their_metrics = verl_core.get_policy_loss_fn(loss_mode)(
        d["old"],
        d["lp"],
        d["adv"],
        d["mask"],
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=d["weights"],
    )
    torch.manual_seed(11)
    ours, our_metrics = fg_verl.policy_loss_fn(loss_mode)(
        d["old"],
        d["lp"],
        d["adv"],
        d["mask"],
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=d["weights"],
    )
    assert_same(ours, theirs, d["lp"])
    assert our_metrics.keys() == their_metrics.keys()
    for name, value in their_metrics.items():
        assert our_metrics[name] == pytest.approx(float(value), rel=1e-6, abs=1e-9), name


def plain_verl_config():
    """verl's default actor config, with the one option a mode requires (dro_beta)."""
    config = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
    object.__setattr__(config, "policy_loss", PolicyLossConfig(dro_beta=0.5))
    return config


def test_verl_registry(data):
    names = fg_verl.register_policy_losses()
    config = plain_verl_config()
    for name, mode in zip(names, fg_verl.LOSS_MODES):
        torch.manual_seed(0)  # clip_cov draws from the global generator
        theirs, _ = verl_core.get_policy_loss_fn(mode)(
            data["old"], data["lp"], data["adv"], data["mask"], config=config
        )
        torch.manual_seed(0)
        ours, _ = verl_core.get_policy_loss_fn(name)(data["old"], data["lp"], data["adv"], data["mask"], config=config)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6), name


@pytest.mark.parametrize("kl_type", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+"])
def test_verl_kl_penalty(data, kl_type):
    ref = data["lp"].detach() + 25 * torch.randn(B, T, dtype=torch.float64)  # beyond the ±20 clamps
    assert_same(
        fg_verl.kl_penalty(data["lp"], ref, kl_type).sum(),
        verl_core.kl_penalty(data["lp"], ref, kl_type).sum(),
        data["lp"],
    )


def test_verl_logprobs_from_logits():
    logits = torch.randn(3, 4, 50, dtype=torch.float32, requires_grad=True)
    labels = torch.randint(0, 50, (3, 4))
    w = torch.randn(3, 4)
    ours = fg_verl.logprobs_from_logits(logits, labels)
    theirs = verl_F.logprobs_from_logits(logits, labels)
    torch.testing.assert_close(ours, theirs)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), logits)
    (g_theirs,) = torch.autograd.grad((theirs * w).sum(), logits)
    torch.testing.assert_close(g_ours, g_theirs)


@pytest.mark.parametrize("loss_mode", fg_verl.LOSS_MODES)
@pytest.mark.parametrize("loss_agg_mode", VERL_AGG_MODES)
def test_verl_dp_size_without_global_counts(data, loss_mode, loss_agg_mode):
    """dp_size > 1 without the global token/sequence count: verl raises (a local count would weight each rank's
    gradient differently); so must the drop-in. Where verl needs no count (token-sum, geo_mean) both agree."""
    d = data
    config = plain_verl_config()
    config.global_batch_info.update(dp_size=2)
    args = (d["old"], d["lp"], d["adv"], d["mask"])
    try:
        theirs, _ = verl_core.get_policy_loss_fn(loss_mode)(*args, loss_agg_mode=loss_agg_mode, config=config)
    except ValueError as e:
        assert "dp_size > 1" in str(e)
        expected = r"global_batch_info\['(batch_num_tokens|global_batch_size)'\].*dp_size > 1"
        with pytest.raises(ValueError, match=expected):
            fg_verl.policy_loss_fn(loss_mode)(*args, loss_agg_mode=loss_agg_mode, config=config)
        return
    ours, _ = fg_verl.policy_loss_fn(loss_mode)(*args, loss_agg_mode=loss_agg_mode, config=config)
    assert_same(ours, theirs, d["lp"])


@pytest.fixture
def verl_gpu_paths(monkeypatch):
    """verl's GPU paths of ``logprobs_from_logits`` (flash-attn's cross-entropy) and ``linear_cross_entropy`` (its
    Triton kernels) cannot run here: their kernels are replaced by the same math in torch, taking rows as the real
    kernels do, so what runs is verl's own code around them: the reshapes and reductions that decide which shapes
    it accepts and returns."""
    from verl.utils.kernel import kernels
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    def cross_entropy_loss(logits, labels, inplace_backward=False):
        assert logits.dim() == 2 and labels.dim() == 1
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none"), None

    def efficient_entropy_forward(hidden, weight, labels, reduction, temperature, dist_process_group):
        assert hidden.dim() == 2 and labels.dim() == 1
        logp = ((hidden.float() @ weight.float().T) / temperature).log_softmax(-1)
        lp, ent = logp.gather(-1, labels[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
        return {0: lp, 1: lp.sum(), 2: lp.mean()}[reduction], ent, None, None, None

    monkeypatch.setattr(verl_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", True)
    monkeypatch.setattr(verl_F, "cross_entropy_loss", cross_entropy_loss, raising=False)
    monkeypatch.setattr(kernels, "efficient_entropy_forward", efficient_entropy_forward)
    monkeypatch.setattr(torch.cuda.nvtx, "range", lambda msg: contextlib.nullcontext())
    return verl_F.logprobs_from_logits, linear_cross_entropy


# verl's own test_linear_cross_entropy passes logits [N, V] with labels [1, N]
ROWS_AND_LABELS = [((6,), (1, 6)), ((6,), (6,)), ((1, 6), (1, 6)), ((2, 3), (2, 3)), ((2, 3), (6,)), ((2, 3, 2), (12,))]


@pytest.mark.parametrize("rows, label_shape", ROWS_AND_LABELS, ids=str)
def test_verl_logprobs_from_logits_shapes(verl_gpu_paths, rows, label_shape):
    theirs_fn, _ = verl_gpu_paths
    logits = torch.randn(*rows, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, label_shape)
    theirs, ours = theirs_fn(logits, labels), fg_verl.logprobs_from_logits(logits, labels)
    assert ours.shape == theirs.shape
    assert_same(ours.sum(), theirs.sum(), logits)
    with pytest.raises(ValueError, match="labels must hold one id per row of logits"):
        fg_verl.logprobs_from_logits(logits, labels.reshape(-1)[1:])


@pytest.mark.parametrize("rows, label_shape", ROWS_AND_LABELS, ids=str)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "Mean"])
def test_verl_linear_cross_entropy_shapes(verl_gpu_paths, rows, label_shape, reduction):
    _, theirs_fn = verl_gpu_paths
    hidden, weight = torch.randn(*rows, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, label_shape)
    theirs = theirs_fn(hidden, weight, labels, 0.9, reduction)
    ours = fg_verl.linear_cross_entropy(hidden, weight, labels, 0.9, reduction)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_verl_fused_linear_for_ppo():
    """fp32: the same values and gradients as verl's torch implementation. bf16: verl rounds the logits to
    bf16 before the softmax, fastgrpo keeps them fp32, so fastgrpo must be as close as verl to verl's fp32."""
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(2, 9, 16, generator=g), 0.3 * torch.randn(70, 16, generator=g)
    ids = torch.randint(0, 70, (2, 9), generator=g)
    w_lp, w_ent = torch.randn(2, 9, generator=g), torch.randn(2, 9, generator=g)

    def run(module, dtype):
        h, w = (x.to(dtype).clone().requires_grad_() for x in (hidden, weight))
        lp, ent = module(h, w, ids, temperature=0.7)
        assert lp.dtype == torch.float32 and ent.dtype == dtype
        ((lp.reshape(2, 9) * w_lp).sum() + (ent.reshape(2, 9).float() * w_ent).sum()).backward()
        return [x.reshape(-1).float() for x in (lp, ent, h.grad, w.grad)]

    exact = run(FusedLinearForPPO(chunk_size=4), torch.float32)
    for a, b in zip(run(fg_verl.FusedLinearForPPO(chunk_size=4), torch.float32), exact):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    theirs, ours = (run(m, torch.bfloat16) for m in (FusedLinearForPPO(chunk_size=4), fg_verl.FusedLinearForPPO()))
    for name, a, b, e in zip(("log_probs", "entropy", "d_hidden", "d_weight"), ours, theirs, exact):
        assert (a - e).norm() <= 1.5 * (b - e).norm() + 1e-6 * e.norm(), name


def test_verl_linear_cross_entropy():
    """verl's Triton linear_cross_entropy needs CUDA: its outputs are checked against verl's torch
    FusedLinearForPPO, which computes the same (log-probs, entropy)."""
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    hidden, weight, labels = torch.randn(6, 8), torch.randn(30, 8), torch.randint(0, 30, (6,))
    lp, ent = fg_verl.linear_cross_entropy(hidden, weight, labels, 0.9)
    ref_lp, ref_ent = FusedLinearForPPO()(hidden, weight, labels, 0.9)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    with pytest.raises(ValueError, match="reduction"):
        fg_verl.linear_cross_entropy(hidden, weight, labels, reduction="average")
    with pytest.raises(TypeError, match="dist_process_group must be a torch.distributed.ProcessGroup"):
        fg_verl.linear_cross_entropy(hidden, weight, labels, dist_process_group=object())


@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(dual_clip=1.5),
        dict(token_level_loss=False, clip_eps_high=0.28),
        dict(policy_loss_type="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4),
        dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=[0.9, 1.2]),
        dict(is_correction_level="token", is_correction_mode="mask", is_correction_threshold=[0.9, 1.2]),
        dict(is_correction_level="seq", is_correction_mode="mask", is_correction_threshold=[0.9, 1.2]),
        dict(is_correction_level="token", is_correction_gating="binary_kl", is_correction_threshold=[0.0, 0.01]),
        dict(is_correction_level="seq", is_correction_gating="tv", is_correction_threshold=[0.0, 0.03]),
        dict(
            policy_loss_type="gspo",
            clip_eps_low=3e-4,
            clip_eps_high=4e-4,
            is_correction_level="token",
            is_correction_threshold=[0.9, 1.2],
        ),
    ],
    ids=str,
)
@pytest.mark.parametrize("batch_info", ["local", "global"])
def test_openrlhf_policy_loss(data, opts, batch_info):
    _, loss_module = openrlhf_modules()
    d = data
    mask = d["mask"].double()
    kw = dict(dp_size=2, batch_num_tokens=50.0, global_batch_size=12.0) if batch_info == "global" else {}
    theirs = loss_module.PolicyLoss(**opts)(d["lp"], d["old"], d["adv"], mask, rollout_log_probs=d["rollout"], **kw)
    ours = fg_openrlhf.PolicyLoss(**opts)(d["lp"], d["old"], d["adv"], mask, rollout_log_probs=d["rollout"], **kw)
    assert len(ours) == len(theirs) == 5
    assert_same(ours[0], theirs[0], d["lp"])
    for name, a, b in zip(("clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), ours[1:], theirs[1:]):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a.double(), b.detach().double(), msg=name)


def test_openrlhf_log_probs():
    utils, _ = openrlhf_modules()
    leaf = torch.randn(3, 4, 50, requires_grad=True)
    labels = torch.randint(0, 50, (3, 4))
    for temperature in (1.0, 0.7):  # a copy each: OpenRLHF divides the logits by the temperature in place
        ours = fg_openrlhf.log_probs_from_logits(leaf * 1.0, labels, temperature=temperature)
        theirs = utils.log_probs_from_logits(leaf * 1.0, labels, temperature=temperature)
        torch.testing.assert_close(ours, theirs)
        (g_ours,) = torch.autograd.grad(ours.sum(), leaf, retain_graph=True)
        (g_theirs,) = torch.autograd.grad(theirs.sum(), leaf, retain_graph=True)
        torch.testing.assert_close(g_ours, g_theirs)


@pytest.mark.parametrize("rows, label_shape", ROWS_AND_LABELS, ids=str)
def test_openrlhf_log_probs_shapes(monkeypatch, rows, label_shape):
    """OpenRLHF's fp32 path with flash-attn (on GPUs) flattens the rows and the labels; flash-attn's kernel is
    replaced by the same math in torch, so the shapes are OpenRLHF's own."""
    utils, _ = openrlhf_modules()
    kernel = types.ModuleType("flash_attn.ops.triton.cross_entropy")
    kernel.cross_entropy_loss = lambda logits, labels: (  # flash-attn's losses are fp32
        torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none"),
        None,
    )
    for name in ("flash_attn", "flash_attn.ops", "flash_attn.ops.triton"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, kernel.__name__, kernel)
    logits = torch.randn(*rows, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, label_shape)
    theirs = utils.log_probs_from_logits(logits * 1.0, labels)
    ours = fg_openrlhf.log_probs_from_logits(logits, labels)
    assert ours.shape == theirs.shape
    assert_same(ours.sum(), theirs.sum(), logits)


def far_policy_data(shift):
    """fp32 (the trainers' log-prob dtype, where exp(100) overflows) with log π − log π_ref = log π − log π_old =
    shift at every token."""
    g = torch.Generator().manual_seed(7)
    lp = (-2.0 * torch.rand(B, T, generator=g)).requires_grad_()
    mask = torch.ones(B, T)
    mask[1, 4:] = 0.0
    adv = torch.tensor([1.2, -0.7, -1.5, 0.4, -0.2])[:, None].expand(B, T)
    return lp, lp.detach() - shift, adv, mask


@pytest.mark.parametrize("shift", [-100.0, -3.0, 0.5, 100.0])
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_openrlhf_far_reference_policy(shift, kl_estimator):
    """OpenRLHF's KL estimates are clamped to ±10, and k3 clamps the log-ratio at −10 before exp: a reference
    policy 100 nats away gives a finite KL term with a zero gradient there (the clamp's), never NaN. Checked on
    the KL drop-in and on fastgrpo's whole OpenRLHF actor loss (policy + init_kl_coef · KL, the preset) against
    OpenRLHF's PolicyLoss + compute_approx_kl + aggregate_loss."""
    utils, loss_module = openrlhf_modules()
    lp, far, adv, mask = far_policy_data(shift)
    kl_theirs = utils.compute_approx_kl(lp, far, far, kl_estimator=kl_estimator)
    kl_ours = fg_openrlhf.compute_approx_kl(lp, far, far, kl_estimator=kl_estimator)
    torch.testing.assert_close(kl_ours, kl_theirs)
    grads = [torch.autograd.grad((k * mask).sum(), lp, retain_graph=True)[0] for k in (kl_ours, kl_theirs)]
    torch.testing.assert_close(*grads)
    coef = 0.1
    theirs = loss_module.PolicyLoss()(lp, far, adv, mask)[0] + coef * loss_module.aggregate_loss(kl_theirs, mask)
    config = presets.openrlhf(use_kl_loss=True, init_kl_coef=coef, kl_estimator=kl_estimator)
    ours = policy_loss(lp, adv, mask, old_logprobs=far, ref_logprobs=far, config=config).loss
    torch.testing.assert_close(ours, theirs)
    grads = [torch.autograd.grad(x, lp)[0] for x in (ours, theirs)]
    assert grads[1].isfinite().all()
    torch.testing.assert_close(*grads)
    # --algo.kl.unbiased_gradient: the value, and the importance-weighted gradient (old = far: weight capped at 10)
    for old in (far, None):
        kl_theirs = utils.compute_approx_kl(lp, far, old, kl_estimator=kl_estimator, unbiased_gradient=True)
        kl_ours = fg_openrlhf.compute_approx_kl(lp, far, old, kl_estimator=kl_estimator, unbiased_gradient=True)
        torch.testing.assert_close(kl_ours, kl_theirs)
        grads = [torch.autograd.grad((k * mask).sum(), lp, retain_graph=True)[0] for k in (kl_ours, kl_theirs)]
        torch.testing.assert_close(*grads)


@pytest.mark.parametrize("shift", [-100.0, 100.0])
def test_openrlhf_policy_loss_far_old_policy(shift):
    """PPO's log-ratio clamp at ±20 (OpenRLHF's) passes through the drop-in: the same loss and gradient."""
    _, loss_module = openrlhf_modules()
    lp, far, adv, mask = far_policy_data(shift)
    results = [
        module(dual_clip=3.0)(lp, far, adv, mask)[0] for module in (fg_openrlhf.PolicyLoss, loss_module.PolicyLoss)
    ]
    torch.testing.assert_close(*results)
    grads = [torch.autograd.grad(x, lp)[0] for x in results]
    assert grads[1].isfinite().all()
    torch.testing.assert_close(*grads)
