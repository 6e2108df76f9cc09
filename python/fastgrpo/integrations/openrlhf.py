"""OpenRLHF drop-ins: a ``PolicyLoss`` module with OpenRLHF's constructor, forward signature and return tuple,
``compute_approx_kl`` and ``log_probs_from_logits`` (read at OpenRLHF 0.11.2: openrlhf/models/loss.py,
models/utils.py; tested against it).

    from fastgrpo.integrations.openrlhf import PolicyLoss     # instead of openrlhf.models.loss.PolicyLoss
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import presets
from ..trajectory.grpo_loss import policy_loss
from ..trajectory.objective import kl_estimate
from ._rows import logprobs_per_row


def _masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """OpenRLHF's masked_mean (no clamp of the count)."""
    return (x * mask).sum() / mask.sum() if dim is None else (x * mask).sum(dim) / mask.sum(dim)


class PolicyLoss(nn.Module):
    """OpenRLHF's ``PolicyLoss`` computed by fastgrpo: forward returns (loss, clip_ratio, ppo_kl, vllm_kl,
    is_filter_ratio), the last two None without an IS correction."""

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: Optional[float] = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: Sequence[float] = (0.5, 5.0),
    ) -> None:
        super().__init__()
        self.clip_eps_low, self.clip_eps_high = clip_eps_low, clip_eps_high
        self.policy_loss_type = policy_loss_type
        self.level, self.mode, self.gating = is_correction_level, is_correction_mode, is_correction_gating
        self.threshold = tuple(is_correction_threshold)
        if is_correction_gating not in ("ratio", "binary_kl", "tv"):
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating!r}")
        if is_correction_gating != "ratio" and is_correction_level != "off" and self.threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound only (low = 0)")
        # a divergence gate is not a LossConfig option: forward passes its weights as is_weights
        self.config = presets.openrlhf(
            policy_loss_type=policy_loss_type,
            eps_clip_low_high=(clip_eps_low, clip_eps_high),
            dual_clip=dual_clip,
            token_level_loss=token_level_loss,
            is_correction_level=is_correction_level if is_correction_gating == "ratio" else "off",
            is_correction_mode=is_correction_mode,
            is_correction_threshold=self.threshold,
        )

    def _divergence_gate(self, old: Tensor, rollout: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(token IS weights, dropped units) for the binary_kl / tv gates: OpenRLHF drops tokens (or whole
        sequences, by the mean) whose divergence between rollout and train probability exceeds the bound."""
        p, q = rollout.exp().clamp(1e-6, 1 - 1e-6), old.exp().clamp(1e-6, 1 - 1e-6)
        if self.gating == "binary_kl":
            stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
        else:
            stat = (p - q).abs()
        if self.level == "seq":
            stat = ((stat * mask).sum(-1) / mask.sum(-1)).unsqueeze(-1)
        keep = (stat >= self.threshold[0]) & (stat <= self.threshold[1])
        return torch.where(keep, (old - rollout).exp(), 0.0), ~keep

    def forward(
        self,
        log_probs: Tensor,
        old_log_probs: Tensor,
        advantages: Tensor,
        action_mask: Optional[Tensor] = None,
        rollout_log_probs: Optional[Tensor] = None,
        dp_size: int = 1,
        batch_num_tokens: Optional[float] = None,
        global_batch_size: Optional[float] = None,
    ):
        mask = torch.ones_like(log_probs) if action_mask is None else action_mask.to(log_probs.dtype)
        gspo = self.policy_loss_type == "gspo"
        correction = self.level != "off"
        # OpenRLHF's GSPO with a correction level measures the ratio against the rollout log-probs
        old = old_log_probs
        if gspo and correction:
            assert rollout_log_probs is not None, "is_correction_level needs rollout_log_probs (as in OpenRLHF)"
            old = rollout_log_probs
        is_weights = vllm_kl = is_filter_ratio = None
        if correction and not gspo:
            assert rollout_log_probs is not None, "is_correction_level needs rollout_log_probs (as in OpenRLHF)"
            old_d, rollout_d = old_log_probs.detach(), rollout_log_probs.detach()
            if self.gating != "ratio":
                is_weights, dropped = self._divergence_gate(old_d, rollout_d, mask)
            else:
                log_is = old_d - rollout_d
                stat = log_is if self.level == "token" else _masked_mean(log_is, mask, dim=-1).unsqueeze(-1)
                dropped = (stat.exp() < self.threshold[0]) | (stat.exp() > self.threshold[1])
            vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, mask)
            is_filter_ratio = (
                dropped.to(mask.dtype).mean() if self.level == "seq" else _masked_mean(dropped.to(mask.dtype), mask)
            )
        count = batch_num_tokens if self.config.aggregation == "token_mean" else global_batch_size
        out = policy_loss(
            log_probs,
            advantages,
            mask,
            old_logprobs=old,
            is_weights=is_weights,
            sampling_logprobs=rollout_log_probs if correction and not gspo else None,
            normalizer=None if count is None else count / dp_size,
            config=self.config,
        )
        # OpenRLHF's clip_ratio: tokens where the clipped surrogate is the smaller one
        log_ratio = (log_probs - old).detach()
        if gspo:
            ratio = torch.exp(_masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1)) * mask
        else:
            ratio = log_ratio.clamp(-20.0, 20.0).exp()
        surr1 = ratio * advantages
        surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
        clip_ratio = _masked_mean((surr2 < surr1).to(mask.dtype), mask)
        ppo_kl = _masked_mean(-(log_probs - old_log_probs).detach(), mask)
        return out.loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio


def compute_approx_kl(
    log_probs: Tensor,
    log_probs_base: Tensor,
    log_probs_old: Optional[Tensor] = None,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
) -> Tensor:
    """OpenRLHF's ``compute_approx_kl``: the per-token estimate (fp32, clamped to ±10) of KL(π‖π_base) by
    ``kl_estimator`` (k1, k2, k3), the one :func:`fastgrpo.presets.openrlhf` puts in the loss. ``log_probs_old``
    is read only by ``unbiased_gradient``, which is not supported."""
    if unbiased_gradient:
        raise NotImplementedError(
            "unbiased_gradient=True (OpenRLHF's --algo.kl.unbiased_gradient) is not supported "
            "by fastgrpo's OpenRLHF integration"
        )
    config = presets.openrlhf(use_kl_loss=True, kl_estimator=kl_estimator)
    return kl_estimate(log_probs.float(), log_probs_base.float(), config)


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """OpenRLHF's ``log_probs_from_logits``: fp32 log-probs [...] of ``labels`` under ``logits`` [..., V] /
    ``temperature``. As OpenRLHF's flash-attn path, ``labels`` may have any shape with one id per row of
    ``logits``. Unlike OpenRLHF, ``logits`` is not divided by the temperature in place."""
    return logprobs_per_row(logits, labels, temperature)
