"""The contract every compiled backend implements (Triton, C++ CPU, CUDA): six ops with the same schemas, their
fake (meta) implementations and their autograd, registered once per op family here.

    token_logprobs(logits, targets, mask?, inv_temperature, with_entropy) -> (ℓ, stats, H)
    token_logprobs_backward(g_ℓ, g_H?, logits, targets, mask?, stats, H, inv_temperature) -> ∂/∂logits
    grpo_loss_fused(logits, targets, mask, advantages, old?, ref?, w_policy, w_kl, w_entropy, rewards?,
                    batch_std?, seq?, params, codes, with_entropy, write_grad)
        -> (loss, ℓ, H, ρ, ∂loss/∂ℓ, advantage used, ∂loss/∂logits)
    grpo_loss_fused_inplace_(logits!, …same…, with_entropy) -> (loss, ℓ, H, ρ, ∂loss/∂ℓ, advantage used)
    scale_grad_(grad!, scale) -> ()
    advantages(rewards, batch_std, group_size, estimator, divide, use_batch_std, singleton_raw, eps)
        -> (advantages, group mean, group std)

``stats`` holds per row the max M of z/τ and log Σ exp(z/τ − M). The fused loss computes ∂loss/∂logits in the
forward (the loss is a scalar); its backward only scales that gradient by the incoming one (see
``precomputed_gradients``): in place and handed to autograd without a copy when the backward frees the graph
(the usual ``loss.backward()``; the scale op does nothing when the scale is 1, deciding on the device), as a
scaled copy when it keeps the graph (``retain_graph=True``), so that every later backward sees the forward's
gradient again. Under torch.compile the scaling is an out-of-place multiply (a saved output cannot be mutated
there). ``params``/``codes`` carry the config (see ``loss_params``; csrc/token_objective.h).

Float hyper-parameters are fp32 tensors on the inputs' device (``inv_temperature``, ``eps``: 1 value, ``params``:
[1/τ, 12 scalars]), never ``float`` arguments: torch.compile specializes a float argument of an op (a SymFloat
included), so every new clip bound or temperature would recompile. ``params_tensor`` builds them without a host
sync. The int ``codes`` select variants: a recompile for a new variant is expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .config import AdvantageConfig, LossConfig

_POLICY = {"ppo": 0, "cispo": 1, "sapo": 2, "reinforce": 3}
_KL = {"k1": 1, "abs": 2, "k2": 3, "k3": 4}
_ESTIMATOR = {"grpo": 0, "rloo": 1, "reinforce_baseline": 2}
_INF = math.inf


@dataclass(frozen=True)
class Ops:
    """One backend's six ops (callables with the schemas above)."""

    token_logprobs: Callable[..., Any]
    token_logprobs_backward: Callable[..., Any]
    grpo_loss_fused: Callable[..., Any]
    grpo_loss_fused_inplace_: Callable[..., Any]
    scale_grad_: Callable[..., Any]
    advantages: Callable[..., Any]


def is_token_local(config: LossConfig, has_old: bool, has_is_weights: bool) -> bool:
    """Whether every per-token quantity of the config depends on that token alone (the fused path)."""
    return (config.ratio_level == "token" and config.policy_loss in _POLICY
            and config.top_entropy_quantile == 1.0 and config.off_policy_mask_threshold is None
            and (config.rollout_correction is None or has_old or has_is_weights))


def advantage_args(config: AdvantageConfig) -> tuple[int, bool, bool, float]:
    """(estimator code, divide, singleton_raw, eps); the op takes eps as ``params_tensor([eps], device)``."""
    return _ESTIMATOR[config.estimator], config.scale != "none", config.singleton == "raw", config.eps


def params_tensor(values: Sequence[float], device: torch.device) -> Tensor:
    """``values`` as the fp32 tensor on ``device`` that the ops take for their float hyper-parameters, with no host
    sync: on CUDA staged in pinned memory and copied asynchronously (a pageable source makes the copy wait for
    it); on the host a plain tensor. While compiling, the values may be symbolic floats (Dynamo makes a config
    float that changed between calls a SymFloat): ``torch.tensor``/``torch.full`` of a SymFloat specialize it
    again (a recompile per value), while a tensor op taking it as a scalar operand keeps it a graph input."""
    if torch.compiler.is_compiling():
        zero = torch.zeros((), dtype=torch.float32, device=device)
        return torch.stack([(zero + v).to(torch.float32) for v in values])
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # a captured CUDA graph would replay the copy from a pinned buffer freed (and reused) after capture:
        # fills on the device instead, with the values baked into the graph (as float arguments were)
        return torch.stack([torch.full((), v, dtype=torch.float32, device=device) for v in values])
    if device.type == "cuda":
        return torch.tensor(values, dtype=torch.float32, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(values, dtype=torch.float32, device=device)


def loss_params(cfg: LossConfig, has_old: bool, device: torch.device, group_size: Optional[int] = None,
                batch: bool = False) -> tuple[Tensor, list[int]]:
    """The fused op's ``params`` on ``device`` ([1/τ, then the scalars of csrc/token_objective.h]; unused bounds as
    ±inf: a clamp to ±inf is the identity) and ``codes`` (``group_size`` set: the kernel normalizes rewards
    itself; ``batch``: by the batch std). Values go in as given: ``float()`` of a SymFloat would specialize it."""
    opt = lambda v, default: default if v is None else v  # noqa: E731
    values = [1.0 / cfg.temperature, cfg.epsilon_low, cfg.epsilon_high, opt(cfg.ratio_cap, _INF),
              opt(cfg.dual_clip, _INF), opt(cfg.log_ratio_clamp, _INF), opt(cfg.cispo_low, -_INF),
              opt(cfg.cispo_high, _INF), cfg.sapo_tau_pos, cfg.sapo_tau_neg, opt(cfg.kl_input_clamp, _INF),
              opt(cfg.kl_output_clamp, _INF), cfg.advantage.eps]
    kl = 0 if cfg.beta == 0.0 else _KL[cfg.kl_estimator.rstrip("+")]
    estimator, divide, singleton_raw, _ = advantage_args(cfg.advantage)
    codes = [_POLICY[cfg.policy_loss], kl, int(cfg.kl_estimator.endswith("+")), int(cfg.kl_ratio_weighted),
             int(has_old), int(group_size is not None), group_size or 1, estimator, int(divide), int(batch),
             int(singleton_raw)]
    return params_tensor(values, device), codes


# ------------------------------------------------------------------------------------------ fake shapes
def _fake_token_logprobs(logits, targets, mask, inv_temperature, with_entropy):
    f32 = dict(device=logits.device, dtype=torch.float32)
    return (logits.new_empty(targets.shape, **f32), logits.new_empty(targets.shape + (2,), **f32),
            logits.new_empty(targets.shape if with_entropy else (0,), **f32))


def _fake_token_logprobs_backward(grad_logprobs, grad_entropy, logits, targets, mask, stats, entropy,
                                  inv_temperature):
    return logits.new_empty(logits.shape)


def _fake_loss_outputs(logits, targets):
    f32 = dict(device=logits.device, dtype=torch.float32)
    return (logits.new_empty((), **f32), *(logits.new_empty(targets.numel(), **f32) for _ in range(5)))


def _fake_grpo_loss_fused(logits, targets, *args):
    write_grad = args[-1]
    return (*_fake_loss_outputs(logits, targets), logits.new_empty(logits.shape if write_grad else (0,)))


def _fake_grpo_loss_fused_inplace(logits, targets, *args):
    return _fake_loss_outputs(logits, targets)


def _fake_scale_grad(grad, scale):
    return None


def _fake_advantages(rewards, batch_std, group_size, *args):
    groups = rewards.numel() // group_size
    return torch.empty_like(rewards), rewards.new_empty(groups), rewards.new_empty(groups)


# -------------------------------------------------------------------------------------------- autograd
def _traced(x: Tensor) -> bool:
    """Under torch.compile / AOT tracing tensors are functional or fake: mutating a saved forward output is
    not expressible there."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(x, (FakeTensor, FunctionalTensor))


def register(prefix: str, ops: Ops) -> None:
    """Registers fakes and autograd for the ops named ``fastgrpo::{prefix}<op>``."""
    name = lambda op: f"fastgrpo::{prefix}{op}"  # noqa: E731
    fakes = {"token_logprobs": _fake_token_logprobs, "token_logprobs_backward": _fake_token_logprobs_backward,
             "grpo_loss_fused": _fake_grpo_loss_fused, "grpo_loss_fused_inplace_": _fake_grpo_loss_fused_inplace,
             "scale_grad_": _fake_scale_grad, "advantages": _fake_advantages}
    for op, fake in fakes.items():
        torch.library.register_fake(name(op), fake)

    def logprobs_setup(ctx, inputs, output):
        logits, targets, mask, inv_temperature, _ = inputs
        ctx.save_for_backward(logits, targets, mask, output[1], output[2], inv_temperature)
        ctx.set_materialize_grads(False)

    def logprobs_backward(ctx, grad_logprobs, _grad_stats, grad_entropy):
        logits, targets, mask, stats, entropy, inv_temperature = ctx.saved_tensors
        if grad_logprobs is None:
            grad_logprobs = torch.zeros(targets.shape, device=stats.device, dtype=stats.dtype)
        if grad_entropy is not None and grad_entropy.numel() == 0:
            grad_entropy = None
        if not _traced(logits):
            first_order_only()
        grad = ops.token_logprobs_backward(grad_logprobs, grad_entropy, logits, targets, mask, stats, entropy,
                                           inv_temperature)
        return grad, None, None, None, None

    torch.library.register_autograd(name("token_logprobs"), logprobs_backward, setup_context=logprobs_setup)

    def loss_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # else autograd fills an [N, V] zero gradient for the gradient output
        if _traced(output[-1]):
            ctx.save_for_backward(output[-1])
        else:  # held on ctx, not saved: backward drops the last reference, so autograd can adopt the buffer
            ctx.grads = [output[-1]]  # as .grad instead of copying it (it has no grad_fn: no reference cycle)

    def loss_backward(ctx, grad_loss, *_):
        if hasattr(ctx, "grads"):  # eager: in place, nothing at all when grad_loss == 1
            (grad,) = precomputed_gradients(ctx, grad_loss, ops.scale_grad_, "grpo_loss")
        else:  # the same rounding as the scale op: an fp32 product, rounded once to the gradient's dtype
            (grad,) = ctx.saved_tensors
            grad = (grad.float() * grad_loss).to(grad.dtype)
        return (grad,) + (None,) * 15

    torch.library.register_autograd(name("grpo_loss_fused"), loss_backward, setup_context=loss_setup)


def precomputed_gradients(ctx, grad_loss: Tensor, scale_: Callable[[Tensor, Tensor], None],
                          what: str) -> list[Optional[Tensor]]:
    """``ctx.grads`` (gradients of a scalar loss computed in its forward) times ``grad_loss``.

    A backward that frees the graph (the usual one) scales the buffers in place and hands them over: autograd
    adopts a buffer nobody else holds as ``.grad`` without a copy. A backward that keeps the graph
    (``retain_graph=True``) returns scaled copies and keeps the buffers for the next one; that is what a
    retained graph costs: its gradient buffers stay alive with it, and each such backward writes one more copy.
    AOTAutograd asks the engine the same question (``_get_current_graph_task_keep_graph``, present in every
    supported torch). Traced by torch.compile, the buffers are saved activations: scaled out of place, with the
    scale op's rounding (fp32 product)."""
    if torch.compiler.is_compiling():
        return [None if g is None else (g.float() * grad_loss).to(g.dtype) for g in ctx.grads]
    first_order_only()
    grads = ctx.grads
    if grads is None:
        raise RuntimeError(
            f"Trying to backward through the {what} graph a second time: its gradient buffers were handed to the "
            "first backward. Specify retain_graph=True on every backward but the last.")
    if torch._C._autograd._get_current_graph_task_keep_graph():
        grads = [None if g is None else g.clone() for g in grads]
    else:
        ctx.grads = None
    for g in grads:
        if g is not None:
            scale_(g, grad_loss)
    return grads


def first_order_only() -> None:
    """The kernels' gradients are not differentiable: under ``create_graph=True`` (the only way grad mode is on
    inside an eager backward) they would silently count as constants in a higher-order gradient, so refuse."""
    if torch.is_grad_enabled():
        raise RuntimeError("create_graph=True: fastgrpo's kernel backends compute first-order gradients only; "
                           "use backend='reference' to differentiate a gradient")


def inplace_grad_function(ops: Ops) -> type:
    """Autograd for ``inplace_grad``: after the forward the logits buffer *is* the gradient. Held on ctx (not
    saved for backward) because its version changed by design; eager only. A backward that keeps the graph
    leaves the buffer holding the unscaled gradient (see ``precomputed_gradients``)."""

    class InplaceGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, *args):
            outs = ops.grpo_loss_fused_inplace_(logits, *args)
            ctx.set_materialize_grads(False)
            ctx.grads = [logits]
            ctx.mark_non_differentiable(*outs[1:])
            return outs

        @staticmethod
        def backward(ctx, grad_loss, *_):
            (grad,) = precomputed_gradients(ctx, grad_loss, ops.scale_grad_, "grpo_loss(inplace_grad=True)")
            return (grad,) + (None,) * 14

    return InplaceGrad
