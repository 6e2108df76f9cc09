"""The fp32 reference against values worked out by hand on tiny tensors (MATH §1–§4).

Every expected number below is written out, not recomputed with a second copy of the formula: the
derivation is in the comment beside it.
"""

import math

import pytest
import torch

import fastgrpo
from fastgrpo import LossConfig
from fastgrpo.reference import policy_loss

ABS = 1e-6


def close(actual, expected, tol=ABS):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=1e-6, atol=tol), (actual.tolist(), expected.tolist())


def run(lp, adv, mask=None, *, cfg, old=None, **kw):
    """policy_loss on [1, T] tensors built from lists; returns (output, ∂loss/∂lp)."""
    lp = torch.tensor([lp], dtype=torch.float64, requires_grad=True)
    mask = torch.ones_like(lp) if mask is None else torch.tensor([mask], dtype=torch.float64)
    old = None if old is None else torch.tensor([old], dtype=torch.float64)
    adv = torch.tensor(adv, dtype=torch.float64)
    out = policy_loss(lp, adv, mask, old_logprobs=old, config=cfg, **kw)
    (grad,) = torch.autograd.grad(out.loss, lp)
    return out, grad[0]


# ---------------------------------------------------------------------------------------------- log-probs
def test_token_logprobs_uniform_and_temperature():
    # uniform logits over 4 entries: ℓ = −ln 4 = −1.3862944, H = ln 4
    lp, ent = fastgrpo.token_logprobs(torch.zeros(1, 4), torch.tensor([2]), entropy=True)
    close(lp, [-1.3862944]), close(ent, [1.3862944])
    # z = [2, 0], τ = 2 → z/τ = [1, 0]: lse = ln(1 + e) = 1.3132617; ℓ0 = 1 − lse, ℓ1 = −lse;
    # H = lse − p0·1 with p0 = e/(1+e) = 0.7310586 → 0.5822031
    lp, ent = fastgrpo.token_logprobs(
        torch.tensor([[2.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1]), temperature=2.0, entropy=True
    )
    close(lp, [-0.3132617, -1.3132617]), close(ent, [0.5822031, 0.5822031])


# ------------------------------------------------------------------------------------------- policy terms
# ρ = [0.5, 1.1, 1.5] from old = 0 and ℓ = ln ρ; ε = 0.2 → clip range [0.8, 1.2].
RHO = [0.5, 1.1, 1.5]
LOG_RHO = [math.log(r) for r in RHO]
OLD0 = [0.0, 0.0, 0.0]


def test_ppo_positive_advantage():
    # A = +1: P = −min(ρ, clip ρ) = [−0.5, −1.1, −1.2]; token mean −2.8/3.
    # ∂P/∂ℓ = −ρ where the unclipped branch is taken (tokens 0, 1), 0 where clipped (token 2); /3 for the mean.
    out, grad = run(LOG_RHO, [1.0], cfg=LossConfig(), old=OLD0)
    close(out.loss, -2.8 / 3)
    close(grad, [-0.5 / 3, -1.1 / 3, 0.0])
    m = out.metrics
    close(m["clip_ratio/high_mean"], 1 / 3), close(m["clip_ratio/low_mean"], 0.0)
    close(m["clip_ratio/region_mean"], 1 / 3), close(m["grad_active_fraction"], 2 / 3)
    close(m["ratio/mean"], 3.1 / 3), close(m["ratio/min"], 0.5), close(m["ratio/max"], 1.5)
    close(m["ppo_kl"], -sum(LOG_RHO) / 3)  # mean(ℓ^old − ℓ)


def test_ppo_negative_advantage_dual_clip_and_ratio_cap():
    # A = −1: P = max(ρ, clip ρ) = [0.8, 1.1, 1.5] → 3.4/3; token 0 sits on the clip bound (no gradient).
    out, grad = run(LOG_RHO, [-1.0], cfg=LossConfig(), old=OLD0)
    close(out.loss, 3.4 / 3)
    close(grad, [0.0, 1.1 / 3, 1.5 / 3])
    close(out.metrics["clip_ratio/low_mean"], 1 / 3)
    # dual clip c = 1.4: P = min(P, −cA) = [0.8, 1.1, 1.4] → 3.3/3; token 2 hits −cA (no gradient).
    out, grad = run(LOG_RHO, [-1.0], cfg=LossConfig(dual_clip=1.4), old=OLD0)
    close(out.loss, 3.3 / 3)
    close(grad, [0.0, 1.1 / 3, 0.0])
    close(out.metrics["clip_ratio/dual"], 1 / 3)
    # ratio cap δ = 1.3 (TRL delta): P = max(min(ρ, δ), clip ρ) = [0.8, 1.1, 1.3] → 3.2/3.
    out, grad = run(LOG_RHO, [-1.0], cfg=LossConfig(ratio_cap=1.3), old=OLD0)
    close(out.loss, 3.2 / 3)
    close(grad, [0.0, 1.1 / 3, 0.0])


def test_log_ratio_clamp():
    # log r = 30 clamped to 20: ρ = e^20 is far above the clip range, A = −1 → P = e^20 and no gradient.
    out, grad = run([30.0], [-1.0], cfg=LossConfig(log_ratio_clamp=20.0), old=[0.0])
    close(out.loss, math.exp(20.0), tol=1e-3)
    close(grad, [0.0])


def test_gspo_sequence_ratio():
    # log r = [ln 2, 0] → log s = ln 2 / 2, s = √2 = 1.4142136 for both tokens.
    cfg = LossConfig(ratio_level="sequence", aggregation="seq_mean_token_mean")
    out, grad = run([math.log(2.0), 0.0], [1.0], cfg=cfg, old=[0.0, 0.0])
    close(out.loss, -1.2)  # clipped at 1 + ε: −min(√2, 1.2)
    close(grad, [0.0, 0.0])
    # ε_high = 0.5: inside the range, P = −s; ∂s/∂ℓ_t = s/2 for each token → −0.7071068.
    cfg = LossConfig(ratio_level="sequence", aggregation="seq_mean_token_mean", epsilon_high=0.5)
    out, grad = run([math.log(2.0), 0.0], [1.0], cfg=cfg, old=[0.0, 0.0])
    close(out.loss, -1.4142136)
    close(grad, [-0.7071068, -0.7071068])
    # upper clamp of log s at 0.25: s = e^0.25 = 1.2840254, clamp → no gradient
    cfg = LossConfig(ratio_level="sequence", epsilon_high=0.5, seq_log_ratio_max=0.25)
    out, grad = run([math.log(2.0), 0.0], [1.0], cfg=cfg, old=[0.0, 0.0])
    close(out.loss, -1.2840254)
    close(grad, [0.0, 0.0])


def test_cispo():
    # ρ = [0.5, 3], A = +1, hi = 2 (TRL: absolute cap, no lower bound): w = sg[0.5, 2].
    # ℓ = [ln 0.5, ln 3] = [−0.6931472, 1.0986123]; P = −w·A·ℓ = [0.3465736, −2.1972246]; mean −0.9253255.
    cfg = LossConfig(policy_loss="cispo", cispo_high=2.0)
    out, grad = run([math.log(0.5), math.log(3.0)], [1.0], cfg=cfg, old=[0.0, 0.0])
    close(out.loss, -0.9253255)
    close(grad, [-0.25, -1.0])  # −w·A/2
    close(out.metrics["cispo_clip_ratio"], 0.5)
    # verl bounds [0.8, 1.2]: w = [0.8, 1.2] → P = [0.5545177, −1.3183347], mean −0.3819085
    cfg = LossConfig(policy_loss="cispo", cispo_low=0.8, cispo_high=1.2)
    out, _ = run([math.log(0.5), math.log(3.0)], [1.0], cfg=cfg, old=[0.0, 0.0])
    close(out.loss, -0.3819085)


def test_sapo():
    # ρ = 1: σ(0) = 1/2 → P = −(4/τ)/2·A. A = +1 (τ_pos = 1): −2. ∂P/∂ρ = −4σ(1−σ)A = −A, ∂ρ/∂ℓ = 1.
    out, grad = run([-1.0], [1.0], cfg=LossConfig(policy_loss="sapo"), old=[-1.0])
    close(out.loss, -2.0), close(grad, [-1.0])
    # A = −1 (τ_neg = 1.05): +2/1.05 = 1.9047619, gradient +1.
    out, grad = run([-1.0], [-1.0], cfg=LossConfig(policy_loss="sapo"), old=[-1.0])
    close(out.loss, 1.9047619), close(grad, [1.0])


def test_gmpo():
    # log r = [0.1, −0.5, 0.3], ε = 0.2. A = +1: d̃ = min(d, clamp d) = [0.1, −0.5, 0.2] → mean −0.0666667,
    # ρ = e^−0.0666667 = 0.9355070, loss = −ρ.
    d = [0.1, -0.5, 0.3]
    out, _ = run(d, [1.0], cfg=LossConfig(policy_loss="gmpo"), old=OLD0)
    close(out.loss, -0.9355070)
    # A = −1: d̃ = max(d, clamp d) = [0.1, −0.2, 0.3] → mean 0.0666667, ρ = 1.0689391, loss = +ρ.
    out, _ = run(d, [-1.0], cfg=LossConfig(policy_loss="gmpo"), old=OLD0)
    close(out.loss, 1.0689391)


def test_reinforce_with_token_advantages():
    # P = −A·ℓ with per-token A = [0.5, −1], ℓ = [−1, −2]: [0.5, −2] → mean −0.75; ∂/∂ℓ = −A/2.
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    out = policy_loss(
        lp,
        torch.tensor([[0.5, -1.0]], dtype=torch.float64),
        torch.ones(1, 2),
        config=LossConfig(policy_loss="reinforce"),
    )
    close(out.loss, -0.75)
    out.loss.backward()
    close(lp.grad[0], [-0.25, 0.5])


# ------------------------------------------------------------------------------------------------ KL term
@pytest.mark.parametrize(
    "estimator, value, grad",
    [
        ("k1", 0.5, 1.0),  # D = 0.5
        ("abs", 0.5, 1.0),
        ("k2", 0.125, 0.5),  # D²/2, gradient D
        ("k3", 0.1065307, 0.3934693),  # e^−D + D − 1 = 0.6065307 − 0.5; gradient 1 − e^−D
        ("k3+", 0.1065307, 0.5),  # value of k3, gradient of k2
    ],
)
def test_kl_estimators(estimator, value, grad):
    # A = 0 leaves only β·K: loss = β·K with β = 2.
    cfg = LossConfig(policy_loss="reinforce", beta=2.0, kl_estimator=estimator)
    out, g = run([-1.0], [0.0], cfg=cfg, ref_logprobs=torch.tensor([[-1.5]], dtype=torch.float64))
    close(out.loss, 2 * value), close(g, [2 * grad])
    close(out.metrics["kl"], value)


def test_kl_clamps_and_ratio_weighting():
    ref = torch.tensor([[0.0]], dtype=torch.float64)
    # D = −2 clamped to −1 on input: k3 = e^1 − 1 − 1 = 0.7182818 (no gradient through the clamp)
    out, g = run([-2.0], [0.0], cfg=LossConfig(policy_loss="reinforce", beta=1.0, kl_input_clamp=1.0), ref_logprobs=ref)
    close(out.loss, 0.7182818), close(g, [0.0])
    # D = −2 unclamped: k3 = e^2 − 3 = 4.3890561, clamped to 0.5 on output
    out, _ = run(
        [-2.0], [0.0], cfg=LossConfig(policy_loss="reinforce", beta=1.0, kl_output_clamp=0.5), ref_logprobs=ref
    )
    close(out.loss, 0.5)
    # TRL bias correction: K·ρ with ρ = e^0.5 (old = −2.5): k3(D = −2)·1.6487213 = 7.2364386
    out, _ = run(
        [-2.0],
        [0.0],
        cfg=LossConfig(policy_loss="reinforce", beta=1.0, kl_ratio_weighted=True),
        old=[-2.5],
        ref_logprobs=ref,
    )
    close(out.loss, 4.3890561 * 1.6487213, tol=1e-5)


# ------------------------------------------------------------------------------------------- aggregation
def _aggregate(cfg, values, mask, normalizer=None):
    """reinforce with ℓ = −1 makes P_t = A_t: the loss is then the aggregation of the given values."""
    values = torch.tensor(values, dtype=torch.float64)
    lp = -torch.ones_like(values)
    out = policy_loss(
        lp,
        values,
        torch.tensor(mask, dtype=torch.float64),
        normalizer=normalizer,
        config=LossConfig(policy_loss="reinforce", **cfg),
    )
    return out.loss


VALUES = [[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]]
MASK = [[1, 1, 1], [1, 0, 0], [0, 0, 0]]  # the third sequence is empty


@pytest.mark.parametrize(
    "cfg, normalizer, expected",
    [
        (dict(aggregation="token_mean"), None, 10 / 4),
        (dict(aggregation="token_mean"), 8.0, 10 / 8),
        (dict(aggregation="seq_mean_token_mean"), None, (2 + 4 + 0) / 3),
        (dict(aggregation="seq_mean_token_mean", count_empty_sequences=False), None, (2 + 4) / 2),
        (dict(aggregation="seq_mean_token_sum"), None, (6 + 4) / 3),
        (dict(aggregation="seq_mean_token_sum", count_empty_sequences=False), None, (6 + 4) / 2),
        (dict(aggregation="token_sum_norm"), None, 10 / (3 * 3)),  # S · padded T
        (dict(aggregation="token_sum_norm", max_length=5), None, 10 / (3 * 5)),
        (dict(aggregation="token_sum_norm", max_length=5, divide_by_num_sequences=False), None, 10 / 5),
        (dict(aggregation="token_sum_norm"), torch.tensor(4.0), 10 / 4),
        (dict(aggregation="token_mean", loss_scale=0.5), None, 10 / 8),
    ],
)
def test_aggregations(cfg, normalizer, expected):
    close(_aggregate(cfg, VALUES, MASK, normalizer), expected)


def test_all_masked_batch_is_zero_not_nan():
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"):
        close(_aggregate(dict(aggregation=agg), [[1.0, 2.0]], [[0, 0]]), 0.0)


# --------------------------------------------------------------------------------------- weights (§2.4)
def _weighted(cfg, old, samp):
    """reinforce with ℓ = −1 and A = 1: the loss is the token mean of the weights."""
    old = torch.tensor([old], dtype=torch.float64)
    out = policy_loss(
        -torch.ones_like(old),
        torch.ones(1, dtype=torch.float64),
        torch.ones_like(old),
        old_logprobs=old,
        sampling_logprobs=torch.zeros_like(old),
        config=LossConfig(policy_loss="reinforce", **cfg),
    )
    return out


@pytest.mark.parametrize(
    "mode, lo, hi, old, expected",
    [
        ("token_truncate", 0.5, 1.5, [math.log(2), math.log(0.25)], [1.5, 0.5]),
        ("token_mask", 0.5, 1.5, [math.log(1.2), math.log(3.0)], [1.2, 0.0]),
        ("sequence_truncate", 0.6, 2.0, [math.log(2), math.log(0.25)], [0.6, 0.6]),  # Σ log w = ln 0.5
        ("sequence_mask", 0.6, 2.0, [math.log(2), math.log(0.25)], [0.0, 0.0]),
        ("sequence_mask", 0.4, 2.0, [math.log(2), math.log(0.25)], [0.5, 0.5]),
        ("sequence_geomean_mask", 0.6, 2.0, [math.log(2), math.log(0.25)], [2.0, 0.25]),  # geo mean 0.7071 kept
        ("sequence_geomean_mask", 0.8, 2.0, [math.log(2), math.log(0.25)], [0.0, 0.0]),
    ],
)
def test_rollout_correction(mode, lo, hi, old, expected):
    out = _weighted(dict(rollout_correction=mode, rollout_min=lo, rollout_max=hi), old, None)
    close(out.loss, sum(expected) / 2)
    close(out.metrics["is_weight/min"], min(expected)), close(out.metrics["is_weight/max"], max(expected))


def test_entropy_mask_keeps_top_quantile():
    # H = [0.1, 0.5, 0.9, 0.3]; the 0.5 quantile of the masked entropies is 0.4 → keep tokens 1 and 2.
    # reinforce with ℓ = −1, A = 1: token mean of the kept-token indicator = 2/4.
    ent = torch.tensor([[0.1, 0.5, 0.9, 0.3]], dtype=torch.float64)
    out = policy_loss(
        -torch.ones(1, 4, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
        torch.ones(1, 4),
        entropy=ent,
        config=LossConfig(policy_loss="reinforce", top_entropy_quantile=0.5),
    )
    close(out.loss, 0.5)


def test_off_policy_mask_drops_negative_stale_sequences():
    # two sequences with A = −1; ℓ^samp − ℓ = 0.5 (> δ = 0.3, dropped) and 0.1 (kept).
    # reinforce with ℓ = −1: P = A = −1 on the kept sequence's 2 tokens → token mean −2/4.
    lp = -torch.ones(2, 2, dtype=torch.float64)
    samp = lp + torch.tensor([[0.5], [0.1]], dtype=torch.float64)
    out = policy_loss(
        lp,
        -torch.ones(2, dtype=torch.float64),
        torch.ones(2, 2),
        sampling_logprobs=samp,
        config=LossConfig(policy_loss="reinforce", off_policy_mask_threshold=0.3),
    )
    close(out.loss, -0.5)
    # a positive advantage keeps the sequence whatever its drift: −(−1)·… = token mean of A = 1
    out = policy_loss(
        lp,
        torch.ones(2, dtype=torch.float64),
        torch.ones(2, 2),
        sampling_logprobs=samp,
        config=LossConfig(policy_loss="reinforce", off_policy_mask_threshold=0.3),
    )
    close(out.loss, 1.0)


def test_entropy_bonus():
    # loss = token mean of P (= A = 1) − 0.1 · mean H (H = [1, 2]) = 1 − 0.15; ∂/∂H = −0.1/2 each
    ent = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    out = policy_loss(
        -torch.ones(1, 2, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
        torch.ones(1, 2),
        entropy=ent,
        config=LossConfig(policy_loss="reinforce", entropy_coef=0.1),
    )
    close(out.loss, 0.85)
    out.loss.backward()
    close(ent.grad[0], [-0.05, -0.05])
    close(out.metrics["entropy"], 1.5)


# ------------------------------------------------------------------------------------------- advantages
def test_advantage_estimators():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    # group [1, 0]: mean 0.5, unbiased std 0.7071068 → ±0.5/(0.7071068 + 1e-4); group [1, 1]: 0
    close(fastgrpo.advantages(r, 2), [0.7070068, -0.7070068, 0.0, 0.0])
    # batch std of all rewards = 0.5: ±0.5/0.5001
    close(fastgrpo.advantages(r, 2, scale="batch"), [0.9998000, -0.9998000, 0.0, 0.0])
    close(fastgrpo.advantages(r, 2, scale="none"), [0.5, -0.5, 0.0, 0.0])
    # rloo on [1, 2, 6]: R − mean of the others = [1 − 4, 2 − 3.5, 6 − 1.5]
    close(fastgrpo.advantages(torch.tensor([1.0, 2.0, 6.0]), 3, estimator="rloo"), [-3.0, -1.5, 4.5])
    # reinforce_baseline: centered [−2, −1, 3] (mean 0, unbiased std √7 = 2.6457513) → whitened
    close(
        fastgrpo.advantages(torch.tensor([1.0, 2.0, 6.0]), 3, estimator="reinforce_baseline", eps=0.0),
        [-0.7559289, -0.3779645, 1.1338934],
    )


def test_advantage_group_ids_singletons_and_multi_reward():
    # ids 7 → [1, 3] (mean 2, std √2) and 3 → [2, 6] (mean 4, std 2√2): all ±1/√2
    adv = fastgrpo.advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), group_ids=torch.tensor([7, 3, 7, 3]), eps=0.0)
    close(adv, [-0.7071068, -0.7071068, 0.7071068, 0.7071068])
    # a group of one: TRL gives 0, verl keeps R/(1 + eps)
    close(fastgrpo.advantages(torch.tensor([3.0]), 1), [0.0])
    close(fastgrpo.advantages(torch.tensor([3.0]), 1, singleton="raw", eps=1e-6), [3.0 / (1 + 1e-6)])
    # two reward functions with weights [1, 0.5]: [1 + 1, 0 + 1] = [2, 1] → ±0.5/(0.7071068 + 1e-4)
    adv = fastgrpo.advantages(torch.tensor([[1.0, 2.0], [0.0, 2.0]]), 2, reward_weights=torch.tensor([1.0, 0.5]))
    close(adv, [0.7070068, -0.7070068])


def test_advantage_metrics():
    _, m = fastgrpo.advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), 2, return_metrics=True)
    close(m["reward"], 0.5)
    close(m["frac_reward_zero_std"], 2 / 3)
    close(m["frac_groups_all_solved"], 1 / 3), close(m["frac_groups_all_failed"], 1 / 3)
    close(m["reward/group_std_mean"], 0.7071068 / 3)
    close(m["advantage/group_sum_abs_max"], 0.0)
