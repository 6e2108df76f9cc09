"""A compiled backend (Triton, C++ CPU, CUDA) behind the interface every backend offers: kernels for every pass
over the vocabulary, PyTorch for the O(N) rest.

Token-local configs (every token-level variant, KL, entropy bonus, rollout weights from given log-probs) take
the fused path: one op computes the loss and writes ∂loss/∂logits in the forward, logits read once, and
normalizes raw rewards of contiguous groups (grpo, rloo) in the same launch. The rest (GSPO/GMPO sequence
ratios, the entropy quantile and off-policy masks) needs a statistic over other tokens first and runs in two
phases: the ``token_logprobs`` op (ℓ, H: one read, masked rows skipped), the per-token objective on those [N]
vectors with the reference's own code, and its gradient w.r.t. ℓ and H through the op's backward (one more
read, one write). No [N, V] intermediate exists besides the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from . import linear_loss
from .reward import torch_advantages
from .trajectory import objective
from .config import AdvantageConfig, LossConfig, LossOutput, Rewards
from .kernel_ops import Ops, advantage_args, inplace_grad_function, is_token_local, loss_params, params_tensor


class KernelBackend:
    SUPPORTS_INPLACE_GRAD = True
    policy_loss = staticmethod(objective.policy_loss)  # O(N) on given log-probs: no vocabulary pass to fuse

    def __init__(self, name: str, ops: Ops) -> None:
        self.__name__ = name
        self.ops = ops
        self._inplace = inplace_grad_function(ops)

    def __repr__(self) -> str:
        return f"KernelBackend({self.__name__!r})"

    # ------------------------------------------------------------------------------------------ log-probs
    def token_logprobs(self, logits: Tensor, targets: Tensor, temperature: float = 1.0, entropy: bool = False,
                       mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        inv_temperature = params_tensor([1.0 / temperature], logits.device)
        logprobs, _, ent = self.ops.token_logprobs(logits, targets, mask, inv_temperature, entropy)
        return logprobs, ent if entropy else None

    def linear_token_logprobs(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                              temperature: float = 1.0, entropy: bool = False, logit_scale: float = 1.0,
                              logit_softcap: Optional[float] = None) -> tuple[Tensor, Optional[Tensor]]:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias))
        if not needs_grad:  # old/ref policy log-probs: one chunk of logits at a time
            return linear_loss.linear_token_logprobs(self, hidden, weight, targets, bias, temperature, entropy,
                                                     logit_scale, logit_softcap)
        # differentiable log-probs still materialize the fp32 logits (the loss itself never does)
        z = linear_loss.hidden_to_logits(hidden, weight, bias, logit_scale, logit_softcap)
        return self.token_logprobs(z, targets, temperature, entropy)

    # ------------------------------------------------------------------------------------------ advantages
    @staticmethod
    def _batch_std(r: Tensor, config: AdvantageConfig) -> tuple[bool, Tensor]:
        """(whether TRL's batch scale applies, the batch std as a 1-element tensor; 1 where unused)."""
        batch = config.estimator == "grpo" and config.scale == "batch"
        return batch, (r.std().reshape(1) if batch and r.numel() > 1 else r.new_ones(1))

    def advantages(self, rewards: Tensor, group_size: Optional[int] = None, group_ids: Optional[Tensor] = None,
                   config: AdvantageConfig = AdvantageConfig(),
                   reward_weights: Optional[Tensor] = None, metrics: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """Contiguous groups in the kernel; arbitrary ``group_ids`` need a relabelling (``torch.unique``) and
        use the reference. Batch-wide steps (TRL's batch std, REINFORCE++ whitening) are O(B) torch ops."""
        if group_ids is not None:
            return torch_advantages.advantages(rewards, None, group_ids, config, reward_weights, metrics)
        r = torch_advantages.combine_rewards(rewards, reward_weights).float().contiguous()
        batch, std_b = self._batch_std(r, config)
        estimator, divide, singleton_raw, eps = advantage_args(config)
        adv, mean, std = self.ops.advantages(r, std_b, group_size, estimator, divide, batch, singleton_raw,
                                             params_tensor([eps], r.device))
        if batch and r.numel() <= 1:
            adv = torch.zeros_like(r)
        if config.estimator == "reinforce_baseline":  # whiten the centered rewards over the batch
            std_w = adv.std() if adv.numel() > 1 else adv.new_ones(())
            adv = (adv - adv.mean()) / (std_w + config.eps)
        if not metrics:
            return adv, {}
        g = torch.arange(r.numel(), device=r.device) // group_size
        return adv, torch_advantages.advantage_metrics(r, adv, g, mean, std)

    # ---------------------------------------------------------------------------------------------- losses
    def grpo_loss(self, logits: Tensor, targets: Tensor, advantages: Union[Tensor, Rewards], mask: Tensor, *,
                  return_entropy: bool = False, config: LossConfig = LossConfig(), inplace_grad: bool = False,
                  **kwargs) -> LossOutput:
        has_old, has_is = kwargs.get("old_logprobs") is not None, kwargs.get("is_weights") is not None
        if is_token_local(config, has_old, has_is):
            return self._fused(logits, targets, advantages, mask, return_entropy=return_entropy, config=config,
                               inplace_grad=inplace_grad, **kwargs)
        if inplace_grad:
            raise ValueError("inplace_grad=True needs a token-local config (token-level ratio, no entropy quantile "
                             "or off-policy mask, rollout weights from given old_logprobs): this one runs in two "
                             "phases")
        lp, ent = self.token_logprobs(logits, targets, config.temperature,
                                      entropy=return_entropy or config.needs_entropy, mask=mask)
        return objective.policy_loss(lp, advantages, mask, entropy=ent, config=config, **kwargs)

    def linear_grpo_loss(self, hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Union[Tensor, Rewards],
                         mask: Tensor, **kwargs) -> LossOutput:
        """Chunked over tokens: the logits never exist beyond one chunk (see ``linear_loss``)."""
        return linear_loss.linear_grpo_loss(self, hidden, weight, targets, advantages, mask, **kwargs)

    def _prepare(self, targets: Tensor, advantages: Union[Tensor, Rewards], mask: Tensor, *, return_entropy: bool,
                 config: LossConfig, device: torch.device, old_logprobs: Optional[Tensor] = None,
                 ref_logprobs: Optional[Tensor] = None, sampling_logprobs: Optional[Tensor] = None,
                 is_weights: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                 normalizer=None) -> "FusedInputs":
        """Everything the fused op takes besides the logits, as per-token fp32 [N] tensors (O(N) work)."""
        cfg = config
        shape = targets.shape
        lay = objective.TokenLayout(shape, cu_seqlens, cfg.max_length, device)
        m = mask.reshape(-1).float()
        flat = lambda x: None if x is None else torch.where(m > 0, x.detach().reshape(-1).float(), 0.0)  # noqa: E731
        old, ref, samp = flat(old_logprobs), flat(ref_logprobs), flat(sampling_logprobs)

        rewards = batch_std = group_size = None
        batch = False
        if (isinstance(advantages, Rewards) and advantages.group_ids is None
                and cfg.advantage.estimator in ("grpo", "rloo")
                and not (cfg.advantage.scale == "batch" and advantages.rewards.shape[0] <= 1)):
            # contiguous groups: the kernel normalizes each token's reward itself, in the same launch
            rewards = torch_advantages.combine_rewards(advantages.rewards, advantages.weights).float().contiguous()
            batch, batch_std = self._batch_std(rewards, cfg.advantage)
            group_size = advantages.group_size
            adv = torch.zeros_like(m)  # unused: the kernel reports the advantages it computed
        else:
            if isinstance(advantages, Rewards):
                r = advantages
                advantages, _ = self.advantages(r.rewards, r.group_size, r.group_ids, cfg.advantage, r.weights,
                                                metrics=False)
            adv = lay.per_token(advantages.detach(), shape)

        weight = torch.ones_like(m)  # §2.4 rollout weights: functions of the inputs alone here
        if is_weights is not None:
            weight = lay.per_token(is_weights.detach(), shape)
        elif cfg.rollout_correction is not None:
            weight = objective.rollout_weights(old, samp, m, lay, cfg)
        agg = lambda mode: objective.aggregation_weights(m, mode, lay, cfg, normalizer) * cfg.loss_scale  # noqa: E731
        params, codes = loss_params(cfg, old is not None, device, group_size, batch)
        return FusedInputs(
            shape=shape, mask=m, advantages=adv.float().contiguous(), old=old, ref=ref,
            w_policy=(agg(cfg.aggregation) * weight).float().contiguous(),
            w_kl=(agg(cfg.kl_aggregation or cfg.aggregation) * cfg.beta).float().contiguous(),
            w_entropy=(agg(cfg.entropy_aggregation or cfg.aggregation) * cfg.entropy_coef).float().contiguous(),
            rewards=rewards, batch_std=batch_std, seq=lay.seq.contiguous(), params=params, codes=codes,
            with_entropy=return_entropy or cfg.entropy_coef != 0.0,
            is_weight=weight, used_weights=is_weights is not None or cfg.rollout_correction is not None)

    @staticmethod
    def _finish(f: "FusedInputs", cfg: LossConfig, loss: Tensor, lp: Tensor, ent: Tensor, rho: Tensor, dlogp: Tensor,
                adv: Tensor) -> LossOutput:
        """The LossOutput from the fused op's per-token outputs: metrics are O(N) reductions, no host sync."""
        lo, hi = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
        values = {"rho": rho, "is_weight": f.is_weight, "low": (rho < lo) & (adv < 0), "high": (rho > hi) & (adv > 0),
                  "ppo_kl": (lp if f.old is None else f.old) - lp}
        if f.ref is not None:
            values["kl"] = objective.kl_estimate(lp, f.ref, cfg)
        metrics = objective.loss_metrics(values, dlogp, adv, f.mask, ent if f.with_entropy else None, cfg, f.used_weights)
        return LossOutput(loss=loss, logprobs=lp.reshape(f.shape),
                          entropy=ent.reshape(f.shape) if f.with_entropy else None, metrics=metrics)

    def _fused(self, logits: Tensor, targets: Tensor, advantages: Union[Tensor, Rewards], mask: Tensor, *,
               return_entropy: bool, config: LossConfig, inplace_grad: bool = False, **kwargs) -> LossOutput:
        """One launch: loss, metrics' per-token values and (when logits need it) ∂loss/∂logits."""
        f = self._prepare(targets, advantages, mask, return_entropy=return_entropy, config=config,
                          device=logits.device, **kwargs)
        args = (targets, *f.op_args())
        write_grad = logits.requires_grad and torch.is_grad_enabled()
        if inplace_grad and write_grad:
            loss, lp, ent, rho, dlogp, adv = self._inplace.apply(logits, *args)
        else:
            loss, lp, ent, rho, dlogp, adv, _ = self.ops.grpo_loss_fused(logits, *args, write_grad)
        return self._finish(f, config, loss, lp, ent, rho, dlogp, adv)


@dataclass
class FusedInputs:
    """Per-token inputs of the fused op ([N] fp32 unless noted) and what the metrics need besides."""

    shape: torch.Size
    mask: Tensor
    advantages: Tensor
    old: Optional[Tensor]
    ref: Optional[Tensor]
    w_policy: Tensor
    w_kl: Tensor
    w_entropy: Tensor
    rewards: Optional[Tensor]  # [B]: normalized in the kernel (then `seq`, int64 [N], maps tokens to rewards)
    batch_std: Optional[Tensor]
    seq: Tensor
    params: Tensor  # [1/τ, the objective's float scalars] on the logits' device (see kernel_ops.loss_params)
    codes: list
    with_entropy: bool
    is_weight: Tensor
    used_weights: bool

    def op_args(self, rows: Optional[Tensor] = None) -> tuple:
        """The op's arguments after (logits, targets), for all tokens or the token indices ``rows``."""
        pick = (lambda x: x) if rows is None else (lambda x: None if x is None else x[rows].contiguous())  # noqa: E731
        mask = self.mask if rows is None else torch.ones(len(rows), device=self.mask.device)
        seq = self.seq if self.rewards is not None else None
        return (mask, pick(self.advantages), pick(self.old), pick(self.ref), pick(self.w_policy), pick(self.w_kl),
                pick(self.w_entropy), self.rewards, self.batch_std, pick(seq), self.params, self.codes,
                self.with_entropy)
