"""TRL 1.16 options beyond the basic loss types, under fastgrpo.integrations.trl, each against the installed TRL on
the same inputs (loss, every parameter's gradient, logged metrics, trainer state): ``loss_type="luspo"``, the
adaptive entropy controller (``use_adaptive_entropy``), ``mask_truncated_completions``, a Mixture-of-Experts
model's router auxiliary loss, ``loss_type="vespo"`` and ``multi_objective_aggregation="normalize_then_sum"``.

Models and tokenizer are the tiny randomly initialized ones of ``test_integration_trl`` (no downloads)."""

import dataclasses
import inspect
import json
import math

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is installed by the test extra; see README")
from test_integration_trl import batch, loss_grads_metrics, make_tokenizer, make_trainer  # noqa: E402
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402

import fastgrpo  # noqa: E402
from fastgrpo import LossConfig, presets  # noqa: E402
from fastgrpo.integrations.trl import patch_grpo_trainer  # noqa: E402

HAS_VESPO = "vespo_k_pos" in {f.name for f in dataclasses.fields(LossConfig)}
SKIP_LOGS = {"step_time", "epoch", "step", "learning_rate"}


def assert_same(ours, expected, *, loss_tol=1e-6, grad_tol=1e-6):
    """ours/expected: (loss, {name: grad}, {metric: value}) of loss_grads_metrics."""
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-5, atol=loss_tol)
    assert ours[1].keys() == expected[1].keys()
    for name, g in expected[1].items():
        torch.testing.assert_close(ours[1][name], g, rtol=1e-4, atol=grad_tol, msg=name)
    assert ours[2].keys() == expected[2].keys()
    for name, value in expected[2].items():
        assert math.isclose(ours[2][name], value, rel_tol=1e-5, abs_tol=1e-6), (name, ours[2][name], value)


def compare_compute_loss(tmp_path, inputs=None, *, model_factory=None, **options):
    """TRL's ``_compute_loss`` and the patched one on one micro-batch of a 2-step accumulation window."""
    model = None
    if model_factory is not None:  # saved: a non-zero beta makes TRL load the reference model from its path
        model = str(tmp_path / "model")
        model_factory().save_pretrained(model)
    trainer = make_trainer(tmp_path, model=model, **options)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # set by train()
    inputs = batch(trainer.model.config.vocab_size) if inputs is None else inputs
    expected = loss_grads_metrics(trainer, trainer._compute_loss, inputs)
    patch_grpo_trainer(trainer)
    ours = loss_grads_metrics(trainer, trainer._compute_loss, inputs)
    assert_same(ours, expected)
    return expected, ours


def compare_training(tmp_path, *, model_factory=None, max_steps=3, **options):
    """Whole ``train()`` runs from one seed with TRL's loss and patched: logs and parameters after the steps."""
    runs = []
    for patched in (False, True):
        model = None if model_factory is None else model_factory()
        trainer = make_trainer(tmp_path / str(patched), model=model, max_steps=max_steps, **options)
        if patched:
            patch_grpo_trainer(trainer)
        trainer.train()
        runs.append((trainer, trainer.state.log_history[:-1], dict(trainer.model.named_parameters())))
    (_, logs_trl, params_trl), (_, logs_ours, params_ours) = runs
    assert len(logs_trl) == len(logs_ours) == max_steps
    for step_trl, step_ours in zip(logs_trl, logs_ours):
        assert step_trl.keys() == step_ours.keys()
        for key in step_trl.keys() - SKIP_LOGS:
            assert math.isclose(step_ours[key], step_trl[key], rel_tol=1e-4, abs_tol=1e-5), (key, step_ours, step_trl)
    for name, p in params_trl.items():
        torch.testing.assert_close(params_ours[name], p, rtol=1e-4, atol=1e-5, msg=name)
    return runs[0][0], runs[1][0], logs_trl


# --------------------------------------------------------------------------------------------------- luspo
def test_luspo_preset():
    config = presets.trl(loss_type="luspo", importance_sampling_level="sequence", gradient_accumulation_steps=4)
    assert (config.policy_loss, config.ratio_level, config.aggregation) == ("ppo", "sequence", "seq_mean_token_sum")
    assert config.count_empty_sequences and config.loss_scale == 0.25 and config.entropy_aggregation == "token_mean"


LUSPO_CASES = [
    dict(importance_sampling_level="sequence"),
    dict(importance_sampling_level="token", beta=0.05, entropy_coef=0.01),  # TRL's default level: a warning only
    dict(importance_sampling_level="sequence", beta=0.04, use_bias_correction_kl=True, top_entropy_quantile=0.5),
    dict(importance_sampling_level="sequence", delta=1.5, epsilon_high=0.28, off_policy_mask_threshold=0.05),
    dict(importance_sampling_level="sequence", entropy_coef=0.01, top_entropy_quantile=0.5),  # bonus on kept tokens
]


@pytest.mark.parametrize("case", LUSPO_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_luspo_compute_loss_matches_trl(tmp_path, case):
    """Includes an all-masked row, which TRL's ``.sum(-1).mean()`` counts as a sequence of loss 0."""
    inputs = batch(len(make_tokenizer()))
    inputs["completion_mask"][3] = 0
    compare_compute_loss(tmp_path, inputs, loss_type="luspo", **case)


def test_luspo_training_matches_trl(tmp_path):
    _, _, logs = compare_training(tmp_path, loss_type="luspo", importance_sampling_level="sequence", beta=0.02)
    assert any(v > 0 for k, v in logs[1].items() if k.startswith("clip_ratio/"))  # the clipped branch ran


# ------------------------------------------------------------------------------------ adaptive entropy control
ADAPTIVE = dict(use_adaptive_entropy=True, entropy_coef=0.02, entropy_coef_delta=0.015, entropy_coef_max=0.05)


def controller_state(trainer):
    stats = trainer._entropy_window_stats
    return trainer.entropy_coef, trainer._last_world_entropy, None if stats is None else stats.tolist()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("entropy_target", [10.0, 1.0])  # above the random model's entropy (≈ log 39), below it
def test_adaptive_entropy_matches_trl_across_windows(tmp_path, loss_type, entropy_target):
    """Three accumulation windows of two micro-batches: the first applies no bonus (no measurement yet), the
    next ones apply the coefficient only while the last window's entropy was at or below the target; the
    coefficient moves by the delta at each window's end, within [min, max]. TRL's and the patched trainer's
    loss, gradients, metrics and controller state after every micro-batch."""
    trainers = []
    for patched in (False, True):
        trainer = make_trainer(
            tmp_path / str(patched), loss_type=loss_type, entropy_target=entropy_target, beta=0.04, **ADAPTIVE
        )
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 2
        if patched:
            patch_grpo_trainer(trainer)
        trainers.append(trainer)
    coefs = []
    for step in range(6):
        inputs = batch(len(make_tokenizer()), seed=step + 1)
        results = []
        for trainer in trainers:
            trainer.accelerator.gradient_state._set_sync_gradients(step % 2 == 1)  # the window's last micro-batch
            results.append(loss_grads_metrics(trainer, trainer._compute_loss, inputs))
        assert_same(results[1], results[0])
        (coef_trl, world_trl, stats_trl), (coef_ours, world_ours, stats_ours) = map(controller_state, trainers)
        assert math.isclose(coef_ours, coef_trl, rel_tol=1e-9) and math.isclose(world_ours, world_trl, rel_tol=1e-5)
        assert (stats_trl is None) == (stats_ours is None)
        if stats_trl is not None:
            assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(stats_ours, stats_trl))
        coefs.append(coef_trl)
        assert ("entropy_coef" in results[0][2]) == (step % 2 == 1)
    above = entropy_target > 5.0  # the measured entropy is ≈ 3.6
    assert coefs[1::2] == pytest.approx([0.035, 0.05, 0.05] if above else [0.005, 0.0, 0.0])
    results = []
    for trainer in trainers:  # evaluation: the same gate, no accumulation scaling, no update
        trainer.model.eval()
        results.append(loss_grads_metrics(trainer, trainer._compute_loss, batch(len(make_tokenizer()), seed=9)))
    assert_same(results[1], results[0])
    for trainer in trainers:
        assert controller_state(trainer)[:2] == pytest.approx((coefs[-1], world_trl), rel=1e-5)


def test_adaptive_entropy_training_and_checkpoint(tmp_path):
    """A whole patched train() with the controller, against TRL's; TRL's checkpoint of the controller state
    (written by its own ``_save_checkpoint`` from the trainer attributes the patch keeps) holds the same values,
    and loading it into a patched trainer changes the coefficient the next step applies."""
    trl_run, ours_run, logs = compare_training(
        tmp_path, loss_type="grpo", entropy_target=10.0, save_strategy="steps", save_steps=2, **ADAPTIVE
    )
    assert [step["entropy_coef"] for step in logs] == pytest.approx([0.035, 0.05, 0.05])
    saved = [
        json.loads((tmp_path / name / "checkpoint-2" / "entropy_ctrl_state.json").read_text())
        for name in ("False", "True")
    ]
    assert saved[1]["entropy_coef"] == pytest.approx(saved[0]["entropy_coef"])
    assert saved[1]["last_world_entropy"] == pytest.approx(saved[0]["last_world_entropy"], rel=1e-5)

    trainer = patch_grpo_trainer(make_trainer(tmp_path / "resumed", loss_type="grpo", entropy_target=3.0, **ADAPTIVE))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    trainer.create_optimizer_and_scheduler(num_training_steps=3)  # the checkpoint holds their states too
    inputs = batch(len(make_tokenizer()))
    gated = loss_grads_metrics(trainer, trainer._compute_loss, inputs)[0]  # inf > target: no bonus
    trainer._load_optimizer_and_scheduler(str(tmp_path / "True" / "checkpoint-2"))
    assert trainer.entropy_coef == saved[1]["entropy_coef"] and trainer._last_world_entropy > 3.0
    trainer._last_world_entropy = 2.0  # at or below the target now: the restored coefficient applies
    applied = loss_grads_metrics(trainer, trainer._compute_loss, inputs)[0]
    assert applied < gated - 0.01  # − 0.05·H/2 with H ≈ 3.6


# ------------------------------------------------------------------------------------ mask_truncated_completions
def test_mask_truncated_completions_training_matches_trl(tmp_path):
    """TRL zeroes the completion mask (and so the attention mask and num_items_in_batch) of completions that
    hit max_completion_length before the loss; the patched loss reads that mask. Some completions must be
    truncated and some not, so the masking changes the loss."""
    for loss_type in ("grpo", "dapo"):
        _, _, logs = compare_training(
            tmp_path / loss_type, loss_type=loss_type, mask_truncated_completions=True, max_completion_length=16
        )
        clipped = [step["completions/clipped_ratio"] for step in logs if "completions/clipped_ratio" in step]
        assert clipped and all(0.0 < c < 1.0 for c in clipped), clipped  # logged at the steps that generate


# ------------------------------------------------------------------------------------ MoE router auxiliary loss
def make_qwen3_moe(seed=0, **extra):
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=len(make_tokenizer()),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
        **extra,
    )
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # a trained-looking router: distinct experts per token, not a uniform tie
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize(
    "case",
    [dict(loss_type="grpo", router_aux_loss_coef=0.5), dict(loss_type="dapo", beta=0.04), dict(loss_type="luspo")],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_moe_router_aux_loss_matches_trl(tmp_path, case):
    """Qwen3-MoE: TRL adds router_aux_loss_coef · aux / accumulation (the model config's coefficient when the
    option is unset) and logs ``aux_loss``; the router weights get gradient from the policy loss and the aux."""
    expected, _ = compare_compute_loss(tmp_path, model_factory=make_qwen3_moe, **case)
    assert expected[2]["aux_loss"] > 0.5  # the load-balancing loss of 4 experts, top-2: ≥ 1 at balance
    assert expected[1]["model.layers.0.mlp.gate.weight"].abs().max() > 0


def test_moe_without_aux_loss(tmp_path):
    expected, _ = compare_compute_loss(
        tmp_path, model_factory=make_qwen3_moe, loss_type="grpo", router_aux_loss_coef=0.0
    )
    assert "aux_loss" not in expected[2]


def test_moe_training_matches_trl(tmp_path):
    compare_training(tmp_path, model_factory=make_qwen3_moe, max_steps=2, loss_type="dapo", router_aux_loss_coef=0.5)


# --------------------------------------------------------------------------------------------------- vespo
VESPO_CASES = [
    dict(),
    dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.0, vespo_lambda_neg=1.0, beta=0.04),
    dict(vllm="token_truncate", vllm_importance_sampling_clip_max=1.05),  # truncates some tokens
    # zeroes 3 tokens of 3 sequences: log 0 → the floor log 1e-8, φ ≈ 0 for those sequences (TRL)
    dict(vllm="token_mask", vllm_importance_sampling_clip_min=0.9, vllm_importance_sampling_clip_max=1.1),
    dict(off_policy_mask_threshold=0.05, top_entropy_quantile=0.5),
    dict(entropy_coef=0.01, beta=0.04, use_bias_correction_kl=True),
]


@pytest.mark.skipif(not HAS_VESPO, reason="LossConfig has no vespo weight yet (policy_loss='vespo', vespo_k_pos...)")
@pytest.mark.parametrize("case", VESPO_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_vespo_compute_loss_matches_trl(tmp_path, case):
    """TRL's VESPO: −sg[φ(w_i)]·A·ℓ, a token sum over num_items_in_batch, the metric vespo/phi_seq_mean. With
    vLLM the token IS ratio's logs (clamped to [log 1e-8, 20]) join log w_i instead of weighting the loss."""
    case = dict(case)
    mode = case.pop("vllm", None)
    trainer = make_trainer(tmp_path, loss_type="vespo", **case)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    inputs = batch(trainer.model.config.vocab_size)
    if mode is None:
        del inputs["importance_sampling_ratio"]  # present only with vLLM's correction
    else:  # TRL's ratio: exp((old − sampling)·mask), truncated or masked to the clip range
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        trainer.vllm_importance_sampling_mode = mode
        ratio = torch.exp((inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"]) * 0.1)
        ratio = ratio.masked_fill(inputs["completion_mask"] == 0, 1.0)
        lo = case.get("vllm_importance_sampling_clip_min") or 0.0
        hi = case.get("vllm_importance_sampling_clip_max", 3.0)
        outside = (ratio < lo) | (ratio > hi)
        assert outside.any()
        inputs["importance_sampling_ratio"] = (
            ratio.clamp(lo, hi) if mode == "token_truncate" else ratio.masked_fill(outside, 0.0)
        )
    expected = loss_grads_metrics(trainer, trainer._compute_loss, inputs)
    patch_grpo_trainer(trainer)
    ours = loss_grads_metrics(trainer, trainer._compute_loss, inputs)
    assert_same(ours, expected)
    assert 0.05 < expected[2]["vespo/phi_seq_mean"] < 1.0  # the weight is neither ~1 everywhere nor ~0


@pytest.mark.skipif(not HAS_VESPO, reason="LossConfig has no vespo weight yet (policy_loss='vespo', vespo_k_pos...)")
def test_vespo_training_matches_trl(tmp_path):
    compare_training(tmp_path, loss_type="vespo", max_steps=2)


def test_vespo_preset():
    if not HAS_VESPO:
        with pytest.raises((ValueError, TypeError)):
            presets.trl(loss_type="vespo")
        return
    config = presets.trl(loss_type="vespo", vespo_k_pos=1.5, importance_sampling_level="sequence")
    assert (config.policy_loss, config.ratio_level, config.vespo_k_pos, config.loss_scale) == ("vespo", "token", 1.5, 1)
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        presets.trl(loss_type="vespo", use_vllm=True, vllm_importance_sampling_mode="sequence_mask")
    with pytest.raises(ValueError, match="vespo_lambda_neg"):
        presets.trl(loss_type="vespo", vespo_lambda_neg=-1.0)


# ------------------------------------------------------------------------------------ multi-objective rewards
def count_b(completions, **_):
    return [2.0 * c.count("b") - 0.05 * len(c) for c in completions]


def test_normalize_then_sum_training_matches_trl(tmp_path):
    """TRL computes the advantages (per-reward group normalization, weighted sum, batch normalization) before
    the loss: the patched trainer trains on them as TRL does."""
    from test_integration_trl import count_a

    _, ours, _ = compare_training(
        tmp_path,
        max_steps=2,
        loss_type="grpo",
        multi_objective_aggregation="normalize_then_sum",
        reward_weights=[1.0, 0.5],
        reward_funcs=[count_a, count_b],
    )
    assert ours.multi_objective_aggregation == "normalize_then_sum"


HAS_MULTI_OBJECTIVE = "multi_objective_aggregation" in inspect.signature(presets.trl).parameters


@pytest.mark.skipif(not HAS_MULTI_OBJECTIVE, reason="presets.trl does not take multi_objective_aggregation yet")
@pytest.mark.parametrize("aggregation", ["normalize_then_sum", "sum_then_normalize"])
def test_multi_objective_advantages_match_trl(tmp_path, aggregation):
    """fastgrpo.advantages with presets.trl(multi_objective_aggregation=...).advantage on the [B, K] rewards TRL
    scored in a real generation step, against the advantages TRL computed from them."""
    from test_integration_trl import count_a

    trainer = make_trainer(
        tmp_path,
        max_steps=1,
        loss_type="grpo",
        multi_objective_aggregation=aggregation,
        reward_weights=[1.0, 0.5],
        reward_funcs=[count_a, count_b],
    )
    seen = {}
    score, generate = trainer._calculate_rewards, trainer._generate_and_score_completions

    def calculate_rewards(*args, **kwargs):
        seen["rewards"] = score(*args, **kwargs)
        return seen["rewards"]

    def generate_and_score(*args, **kwargs):
        output = generate(*args, **kwargs)
        seen["advantages"] = output["advantages"]
        return output

    trainer._calculate_rewards, trainer._generate_and_score_completions = calculate_rewards, generate_and_score
    patch_grpo_trainer(trainer)
    trainer.train()
    rewards, expected = seen["rewards"], seen["advantages"]
    assert rewards.shape == (8, 2) and rewards.std(0).min() > 0.1
    config = presets.trl(multi_objective_aggregation=aggregation).advantage
    weights = trainer.reward_weights
    ours = fastgrpo.advantages(rewards, trainer.num_generations, reward_weights=weights, config=config)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    other = "sum_then_normalize" if aggregation == "normalize_then_sum" else "normalize_then_sum"
    config = presets.trl(multi_objective_aggregation=other).advantage
    assert (
        fastgrpo.advantages(rewards, trainer.num_generations, reward_weights=weights, config=config) - expected
    ).abs().max() > 0.01
