"""OpenRLHF drop-ins: a ``PolicyLoss`` module with OpenRLHF's constructor, forward signature and return tuple,
and ``log_probs_from_logits`` (OpenRLHF ≥ 0.9, read at 0.11.0: openrlhf/models/loss.py).

    from fastgrpo.integrations.openrlhf import PolicyLoss     # instead of openrlhf.models.loss.PolicyLoss
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import presets
from ..logprobs import token_logprobs
from ..loss import policy_loss


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum()


class PolicyLoss(nn.Module):
    """OpenRLHF's ``PolicyLoss`` computed by fastgrpo: forward returns (loss, clip_ratio, ppo_kl, vllm_kl)."""

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: Optional[float] = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", enable_vllm_is_correction: bool = False,
                 vllm_is_truncated_threshold: Optional[list] = None, vllm_is_correction_type: str = "tis") -> None:
        super().__init__()
        self.clip_eps_low, self.clip_eps_high = clip_eps_low, clip_eps_high
        self.policy_loss_type = policy_loss_type
        self.enable_vllm_is_correction = enable_vllm_is_correction
        self.config = presets.openrlhf(
            policy_loss_type=policy_loss_type, eps_clip_low_high=(clip_eps_low, clip_eps_high), dual_clip=dual_clip,
            token_level_loss=token_level_loss, enable_vllm_is_correction=enable_vllm_is_correction,
            vllm_is_truncated_threshold=tuple(vllm_is_truncated_threshold or (0.5, 5.0)),
            vllm_is_correction_type=vllm_is_correction_type)

    def forward(self, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor,
                action_mask: Optional[Tensor] = None, rollout_log_probs: Optional[Tensor] = None, dp_size: int = 1,
                batch_num_tokens: Optional[float] = None, global_batch_size: Optional[float] = None):
        mask = torch.ones_like(log_probs) if action_mask is None else action_mask.float()
        gspo = self.policy_loss_type == "gspo"
        correction = self.enable_vllm_is_correction
        # OpenRLHF's GSPO with the correction measures the ratio against the rollout log-probs
        old = rollout_log_probs if gspo and correction else old_log_probs
        count = batch_num_tokens if self.config.aggregation == "token_mean" else global_batch_size
        out = policy_loss(log_probs, advantages, mask, old_logprobs=old,
                          sampling_logprobs=rollout_log_probs if correction and not gspo else None,
                          normalizer=None if count is None else count / dp_size, config=self.config)
        # OpenRLHF's clip_ratio: tokens where the clipped surrogate is the smaller one
        log_ratio = (log_probs - old).detach()
        if gspo:
            ratio = torch.exp((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)) * mask
        else:
            ratio = log_ratio.clamp(-20.0, 20.0).exp()
        surr1 = ratio * advantages
        surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
        clip_ratio = _masked_mean((surr2 < surr1).float(), mask)
        ppo_kl = _masked_mean(-(log_probs - old_log_probs).detach(), mask)
        vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, mask) if correction and not gspo else None
        return out.loss, clip_ratio, ppo_kl, vllm_kl


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """OpenRLHF's ``log_probs_from_logits``: fp32 log-probs of ``labels`` under ``logits / temperature``."""
    return token_logprobs(logits, labels, temperature=temperature)
