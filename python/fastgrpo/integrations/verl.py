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
from ..trajectory.grpo_loss import policy_loss
from ..trajectory.objective import kl_estimate
from ..trajectory.token_logprobs import linear_token_logprobs, token_logprobs
from . import megatron
from ._rows import as_rows, labels_per_row, logprobs_per_row

LOSS_MODES = ("vanilla", "gspo", "sapo", "gpg", "geo_mean", "cispo")


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
    loss_mode: str, old: Tensor, lp: Tensor, adv: Tensor, mask: Tensor, low: float, high: float, clip_ratio_c: float
) -> dict[str, float]:
    """verl's three policy metrics, by its per-mode definitions."""
    if loss_mode == "gpg":
        return {}
    m = mask.float()
    nkl = (lp - old).detach()
    if loss_mode in ("vanilla", "sapo", "cispo"):
        nkl = nkl.clamp(-20.0, 20.0)
    zero = torch.zeros((), device=lp.device)
    ppo_kl = _masked_mean(-nkl, m)
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
    """A policy loss with verl's signature for ``loss_mode`` (vanilla, gspo, sapo, gpg, geo_mean, cispo)."""
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {loss_mode!r}")
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
        metrics = _verl_metrics(loss_mode, old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c)
        return out.loss, metrics

    compute_policy_loss.__name__ = f"fastgrpo_{loss_mode}"
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
