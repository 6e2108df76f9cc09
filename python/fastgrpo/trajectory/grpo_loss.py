"""The ``grpo_loss`` op (MATH §2): the GRPO-family loss at the log-prob and logit levels, fused.

Kernels: ``kernels/grpo_loss.py`` (Triton: per row, the log-prob pass, the per-token objective and its
derivative, the gradient row, in one launch), ``csrc/token_objective.h`` (the same objective for the C++ CPU
kernel ``csrc/cpu/grpo_loss.cpp`` and the CUDA kernel ``csrc/cuda/grpo_loss.cu``). This module, top to bottom:
the Triton launchers, the ops' registration (fakes, autograd), the kernel backends' host code (``fused``,
``two_phase``) and the public functions ``policy_loss`` (given log-probs), ``grpo_loss`` (logits) and
:class:`GRPOLoss`. The hidden-state level is ``linear_grpo_loss``.

    grpo_loss_fused(logits, targets, tokens, rewards?, seq?, params, codes, with_entropy, write_grad)
        -> (loss, outputs, ∂loss/∂logits)
    grpo_loss_fused_inplace_(logits!, targets, tokens, rewards?, seq?, params, codes, with_entropy) -> (loss, outputs)
    scale_grad_(grad!, scale) -> ()

``tokens`` [TOKEN_INPUTS, N] and ``outputs`` [TOKEN_OUTPUTS, N] are per-token fp32 rows, ``params`` the float
hyper-parameters (SCALARS), ``codes`` the variants (CODES): all named in ``kernels/params.py``. The fused loss
computes ∂loss/∂logits in the forward (the loss is a scalar); its backward only scales that gradient by the
incoming one (``_library.precomputed_gradients``: in place and handed to autograd without a copy when the backward
frees the graph, a scaled copy when it keeps it). Under torch.compile the scaling is an out-of-place multiply (a
saved output cannot be mutated there).

Token-local configs (every token-level variant, KL, entropy bonus, rollout weights from given log-probs) take
the fused path: logits read once, ∂loss/∂logits written in the forward, raw rewards of contiguous groups
(grpo, rloo) normalized in the same launch. The rest (GSPO/GMPO sequence ratios, the entropy quantile and
off-policy masks) needs a statistic over other tokens first and runs in two phases: the ``token_logprobs`` op,
the O(N) objective (``objective.policy_loss``) on those [N] vectors, and its gradient through the log-prob op's
backward (one more read, one write). No [N, V] intermediate exists besides the gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import _checks, _library, backends, distributed
from ..config import LossConfig, LossOutput, Rewards
from ..inputs import LossInputs, LossOptions, check_config, check_logits, check_options, resolve
from ..kernels import params as P
from ..reward import advantages as reward
from . import gradient_rank, objective
from .token_logprobs import kernel_token_logprobs

if TYPE_CHECKING:
    from typing_extensions import Unpack


# ---------------------------------------------------------------------------------------- Triton launchers
def _launch(
    logits: Tensor,
    targets: Tensor,
    tokens: Tensor,
    rewards: Optional[Tensor],
    seq: Optional[Tensor],
    params: Tensor,
    codes: Sequence[int],
    with_entropy: bool,
    grad: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """Runs the kernel; ``grad`` is None (no gradient), a new buffer, or ``logits`` itself (in place). Absent
    optional pointers are replaced by any valid buffer: the kernel never reads them."""
    from ..kernels import grpo_loss as K

    _library.check_codes(codes, len(P.CODES))
    n, vocab = targets.numel(), logits.shape[-1]
    if tokens.shape != (len(P.TOKEN_INPUTS), n):  # the kernel reads row k of token r at k·N + r
        raise ValueError(
            f"tokens must be [{len(P.TOKEN_INPUTS)}, {n}] (kernels/params.py: TOKEN_INPUTS), got {list(tokens.shape)}"
        )
    named = dict(zip(P.CODES, codes))
    if named["adv_from_rewards"]:  # the kernel normalizes each token's reward: its group must be there
        if rewards is None or seq is None:
            raise ValueError("rewards and seq are required when adv_from_rewards is set")
        if named["group_size"] <= 0 or rewards.numel() % named["group_size"]:
            raise ValueError(
                f"group_size ({named['group_size']}) must divide the number of rewards ({rewards.numel()})"
            )
        if seq.numel() != n:
            raise ValueError(f"seq must hold one sequence index per token ({n}), got {seq.numel()}")
    for name, x in (("tokens", tokens), ("rewards", rewards), ("seq", seq)):
        if x is not None and x.device != logits.device:
            raise ValueError(f"{name} must be on the device of the op's inputs ({logits.device}), got {x.device}")
    outputs = torch.empty(len(P.TOKEN_OUTPUTS), n, device=logits.device, dtype=torch.float32)
    if n > 0:
        t, stride_b, stride_t = _library.row_addressing(logits)
        _, grad_stride_b, grad_stride_t = _library.row_addressing(logits if grad is None else grad)
        block = K.block_v(vocab)
        ids = _library.rows(targets)
        _library.launch(K.grpo_loss_fwd_kernel)[(_library.row_programs(logits, n, reread=grad is not None),)](
            logits,
            ids,
            tokens.float().contiguous(),
            tokens if rewards is None else rewards,
            ids if seq is None else seq,
            _library.float_params(params, logits, len(P.SCALARS), "params"),
            outputs,
            outputs if grad is None else grad,
            n,
            t,
            vocab,
            stride_b,
            stride_t,
            grad_stride_b,
            grad_stride_t,
            **named,
            HAS_ENTROPY=with_entropy,
            WRITE_GRAD=grad is not None,
            R=K.group(logits.element_size()),
            BLOCK_V=block,
            num_warps=K.num_warps(block),
        )
    return outputs[P.TOKEN_OUTPUTS.index("loss_terms")].sum(), outputs


def grpo_loss_fused_launcher(
    logits: Tensor,
    targets: Tensor,
    tokens: Tensor,
    rewards: Optional[Tensor],
    seq: Optional[Tensor],
    params: Tensor,
    codes: Sequence[int],
    with_entropy: bool,
    write_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    grad = torch.empty(logits.shape if write_grad else (0,), device=logits.device, dtype=logits.dtype)
    loss, outputs = _launch(
        logits, targets, tokens, rewards, seq, params, codes, with_entropy, grad if write_grad else None
    )
    return loss, outputs, grad


def grpo_loss_fused_inplace_launcher(
    logits: Tensor,
    targets: Tensor,
    tokens: Tensor,
    rewards: Optional[Tensor],
    seq: Optional[Tensor],
    params: Tensor,
    codes: Sequence[int],
    with_entropy: bool,
) -> tuple[Tensor, Tensor]:
    return _launch(logits, targets, tokens, rewards, seq, params, codes, with_entropy, logits)


def scale_grad_launcher(grad: Tensor, scale: Tensor) -> None:
    from ..kernels import grpo_loss as K

    if grad.numel() > 0:
        # logits-shaped gradients ([B, T, V] / [N, V], maybe the in-place view of a larger buffer) keep their
        # strides; the others (hidden, weight, bias of the linear path) are contiguous: one row per leading index
        rows2d = (
            grad
            if grad.dim() in (2, 3) and (grad.shape[-1] <= 1 or grad.stride(-1) == 1)
            else grad.view(-1, grad.shape[-1])
            if grad.dim()
            else grad.view(1, 1)
        )
        t, stride_b, stride_t = _library.row_addressing(rows2d)
        vocab = rows2d.shape[-1]
        _library.launch(K.scale_grad_kernel)[(grad.numel() // vocab, -(-vocab // K.SCALE_BLOCK))](
            grad, scale.reshape(1).float(), t, vocab, stride_b, stride_t, BLOCK=K.SCALE_BLOCK
        )


# ------------------------------------------------------------------------------------------- registration
def register_triton() -> None:
    _library.register_triton_op("grpo_loss_fused", grpo_loss_fused_launcher)
    _library.register_triton_op("grpo_loss_fused_inplace_", grpo_loss_fused_inplace_launcher, ("logits",))
    _library.register_triton_op("scale_grad_", scale_grad_launcher, ("grad",))


def _fake_outputs(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    f32: dict[str, Any] = dict(device=logits.device, dtype=torch.float32)
    return logits.new_empty((), **f32), logits.new_empty((len(P.TOKEN_OUTPUTS), targets.numel()), **f32)


def _fake_fused(logits, targets, tokens, rewards, seq, params, codes, with_entropy, write_grad):
    return (*_fake_outputs(logits, targets), logits.new_empty(logits.shape if write_grad else (0,)))


def _fake_fused_inplace(logits, targets, tokens, rewards, seq, params, codes, with_entropy):
    return _fake_outputs(logits, targets)


def _fake_scale_grad(grad, scale):
    return None


def register(prefix: str, ops: _library.Ops) -> None:
    """Fakes of ``fastgrpo::<prefix>grpo_loss_fused(_inplace_)`` and ``<prefix>scale_grad_``, and the fused op's
    autograd. (The in-place op's autograd is ``inplace_grad_function``: it needs no graph of its own.)"""
    name = f"fastgrpo::{prefix}grpo_loss_fused"
    torch.library.register_fake(name, _fake_fused)
    torch.library.register_fake(name + "_inplace_", _fake_fused_inplace)
    torch.library.register_fake(f"fastgrpo::{prefix}scale_grad_", _fake_scale_grad)
    op = getattr(torch.ops.fastgrpo, prefix + "grpo_loss_fused")

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # else autograd fills an [N, V] zero gradient for the gradient output
        if _library.traced(output[-1]):
            ctx.save_for_backward(output[-1])
        else:  # held on ctx, not saved: backward drops the last reference, so autograd can adopt the buffer
            ctx.grads = [output[-1]]  # as .grad instead of copying it (it has no grad_fn: no reference cycle)

    def backward(ctx, grad_loss, *_):
        if hasattr(ctx, "grads"):  # eager: in place, nothing at all when grad_loss == 1
            (grad,) = _library.precomputed_gradients(ctx, grad_loss, ops.scale_grad_, "grpo_loss")
        else:  # the same rounding as the scale op: an fp32 product, rounded once to the gradient's dtype
            (grad,) = ctx.saved_tensors
            grad = (grad.float() * grad_loss).to(grad.dtype)
        return _library.gradients_by_name(op, logits=grad)

    torch.library.register_autograd(name, backward, setup_context=setup_context)


@functools.lru_cache(maxsize=None)
def inplace_grad_function(ops: _library.Ops) -> type[torch.autograd.Function]:
    """Autograd for ``inplace_grad``: after the forward the logits buffer *is* the gradient. Held on ctx (not
    saved for backward) because its version changed by design; eager only. A backward that keeps the graph
    leaves the buffer holding the unscaled gradient (see ``_library.precomputed_gradients``)."""
    op = ops.grpo_loss_fused_inplace_

    class InplaceGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, *args):
            loss, outputs = op(logits, *args)
            ctx.set_materialize_grads(False)
            ctx.grads = [logits]
            ctx.mark_non_differentiable(outputs)
            return loss, outputs

        @staticmethod
        def backward(ctx, grad_loss, _):
            (grad,) = _library.precomputed_gradients(ctx, grad_loss, ops.scale_grad_, "grpo_loss(inplace_grad=True)")
            return _library.gradients_by_name(op, logits=grad)

    return InplaceGrad


# ------------------------------------------------------------------------------- kernel backends' host code
def is_token_local(inputs: LossInputs) -> bool:
    """Whether every per-token quantity of the config depends on that token alone (the fused path)."""
    cfg = inputs.config
    return (
        cfg.ratio_level == "token"
        and cfg.policy_loss in P.POLICY
        and cfg.top_entropy_quantile == 1.0
        and cfg.off_policy_mask_threshold is None
        and (cfg.rollout_correction is None or inputs.old_logprobs is not None or inputs.is_weights is not None)
    )


def loss_params(cfg: LossConfig, device: torch.device, batch_std: Optional[Tensor] = None) -> Tensor:
    """The fused op's ``params`` on ``device`` (``SCALARS``; unused bounds as ±inf: a clamp to ±inf is the
    identity; ``batch_std``: a 1-element device tensor, or 1 where unused). Values go in as given: ``float()`` of a
    SymFloat would specialize it."""
    inf = math.inf
    opt = lambda v, default: default if v is None else v  # noqa: E731
    named: dict[str, Union[float, Tensor]] = dict(
        inv_temperature=1.0 / cfg.temperature,
        eps_low=cfg.epsilon_low,
        eps_high=cfg.epsilon_high,
        ratio_cap=opt(cfg.ratio_cap, inf),
        dual_clip=opt(cfg.dual_clip, inf),
        log_ratio_clamp=opt(cfg.log_ratio_clamp, inf),
        cispo_low=opt(cfg.cispo_low, -inf),
        cispo_high=opt(cfg.cispo_high, inf),
        sapo_tau_pos=cfg.sapo_tau_pos,
        sapo_tau_neg=cfg.sapo_tau_neg,
        kl_input_clamp=opt(cfg.kl_input_clamp, inf),
        kl_output_clamp=opt(cfg.kl_output_clamp, inf),
        kl_is_cap=opt(cfg.kl_importance_cap, inf),
        dro_beta=cfg.dro_beta,
        teacher_coef=cfg.teacher_coef,
        teacher_input_clamp=opt(cfg.teacher_input_clamp, inf),
        teacher_output_clamp=opt(cfg.teacher_output_clamp, inf),
        adv_eps=cfg.advantage.eps,
        batch_std=1.0 if batch_std is None else batch_std,
    )
    return _library.params_of(P.SCALARS, named, device)


def loss_codes(cfg: LossConfig, has_old: bool, group_size: Optional[int] = None, batch: bool = False) -> list[int]:
    """The fused op's ``codes`` (``CODES``): ``group_size`` set, the kernel normalizes rewards itself (by the
    batch std with ``batch``)."""
    named = dict(
        policy=P.POLICY[cfg.policy_loss],
        kl=P.KL["none" if cfg.beta == 0.0 else cfg.kl_estimator.rstrip("+")],
        kl_straight=P.KL_GRADIENT[
            "k2_importance_weighted"
            if cfg.kl_importance_gradient
            else "k2"
            if cfg.kl_estimator.endswith("+")
            else "estimator"
        ],
        kl_ratio_weighted=int(cfg.kl_ratio_weighted),
        has_old=int(has_old),
        teacher_kl=P.KL["none" if cfg.teacher_coef == 0.0 else cfg.teacher_estimator],
        teacher_in_advantage=int(cfg.teacher_form == "advantage"),
        teacher_at_old=int(cfg.teacher_reward_at == "old"),
        adv_from_rewards=int(group_size is not None),
    )
    advantage = reward.advantage_codes(cfg.advantage, group_size or 1, batch)
    named.update(zip(P.ADVANTAGE_CODES, advantage))
    return [named[name] for name in P.CODES]


@dataclass
class FusedInputs:
    """What the fused op takes besides the logits and targets, and what the metrics need besides its outputs."""

    shape: torch.Size
    tokens: Tensor  # [TOKEN_INPUTS, N] fp32
    rewards: Optional[Tensor]  # [B]: normalized in the kernel (then `seq`, int64 [N], maps tokens to rewards)
    seq: Optional[Tensor]
    params: Tensor
    codes: list[int]
    with_entropy: bool
    has_ref: bool
    is_weight: Tensor  # rollout importance weights [N] (ones when unused)
    used_weights: bool
    lay: objective.TokenLayout

    @property
    def has_old(self) -> bool:  # (the codes say it: the kernel reads the old log-probs only then)
        return bool(self.codes[P.CODES.index("has_old")])

    def row(self, name: str) -> Tensor:
        return self.tokens[P.TOKEN_INPUTS.index(name)]

    def op_args(self, rows: Optional[Tensor] = None) -> tuple:
        """The op's arguments after (logits, targets), for all tokens or the token indices ``rows``."""
        if rows is None:
            return self.tokens, self.rewards, self.seq, self.params, self.codes, self.with_entropy
        seq = None if self.seq is None else self.seq[rows].contiguous()
        return self.tokens[:, rows].contiguous(), self.rewards, seq, self.params, self.codes, self.with_entropy


def prepare(
    ops: _library.Ops, targets: Tensor, inputs: LossInputs, return_entropy: bool, device: torch.device
) -> FusedInputs:
    """Everything the fused op takes besides the logits, as per-token fp32 rows (O(N) work)."""
    cfg, shape = inputs.config, targets.shape
    lay = objective.TokenLayout(shape, inputs.cu_seqlens, cfg.max_length, device)
    m = inputs.mask.reshape(-1).float()
    flat = lambda x: None if x is None else torch.where(m > 0, x.detach().reshape(-1).float(), 0.0)  # noqa: E731
    old, ref, samp = flat(inputs.old_logprobs), flat(inputs.ref_logprobs), flat(inputs.sampling_logprobs)
    teacher = flat(inputs.teacher_logprobs)

    advantages, rewards, std_b, group_size, batch = inputs.advantages, None, None, None, False
    if (
        isinstance(advantages, Rewards)
        and advantages.group_ids is None
        and advantages.group_size is not None
        and cfg.advantage.estimator in ("grpo", "rloo")
        and not (cfg.advantage.scale == "batch" and advantages.rewards.shape[0] <= 1)
    ):
        # contiguous groups: the kernel normalizes each token's reward itself, in the same launch
        rewards = reward.combine_rewards(advantages.rewards, advantages.weights).float().contiguous()
        batch, std_b = reward.batch_std(rewards, cfg.advantage)
        group_size = advantages.group_size
        adv = torch.zeros_like(m)  # unused: the kernel reports the advantages it computed
    else:
        if isinstance(advantages, Rewards):
            advantages, _ = reward.kernel_advantages(ops, advantages, cfg.advantage, metrics=False)
        adv = lay.per_token(advantages.detach(), shape)

    weight = torch.ones_like(m)  # MATH §2.4 rollout weights: functions of the inputs alone here
    if inputs.is_weights is not None:
        weight = lay.per_token(inputs.is_weights.detach(), shape)
    elif cfg.rollout_correction is not None:
        # token local (the fused path): old_logprobs given; sampling_logprobs are then required (checked on input)
        assert old is not None and samp is not None
        weight = objective.rollout_weights(old, samp, m, lay, cfg)
    agg = lambda mode: objective.aggregation_weights(m, mode, lay, cfg, inputs.normalizer) * cfg.loss_scale  # noqa: E731
    rows = dict(
        mask=m,
        advantages=adv,
        old_logprobs=old if old is not None else torch.zeros_like(m),
        ref_logprobs=ref if ref is not None else torch.zeros_like(m),
        w_policy=agg(cfg.aggregation) * weight,
        w_kl=agg(cfg.kl_aggregation or cfg.aggregation) * cfg.beta,
        w_entropy=agg(cfg.entropy_aggregation or cfg.aggregation) * cfg.entropy_coef,
        teacher_logprobs=teacher if teacher is not None else torch.zeros_like(m),
        w_teacher=agg(cfg.aggregation) * cfg.teacher_coef if cfg.teacher_form == "loss" else torch.zeros_like(m),
    )
    return FusedInputs(
        shape=shape,
        tokens=torch.stack([rows[name].float() for name in P.TOKEN_INPUTS]),
        rewards=rewards,
        seq=lay.seq.contiguous() if rewards is not None else None,
        params=loss_params(cfg, device, std_b),
        codes=loss_codes(cfg, old is not None, group_size, batch),
        with_entropy=return_entropy or cfg.entropy_coef != 0.0,
        has_ref=ref is not None,
        is_weight=weight,
        used_weights=inputs.is_weights is not None or cfg.rollout_correction is not None,
        lay=lay,
    )


def finish(
    f: FusedInputs, cfg: LossConfig, loss: Tensor, outputs: Tensor, sketch_rows: Optional[Tensor] = None
) -> LossOutput:
    """The LossOutput from the fused op's per-token outputs: metrics are O(N) reductions, no host sync
    (``sketch_rows``: ``gradient_rank.logit_rows`` when the config asks for the effective rank)."""
    out = dict(zip(P.TOKEN_OUTPUTS, outputs))
    lp, rho, adv, m = out["logprobs"], out["ratio"], out["advantages_used"], f.row("mask")
    old = f.row("old_logprobs") if f.has_old else lp
    low, high = objective.clip_flags(cfg, rho, adv, lp, old)
    values = {"rho": rho, "is_weight": f.is_weight, "low": low, "high": high, "ppo_kl": old - lp}
    if f.has_ref:
        values["kl"] = objective.kl_estimate(lp, f.row("ref_logprobs"), cfg)
    ent = out["entropy"] if f.with_entropy else None
    metrics = objective.loss_metrics(values, out["grad_logprobs"], adv, m, ent, cfg, f.used_weights)
    stats = torch.stack([out[name] for name in P.ROW_STATS[2:]], -1)
    grad_ent = None if ent is None else -f.row("w_entropy")  # the loss holds −w_H·H
    grad_norms = objective.gradient_metrics(
        metrics, out["grad_logprobs"], grad_ent, lp, ent, stats, sketch_rows, cfg, m, f.lay
    )
    return LossOutput(
        loss=loss,
        logprobs=lp.reshape(f.shape),
        entropy=None if ent is None else ent.reshape(f.shape),
        metrics=metrics,
        grad_norms=grad_norms,
    )


def fused(
    ops: _library.Ops, logits: Tensor, targets: Tensor, inputs: LossInputs, return_entropy: bool, inplace_grad: bool
) -> LossOutput:
    """One launch: loss, metrics' per-token values and (when logits need it) ∂loss/∂logits."""
    f = prepare(ops, targets, inputs, return_entropy, logits.device)
    cfg = inputs.config
    sketch_rows = None  # before the launch: in place, the logits are the gradient after it
    if cfg.effective_rank_sketch:
        sketch_rows, _ = gradient_rank.logit_rows(logits, targets, 1.0 / cfg.temperature, cfg.effective_rank_sketch)
    write_grad = logits.requires_grad and torch.is_grad_enabled()
    if inplace_grad and write_grad:
        loss, outputs = inplace_grad_function(ops).apply(logits, targets, *f.op_args())
    else:
        loss, outputs, _ = ops.grpo_loss_fused(logits, targets, *f.op_args(), write_grad)
    return finish(f, cfg, loss, outputs, sketch_rows)


def kernel_grpo_loss(
    ops: _library.Ops, logits: Tensor, targets: Tensor, inputs: LossInputs, return_entropy: bool, inplace_grad: bool
) -> LossOutput:
    """The fused path for token-local configs; else two phases (log-probs, then the O(N) objective), which is also
    the distributed path: log-probs from a vocabulary shard, the objective over whole sequences (MATH §7)."""
    parallel = inputs.parallel
    if parallel is None and is_token_local(inputs):
        return fused(ops, logits, targets, inputs, return_entropy, inplace_grad)
    if inplace_grad:
        raise ValueError(
            "inplace_grad=True needs a token-local config (token-level ratio, no entropy quantile "
            "or off-policy mask, rollout weights from given old_logprobs) and no tp_group or cp_group: "
            "this one runs in two phases"
        )
    cfg = inputs.config
    entropy = return_entropy or cfg.needs_entropy
    if parallel is not None and parallel.tp is not None:
        lp, ent, stats = distributed.vocab_parallel_logprobs(
            ops, logits, targets, parallel.tp, cfg.temperature, entropy, inputs.mask
        )
    else:
        lp, ent, stats = kernel_token_logprobs(ops, logits, targets, cfg.temperature, entropy=entropy, mask=inputs.mask)
    inputs = dataclasses.replace(inputs, logit_stats=stats[..., 2:])
    k = cfg.effective_rank_sketch
    if k:  # opt-in: one more read of the logits (MATH §8.8)
        tp = None if parallel is None else parallel.tp
        rows, lse_r = gradient_rank.logit_rows(logits, targets, 1.0 / cfg.temperature, k, 0 if tp is None else tp.start)
        if tp is not None:
            rows = gradient_rank.fold_shards(rows, lse_r, stats[..., 0] + stats[..., 1], tp.group)
        inputs = dataclasses.replace(inputs, logit_sketch=rows.view(*targets.shape, 3 * k))
    return distributed.policy_loss(objective_loss, lp, ent, inputs)


def with_reward_metrics(out: LossOutput, inputs: LossInputs) -> LossOutput:
    """Raw rewards passed: the reward side's metrics of MATH §3 join the loss's (O(B) PyTorch on every backend, no
    host sync; the fused launch normalizes the rewards itself and reports no group statistics)."""
    if isinstance(inputs.advantages, Rewards):
        _, metrics = reward.torch_advantages(inputs.advantages, inputs.config.advantage)
        out.metrics.update(metrics)
    return out


def objective_loss(logprobs: Tensor, entropy: Optional[Tensor], inputs: LossInputs) -> LossOutput:
    """``objective.policy_loss`` in the argument order of ``Backend.policy_loss``."""
    return objective.policy_loss(logprobs, inputs, entropy)


# ----------------------------------------------------------------------------------------- public functions
def policy_loss(
    logprobs: Tensor,
    advantages: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    entropy: Optional[Tensor] = None,
    cp_group: Optional[distributed.ProcessGroup] = None,
    config: LossConfig = LossConfig(),
    backend: str = "auto",
    check_values: Optional[bool] = None,
    **options: Unpack[LossOptions],
) -> LossOutput:
    """The loss of MATH §2 from per-token log-probs ``logprobs`` [B, T] (or packed [N] + ``cu_seqlens``).

    advantages: per sequence [B] / [B, 1] / [S], or per token [B, T]; or pass ``rewards`` [B] ([B, K] with
        ``reward_weights``) and ``group_size``/``group_ids`` to normalize them first (``config.advantage``).
    mask: 0/1 per token (default: all ones). old/ref/sampling_logprobs: [B, T] log-probs of the old,
        reference and rollout policies (``old`` defaults to sg[logprobs], i.e. on-policy).
    old_logprobs, ref_logprobs, sampling_logprobs, teacher_logprobs, generator, is_weights, rewards, group_size,
    group_ids, reward_weights, cu_seqlens and normalizer are the keywords of :class:`fastgrpo.inputs.LossOptions`,
    shared by every loss entry point, each None by default.
    is_weights: precomputed rollout importance weights, per token or per sequence.
    teacher_logprobs: [B, T] the teacher's log-probs of the sampled tokens (on-policy distillation,
        ``config.teacher_coef``).
    generator: the random draws of ``policy_loss="clip_cov"`` (default: torch's global generator, as verl).
    entropy: per-token entropy [B, T], needed for ``entropy_coef`` and ``top_entropy_quantile``.
    normalizer: a float or 0-d tensor replacing the local denominator of the aggregation (e.g. a global
        token count, ``fastgrpo.distributed.data_parallel_normalizer``); never read on the host (its value check
        is part of the call's one read).
    cp_group: context parallel (MATH §7.2): this rank holds a part of every sequence's tokens ([B, T_r], or
        packed [N_r] with this rank's ``cu_seqlens`` of the same sequences); sequence statistics are taken over
        the whole sequences, the loss and metrics are global, the per-token outputs this rank's.
    check_values: None (the global default, ``fastgrpo.set_check_values``), True or False. On, a call rejects
        (ValueError naming the argument, the first bad value and its position) a mask entry that is negative
        or not finite (fractional entries are soft weights, as TRL multiplies by the mask), non-finite
        old/ref/sampling log-probs (−inf included: a sampled token has p > 0), advantages or entropy at
        unmasked positions, negative or non-finite ``is_weights`` there, non-finite rewards or reward weights
        anywhere (they enter the group statistics), a tensor ``normalizer`` ≤ 0 or not finite, ids or
        ``cu_seqlens`` out of range: all in one device-side reduction read once (one host sync per call).
        Off, and always under torch.compile or on meta/fake tensors, nothing is read (no host sync) and a
        non-finite input propagates to the loss. Masked positions are never checked: they are ignored.

    PyTorch equivalent of the default config (token-level PPO clip, token mean)::

        ratio = torch.exp(logprobs - old_logprobs)
        pg = -torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
        loss = (pg * mask).sum() / mask.sum()
    """
    check_options("policy_loss", options)
    _checks.tensor("logprobs", logprobs)
    _checks.floating("logprobs", logprobs)
    tokens = logprobs.shape
    checks = _checks.ValueChecks(check_values, logprobs)
    cu_seqlens = options.get("cu_seqlens")
    parallel = distributed.resolve(checks, tokens, logprobs.device, vocab=0, cp_group=cp_group, cu_seqlens=cu_seqlens)
    inputs = resolve(tokens, logprobs.device, checks, advantages, mask, config, parallel, options)
    if config.needs_entropy and entropy is None:
        raise ValueError(
            "entropy is required by this config (entropy_coef != 0 or top_entropy_quantile < 1): "
            "pass the per-token entropy, or use grpo_loss on logits"
        )
    if entropy is not None:
        _checks.tensor("entropy", entropy)
        _checks.floating("entropy", entropy)
        _checks.shape("entropy", entropy, tokens, "one entropy per token")
        _checks.same_device(logprobs.device, entropy=entropy)
    checks.finite("entropy", entropy)
    checks.run()
    impl = backends.select(backend, logprobs.device)
    return with_reward_metrics(distributed.policy_loss(impl.policy_loss, logprobs, entropy, inputs), inputs)


def grpo_loss(
    logits: Tensor,
    targets: Tensor,
    advantages: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    return_entropy: bool = False,
    inplace_grad: bool = False,
    tp_group: Optional[distributed.ProcessGroup] = None,
    vocab_start: Optional[int] = None,
    cp_group: Optional[distributed.ProcessGroup] = None,
    config: LossConfig = LossConfig(),
    backend: str = "auto",
    check_values: Optional[bool] = None,
    **options: Unpack[LossOptions],
) -> LossOutput:
    """The loss of MATH §2 from ``logits`` [B, T, V] (or packed [N, V]) and ``targets`` [B, T] / [N].

    Same keywords as :func:`policy_loss`; log-probs and entropy come from the logits divided by
    ``config.temperature``. Leading dims of ``logits`` may be any view (e.g. ``logits[:, :-1]``); the
    vocabulary dim must be contiguous. Target ids at masked positions are ignored (padding such as -100).
    ``check_values`` as in :func:`policy_loss`, plus the ids; the logits are never scanned (a NaN or inf
    logit at an unmasked position propagates to the loss).
    ``inplace_grad=True`` (Triton backend, token-local configs, eager) writes the gradient over ``logits``
    in the forward, so no second [N, V] buffer exists; the logits are unusable afterwards.
    ``tp_group`` (kernel backends): ``logits`` [.., V_r] are this rank's contiguous vocabulary shard, equal
    shards in rank order or starting at ``vocab_start``; ``targets`` are global ids. One all_gather of [N, 8]
    fp32 row statistics per call; every rank gets the same loss, log-probs and metrics, and the gradient of its
    shard (MATH §7.1). ``cp_group``: as in :func:`policy_loss`; both combine.

    PyTorch equivalent::

        logprobs = torch.log_softmax(logits.float() / config.temperature, -1).gather(
            -1, targets.unsqueeze(-1)).squeeze(-1)
        policy_loss(logprobs, advantages, mask, ..., config=config)
    """
    check_options("grpo_loss", options)
    check_logits(logits, targets)
    checks = _checks.ValueChecks(check_values, logits)
    parallel = distributed.resolve(
        checks,
        targets.shape,
        logits.device,
        vocab=logits.shape[-1],
        tp_group=tp_group,
        vocab_start=vocab_start,
        cp_group=cp_group,
        cu_seqlens=options.get("cu_seqlens"),
    )
    inputs = resolve(targets.shape, logits.device, checks, advantages, mask, config, parallel, options)
    checks.token_ids("targets", targets, distributed.checked_vocab(parallel, logits.shape[-1]))
    checks.run()
    impl = backends.select(backend, logits.device)
    if parallel is not None:
        backends.require_kernels(impl, "tp_group" if tp_group is not None else "cp_group")
    if inplace_grad and not impl.supports_inplace_grad:
        raise ValueError(f"inplace_grad=True needs the Triton backend (CUDA tensors), got {impl.name}")
    return with_reward_metrics(impl.grpo_loss(logits, targets, inputs, return_entropy, inplace_grad), inputs)


class GRPOLoss(nn.Module):
    """``nn.Module`` form of :func:`grpo_loss` holding the config and backend.

    ``GRPOLoss(fastgrpo.presets.trl(loss_type="dapo"))(logits, targets, advantages, mask, **kw)``.
    ``check_values`` is the default of every call (a call may pass its own).
    """

    def __init__(
        self, config: LossConfig = LossConfig(), backend: str = "auto", check_values: Optional[bool] = None
    ) -> None:
        super().__init__()
        check_config(config)
        _checks.ValueChecks.resolve(check_values)
        self.config = config
        self.backend = backend
        self.check_values = check_values

    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        advantages: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        **kwargs,
    ) -> LossOutput:
        kwargs.setdefault("check_values", self.check_values)
        return grpo_loss(logits, targets, advantages, mask, config=self.config, backend=self.backend, **kwargs)

    def extra_repr(self) -> str:
        return f"config={self.config}, backend={self.backend!r}, check_values={self.check_values!r}"
