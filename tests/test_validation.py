"""SPEC §6: every bad input gets an error naming the argument and what was expected."""

import subprocess
import sys

import pytest
import torch

import fastgrpo
from fastgrpo import LossConfig

B, T, V = 2, 3, 5


def good(**over):
    kw = dict(logits=torch.randn(B, T, V), targets=torch.randint(0, V, (B, T)), advantages=torch.randn(B),
              mask=torch.ones(B, T))
    kw.update(over)
    return kw


def call(**over):
    kw = good(**over)
    return fastgrpo.grpo_loss(kw.pop("logits"), kw.pop("targets"), kw.pop("advantages"), kw.pop("mask"), **kw)


@pytest.mark.parametrize("over, error, match", [
    (dict(logits=torch.randn(B, T, V).numpy()), TypeError, "logits must be a torch.Tensor"),
    (dict(logits=torch.randint(0, 3, (B, T, V))), TypeError, "logits must be a floating tensor"),
    (dict(logits=torch.randn(B, T, V, 1)), ValueError, r"logits must be \[B, T, V\]"),
    (dict(targets=torch.randint(0, V, (B, T + 1))), ValueError, "targets must have shape"),
    (dict(targets=torch.rand(B, T)), TypeError, "targets must be an integer tensor"),
    (dict(targets=torch.full((B, T), V)), ValueError, r"targets must hold token ids in \[0, 5\)"),
    (dict(targets=torch.full((B, T), -1)), ValueError, "targets must hold token ids"),
    (dict(logits=torch.randn(B, T, 2 * V)[..., ::2]), ValueError, "logits must be contiguous in its last"),
    (dict(mask=torch.ones(B, T + 1)), ValueError, "mask must have shape"),
    (dict(advantages=torch.randn(B + 1)), ValueError, "advantages must be per sequence"),
    (dict(advantages=torch.randn(B, T + 1)), ValueError, "advantages must be per sequence"),
    (dict(advantages=torch.ones(B, dtype=torch.long)), TypeError, "advantages must be a floating tensor"),
    (dict(advantages=None), ValueError, "pass exactly one of advantages"),
    (dict(rewards=torch.ones(B)), ValueError, "pass exactly one of advantages"),
    (dict(advantages=None, rewards=torch.ones(B)), ValueError, "exactly one of group_size"),
    (dict(advantages=None, rewards=torch.ones(B), group_size=3), ValueError, "group_size .3. must divide"),
    (dict(advantages=None, rewards=torch.ones(B + 2), group_size=2), ValueError, "rewards must have one entry"),
    (dict(advantages=None, rewards=torch.ones(B), group_ids=torch.zeros(B + 1, dtype=torch.long)),
     ValueError, "group_ids must have shape"),
    (dict(old_logprobs=torch.zeros(B, T + 1)), ValueError, "old_logprobs must have shape"),
    (dict(ref_logprobs=torch.zeros(B, T, dtype=torch.long)), TypeError, "ref_logprobs must be a floating"),
    (dict(config=LossConfig(beta=0.1)), ValueError, "ref_logprobs is required when config.beta"),
    (dict(config=LossConfig(rollout_correction="token_mask")), ValueError, "needs sampling_logprobs"),
    (dict(is_weights=torch.ones(B + 1)), ValueError, "is_weights must be per sequence"),
    (dict(normalizer=0.0), ValueError, "normalizer must be a finite number > 0"),
    (dict(normalizer=torch.ones(2)), ValueError, "normalizer must be a float or a 0-d tensor"),
    (dict(config={"beta": 0.0}), TypeError, "config must be a fastgrpo.LossConfig"),
    (dict(backend="tpu"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), RuntimeError, "backend=.cuda. cannot run on cpu tensors"),
    (dict(cu_seqlens=torch.tensor([0, 3, 6])), ValueError, "with cu_seqlens the input must be packed"),
    (dict(mask=torch.ones(B, T, device="meta")), ValueError, "mask is on meta but the inputs are on cpu"),
])
def test_grpo_loss_errors(over, error, match):
    with pytest.raises(error, match=match):
        call(**over)


def test_masked_positions_may_hold_padding_ids():
    targets = torch.randint(0, V, (B, T))
    targets[1, 2] = -100
    mask = torch.ones(B, T)
    mask[1, 2] = 0
    out = call(targets=targets, mask=mask)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("cu, match", [
    (torch.tensor([1, 6]), "cu_seqlens must start at 0"),
    (torch.tensor([0, 4]), "end at N = 6"),
    (torch.tensor([0, 4, 2, 6]), "non-decreasing"),
    (torch.tensor([[0, 6]]), r"cu_seqlens must be 1-D"),
    (torch.tensor([0.0, 6.0]), "cu_seqlens must be an integer tensor"),
])
def test_packed_cu_seqlens_errors(cu, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastgrpo.grpo_loss(torch.randn(6, V), torch.zeros(6, dtype=torch.long), torch.ones(6), cu_seqlens=cu)


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(epsilon_low=1.0), r"epsilon_low must be in \[0, 1\)"),
    (dict(epsilon_low=-0.1), r"epsilon_low must be in \[0, 1\)"),
    (dict(epsilon_high=-0.2), "epsilon_high must be a finite number >= 0"),
    (dict(dual_clip=1.0), "dual_clip must be > 1"),
    (dict(policy_loss="ppo2"), "policy_loss must be one of"),
    (dict(aggregation="mean"), "aggregation must be one of"),
    (dict(kl_estimator="k4"), "kl_estimator must be one of"),
    (dict(rollout_correction="tis"), "rollout_correction must be one of"),
    (dict(top_entropy_quantile=0.0), r"top_entropy_quantile must be in \(0, 1\]"),
    (dict(ratio_cap=0.0), "ratio_cap must be a finite number > 0"),
    (dict(cispo_low=2.0, cispo_high=1.0), "cispo_low .2.0. must be <= cispo_high"),
    (dict(rollout_min=2.0, rollout_max=1.0), "rollout_min .2.0. must be <= rollout_max"),
    (dict(policy_loss="cispo", ratio_level="sequence"), "token level only"),
    (dict(policy_loss="gmpo", top_entropy_quantile=0.5), "not defined for policy_loss='gmpo'"),
    (dict(max_length=0), "max_length must be a positive int"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kw)


def test_other_entry_points_validate():
    with pytest.raises(ValueError, match="temperature must be"):
        fastgrpo.token_logprobs(torch.randn(3, V), torch.zeros(3, dtype=torch.long), temperature=-1.0)
    with pytest.raises(ValueError, match="targets must hold token ids"):
        fastgrpo.token_logprobs(torch.randn(3, V), torch.full((3,), V))
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H = 4"):
        fastgrpo.linear_token_logprobs(torch.randn(3, 4), torch.randn(V, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="weight .* must have the dtype of hidden"):
        fastgrpo.linear_grpo_loss(torch.randn(1, 3, 4), torch.randn(V, 4, dtype=torch.float64),
                                  torch.zeros(1, 3, dtype=torch.long), torch.ones(1))
    with pytest.raises(ValueError, match="bias must have shape"):
        fastgrpo.linear_grpo_loss(torch.randn(1, 3, 4), torch.randn(V, 4), torch.zeros(1, 3, dtype=torch.long),
                                  torch.ones(1), bias=torch.zeros(V + 1))
    with pytest.raises(ValueError, match="entropy is required by this config"):
        fastgrpo.policy_loss(torch.randn(B, T), torch.ones(B), config=LossConfig(entropy_coef=0.1))
    with pytest.raises(TypeError, match="logprobs must be a floating tensor"):
        fastgrpo.policy_loss(torch.zeros(B, T, dtype=torch.long), torch.ones(B))
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        fastgrpo.advantages(torch.ones(4), 0)
    with pytest.raises(ValueError, match="reward_weights must have shape"):
        fastgrpo.advantages(torch.ones(4, 2), 2, reward_weights=torch.ones(3))
    with pytest.raises(ValueError, match="estimator must be one of"):
        fastgrpo.advantages(torch.ones(4), 2, estimator="ppo")


def test_import_has_no_side_effects():
    """Importing fastgrpo loads no Triton, no extension and patches nothing."""
    code = ("import sys, torch; before = set(sys.modules); import fastgrpo; "
            "new = set(sys.modules) - before; "
            "assert not any(m.startswith(('triton', 'fastgrpo._C', 'trl', 'verl', 'openrlhf')) for m in new), new")
    subprocess.run([sys.executable, "-c", code], check=True)
