"""``fastgrpo::grpo_loss_fused``: the one-launch loss + logit gradient for token-local configs.

The forward computes the scalar loss *and* ∂loss/∂logits (the loss is a scalar, so its gradient is known
in the forward): logits are read once and the gradient written once. The backward only scales that
gradient by the incoming one, in place, and the scale kernel exits on the device when it is 1 (no host
sync). ``retain_graph`` double backward therefore sees the scaled buffer: call the loss again instead.
Under torch.compile the scaling is an out-of-place multiply (a saved output cannot be mutated there).

What is not token-local (sequence ratios, entropy quantile and off-policy masks, rollout weights that need
the on-policy ℓ) is routed by ``triton_backend`` to the two-phase path.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from . import reference, triton_advantages
from .config import LossConfig, LossOutput, Rewards
from .kernels import grpo_loss as K
from .triton_token_logprobs import _as_row_mask, _row_addressing, _rows

_register = custom_op if os.environ.get("TRITON_INTERPRET") == "1" else triton_op  # see triton_token_logprobs
_POLICY = {"ppo": K.PPO, "cispo": K.CISPO, "sapo": K.SAPO, "reinforce": K.REINFORCE}
_KL = {"k1": K.KL_K1, "abs": K.KL_ABS, "k2": K.KL_K2, "k3": K.KL_K3}
_INF = math.inf


def is_token_local(config: LossConfig, has_old: bool, has_is_weights: bool) -> bool:
    """Whether every per-token quantity of the config depends on that token alone."""
    return (config.ratio_level == "token" and config.policy_loss in _POLICY
            and config.top_entropy_quantile == 1.0 and config.off_policy_mask_threshold is None
            and (config.rollout_correction is None or has_old or has_is_weights))


def _scalars(cfg: LossConfig) -> list[float]:
    """The kernel's runtime floats, unused bounds as ±inf (a clamp to ±inf is the identity)."""
    opt = lambda v, default: default if v is None else float(v)  # noqa: E731
    return [cfg.epsilon_low, cfg.epsilon_high, opt(cfg.ratio_cap, _INF), opt(cfg.dual_clip, _INF),
            opt(cfg.log_ratio_clamp, _INF), opt(cfg.cispo_low, -_INF), opt(cfg.cispo_high, _INF),
            cfg.sapo_tau_pos, cfg.sapo_tau_neg, opt(cfg.kl_input_clamp, _INF), opt(cfg.kl_output_clamp, _INF),
            cfg.advantage.eps]


def _codes(cfg: LossConfig, has_old: bool, group_size: Optional[int] = None, batch: bool = False) -> list[int]:
    """The kernel's runtime integers; ``group_size`` set means advantages come from rewards in the kernel."""
    kl = K.KL_NONE if cfg.beta == 0.0 else _KL[cfg.kl_estimator.rstrip("+")]
    estimator, divide, singleton_raw, _ = triton_advantages.kernel_args(cfg.advantage)
    return [_POLICY[cfg.policy_loss], kl, int(cfg.kl_estimator.endswith("+")), int(cfg.kl_ratio_weighted),
            int(has_old), int(group_size is not None), group_size or 1, estimator, int(divide), int(batch),
            int(singleton_raw)]


def _launch(logits, targets, mask, advantages, old_logprobs, ref_logprobs, w_policy, w_kl, w_entropy, rewards,
            batch_std, seq, inv_temperature, scalars, codes, with_entropy, grad):
    """Runs the kernel; ``grad`` is None (no gradient), a new buffer, or ``logits`` itself (in place).
    ``rewards`` (with ``batch_std`` and the token → sequence map ``seq``) replace ``advantages`` when given."""
    rows, vocab = targets.numel(), logits.shape[-1]
    per_row = lambda: torch.empty(rows, device=logits.device, dtype=torch.float32)  # noqa: E731
    logprobs, entropy, loss_terms, ratio, dlogp, adv_used = (per_row() for _ in range(6))
    if rows > 0:
        t, stride_b, stride_t = _row_addressing(logits)
        _, grad_stride_b, grad_stride_t = _row_addressing(logits if grad is None else grad)
        block = K.block_v(vocab)
        wrap_triton(K.grpo_loss_fwd_kernel)[(rows,)](
            logits, _rows(targets), mask, advantages, advantages if old_logprobs is None else old_logprobs,
            advantages if ref_logprobs is None else ref_logprobs, w_policy, w_kl, w_entropy,
            advantages if rewards is None else rewards, advantages if batch_std is None else batch_std,
            _rows(targets) if seq is None else seq,
            logprobs, entropy, loss_terms, ratio, dlogp, adv_used, logprobs if grad is None else grad,
            t, vocab, stride_b, stride_t, grad_stride_b, grad_stride_t, float(inv_temperature), *codes, *scalars,
            HAS_ENTROPY=with_entropy, WRITE_GRAD=grad is not None, BLOCK_V=block, num_warps=K.num_warps(block))
    return loss_terms.sum(), logprobs, entropy, ratio, dlogp, adv_used


@_register("fastgrpo::grpo_loss_fused", mutates_args=())
def grpo_loss_fused_op(
    logits: Tensor, targets: Tensor, mask: Tensor, advantages: Tensor, old_logprobs: Optional[Tensor],
    ref_logprobs: Optional[Tensor], w_policy: Tensor, w_kl: Tensor, w_entropy: Tensor, rewards: Optional[Tensor],
    batch_std: Optional[Tensor], seq: Optional[Tensor], inv_temperature: float, scalars: list[float],
    codes: list[int], with_entropy: bool, write_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, ℓ, H, ρ, ∂loss/∂ℓ, A, ∂loss/∂logits): per-token fp32 [N] values (A: the advantage used), the
    gradient shaped like ``logits`` in its dtype ([0] without ``write_grad``). Per-token inputs are fp32 [N];
    ``rewards`` [B] fp32 with ``seq`` (int64 [N]) replace ``advantages`` when given (see ``_codes``)."""
    grad = torch.empty(logits.shape if write_grad else (0,), device=logits.device, dtype=logits.dtype)
    outs = _launch(logits, targets, mask, advantages, old_logprobs, ref_logprobs, w_policy, w_kl, w_entropy,
                   rewards, batch_std, seq, inv_temperature, scalars, codes, with_entropy,
                   grad if write_grad else None)
    return (*outs, grad)


@_register("fastgrpo::grpo_loss_fused_inplace_", mutates_args=("logits",))
def grpo_loss_fused_inplace_op(
    logits: Tensor, targets: Tensor, mask: Tensor, advantages: Tensor, old_logprobs: Optional[Tensor],
    ref_logprobs: Optional[Tensor], w_policy: Tensor, w_kl: Tensor, w_entropy: Tensor, rewards: Optional[Tensor],
    batch_std: Optional[Tensor], seq: Optional[Tensor], inv_temperature: float, scalars: list[float],
    codes: list[int], with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As ``grpo_loss_fused`` with the gradient written over ``logits`` (no second [N, V] buffer)."""
    return _launch(logits, targets, mask, advantages, old_logprobs, ref_logprobs, w_policy, w_kl, w_entropy,
                   rewards, batch_std, seq, inv_temperature, scalars, codes, with_entropy, logits)


@grpo_loss_fused_inplace_op.register_fake
def _(logits, targets, mask, advantages, old_logprobs, ref_logprobs, w_policy, w_kl, w_entropy, rewards, batch_std,
      seq, inv_temperature, scalars, codes, with_entropy):
    rows = targets.numel()
    f32 = dict(device=logits.device, dtype=torch.float32)
    return (logits.new_empty((), **f32), *(logits.new_empty(rows, **f32) for _ in range(5)))


class _InplaceGrad(torch.autograd.Function):
    """Autograd for ``inplace_grad``: the logits buffer *is* the gradient after the forward. Held on ctx
    (not saved for backward) because its version changed by design; eager only."""

    @staticmethod
    def forward(ctx, logits, *args):
        outs = grpo_loss_fused_inplace_op(logits, *args)
        ctx.grad = logits
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, grad_loss, *_):
        scale_grad_op(ctx.grad, grad_loss)
        return (ctx.grad,) + (None,) * 15


@grpo_loss_fused_op.register_fake
def _(logits, targets, mask, advantages, old_logprobs, ref_logprobs, w_policy, w_kl, w_entropy, rewards, batch_std,
      seq, inv_temperature, scalars, codes, with_entropy, write_grad):
    rows = targets.numel()
    f32 = dict(device=logits.device, dtype=torch.float32)
    return (logits.new_empty((), **f32), *(logits.new_empty(rows, **f32) for _ in range(5)),
            logits.new_empty(logits.shape if write_grad else (0,)))


@_register("fastgrpo::scale_grad_", mutates_args=("grad",))
def scale_grad_op(grad: Tensor, scale: Tensor) -> None:
    """grad *= scale in place; the kernel reads ``scale`` on the device and does nothing when it is 1."""
    if grad.numel() > 0:
        wrap_triton(K.scale_grad_kernel)[(triton_cdiv(grad.numel(), K.SCALE_BLOCK),)](
            grad, scale.reshape(1).float(), grad.numel(), BLOCK=K.SCALE_BLOCK)


@scale_grad_op.register_fake
def _(grad, scale):
    return None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _setup_context(ctx, inputs, output) -> None:
    grad = output[-1]
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(*output[1:])


def _traced(x: Tensor) -> bool:
    """Under torch.compile / AOT tracing the gradient is a functional or fake tensor: mutating a saved
    forward output is not expressible there, so the backward scales out of place instead."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(x, (FakeTensor, FunctionalTensor))


def _backward(ctx, grad_loss, *_):
    (grad,) = ctx.saved_tensors
    if _traced(grad):
        grad = grad * grad_loss.to(grad.dtype)
    else:  # eager: in place, and the kernel skips the pass on the device when grad_loss == 1
        scale_grad_op(grad, grad_loss)
    return (grad,) + (None,) * 16


torch.library.register_autograd("fastgrpo::grpo_loss_fused", _backward, setup_context=_setup_context)


def _rewards_in_kernel(advantages, cfg: LossConfig) -> bool:
    """Contiguous groups with a per-group estimator: the kernel normalizes each token's reward itself.
    Arbitrary group ids and REINFORCE++'s batch whitening take one small launch before."""
    return (isinstance(advantages, Rewards) and advantages.group_ids is None
            and cfg.advantage.estimator in ("grpo", "rloo")
            and not (cfg.advantage.scale == "batch" and advantages.rewards.shape[0] <= 1))


def grpo_loss(
    logits: Tensor, targets: Tensor, advantages: Union[Tensor, Rewards], mask: Tensor, *,
    return_entropy: bool = False,
    config: LossConfig = LossConfig(), old_logprobs: Optional[Tensor] = None, ref_logprobs: Optional[Tensor] = None,
    sampling_logprobs: Optional[Tensor] = None, is_weights: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None, normalizer=None, inplace_grad: bool = False,
) -> LossOutput:
    """The fused path of ``backend="triton"`` (token-local configs only, see :func:`is_token_local`).
    ``inplace_grad`` overwrites ``logits`` with the gradient (they are unusable afterwards)."""
    cfg = config
    shape = targets.shape
    lay = reference.TokenLayout(shape, cu_seqlens, cfg.max_length, logits.device)
    m = mask.reshape(-1).float()
    flat = lambda x: None if x is None else torch.where(m > 0, x.detach().reshape(-1).float(), 0.0)  # noqa: E731
    rewards = batch_std = seq = group_size = None
    batch = False
    if _rewards_in_kernel(advantages, cfg):
        rewards = reference.combine_rewards(advantages.rewards, advantages.weights).float().contiguous()
        batch, batch_std = triton_advantages.batch_std(rewards, cfg.advantage)
        seq, group_size = lay.seq.contiguous(), advantages.group_size
        adv = torch.zeros_like(m)  # unused: the kernel writes the advantages it computed
    else:
        if isinstance(advantages, Rewards):
            r = advantages
            advantages, _ = triton_advantages.advantages(r.rewards, r.group_size, r.group_ids, cfg.advantage,
                                                         r.weights)
        adv = lay.per_token(advantages.detach(), shape)
    old, ref, samp = flat(old_logprobs), flat(ref_logprobs), flat(sampling_logprobs)

    weight = torch.ones_like(m)  # §2.4 rollout weights: functions of the inputs alone here
    if is_weights is not None:
        weight = lay.per_token(is_weights.detach(), shape)
    elif cfg.rollout_correction is not None:
        weight = reference._rollout_weights(old, samp, m, lay, cfg)
    agg = lambda mode: reference.aggregation_weights(m, mode, lay, cfg, normalizer) * cfg.loss_scale  # noqa: E731
    w_policy = agg(cfg.aggregation) * weight
    w_kl = agg(cfg.kl_aggregation or cfg.aggregation) * cfg.beta
    w_entropy = agg(cfg.entropy_aggregation or cfg.aggregation) * cfg.entropy_coef
    with_entropy = return_entropy or cfg.entropy_coef != 0.0

    args = (targets, m, adv.float().contiguous(), old, ref, w_policy.float().contiguous(), w_kl.float().contiguous(),
            w_entropy.float().contiguous(), rewards, batch_std, seq, 1.0 / cfg.temperature, _scalars(cfg),
            _codes(cfg, old is not None, group_size, batch), with_entropy)
    write_grad = logits.requires_grad and torch.is_grad_enabled()
    if inplace_grad and write_grad:
        loss, lp, ent, rho, dlogp, adv = _InplaceGrad.apply(logits, *args)
    else:
        loss, lp, ent, rho, dlogp, adv, _ = grpo_loss_fused_op(logits, *args, write_grad)

    lo, hi = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
    values = {"rho": rho, "is_weight": weight, "low": (rho < lo) & (adv < 0), "high": (rho > hi) & (adv > 0),
              "ppo_kl": (lp if old is None else old) - lp}
    if ref is not None:
        values["kl"] = reference._kl(lp, ref, cfg)
    used_weights = is_weights is not None or cfg.rollout_correction is not None
    metrics = reference._metrics(values, dlogp, adv, m, ent if with_entropy else None, cfg, used_weights)
    return LossOutput(loss=loss, logprobs=lp.reshape(shape),
                      entropy=ent.reshape(shape) if with_entropy else None, metrics=metrics)
