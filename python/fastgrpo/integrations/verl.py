"""verl drop-ins: policy losses with verl's policy-loss call signature, its KL penalty and log-prob helper.

    from fastgrpo.integrations import verl as fg
    fg.register_policy_losses()          # adds "fastgrpo_vanilla", "fastgrpo_gspo", ... to verl's registry
    # then actor.policy_loss.loss_mode=fastgrpo_vanilla (or call fg.policy_loss_fn("vanilla") directly)

Each function returns what verl's own returns: (loss, metrics) with verl's metric names and definitions,
computed from the same inputs (read at verl 0.9.1, verl/trainer/ppo/core_algos.py; tested against it).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .. import presets
from ..config import LossConfig
from ..trajectory.grpo_loss import policy_loss
from ..trajectory.objective import dppo_valid, kl_estimate
from ..trajectory.token_logprobs import linear_token_logprobs, token_logprobs
from . import megatron
from ._rows import as_rows, labels_per_row, logprobs_per_row

LOSS_MODES = (
    "vanilla",
    "gspo",
    "sapo",
    "gpg",
    "geo_mean",
    "cispo",
    "dppo_tv",
    "dppo_kl",
    "dro",
    "clip_cov",
    "kl_cov",
    "bypass_mode",
)


def _option(config: Any, name: str, default: Any = None) -> Any:
    """An option of verl's ActorConfig, an omegaconf DictConfig or a plain dict."""
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(name, default)
    value = getattr(config, name, default)
    return default if value is None and default is not None else value


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum()


def _verl_metrics(
    loss_mode: str,
    old: Tensor,
    lp: Tensor,
    adv: Tensor,
    mask: Tensor,
    low: float,
    high: float,
    clip_ratio_c: float,
    cfg: LossConfig,
    out_metrics: dict[str, Tensor],
) -> dict[str, float]:
    """verl's policy metrics, by its per-mode definitions (``out_metrics``: fastgrpo's, for what only the loss
    knows: clip_cov's drawn tokens, DPPO's trust region)."""
    if loss_mode == "gpg":
        return {}
    m = mask.float()
    nkl = (lp - old).detach()
    if loss_mode in ("vanilla", "sapo", "cispo", "dppo_tv", "dppo_kl"):
        nkl = nkl.clamp(-20.0, 20.0)
    zero = torch.zeros((), device=lp.device)
    ppo_kl = _masked_mean(-nkl, m)
    if loss_mode in ("dro", "kl_cov", "clip_cov"):
        only = {"actor/ppo_kl": (_masked_mean(nkl.abs(), m) if loss_mode == "kl_cov" else ppo_kl).item()}
        if loss_mode == "clip_cov":
            only["actor/pg_clipfrac"] = out_metrics["cov_selected_fraction"].item()
        return only
    if loss_mode in ("dppo_tv", "dppo_kl"):  # outside the trust region; truncated (ρ > c) inside it
        valid = dppo_valid(lp.detach(), old.detach(), adv, cfg)
        return {
            "actor/pg_clipfrac": _masked_mean((~valid).float(), m).item(),
            "actor/ppo_kl": ppo_kl.item(),
            "actor/pg_clipfrac_lower": _masked_mean(((nkl.exp() > clip_ratio_c) & valid).float(), m).item(),
        }
    if loss_mode in ("vanilla", "gspo"):
        if loss_mode == "gspo":
            seq = (nkl * m).sum(-1) / m.sum(-1).clamp(min=1)
            ratio = torch.exp(seq.unsqueeze(-1).expand_as(nkl).clamp(max=10.0))
        else:
            ratio = torch.exp(nkl)
        l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
        clipfrac = _masked_mean((l2 > l1).float(), m)
        lower = zero
        if loss_mode == "vanilla":
            lower = _masked_mean(((torch.maximum(l1, l2) > -adv * clip_ratio_c) & (adv < 0)).float(), m)
    elif loss_mode == "geo_mean":
        clipped = nkl != nkl.clamp(-low, high)
        clipfrac, lower = _masked_mean((clipped & (adv > 0)).float(), m), _masked_mean((clipped & (adv < 0)).float(), m)
    elif loss_mode == "cispo":
        ratio = torch.exp(nkl)
        clipfrac, lower = _masked_mean((ratio != ratio.clamp(1 - low, 1 + high)).float(), m), zero
    else:  # sapo reports no clipping
        clipfrac = lower = zero
    return {
        "actor/pg_clipfrac": clipfrac.item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": lower.item(),
    }


def _global_normalizer(loss_mode: str, loss_agg_mode: str, info: dict, padded_length: int) -> Optional[float]:
    """The denominator verl's ``agg_loss`` uses with ``global_batch_info`` (the global count / dp_size), or
    None for the local count (dp_size 1 only). geo_mean takes a plain mean over the micro-batch's sequences."""
    dp = info.get("dp_size", 1)
    if loss_mode == "geo_mean":
        return None
    if loss_mode == "sapo":  # its policy term is always a sequence mean
        loss_agg_mode = "seq-mean-token-mean"
    if loss_agg_mode == "token-sum":
        return 1.0 / dp if dp != 1 else None
    name = "batch_num_tokens" if loss_agg_mode == "token-mean" else "global_batch_size"
    count = info.get(name)
    if count is None:
        if dp > 1:  # verl's agg_loss raises too: a local count would scale each rank's gradient differently
            raise ValueError(
                f"global_batch_info[{name!r}] (the global count) is required when dp_size > 1 "
                f"(loss_agg_mode={loss_agg_mode!r}), as in verl's agg_loss"
            )
        return None
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return count / dp * (info.get("loss_scale_factor") or padded_length)
    return count / dp


def policy_loss_fn(loss_mode: str) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """A policy loss with verl's signature for ``loss_mode`` (``LOSS_MODES``). The options of
    ``config.policy_loss`` (clip_cov_ratio, clip_cov_lb/ub, kl_cov_ratio, ppo_kl_coef, dro_beta) are read there;
    clip_cov draws from torch's global generator, as verl."""
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {loss_mode!r}")
    if loss_mode == "bypass_mode":
        bypass = _bypass_mode(policy_loss_fn("vanilla"), policy_loss_fn("gpg"))
        bypass.__name__ = "fastgrpo_bypass_mode"
        return bypass
    default_agg = "seq-mean-token-mean" if loss_mode in ("gspo", "sapo") else "token-mean"  # verl's defaults

    def compute_policy_loss(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = default_agg,
        config: Any = None,
        rollout_is_weights: Optional[Tensor] = None,
    ) -> tuple[Tensor, dict[str, float]]:
        clip_ratio = _option(config, "clip_ratio", 0.2)
        low = _option(config, "clip_ratio_low", clip_ratio)
        high = _option(config, "clip_ratio_high", clip_ratio)
        clip_ratio_c = _option(config, "clip_ratio_c", 3.0)
        info = _option(config, "global_batch_info", {}) or {}
        sub = _option(config, "policy_loss")
        cfg = presets.verl(
            loss_mode=loss_mode,
            loss_agg_mode=loss_agg_mode,
            clip_ratio=clip_ratio,
            clip_ratio_low=low,
            clip_ratio_high=high,
            clip_ratio_c=clip_ratio_c,
            tau_pos=_option(config, "tau_pos", 1.0),
            tau_neg=_option(config, "tau_neg", 1.05),
            loss_scale_factor=info.get("loss_scale_factor") or _option(config, "loss_scale_factor"),
            dro_beta=_option(sub, "dro_beta"),
            clip_cov_ratio=_option(sub, "clip_cov_ratio", 0.0002),
            clip_cov_lb=_option(sub, "clip_cov_lb", 1.0),
            clip_cov_ub=_option(sub, "clip_cov_ub", 5.0),
            kl_cov_ratio=_option(sub, "kl_cov_ratio", 0.0002),
            ppo_kl_coef=_option(sub, "ppo_kl_coef", 1.0),
        )
        normalizer = _global_normalizer(loss_mode, loss_agg_mode, info, response_mask.shape[-1])
        out = policy_loss(
            log_prob,
            advantages,
            response_mask,
            old_logprobs=old_log_prob,
            is_weights=rollout_is_weights,
            normalizer=normalizer,
            config=cfg,
        )
        metrics = _verl_metrics(
            loss_mode, old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c, cfg, out.metrics
        )
        return out.loss, metrics

    compute_policy_loss.__name__ = f"fastgrpo_{loss_mode}"
    return compute_policy_loss


def _bypass_mode(vanilla: Callable, gpg: Callable) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """verl's ``bypass_mode`` (old_log_prob is the rollout's): IS weights and rejection from the current log-probs
    (detached) against the rollout's, by ``config.policy_loss.rollout_correction``; then ``ppo_clip`` (the vanilla
    loss against the rollout log-probs, no IS weights) or ``reinforce`` (−w·A·ℓ) on the rejection-masked tokens."""
    from ..trajectory.rollout_correction import compute_rollout_correction_and_rejection_mask

    def compute_policy_loss(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Optional[Tensor] = None,
    ) -> tuple[Tensor, dict[str, float]]:
        options = _option(_option(config, "policy_loss"), "rollout_correction")
        if options is None:
            raise ValueError("loss_mode='bypass_mode' needs config.policy_loss.rollout_correction (verl's options)")
        loss_type = _option(options, "loss_type", "ppo_clip")
        if loss_type not in ("ppo_clip", "reinforce"):
            raise ValueError(f"rollout_correction.loss_type must be 'ppo_clip' or 'reinforce', got {loss_type!r}")
        with torch.no_grad():
            weights, mask, corr_metrics = compute_rollout_correction_and_rejection_mask(
                old_log_prob=log_prob.detach(),
                rollout_log_prob=old_log_prob,
                response_mask=response_mask,
                rollout_is=_option(options, "rollout_is"),
                rollout_is_threshold=_option(options, "rollout_is_threshold", 2.0),
                rollout_is_batch_normalize=_option(options, "rollout_is_batch_normalize", False),
                rollout_rs=_option(options, "rollout_rs"),
                rollout_rs_threshold=_option(options, "rollout_rs_threshold"),
            )
        if loss_type == "ppo_clip":  # the ratio to the rollout policy already corrects: no IS weights
            loss, metrics = vanilla(old_log_prob, log_prob, advantages, mask, loss_agg_mode, config)
        else:
            w = None if weights is None else weights.batch["rollout_is_weights"]
            loss, _ = gpg(old_log_prob, log_prob, advantages, mask, loss_agg_mode, config, w)
            metrics = {"actor/ppo_kl": _masked_mean((old_log_prob - log_prob).detach(), mask.float()).item()}
        return loss, {**metrics, **corr_metrics}

    return compute_policy_loss


def register_policy_losses(prefix: str = "fastgrpo_") -> list[str]:
    """Registers every mode in verl's policy-loss registry as ``prefix + mode``; returns the names."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    names = []
    for mode in LOSS_MODES:
        register_policy_loss(prefix + mode)(policy_loss_fn(mode))
        names.append(prefix + mode)
    return names


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty: str) -> Tensor:
    """verl's ``kl_penalty`` (kl/k1, abs, mse/k2, low_var_kl/k3, and the straight-through ``+`` forms)."""
    cfg = presets.verl(use_kl_loss=True, kl_loss_type=kl_penalty)
    return kl_estimate(logprob, ref_logprob, cfg)


def logprobs_from_logits(logits: Tensor, labels: Tensor, inplace_backward: bool = True) -> Tensor:
    """verl's ``logprobs_from_logits``: fp32 log-probs [...] of ``labels`` under ``logits`` [..., V], one fused
    pass. As verl's flash-attn path, ``labels`` may have any shape with one id per row of ``logits`` (e.g. [1, N]
    for [N, V]). ``inplace_backward`` is accepted for the signature and ignored (no in-place gradient here)."""
    return logprobs_per_row(logits, labels)


class FusedLinearForPPO(nn.Module):
    """verl's ``FusedLinearForPPO`` (verl/utils/experimental/torch_functional.py): hidden states + LM-head weight
    → (fp32 log-probs, entropy in the hidden states' dtype), on fastgrpo's linear path (logits one chunk at a
    time, one pass for both outputs). ``chunk_size`` and ``impl_backend`` are accepted for the signature."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch") -> None:
        super().__init__()
        if impl_backend not in ("torch", "liger"):  # verl's check
            raise ValueError(f"impl_backend must be 'torch' or 'liger', got {impl_backend!r}")
        self.chunk_size, self.impl_backend = chunk_size, impl_backend

    def forward(
        self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor, temperature: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        lp, ent = linear_token_logprobs(
            hidden_states, vocab_weights, input_ids.long(), temperature=temperature, entropy=True
        )
        return lp, ent.to(hidden_states.dtype)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group: Any = None,
) -> tuple[Tensor, Tensor]:
    """verl's ``linear_cross_entropy`` (verl/utils/kernel/linear_cross_entropy.py, CUDA-only there): the rows of
    ``hidden`` [..., H] flattened, one label per row in any shape → (log-probs [N], entropy [N]), fp32,
    differentiable w.r.t. hidden and weight; ``reduction`` ``"sum"``/``"mean"`` reduces the log-probs to a
    scalar (the entropy stays [N]), as verl's.

    ``dist_process_group``: ``weight`` is this rank's vocabulary shard (equal shards in rank order), ``hidden``
    the same on every rank, ``labels`` global ids; the outputs are the same on every rank. As verl's, the
    backward leaves this rank's partial hidden gradient (verl's sequence-parallel gather sums it in its backward
    reduce-scatter) and the shard's weight gradient."""
    if dist_process_group is not None and not isinstance(dist_process_group, torch.distributed.ProcessGroup):
        raise TypeError(
            f"dist_process_group must be a torch.distributed.ProcessGroup, got {type(dist_process_group).__name__}"
        )
    if not isinstance(reduction, str) or reduction.lower() not in ("none", "sum", "mean"):
        # verl reads any other string as "none"; a typo should not silently change the output's shape
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    ids = labels_per_row("hidden", hidden, labels).reshape(-1)
    lp, ent = linear_token_logprobs(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        ids.long(),
        temperature=temperature,
        entropy=True,
        tp_group=dist_process_group,
        reduce_hidden_grad=False,
    )
    reductions: dict[str, Callable[[Tensor], Tensor]] = {"none": lambda x: x, "sum": torch.sum, "mean": torch.mean}
    reduce = reductions[reduction.lower()]
    return reduce(lp), ent


def vocab_parallel_log_probs_from_logits(logits: Tensor, labels: Tensor, tp_group: Any = None) -> Tensor:
    """verl's ``vocab_parallel_log_probs_from_logits`` (verl/utils/megatron/tensor_parallel.py, the Megatron
    engine's path): fp32 log-probs of ``labels`` (global ids, already shifted) under this rank's vocabulary
    shard of ``logits`` [..., V/tp], one fused pass and one all_gather instead of megatron-core's three
    all-reduces. ``tp_group``: megatron's tensor-parallel group when None (as verl's, which takes no group)."""
    group = megatron.tensor_parallel_group(tp_group)
    rows = as_rows(logits)
    ids = labels_per_row("logits", logits, labels).reshape(rows.shape[:-1]).long()
    return token_logprobs(rows, ids, tp_group=group).reshape(labels.shape)


def vocab_parallel_entropy(vocab_parallel_logits: Tensor, tp_group: Any = None) -> Tensor:
    """verl's ``vocab_parallel_entropy``: the entropy [...] of the whole vocabulary from this rank's shard
    [..., V/tp], in the logits' dtype as verl's (computed in fp32 here), differentiable."""
    group = megatron.tensor_parallel_group(tp_group)
    z = vocab_parallel_logits
    rows = as_rows(z)
    ids = torch.zeros(rows.shape[:-1], dtype=torch.long, device=z.device)  # any id: only the entropy is used
    _, ent = token_logprobs(rows, ids, entropy=True, tp_group=group, check_values=False)
    return ent.reshape(z.shape[:-1]).to(z.dtype)


# ------------------------------------------------------------------------------------------ advantage estimators
# verl's advantage estimators (core_algos.py, register_adv_est) with their call signatures; gae needs a critic.
ADV_ESTIMATORS = (
    "grpo",
    "grpo_vectorized",
    "rloo",
    "rloo_vectorized",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
    "remax",
    "opo",
    "grpo_passk",
    "gpg",
    "gdpo",
    "optimal_token_baseline",
    "tir_optimal_token_baseline",
)
_OUTCOME = ("token_level_rewards", "response_mask", "index", "epsilon")
_ADV_POSITIONAL = {  # each verl function's positional parameters, in its order (the rest are keywords)
    **{name: _OUTCOME + ("config",) for name in ("rloo", "rloo_vectorized", "opo", "reinforce_plus_plus_baseline")},
    **{name: _OUTCOME + ("norm_adv_by_std_in_grpo", "config") for name in ("grpo", "grpo_vectorized", "grpo_passk")},
    "gdpo": _OUTCOME + ("norm_adv_by_std_in_grpo", "config", "non_tensor_batch", "batch"),
    "gpg": _OUTCOME + ("f_norm", "alpha", "config"),
    "reinforce_plus_plus": ("token_level_rewards", "response_mask", "config"),
    "remax": ("token_level_rewards", "reward_baselines", "response_mask", "config"),
    **{
        name: ("token_level_rewards", "response_mask", "index", "old_log_probs", "sum_pi_squared")
        + ("rollout_is_weights", "handle_zero_tail", "epsilon")
        for name in ("optimal_token_baseline", "tir_optimal_token_baseline")
    },
}


def _group_ids(index: Any, device: torch.device) -> Tensor:
    """verl's ``index`` (the ``uid`` of each sample's prompt: a numpy array of strings, a list or a tensor) → one
    integer id per distinct value."""
    if isinstance(index, Tensor):
        return index.to(device)
    import numpy as np

    _, inverse = np.unique(np.asarray(index), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long, device=device)


def _gdpo_rewards(token_level_rewards: Tensor, config: Any, non_tensor_batch: Any, batch: Any) -> tuple[Tensor, Any]:
    """verl gdpo's reward dimensions: one column per ``algorithm.gdpo_reward_keys`` entry of ``non_tensor_batch``
    (each as fp32, as verl reads them) with ``gdpo_reward_weights``; without config, non_tensor_batch and batch
    (verl's condition), the summed token-level rewards as the one dimension."""
    keys = _option(config, "gdpo_reward_keys")
    if config is None or non_tensor_batch is None or batch is None:
        if keys:  # verl's trainer hands non_tensor_batch and batch to the estimator named "gdpo" only
            raise ValueError(
                "algorithm.gdpo_reward_keys is set but non_tensor_batch/batch were not passed: verl's trainer "
                "passes them to its 'gdpo' estimator only (or call this function with them)"
            )
        total = torch.float64 if token_level_rewards.dtype == torch.float64 else torch.float32
        return token_level_rewards.sum(-1, dtype=total), None
    import numpy as np

    if not keys:
        raise ValueError(
            "gdpo needs algorithm.gdpo_reward_keys: the reward components returned by compute_score "
            "(e.g. ['format_reward', 'accuracy_reward'])"
        )
    missing = [key for key in keys if key not in non_tensor_batch]
    if missing:
        raise ValueError(f"gdpo reward keys {missing} are not in non_tensor_batch (keys: {list(non_tensor_batch)})")
    device = token_level_rewards.device
    columns = [torch.as_tensor(np.asarray(non_tensor_batch[key], dtype=np.float32), device=device) for key in keys]
    weights = _option(config, "gdpo_reward_weights")
    w = None if weights is None else torch.tensor(list(weights), dtype=torch.float32, device=device)
    return torch.stack(columns, -1), w


def advantage_fn(name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """An advantage estimator with verl's signature for ``name`` (one of ``ADV_ESTIMATORS``): the same positional
    parameters and keywords as verl's function, → (advantages [B, T], returns [B, T]) in the token-level
    rewards' dtype, computed by ``fastgrpo.advantages`` with ``presets.verl(adv_estimator=name).advantage``.

    What verl does, reproduced (read at 0.9.1):

    - ``grpo`` reads ``norm_adv_by_std_in_grpo`` from the argument, else from ``config`` (verl's trainer passes it
      to its own grpo; its registry path would drop it); ``grpo_passk`` reads it from ``config`` only, ignoring
      the argument, and ``grpo_vectorized`` and ``gdpo`` from the argument only (default True): verl's trainer
      never passes it to them, so ``algorithm.norm_adv_by_std_in_grpo=False`` has no effect there.
    - ``reinforce_plus_plus`` discounts by ``config.gamma``; ``gpg``'s ``f_norm``/``alpha`` change nothing.
    - ``returns``: the advantages for the outcome estimators, the (discounted) return-to-go for
      ``reinforce_plus_plus`` (0 at masked tokens), the undiscounted one for ``remax`` and the optimal token
      baselines (not masked), as verl's.

    Where verl differs, fastgrpo is finite: ``opo`` gives 0 where verl's all-empty group divides 0 by 0;
    ``remax`` puts 0 at masked tokens inside a response where verl leaves the return; whitening over fewer than
    two tokens gives 0 where verl's ``masked_whiten`` raises. A missing input (``index``, ``reward_baselines``,
    ``old_log_probs``, ``sum_pi_squared``) is a ValueError naming verl's argument.
    """
    from dataclasses import replace

    from ..reward import estimators
    from ..reward.advantages import advantages

    if name not in ADV_ESTIMATORS:
        raise ValueError(f"name must be one of {ADV_ESTIMATORS} (gae needs a critic), got {name!r}")
    positional = _ADV_POSITIONAL[name]
    token_baseline = name in ("optimal_token_baseline", "tir_optimal_token_baseline")
    outcome = name not in ("reinforce_plus_plus", "remax") and not token_baseline
    needs_index = name not in ("reinforce_plus_plus", "remax")

    def compute_advantage(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if len(args) > len(positional):
            raise TypeError(f"fastgrpo_{name} takes at most {len(positional)} positional arguments ({positional})")
        for param, value in zip(positional, args):
            if param in kwargs:
                raise TypeError(f"fastgrpo_{name} got multiple values for argument {param!r}")
            kwargs[param] = value
        for param in ("token_level_rewards", "response_mask"):
            if kwargs.get(param) is None:
                raise ValueError(f"{param} is required by verl's {name} estimator")
        rewards_tok: Tensor = kwargs["token_level_rewards"]
        mask: Tensor = kwargs["response_mask"]
        config = kwargs.get("config")
        norm = kwargs.get("norm_adv_by_std_in_grpo")  # the argument: what grpo_vectorized and gdpo read
        if name == "grpo_passk" or (name == "grpo" and norm is None):
            norm = _option(config, "norm_adv_by_std_in_grpo", True)
        gamma = _option(config, "gamma", 1.0) if name == "reinforce_plus_plus" else 1.0
        changes: dict[str, Any] = {}
        if name in ("grpo", "grpo_vectorized", "grpo_passk", "gdpo") and norm is not None:
            changes["scale"] = "group" if norm else "none"
        if kwargs.get("epsilon") is not None:
            changes["eps"] = kwargs["epsilon"]
        if token_baseline:
            changes["zero_tail"] = kwargs.get("handle_zero_tail", True)
        adv_cfg = replace(presets.verl(adv_estimator=name, gamma=gamma).advantage, **changes)
        index = kwargs.get("index")
        if needs_index and index is None:
            raise ValueError(f"index (each sample's prompt uid) is required by verl's {name} estimator")
        group_ids = None if index is None else _group_ids(index, rewards_tok.device)
        weights = None
        # the score in fp32 at least (verl sums in the rewards' dtype, bf16 included)
        total = torch.float64 if rewards_tok.dtype == torch.float64 else torch.float32
        if name == "gdpo":
            scores, weights = _gdpo_rewards(rewards_tok, config, kwargs.get("non_tensor_batch"), kwargs.get("batch"))
            token_rewards = None
        elif outcome:
            scores, token_rewards = rewards_tok.sum(-1, dtype=total), None
        else:  # the return-based estimators read the token-level rewards as they are
            scores, token_rewards = rewards_tok.new_zeros(rewards_tok.shape[0]), rewards_tok
        extra: dict[str, Any] = {}
        if name == "remax":
            if kwargs.get("reward_baselines") is None:
                raise ValueError("reward_baselines (the greedy responses' rewards) is required by verl's remax")
            extra["baseline_rewards"] = kwargs["reward_baselines"]
        elif token_baseline:
            for param in ("old_log_probs", "sum_pi_squared"):
                if kwargs.get(param) is None:
                    raise ValueError(f"{param} is required by verl's {name} estimator")
            extra.update(
                old_logprobs=kwargs["old_log_probs"],
                sum_pi_squared=kwargs["sum_pi_squared"],
                is_weights=kwargs.get("rollout_is_weights"),
            )
        adv = advantages(
            scores,
            group_ids=group_ids,
            config=adv_cfg,
            reward_weights=weights,
            response_mask=mask,
            token_rewards=token_rewards,
            **extra,
        ).to(rewards_tok.dtype)
        if outcome:
            return adv, adv
        m = mask != 0
        if name == "reinforce_plus_plus":
            returns = estimators.return_to_go(rewards_tok, m, adv_cfg.gamma, "skip")
        else:
            returns = estimators.return_to_go(rewards_tok, m, 1.0, "count")
        return adv, returns.to(rewards_tok.dtype)

    compute_advantage.__name__ = f"fastgrpo_{name}"
    return compute_advantage


def register_advantage_estimators(prefix: str = "fastgrpo_") -> list[str]:
    """Registers every estimator of ``ADV_ESTIMATORS`` in verl's registry as ``prefix + name`` (then
    ``algorithm.adv_estimator=fastgrpo_grpo`` ...); returns the names.

    verl's trainer (``compute_advantage``) passes every estimator the token-level rewards, response mask, config,
    ``uid`` index and ``reward_baselines`` when present; but the old log-probs, Σπ² and rollout weights only to
    the estimators named ``optimal_token_baseline``/``tir_optimal_token_baseline``, and GDPO's reward columns
    only to ``gdpo``. ``register_adv_est`` refuses to replace a name, so to run those three through verl's
    trainer set ``core_algos.ADV_ESTIMATOR_REGISTRY[name] = advantage_fn(name)``. (verl's own ``grpo`` runs in
    a branch of the trainer, not through the registry; ``fastgrpo_grpo`` goes through it.)"""
    from verl.trainer.ppo.core_algos import register_adv_est

    names = []
    for name in ADV_ESTIMATORS:
        register_adv_est(prefix + name)(advantage_fn(name))
        names.append(prefix + name)
    return names
