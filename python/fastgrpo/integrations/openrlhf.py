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
from ..trajectory import rollout_correction
from ..trajectory.grpo_loss import policy_loss
from ..trajectory.objective import kl_estimate
from ._rows import logprobs_per_row


def _masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """OpenRLHF's masked_mean (no clamp of the count)."""
    return (x * mask).sum() / mask.sum() if dim is None else (x * mask).sum(dim) / mask.sum(dim)


class PolicyLoss(nn.Module):
    """OpenRLHF's ``PolicyLoss`` computed by fastgrpo: forward returns (loss, clip_ratio, ppo_kl, vllm_kl,
    is_filter_ratio), the last two None without an IS correction. The train/rollout IS correction, every
    ``is_correction_gating`` included, is the loss's own (``presets.openrlhf``): forward passes the rollout
    log-probs as ``sampling_logprobs``."""

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
        # the preset checks the options as OpenRLHF's constructor does (errors name the option)
        self.config = presets.openrlhf(
            policy_loss_type=policy_loss_type,
            eps_clip_low_high=(clip_eps_low, clip_eps_high),
            dual_clip=dual_clip,
            token_level_loss=token_level_loss,
            is_correction_level=is_correction_level,
            is_correction_mode=is_correction_mode,
            is_correction_gating=is_correction_gating,
            is_correction_threshold=self.threshold,
        )

    def _filter_ratio(self, old: Tensor, rollout: Tensor, mask: Tensor) -> Tensor:
        """OpenRLHF's is_filter_ratio: the fraction of the units its gate filters, unmasked tokens or sequences
        (all of them: an all-masked sequence's mean is NaN, outside a mask band, inside a clip one)."""
        rows = mask.reshape(-1, mask.shape[-1])  # a sequence per row, as OpenRLHF's dim=-1 means
        seg = rollout_correction.Segments.rows(rows.shape[0], rows.shape[1], mask.device)
        level = "sequence" if self.level == "seq" else "token"
        old, rollout, m = (x.detach().reshape(-1) for x in (old, rollout, rows))
        stat = rollout_correction.gate_statistic(old, rollout, m, seg, self.gating, level)
        low, high = self.threshold
        if self.mode == "clip":
            filtered = (stat < low) | (stat > high)
        else:
            filtered = ~rollout_correction.within(stat, low, high)
        if level == "sequence":
            return filtered.float().mean()
        return _masked_mean(filtered.float().reshape(mask.shape), mask)

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
        vllm_kl = is_filter_ratio = None
        if correction and not gspo:
            assert rollout_log_probs is not None, "is_correction_level needs rollout_log_probs (as in OpenRLHF)"
            vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, mask)
            is_filter_ratio = self._filter_ratio(old_log_probs, rollout_log_probs, mask)
        count = batch_num_tokens if self.config.aggregation == "token_mean" else global_batch_size
        out = policy_loss(
            log_probs,
            advantages,
            mask,
            old_logprobs=old,
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
    ``kl_estimator`` (k1, k2, k3), the one :func:`fastgrpo.presets.openrlhf` puts in the loss. With
    ``unbiased_gradient`` the value stays, the gradient is sg[min(π/π_old, 10)]·(ℓ − ℓ_base)·∇ℓ (weight 1 without
    ``log_probs_old``)."""
    config = presets.openrlhf(use_kl_loss=True, kl_estimator=kl_estimator, unbiased_gradient=unbiased_gradient)
    old = None if log_probs_old is None else log_probs_old.float()
    return kl_estimate(log_probs.float(), log_probs_base.float(), config, old)


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """OpenRLHF's ``log_probs_from_logits``: fp32 log-probs [...] of ``labels`` under ``logits`` [..., V] /
    ``temperature``. As OpenRLHF's flash-attn path, ``labels`` may have any shape with one id per row of
    ``logits``. Unlike OpenRLHF, ``logits`` is not divided by the temperature in place."""
    return logprobs_per_row(logits, labels, temperature)
