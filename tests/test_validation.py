"""MATH §6: every bad input gets an error naming the argument and what was expected."""

import subprocess
import sys

import pytest
import torch

import fastgrpo
from fastgrpo import LossConfig

B, T, V = 2, 3, 5


def good(**over):
    kw = dict(
        logits=torch.randn(B, T, V),
        targets=torch.randint(0, V, (B, T)),
        advantages=torch.randn(B),
        mask=torch.ones(B, T),
    )
    kw.update(over)
    return kw


def call(**over):
    kw = good(**over)
    return fastgrpo.grpo_loss(kw.pop("logits"), kw.pop("targets"), kw.pop("advantages"), kw.pop("mask"), **kw)


@pytest.mark.parametrize(
    "over, error, match",
    [
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
        (
            dict(advantages=None, rewards=torch.ones(B), group_ids=torch.zeros(B + 1, dtype=torch.long)),
            ValueError,
            "group_ids must have shape",
        ),
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
    ],
)
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


@pytest.mark.parametrize(
    "cu, match",
    [
        (torch.tensor([1, 6]), "cu_seqlens must start at 0"),
        (torch.tensor([0, 4]), "end at N = 6"),
        (torch.tensor([0, 4, 2, 6]), "non-decreasing"),
        (torch.tensor([[0, 6]]), r"cu_seqlens must be 1-D"),
        (torch.tensor([0.0, 6.0]), "cu_seqlens must be an integer tensor"),
        (torch.tensor([0, 7, 6]), r"non-decreasing and end at N = 6, got \[0, 7, 6\]"),
        # the device is checked before any value is read (a meta tensor has none)
        (torch.tensor([0, 6], device="meta"), "cu_seqlens is on meta but the inputs are on cpu"),
    ],
)
def test_packed_cu_seqlens_errors(cu, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastgrpo.grpo_loss(torch.randn(6, V), torch.zeros(6, dtype=torch.long), torch.ones(6), cu_seqlens=cu)


@pytest.mark.parametrize(
    "kw, match",
    [
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
        # NaN, negative and out-of-range values once accepted silently
        (dict(cispo_low=float("nan")), "cispo_low must be a finite number >= 0 or None, got nan"),
        (dict(cispo_low=-0.5), "cispo_low must be a finite number >= 0"),
        (dict(cispo_high=float("nan")), "cispo_high must be a finite number > 0 or None, got nan"),
        (dict(cispo_high=-1.0), "cispo_high must be a finite number > 0"),
        (dict(rollout_min=float("nan")), "rollout_min must be a finite number >= 0 or None, got nan"),
        (dict(rollout_min=-1.0), "rollout_min must be a finite number >= 0"),
        (dict(rollout_max=float("nan")), "rollout_max must be a finite number > 0 or None, got nan"),
        (dict(rollout_max=-2.0), "rollout_max must be a finite number > 0"),
        (dict(off_policy_mask_threshold=float("nan")), "off_policy_mask_threshold must be a finite number >= 0"),
        (dict(off_policy_mask_threshold=-0.1), "off_policy_mask_threshold must be a finite number >= 0"),
        (dict(max_length=-3), "max_length must be a positive int"),
        (dict(epsilon_low=float("nan")), r"epsilon_low must be in \[0, 1\)"),
        (dict(epsilon_high=float("inf")), "epsilon_high must be a finite number >= 0"),
        (dict(seq_log_ratio_max=float("nan")), "seq_log_ratio_max must be a finite number or None"),
        (dict(log_ratio_clamp=-20.0), "log_ratio_clamp must be a finite number > 0"),
        (dict(kl_input_clamp=float("nan")), "kl_input_clamp must be a finite number > 0"),
        (dict(kl_output_clamp=0.0), "kl_output_clamp must be a finite number > 0"),
        (dict(sapo_tau_pos=0.0), "sapo_tau_pos must be a finite number > 0"),
        (dict(sapo_tau_neg=float("nan")), "sapo_tau_neg must be a finite number > 0"),
        (dict(beta=float("nan")), "beta must be a finite number >= 0"),
        (dict(beta=-0.1), "beta must be a finite number >= 0"),
        (dict(entropy_coef=float("inf")), "entropy_coef must be a finite number"),
        (dict(loss_scale=float("nan")), "loss_scale must be a finite number > 0"),
        (dict(loss_scale=0.0), "loss_scale must be a finite number > 0"),
        (dict(top_entropy_quantile=float("nan")), r"top_entropy_quantile must be in \(0, 1\]"),
        (dict(kl_aggregation="mean"), "kl_aggregation must be one of .* or None"),
        (dict(entropy_aggregation="sum"), "entropy_aggregation must be one of"),
        (dict(sequence_ratio_grad="both"), "sequence_ratio_grad must be one of"),
        (dict(ratio_level=None), "ratio_level must be one of"),
        (dict(policy_loss="gmpo", ratio_level="sequence"), "builds its own sequence ratio"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_length=2.5), "max_length must be a positive int or None, got float 2.5"),
        (dict(max_length=True), "max_length must be a positive int or None, got bool"),
        (dict(divide_by_num_sequences="yes"), "divide_by_num_sequences must be a bool, got str 'yes'"),
        (dict(count_empty_sequences=1), "count_empty_sequences must be a bool, got int"),
        (dict(kl_ratio_weighted=None), "kl_ratio_weighted must be a bool, got NoneType"),
        (dict(epsilon_low="0.2"), "epsilon_low must be a number, got str '0.2'"),
        (dict(epsilon_high=None), "epsilon_high must be a number, got NoneType"),
        (dict(temperature="1.0"), "temperature must be a number, got str"),
        (dict(temperature=None), "temperature must be a number, got NoneType"),
        (dict(beta=None), "beta must be a number, got NoneType"),
        (dict(loss_scale=None), "loss_scale must be a number"),
        (dict(entropy_coef="0.1"), "entropy_coef must be a number"),
        (dict(top_entropy_quantile=None), "top_entropy_quantile must be a number"),
        (dict(sapo_tau_pos="1"), "sapo_tau_pos must be a number"),
        (dict(dual_clip="3"), "dual_clip must be a number or None, got str '3'"),
        (dict(ratio_cap=True), "ratio_cap must be a number or None, got bool"),
        (dict(cispo_high="5"), "cispo_high must be a number or None"),
        (dict(rollout_max="3"), "rollout_max must be a number or None"),
        (dict(off_policy_mask_threshold="0.1"), "off_policy_mask_threshold must be a number or None"),
        (dict(advantage="grpo"), "advantage must be an AdvantageConfig, got str"),
    ],
)
def test_config_type_errors_name_the_field(kw, match):
    """Strings, None and floats where another type belongs raised raw TypeErrors that named no field."""
    with pytest.raises(TypeError, match=match):
        LossConfig(**kw)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(eps=float("nan")), ValueError, "eps must be a finite number >= 0, got nan"),
        (dict(eps=-1e-4), ValueError, "eps must be a finite number >= 0"),
        (dict(eps="1e-4"), TypeError, "eps must be a number, got str"),
        (dict(eps=None), TypeError, "eps must be a number, got NoneType"),
        (dict(estimator=None), ValueError, "estimator must be one of"),
        (dict(scale="std"), ValueError, "scale must be one of"),
        (dict(singleton=0), ValueError, "singleton must be one of"),
    ],
)
def test_advantage_config_errors(kw, error, match):
    with pytest.raises(error, match=match):
        fastgrpo.AdvantageConfig(**kw)


def test_config_errors_carry_the_field():
    """Presets rely on ``err.fields`` to name the trainer option behind a field."""
    with pytest.raises(ValueError) as info:
        LossConfig(cispo_low=2.0, cispo_high=1.0)
    assert info.value.fields == ("cispo_low", "cispo_high")
    with pytest.raises(TypeError) as info:
        LossConfig(max_length=2.5)
    assert info.value.fields == ("max_length",)


def test_advantages_config_must_be_an_advantage_config():
    with pytest.raises(TypeError, match="config must be a fastgrpo.AdvantageConfig or None, got str"):
        fastgrpo.advantages(torch.ones(4), 2, config="grpo")
    with pytest.raises(TypeError, match="config must be a fastgrpo.AdvantageConfig or None, got LossConfig"):
        fastgrpo.advantages(torch.ones(4), 2, config=LossConfig())


def test_other_entry_points_validate():
    with pytest.raises(ValueError, match="temperature must be"):
        fastgrpo.token_logprobs(torch.randn(3, V), torch.zeros(3, dtype=torch.long), temperature=-1.0)
    with pytest.raises(ValueError, match="targets must hold token ids"):
        fastgrpo.token_logprobs(torch.randn(3, V), torch.full((3,), V))
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H = 4"):
        fastgrpo.linear_token_logprobs(torch.randn(3, 4), torch.randn(V, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="weight .* must have the dtype of hidden"):
        fastgrpo.linear_grpo_loss(
            torch.randn(1, 3, 4),
            torch.randn(V, 4, dtype=torch.float64),
            torch.zeros(1, 3, dtype=torch.long),
            torch.ones(1),
        )
    with pytest.raises(ValueError, match="bias must have shape"):
        fastgrpo.linear_grpo_loss(
            torch.randn(1, 3, 4),
            torch.randn(V, 4),
            torch.zeros(1, 3, dtype=torch.long),
            torch.ones(1),
            bias=torch.zeros(V + 1),
        )
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


def test_a_misspelt_keyword_is_refused_by_every_loss_entry_point():
    """The shared keywords arrive as ``**options`` (inputs.LossOptions): a typo must not be silently ignored."""
    lp, adv = torch.randn(B, T), torch.ones(B)
    with pytest.raises(TypeError, match=r"policy_loss\(\) got an unexpected keyword argument 'old_logprob'"):
        fastgrpo.policy_loss(lp, adv, old_logprob=lp)
    with pytest.raises(TypeError, match=r"grpo_loss\(\) got an unexpected keyword argument 'ref_logprob'"):
        call(ref_logprob=lp)
    with pytest.raises(TypeError, match=r"grpo_loss\(\) got an unexpected keyword argument 'group_sizes'"):
        fastgrpo.GRPOLoss()(torch.randn(B, T, V), torch.zeros(B, T, dtype=torch.long), adv, group_sizes=2)
    with pytest.raises(TypeError, match=r"linear_grpo_loss\(\) got an unexpected keyword argument 'normaliser'"):
        fastgrpo.linear_grpo_loss(
            torch.randn(B, T, 4), torch.randn(V, 4), torch.zeros(B, T, dtype=torch.long), adv, normaliser=1.0
        )


def test_import_has_no_side_effects():
    """Importing fastgrpo loads no Triton, no extension and patches nothing."""
    code = (
        "import sys, torch; before = set(sys.modules); import fastgrpo; "
        "new = set(sys.modules) - before; "
        "assert not any(m.startswith(('triton', 'fastgrpo._C', 'trl', 'verl', 'openrlhf')) for m in new), new"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
