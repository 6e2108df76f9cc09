"""The three trainers' loss computations, restated from their sources for the preset tests.

Each function follows the cited source statement by statement (same order, same clamps, same
denominators), written over plain tensors so it runs without the trainer installed. Sources read:
- TRL v1.10.0.dev (main, 2026-07): trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss,
  get_high_entropy_mask, get_off_policy_mask; the vLLM IS ratio in _generate_and_score_completions.
- verl 0.9.1 (PyPI): verl/trainer/ppo/core_algos.py (agg_loss, compute_policy_loss_vanilla, _gspo, _sapo,
  _gpg, _geo_mean, _cispo, kl_penalty, kl_penalty_forward); verl/workers/utils/losses.py (ppo_loss: entropy
  and KL terms, loss_scale_factor).
- OpenRLHF 0.11.2 (PyPI): openrlhf/models/loss.py (aggregate_loss, PolicyLoss.forward),
  openrlhf/models/utils.py (compute_approx_kl), openrlhf/trainer/ray/ppo_actor.py (KL and entropy terms).
The verl and OpenRLHF drop-ins are also tested against the installed packages (test_integration_packages.py).
"""

import torch


def _masked_mean(x, m, dim=None):
    return (x * m).sum() / m.sum() if dim is None else (x * m).sum(dim) / m.sum(dim)


# ---------------------------------------------------------------------------------------------------- TRL
def trl_loss(
    lp,
    old,
    ref,
    adv,
    mask,
    entropies,
    *,
    loss_type,
    epsilon=0.2,
    epsilon_high=None,
    delta=None,
    beta=0.0,
    importance_sampling_level="token",
    use_bias_correction_kl=False,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    max_completion_length=512,
    top_entropy_quantile=1.0,
    off_policy_mask_threshold=None,
    sampling=None,
    importance_sampling_ratio=None,
    entropy_coef=0.0,
    num_items_in_batch=None,
    gradient_accumulation_steps=1,
):
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    entropy_mask = None
    if top_entropy_quantile < 1.0:
        local = entropies[mask.bool()].float()
        threshold = torch.quantile(local, 1 - top_entropy_quantile)
        entropy_mask = ((entropies * mask.float()) >= threshold) & mask.bool()
    advantages = adv.unsqueeze(1)
    if off_policy_mask_threshold is not None:
        samp = sampling if sampling is not None else old
        kl_div = samp - lp.detach()
        avg = (kl_div * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        off_policy_mask = ((advantages >= 0) | (avg <= off_policy_mask_threshold)).to(mask.dtype)
    log_ratio = lp - old
    if importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    if beta != 0.0:
        per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * advantages * lp
    elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    else:  # sapo
        t = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -(torch.sigmoid(t * (coef_1 - 1)) * 4 / t) * advantages
    if off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if importance_sampling_ratio is not None:
        per_token_loss = per_token_loss * importance_sampling_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    ga = gradient_accumulation_steps
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / ga
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / ga
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length) / ga
    else:  # dapo, cispo: num_items_in_batch over processes (one process here)
        normalizer = num_items_in_batch.clamp(min=1.0)
        loss = (per_token_loss * mask).sum() / normalizer
    if entropy_coef != 0.0:
        eff = mask if entropy_mask is None else mask * entropy_mask
        if loss_type in ("cispo", "dapo"):
            entropy_loss = (entropies * eff).sum() / normalizer
        else:
            entropy_loss = (entropies * eff).sum() / eff.sum().clamp(min=1.0) / ga
        loss = loss - entropy_coef * entropy_loss
    return loss


def trl_importance_sampling_ratio(old, sampling, mask, mode, clip_min, clip_max):
    diff = (old - sampling) * mask
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -float("inf")
    hi = clip_max if clip_max is not None else float("inf")
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


# --------------------------------------------------------------------------------------------------- verl
def verl_agg_loss(
    loss_mat, loss_mask, loss_agg_mode, loss_scale_factor=None, dp_size=1, batch_num_tokens=None, global_batch_size=None
):
    if loss_agg_mode == "token-mean":
        count = loss_mask.sum() if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * loss_mask).sum() / count * dp_size
    if loss_agg_mode == "token-sum":
        return (loss_mat * loss_mask).sum() * dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = (loss_mat * loss_mask).sum(-1)
        seq_mask = (loss_mask.sum(-1) > 0).float()
        count = seq_mask.sum() if global_batch_size is None else global_batch_size
        loss = (seq_losses * seq_mask).sum() / count * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss
    if loss_agg_mode == "seq-mean-token-mean":
        count = loss_mask.sum(-1)
        seq_losses = (loss_mat * loss_mask).sum(-1) / (count + 1e-8)
        seq_mask = (count > 0).float()
        total = seq_mask.sum() if global_batch_size is None else global_batch_size
        return (seq_losses * seq_mask).sum() / total * dp_size
    raise ValueError(loss_agg_mode)


def verl_policy_loss(
    old,
    lp,
    adv,
    mask,
    *,
    loss_mode,
    loss_agg_mode,
    clip_ratio=0.2,
    clip_ratio_low=None,
    clip_ratio_high=None,
    clip_ratio_c=3.0,
    tau_pos=1.0,
    tau_neg=1.05,
    loss_scale_factor=None,
    rollout_is_weights=None,
    global_batch=None,
):
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    info = dict(global_batch or {})
    info.pop("loss_scale_factor", None)
    agg = lambda x, mode=loss_agg_mode: verl_agg_loss(x, mask, mode, loss_scale_factor, **info)  # noqa: E731
    w = (lambda x: x) if rollout_is_weights is None else (lambda x: x * rollout_is_weights)  # noqa: E731
    nkl = lp - old
    if loss_mode == "vanilla":
        ratio = torch.exp(torch.clamp(nkl, -20.0, 20.0))
        l1, l2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - low, 1 + high)
        c1 = torch.maximum(l1, l2)
        c2 = torch.min(-adv * clip_ratio_c, c1)
        return agg(w(torch.where(adv < 0, c2, c1)))
    if loss_mode == "gspo":
        seq = (nkl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        log_s = torch.clamp(lp - lp.detach() + seq.detach().unsqueeze(-1), max=10.0)
        s = torch.exp(log_s)
        l1, l2 = -adv * s, -adv * torch.clamp(s, 1 - low, 1 + high)
        return agg(w(torch.maximum(l1, l2)))
    if loss_mode == "sapo":
        ratio = torch.exp(torch.clamp(nkl, -20.0, 20.0))
        taus = torch.where(adv > 0, torch.tensor(tau_pos, dtype=adv.dtype), torch.tensor(tau_neg, dtype=adv.dtype))
        gates = torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)
        return agg(w(-gates * adv), "seq-mean-token-mean")
    if loss_mode == "gpg":
        return agg(w(-lp * adv))
    if loss_mode == "geo_mean":
        sgn = torch.sign(adv)
        clamped = torch.clamp(nkl, -low, high)
        d = sgn * torch.min(sgn * nkl, sgn * clamped)
        msum = mask.sum(-1)
        ratio = torch.exp((d * mask).sum(-1) / (msum + 1e-8))
        a = (adv * mask).sum(-1) / (msum + 1e-8)
        pg = -a * ratio
        if rollout_is_weights is not None:
            pg = pg * torch.exp((torch.log(rollout_is_weights + 1e-10) * mask).sum(-1) / (msum + 1e-8))
        return pg.mean()
    assert loss_mode == "cispo"
    ratio = torch.exp(torch.clamp(nkl, -20.0, 20.0))
    return agg(w(-torch.clamp(ratio, 1 - low, 1 + high).detach() * adv * lp))


def verl_kl_penalty(lp, ref, kl_type):
    def forward(kind):
        if kind in ("kl", "k1"):
            return lp - ref
        if kind == "abs":
            return (lp - ref).abs()
        if kind in ("mse", "k2"):
            return 0.5 * (lp - ref).square()
        kl = torch.clamp(ref - lp, -20, 20)
        return torch.clamp(torch.exp(kl) - kl - 1, -10, 10)

    value = forward(kl_type.rstrip("+"))
    if not kl_type.endswith("+") or kl_type in ("mse", "k2"):
        return value
    backward = 0.5 * (lp - ref).square()
    return backward - backward.detach() + value.detach()


def verl_actor_loss(
    old,
    lp,
    ref,
    adv,
    mask,
    entropy,
    *,
    loss_agg_mode,
    entropy_coeff=0.0,
    use_kl_loss=False,
    kl_loss_coef=0.001,
    kl_loss_type="low_var_kl",
    gradient_accumulation=1,
    **policy_kw,
):
    loss = verl_policy_loss(old, lp, adv, mask, loss_agg_mode=loss_agg_mode, **policy_kw)
    if entropy_coeff != 0:
        loss = loss - verl_agg_loss(entropy, mask, loss_agg_mode) * entropy_coeff
    if use_kl_loss:
        loss = loss + verl_agg_loss(verl_kl_penalty(lp, ref, kl_loss_type), mask, loss_agg_mode) * kl_loss_coef
    return loss * (1 / gradient_accumulation)


# ----------------------------------------------------------------------------------------------- OpenRLHF
def openrlhf_aggregate(loss, mask, token_level_loss=True, dp_size=1, batch_num_tokens=None, global_batch_size=None):
    if token_level_loss:
        if batch_num_tokens is None:
            return _masked_mean(loss, mask)
        return (loss * mask).sum() / batch_num_tokens * dp_size
    counts = mask.sum(-1)
    seq_loss = (loss * mask).sum(-1) / (counts + 1e-8)
    seq_mask = (counts > 0).float()
    if global_batch_size is None:
        return _masked_mean(seq_loss, seq_mask)
    return (seq_loss * seq_mask).sum() / global_batch_size * dp_size


def openrlhf_actor_loss(
    lp,
    old,
    ref,
    adv,
    mask,
    entropy,
    *,
    policy_loss_type="ppo",
    clip_eps_low=0.2,
    clip_eps_high=0.2,
    dual_clip=None,
    token_level_loss=True,
    rollout=None,
    is_correction_level="off",
    is_correction_mode="mask",
    is_correction_threshold=(0.5, 5.0),
    use_kl_loss=False,
    init_kl_coef=0.0,
    kl_estimator="k1",
    entropy_coef=None,
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
):
    token_level = token_level_loss and policy_loss_type != "gspo"
    raw = lp - old
    if policy_loss_type == "ppo":
        ratio = raw.clamp(-20.0, 20.0).exp()
    else:
        log_ratio = lp - rollout if is_correction_level != "off" else raw
        ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).exp().unsqueeze(-1) * mask
    surr1, surr2 = ratio * adv, ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * adv
    if dual_clip is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        loss = -torch.where(adv < 0, torch.max(clip1, dual_clip * adv), clip1)
    if is_correction_level != "off" and policy_loss_type == "ppo":  # ratio gating
        lo, hi = is_correction_threshold
        log_r = (old - rollout).detach()
        stat = (
            torch.exp(_masked_mean(log_r, mask, dim=-1)).unsqueeze(-1)
            if is_correction_level == "seq"
            else torch.exp(log_r)
        )
        if is_correction_mode == "clip":
            loss = stat.clamp(min=lo, max=hi) * loss
        else:
            loss = torch.where((stat >= lo) & (stat <= hi), torch.exp(log_r), 0.0) * loss
    total = openrlhf_aggregate(loss, mask, token_level, dp_size, batch_num_tokens, global_batch_size)
    if use_kl_loss and init_kl_coef > 0:
        d = lp.float() - ref.float()
        kl = {"k1": d, "k2": d**2 / 2.0, "k3": (-d).exp() - 1 + d}[kl_estimator].clamp(min=-10, max=10)
        total = total + openrlhf_aggregate(kl, mask) * init_kl_coef
    if entropy_coef is not None and entropy_coef != 0:
        total = total - openrlhf_aggregate(entropy, mask) * entropy_coef
    return total
