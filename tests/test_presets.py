"""Presets reproduce each trainer's loss as written in its source (restated in trainer_losses.py):
loss and gradients w.r.t. the log-probs and the entropy, on random inputs with a partly and a fully
masked sequence."""

import pytest
import torch

import fastgrpo
from fastgrpo import presets

from trainer_losses import openrlhf_actor_loss, trl_importance_sampling_ratio, trl_loss, verl_actor_loss

B, T = 4, 6


def far(scale: float) -> torch.Tensor:
    """A seeded [B, T] spread of log-probs ``scale`` wide (reaching the trainers' clamps), the same every run."""
    return scale * torch.randn(B, T, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    lp = (-2.0 * torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    noise = lambda s: s * torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 4:] = 0
    mask[3] = 0  # a fully masked sequence: TRL counts it in its sequence mean, verl and OpenRLHF do not
    return dict(
        lp=lp,
        old=lp.detach() + noise(0.3),
        ref=lp.detach() + noise(0.3),
        samp=lp.detach() + noise(0.2),
        adv=torch.tensor([1.2, -0.7, -1.5, 0.4], dtype=torch.float64),
        mask=mask,
        entropy=(1.0 + torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_(),
    )


def compare(expected, out, d):
    # fp64 inputs; 1e-6 leaves room for constants the trainers build in fp32 (TRL: torch.where(A > 0, 1.0, 1.05))
    ge = torch.autograd.grad(expected, (d["lp"], d["entropy"]), allow_unused=True)
    go = torch.autograd.grad(out.loss, (d["lp"], d["entropy"]), allow_unused=True)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-9)
    for a, b in zip(go, ge):
        a = torch.zeros_like(d["lp"]) if a is None else a
        b = torch.zeros_like(d["lp"]) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def ours(d, cfg, **kw):
    return fastgrpo.policy_loss(
        d["lp"],
        d["adv"],
        d["mask"],
        old_logprobs=d["old"],
        ref_logprobs=d["ref"],
        entropy=d["entropy"],
        config=cfg,
        backend="reference",
        **kw,
    )


# ---------------------------------------------------------------------------------------------------- TRL
TRL_CASES = [
    dict(loss_type="grpo"),
    dict(loss_type="bnpo"),
    dict(loss_type="dr_grpo", max_completion_length=16),
    dict(loss_type="dapo", epsilon_high=0.28),
    dict(loss_type="cispo", epsilon_high=1.2),
    dict(loss_type="sapo"),
    dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
    dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
    dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.5),
    dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True, delta=1.1),
    dict(loss_type="bnpo", beta=0.1, top_entropy_quantile=0.4, entropy_coef=0.01),
    dict(loss_type="dapo", beta=0.05, entropy_coef=0.02, off_policy_mask_threshold=0.05),
    dict(loss_type="dr_grpo", off_policy_mask_threshold=0.0, gradient_accumulation_steps=4),
    dict(
        loss_type="grpo",
        importance_sampling_level="sequence",
        beta=0.1,
        use_bias_correction_kl=True,
        gradient_accumulation_steps=2,
    ),
]


@pytest.mark.parametrize("opts", TRL_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_trl(data, opts):
    d = data
    num_items = d["mask"].sum()
    expected = trl_loss(
        d["lp"],
        d["old"],
        d["ref"],
        d["adv"],
        d["mask"],
        d["entropy"],
        sampling=d["samp"],
        num_items_in_batch=num_items,
        **opts,
    )
    out = ours(
        d,
        presets.trl(**opts),
        sampling_logprobs=d["samp"],
        normalizer=num_items if opts["loss_type"] in ("dapo", "cispo") else None,
    )
    compare(expected, out, d)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_trl_vllm_importance_sampling(data, mode):
    d = data
    lo, hi = (0.9, 1.3) if mode.startswith("token") else (0.2, 1.5)
    ratio = trl_importance_sampling_ratio(d["old"], d["samp"], d["mask"], mode, lo, hi)
    opts = dict(loss_type="bnpo", beta=0.02)
    expected = trl_loss(
        d["lp"], d["old"], d["ref"], d["adv"], d["mask"], d["entropy"], importance_sampling_ratio=ratio, **opts
    )
    cfg = presets.trl(
        **opts,
        use_vllm=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=lo,
        vllm_importance_sampling_clip_max=hi,
    )
    compare(expected, ours(d, cfg, sampling_logprobs=d["samp"]), d)
    # TRL's precomputed ratio passed as is_weights gives the same loss
    compare(
        trl_loss(
            d["lp"], d["old"], d["ref"], d["adv"], d["mask"], d["entropy"], importance_sampling_ratio=ratio, **opts
        ),
        ours(d, cfg, is_weights=ratio),
        d,
    )


# --------------------------------------------------------------------------------------------------- verl
VERL_MODES = ["vanilla", "gspo", "sapo", "gpg", "geo_mean", "cispo"]
VERL_AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("loss_mode", VERL_MODES)
@pytest.mark.parametrize("loss_agg_mode", VERL_AGGS)
def test_verl_modes(data, loss_mode, loss_agg_mode):
    d = data
    opts = dict(
        loss_mode=loss_mode,
        loss_agg_mode=loss_agg_mode,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=1.5,
        entropy_coeff=0.01,
        use_kl_loss=True,
        kl_loss_coef=0.05,
        gradient_accumulation_steps=2,
    )
    if loss_mode == "gspo":
        opts.update(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    trainer = {k: v for k, v in opts.items() if k != "gradient_accumulation_steps"}
    expected = verl_actor_loss(
        d["old"],
        d["lp"],
        d["ref"],
        d["adv"][:, None].expand(B, T),
        d["mask"],
        d["entropy"],
        gradient_accumulation=2,
        **trainer,
    )
    compare(expected, ours(d, presets.verl(**opts)), d)


@pytest.mark.parametrize(
    "kl_loss_type", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "abs+", "k2+", "k3+", "low_var_kl+"]
)
def test_verl_kl_types(data, kl_loss_type):
    d = data
    opts = dict(
        loss_mode="vanilla", loss_agg_mode="token-mean", use_kl_loss=True, kl_loss_coef=0.3, kl_loss_type=kl_loss_type
    )
    d["ref"] = d["lp"].detach() + far(25.0)  # reach the k3 clamps
    expected = verl_actor_loss(
        d["old"], d["lp"], d["ref"], d["adv"][:, None].expand(B, T), d["mask"], d["entropy"], **opts
    )
    compare(expected, ours(d, presets.verl(**opts)), d)


@pytest.mark.parametrize("loss_mode", ["vanilla", "gpg", "geo_mean", "cispo"])
def test_verl_rollout_is_weights_and_scale_factor(data, loss_mode):
    d = data
    w = torch.rand(B, T, dtype=torch.float64) + 0.5
    opts = dict(loss_mode=loss_mode, loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=10)
    expected = verl_actor_loss(
        d["old"],
        d["lp"],
        d["ref"],
        d["adv"][:, None].expand(B, T),
        d["mask"],
        d["entropy"],
        rollout_is_weights=w,
        **opts,
    )
    compare(expected, ours(d, presets.verl(**opts), is_weights=w), d)


# ----------------------------------------------------------------------------------------------- OpenRLHF
OPENRLHF_CASES = [
    dict(policy_loss_type="ppo"),
    dict(policy_loss_type="ppo", token_level_loss=False, eps_clip_low_high=(0.2, 0.28)),
    dict(policy_loss_type="ppo", dual_clip=1.5),
    dict(policy_loss_type="gspo", eps_clip_low_high=(3e-4, 4e-4)),
    dict(policy_loss_type="gspo", eps_clip_low_high=(0.4, 0.5), dual_clip=1.2),
    dict(policy_loss_type="ppo", use_kl_loss=True, init_kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01),
    dict(policy_loss_type="ppo", use_kl_loss=True, init_kl_coef=0.1, kl_estimator="k2"),
    dict(policy_loss_type="gspo", use_kl_loss=True, init_kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01),
    dict(
        policy_loss_type="ppo",
        is_correction_level="token",
        is_correction_mode="clip",
        is_correction_threshold=(0.9, 1.2),
    ),
    dict(
        policy_loss_type="ppo",
        is_correction_level="token",
        is_correction_mode="mask",
        is_correction_threshold=(0.9, 1.2),
    ),
    dict(
        policy_loss_type="ppo",
        is_correction_level="seq",
        is_correction_mode="mask",
        is_correction_threshold=(0.9, 1.2),
        token_level_loss=False,
    ),
]


@pytest.mark.parametrize("opts", OPENRLHF_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_openrlhf(data, opts):
    d = data
    d["ref"] = d["lp"].detach() + far(15.0)  # reach the ±10 KL clamp
    trainer = {k: v for k, v in opts.items() if k != "eps_clip_low_high"}
    low, high = opts.get("eps_clip_low_high", (0.2, 0.2))
    expected = openrlhf_actor_loss(
        d["lp"],
        d["old"],
        d["ref"],
        d["adv"][:, None].expand(B, T),
        d["mask"],
        d["entropy"],
        clip_eps_low=low,
        clip_eps_high=high,
        rollout=d["samp"],
        **trainer,
    )
    compare(expected, ours(d, presets.openrlhf(**opts), sampling_logprobs=d["samp"]), d)


# ------------------------------------------------------------------------------------------- advantages
def test_preset_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    trl_adv, _ = fastgrpo.reference.advantages(r, 3, config=presets.trl(loss_type="grpo").advantage)
    # TRL: (r − mean)/(std + 1e-4): group [1, 0, 0] mean 1/3, std 0.5773503
    torch.testing.assert_close(trl_adv[:3], torch.tensor([1.154501, -0.577250, -0.577250]), rtol=1e-5, atol=1e-6)
    verl_cfg = presets.verl(norm_adv_by_std_in_grpo=False).advantage
    assert (verl_cfg.scale, verl_cfg.eps, verl_cfg.singleton) == ("none", 1e-6, "raw")
    assert presets.openrlhf(advantage_estimator="rloo").advantage.estimator == "rloo"


def test_preset_rejects_unknown_options():
    with pytest.raises(ValueError, match="loss_type"):
        presets.trl(loss_type="gspo")  # (GSPO is importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="loss_mode"):
        presets.verl(loss_mode="bypass")
    with pytest.raises(ValueError, match="kl_loss_type"):
        presets.verl(kl_loss_type="full")
    with pytest.raises(ValueError, match="policy_loss_type"):
        presets.openrlhf(policy_loss_type="reinforce")
    with pytest.raises(TypeError):
        presets.trl(epsilonn=0.2)


def test_log_ratio_clamps_at_20(data):
    """verl vanilla/sapo/cispo and OpenRLHF ppo clamp log r to ±20; GSPO and GMPO do not."""
    d = data
    d["old"] = d["lp"].detach() + far(30.0)
    adv = d["adv"][:, None].expand(B, T)
    for mode in ("vanilla", "sapo", "cispo"):
        opts = dict(loss_mode=mode, loss_agg_mode="token-mean")
        compare(
            verl_actor_loss(d["old"], d["lp"], d["ref"], adv, d["mask"], d["entropy"], **opts),
            ours(d, presets.verl(**opts)),
            d,
        )
    # no dual clip: with A < 0 the loss grows as ρ itself, so e^20 and e^30 differ
    compare(
        openrlhf_actor_loss(d["lp"], d["old"], d["ref"], adv, d["mask"], d["entropy"]), ours(d, presets.openrlhf()), d
    )


# ------------------------------------------------------------------------------------------- option errors
NAN = float("nan")
PRESET_ERRORS = [  # (preset, options, the option the error must name); one case per option and kind of value
    ("trl", dict(loss_type="gspo"), "loss_type"),
    ("trl", dict(epsilon=NAN), "epsilon"),
    ("trl", dict(epsilon=-0.1), "epsilon"),
    ("trl", dict(epsilon="0.2"), "epsilon"),
    ("trl", dict(epsilon_high=-1.0), "epsilon_high"),
    ("trl", dict(loss_type="cispo", epsilon_high=NAN), "epsilon_high"),
    ("trl", dict(delta=0), "delta"),
    ("trl", dict(beta=NAN), "beta"),
    ("trl", dict(beta=-0.04), "beta"),
    ("trl", dict(importance_sampling_level="seq"), "importance_sampling_level"),
    ("trl", dict(loss_type="cispo", importance_sampling_level="sequence"), "loss_type"),
    ("trl", dict(temperature=0.0), "temperature"),
    ("trl", dict(loss_type="dr_grpo", max_completion_length=0), "max_completion_length"),
    ("trl", dict(loss_type="dr_grpo", max_completion_length=2.5), "max_completion_length"),
    ("trl", dict(use_bias_correction_kl="yes"), "use_bias_correction_kl"),
    ("trl", dict(sapo_temperature_pos=0.0), "sapo_temperature_pos"),
    ("trl", dict(sapo_temperature_neg=NAN), "sapo_temperature_neg"),
    ("trl", dict(top_entropy_quantile=0.0), "top_entropy_quantile"),
    ("trl", dict(off_policy_mask_threshold=-0.1), "off_policy_mask_threshold"),
    ("trl", dict(off_policy_mask_threshold=NAN), "off_policy_mask_threshold"),
    ("trl", dict(entropy_coef=float("inf")), "entropy_coef"),
    ("trl", dict(use_vllm="yes"), "use_vllm"),
    ("trl", dict(vllm_importance_sampling_correction=None), "vllm_importance_sampling_correction"),
    ("trl", dict(use_vllm=True, vllm_importance_sampling_mode="tis"), "vllm_importance_sampling_mode"),
    ("trl", dict(vllm_importance_sampling_clip_min=-1.0), "vllm_importance_sampling_clip_min"),
    ("trl", dict(vllm_importance_sampling_clip_max=NAN), "vllm_importance_sampling_clip_max"),
    ("trl", dict(vllm_importance_sampling_clip_min=4.0), "vllm_importance_sampling_clip_min"),
    ("trl", dict(scale_rewards="std"), "scale_rewards"),
    ("trl", dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    ("trl", dict(gradient_accumulation_steps="2"), "gradient_accumulation_steps"),
    ("verl", dict(loss_mode="bypass"), "loss_mode"),
    ("verl", dict(loss_mode="dro"), "dro_beta"),
    ("verl", dict(loss_agg_mode="mean"), "loss_agg_mode"),
    ("verl", dict(clip_ratio=NAN), "clip_ratio"),
    ("verl", dict(clip_ratio="0.2"), "clip_ratio"),
    ("verl", dict(clip_ratio_low=1.5), "clip_ratio_low"),
    ("verl", dict(loss_mode="cispo", clip_ratio_low=1.5), "clip_ratio_low"),
    ("verl", dict(clip_ratio_high=-0.1), "clip_ratio_high"),
    ("verl", dict(loss_mode="cispo", clip_ratio_high="0.28"), "clip_ratio_high"),
    ("verl", dict(clip_ratio_c=0.5), "clip_ratio_c"),
    ("verl", dict(tau_pos=0.0), "tau_pos"),
    ("verl", dict(tau_neg=NAN), "tau_neg"),
    ("verl", dict(use_kl_loss="yes"), "use_kl_loss"),
    ("verl", dict(use_kl_loss=True, kl_loss_coef=-0.001), "kl_loss_coef"),
    ("verl", dict(kl_loss_type="full"), "kl_loss_type"),
    ("verl", dict(kl_loss_type=None), "kl_loss_type"),
    ("verl", dict(entropy_coeff=NAN), "entropy_coeff"),
    ("verl", dict(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=0), "loss_scale_factor"),
    ("verl", dict(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=2.5), "loss_scale_factor"),
    ("verl", dict(temperature=-1.0), "temperature"),
    ("verl", dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    ("verl", dict(gradient_accumulation_steps=1.5), "gradient_accumulation_steps"),
    ("verl", dict(adv_estimator="gae"), "adv_estimator"),
    ("verl", dict(norm_adv_by_std_in_grpo="no"), "norm_adv_by_std_in_grpo"),
    ("openrlhf", dict(policy_loss_type="reinforce"), "policy_loss_type"),
    ("openrlhf", dict(eps_clip_low_high=0.2), "eps_clip_low_high"),
    ("openrlhf", dict(eps_clip_low_high=(0.2,)), "eps_clip_low_high"),
    ("openrlhf", dict(eps_clip_low_high=("0.2", "0.2")), "eps_clip_low_high"),
    ("openrlhf", dict(eps_clip_low_high=(0.2, NAN)), "eps_clip_low_high"),
    ("openrlhf", dict(eps_clip_low_high=(1.2, 0.2)), "eps_clip_low_high"),
    ("openrlhf", dict(dual_clip=1.0), "dual_clip"),
    ("openrlhf", dict(token_level_loss="yes"), "token_level_loss"),
    ("openrlhf", dict(use_kl_loss=1), "use_kl_loss"),
    ("openrlhf", dict(use_kl_loss=True, init_kl_coef=NAN), "init_kl_coef"),
    ("openrlhf", dict(kl_estimator="k4"), "kl_estimator"),
    ("openrlhf", dict(entropy_coef=float("inf")), "entropy_coef"),
    ("openrlhf", dict(is_correction_level="sequence"), "is_correction_level"),
    ("openrlhf", dict(is_correction_mode="truncate"), "is_correction_mode"),
    ("openrlhf", dict(is_correction_level="seq", is_correction_mode="clip"), "is_correction_mode"),
    ("openrlhf", dict(is_correction_gating="kl"), "is_correction_gating"),
    ("openrlhf", dict(is_correction_level="token", is_correction_gating="tv"), "is_correction_gating"),
    ("openrlhf", dict(is_correction_threshold=0.5), "is_correction_threshold"),
    ("openrlhf", dict(is_correction_level="token", is_correction_threshold=(2.0, 1.0)), "is_correction_threshold"),
    ("openrlhf", dict(is_correction_level="token", is_correction_threshold=(-1.0, 2.0)), "is_correction_threshold"),
    ("openrlhf", dict(temperature=0.0), "temperature"),
    ("openrlhf", dict(advantage_estimator="gae"), "advantage_estimator"),
]


@pytest.mark.parametrize(
    "preset, options, option",
    PRESET_ERRORS,
    ids=[f"{p}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for p, o, _ in PRESET_ERRORS],
)
def test_preset_errors_name_the_users_option(preset, options, option):
    """Each bad option value gets a ValueError/TypeError that starts with the preset and names the trainer
    option the user passed (never a raw ZeroDivisionError or unpack error, nor only the LossConfig field)."""
    with pytest.raises((ValueError, TypeError), match=rf"^presets\.{preset}: {option}\b") as info:
        getattr(presets, preset)(**options)
    if option in options:  # the value the user gave is shown
        assert repr(options[option]) in str(info.value) or str(options[option]) in str(info.value)
