"""Trainer drop-ins against each trainer's loss restated from its source (tests/trainer_losses.py).
The real packages are exercised in [5/6]; here: verl's policy-loss signature and OpenRLHF's PolicyLoss."""

import math

import pytest
import torch

from fastgrpo.integrations import openrlhf as fg_openrlhf
from fastgrpo.integrations import verl as fg_verl
from trainer_losses import openrlhf_actor_loss, verl_kl_penalty, verl_policy_loss

B, T = 4, 6


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(3)
    lp = (-2.0 * torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 4:] = 0
    adv = torch.tensor([1.2, -0.7, -1.5, 0.4], dtype=torch.float64)[:, None].expand(B, T)
    return dict(lp=lp, old=lp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
                rollout=lp.detach() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64), adv=adv, mask=mask)


def close(ours, expected, lp):
    (g_ours,) = torch.autograd.grad(ours, lp, retain_graph=True)
    (g_exp,) = torch.autograd.grad(expected, lp)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_ours, g_exp, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss_mode", fg_verl.LOSS_MODES)
@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                           "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("global_batch", [False, True])
def test_verl_policy_losses(data, loss_mode, loss_agg_mode, global_batch):
    d = data
    config = dict(clip_ratio=0.2, clip_ratio_high=0.28, clip_ratio_c=2.0, global_batch_info={})
    if global_batch:
        config["global_batch_info"] = dict(dp_size=2, batch_num_tokens=40, global_batch_size=12)
    if loss_mode == "gspo":
        config.update(clip_ratio=3e-4, clip_ratio_high=4e-4)
    w = torch.rand(B, T, dtype=torch.float64) + 0.5
    fn = fg_verl.policy_loss_fn(loss_mode)
    ours, metrics = fn(d["old"], d["lp"], d["adv"], d["mask"], loss_agg_mode=loss_agg_mode, config=config,
                       rollout_is_weights=w)
    expected = verl_policy_loss(d["old"], d["lp"], d["adv"], d["mask"], loss_mode=loss_mode,
                                loss_agg_mode=loss_agg_mode, clip_ratio=config["clip_ratio"],
                                clip_ratio_high=config["clip_ratio_high"], clip_ratio_c=2.0, rollout_is_weights=w,
                                **({"global_batch": config["global_batch_info"]} if global_batch else {}))
    close(ours, expected, d["lp"])
    assert set(metrics) == (set() if loss_mode == "gpg" else
                            {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})


def test_verl_metrics_by_hand():
    # ρ = [0.5, 1.1, 1.5, 3.5] (old = 0), A = −1, ε = 0.2, c = 3: clipped where −A·clip > −A·ρ, i.e. ρ < 0.8
    # (token 0); dual clip where A < 0 and max(ρ, clip ρ) > c (token 3); ppo_kl = mean(−log ρ)
    rho = torch.tensor([[0.5, 1.1, 1.5, 3.5]], dtype=torch.float64)
    lp, old, adv, mask = rho.log(), torch.zeros(1, 4, dtype=torch.float64), -torch.ones(1, 4), torch.ones(1, 4)
    _, m = fg_verl.policy_loss_fn("vanilla")(old, lp, adv, mask, config=dict(clip_ratio=0.2, clip_ratio_c=3.0))
    assert m["actor/pg_clipfrac"] == pytest.approx(0.25) and m["actor/pg_clipfrac_lower"] == pytest.approx(0.25)
    assert m["actor/ppo_kl"] == pytest.approx(-sum(math.log(r) for r in (0.5, 1.1, 1.5, 3.5)) / 4)
    _, m = fg_verl.policy_loss_fn("cispo")(old, lp, adv, mask, config=dict(clip_ratio=0.2))
    assert m["actor/pg_clipfrac"] == pytest.approx(0.75)  # every ρ outside [0.8, 1.2] but 1.1


@pytest.mark.parametrize("kl_type", ["kl", "abs", "mse", "low_var_kl", "k3+"])
def test_verl_kl_penalty(data, kl_type):
    ref = data["lp"].detach() + 25 * torch.randn(B, T, dtype=torch.float64)
    close(fg_verl.kl_penalty(data["lp"], ref, kl_type).sum(), verl_kl_penalty(data["lp"], ref, kl_type).sum(),
          data["lp"])


@pytest.mark.parametrize("opts", [
    dict(), dict(dual_clip=1.5), dict(token_level_loss=False, clip_eps_high=0.28),
    dict(policy_loss_type="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4),
    dict(enable_vllm_is_correction=True, vllm_is_truncated_threshold=[0.9, 1.2]),
    dict(enable_vllm_is_correction=True, vllm_is_truncated_threshold=[0.9, 1.2], vllm_is_correction_type="icepop"),
    dict(enable_vllm_is_correction=True, vllm_is_truncated_threshold=[0.9, 1.2],
         vllm_is_correction_type="seq-mask-tis"),
], ids=str)
@pytest.mark.parametrize("global_batch", [False, True])
def test_openrlhf_policy_loss(data, opts, global_batch):
    d = data
    kw = dict(dp_size=2, batch_num_tokens=40.0, global_batch_size=10.0) if global_batch else {}
    loss, clip_ratio, ppo_kl, vllm_kl = fg_openrlhf.PolicyLoss(**opts)(
        d["lp"], d["old"], d["adv"], d["mask"], rollout_log_probs=d["rollout"], **kw)
    trainer = {k: v for k, v in opts.items() if k not in ("enable_vllm_is_correction",)}
    if opts.get("enable_vllm_is_correction"):
        trainer.setdefault("vllm_is_correction_type", "tis")
        trainer["vllm_is_truncated_threshold"] = tuple(trainer["vllm_is_truncated_threshold"])
    expected = openrlhf_actor_loss(d["lp"], d["old"], None, d["adv"], d["mask"], None, rollout=d["rollout"],
                                   **trainer, **kw)
    close(loss, expected, d["lp"])
    assert 0.0 <= clip_ratio.item() <= 1.0 and (vllm_kl is not None) == bool(opts.get("enable_vllm_is_correction"))
    assert ppo_kl.item() == pytest.approx(((d["old"] - d["lp"].detach()) * d["mask"]).sum().item() / d["mask"].sum().item())
