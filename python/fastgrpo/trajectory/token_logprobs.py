"""The ``token_logprobs`` op (MATH §1): per-token log-probs and entropy of the targets, and their backward.

Kernels: ``kernels/token_logprobs.py`` (Triton: one program per row, online log-sum-exp in fp32, batch
invariant), ``csrc/cpu/token_logprobs.cpp`` and ``csrc/cuda/token_logprobs.cu`` (``token_logprobs``,
``token_logprobs_backward``). This module, top to bottom: the Triton launchers, the ops' registration (fakes,
autograd), the kernel backends' host code and the public functions ``token_logprobs`` and
``linear_token_logprobs`` (the hidden-state form; its chunked kernel path lives with ``linear_grpo_loss``).

    token_logprobs(logits, targets, mask?, inv_temperature, with_entropy) -> (ℓ, stats, H)
    token_logprobs_backward(g_ℓ, g_H?, logits, targets, mask?, stats, H, inv_temperature) -> ∂/∂logits

``stats`` holds per row the columns of ``ROW_STATS``: the max M of z/τ, log Σ exp(z/τ − M) and the sums over the
non-target entries from which the loss reports its gradient norms; rows with mask 0 get zeros and no exp work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Optional, TypedDict, Union, cast, overload

import torch
from torch import Tensor

from .. import _checks, _library, backends, distributed
from ..inputs import check_logits, check_temperature, lm_head_operands
from ..kernels import params as P

if TYPE_CHECKING:
    from typing_extensions import Unpack

LogprobsResult = Union[Tensor, tuple[Tensor, Tensor]]


# ---------------------------------------------------------------------------------------- Triton launchers
def row_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    if mask is None:
        return None
    mask = _library.rows(mask)
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def token_logprobs_launcher(
    logits: Tensor, targets: Tensor, mask: Optional[Tensor], inv_temperature: Tensor, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels import token_logprobs as K

    n, vocab = targets.numel(), logits.shape[-1]
    out: dict[str, Any] = dict(device=logits.device, dtype=torch.float32)
    logprobs, stats = torch.empty(targets.shape, **out), torch.empty(targets.shape + (len(P.ROW_STATS),), **out)
    entropy = torch.empty(targets.shape if with_entropy else (0,), **out)
    if n > 0:
        t, stride_b, stride_t = _library.row_addressing(logits)
        m = row_mask(mask)
        block = K.block_v(vocab)
        _library.launch(K.token_logprobs_fwd_kernel)[(_library.row_programs(logits, n, reread=False),)](
            logits,
            _library.rows(targets),
            logprobs if m is None else m,
            _library.float_params(inv_temperature, logits, 1, "inv_temperature"),
            logprobs,
            stats,
            entropy,
            n,
            t,
            vocab,
            stride_b,
            stride_t,
            HAS_MASK=m is not None,
            HAS_ENTROPY=with_entropy,
            R=K.group(logits.element_size()),
            BLOCK_V=block,
            num_warps=K.num_warps(block),
        )
    return logprobs, stats, entropy


def token_logprobs_backward_launcher(
    grad_logprobs: Tensor,
    grad_entropy: Optional[Tensor],
    logits: Tensor,
    targets: Tensor,
    mask: Optional[Tensor],
    stats: Tensor,
    entropy: Tensor,
    inv_temperature: Tensor,
) -> Tensor:
    from ..kernels import token_logprobs as K

    n, vocab = targets.numel(), logits.shape[-1]
    if stats.numel() != n * len(P.ROW_STATS):  # the kernel reads row r's statistics at len(ROW_STATS)·r
        raise ValueError(f"stats must hold {len(P.ROW_STATS)} values per row (ROW_STATS), got {list(stats.shape)}")
    grad_logits = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    if n > 0:
        t, stride_b, stride_t = _library.row_addressing(logits)
        block = K.block_v(vocab)
        has_grad_entropy = grad_entropy is not None
        m = row_mask(mask)
        _library.launch(K.token_logprobs_bwd_kernel)[(_library.row_programs(logits, n, reread=False),)](
            grad_logits,
            logits,
            _library.rows(targets),
            stats if m is None else m,
            stats,
            _library.rows(entropy),
            _library.rows(grad_logprobs, torch.float32),
            _library.rows(grad_entropy, torch.float32) if grad_entropy is not None else stats,
            _library.float_params(inv_temperature, logits, 1, "inv_temperature"),
            n,
            t,
            vocab,
            stride_b,
            stride_t,
            HAS_MASK=m is not None,
            HAS_GRAD_ENTROPY=has_grad_entropy,
            R=K.group(logits.element_size()),
            BLOCK_V=block,
            num_warps=K.num_warps(block),
        )
    return grad_logits


# ------------------------------------------------------------------------------------------- registration
def register_triton() -> None:
    _library.register_triton_op("token_logprobs", token_logprobs_launcher)
    _library.register_triton_op("token_logprobs_backward", token_logprobs_backward_launcher)


def _fake_token_logprobs(logits, targets, mask, inv_temperature, with_entropy):
    f32 = dict(device=logits.device, dtype=torch.float32)
    return (
        logits.new_empty(targets.shape, **f32),
        logits.new_empty(targets.shape + (len(P.ROW_STATS),), **f32),
        logits.new_empty(targets.shape if with_entropy else (0,), **f32),
    )


def _fake_token_logprobs_backward(grad_logprobs, grad_entropy, logits, targets, mask, stats, entropy, inv_temperature):
    return logits.new_empty(logits.shape)


def register(prefix: str, ops: _library.Ops) -> None:
    """Fakes of ``fastgrpo::<prefix>token_logprobs(_backward)``, and the forward's autograd through the backward op."""
    name = f"fastgrpo::{prefix}token_logprobs"
    torch.library.register_fake(name, _fake_token_logprobs)
    torch.library.register_fake(name + "_backward", _fake_token_logprobs_backward)
    op = getattr(torch.ops.fastgrpo, prefix + "token_logprobs")

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
        if not _library.traced(logits):
            _library.first_order_only()
        grad = ops.token_logprobs_backward(
            grad_logprobs, grad_entropy, logits, targets, mask, stats, entropy, inv_temperature
        )
        return _library.gradients_by_name(op, logits=grad)

    torch.library.register_autograd(name, logprobs_backward, setup_context=logprobs_setup)


# ------------------------------------------------------------------------------- kernel backends' host code
def kernel_token_logprobs(
    ops: _library.Ops,
    logits: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
    mask: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """(ℓ, H or None, the row statistics [*targets.shape, len(ROW_STATS)], not differentiable)."""
    inv_temperature = _library.params_tensor([1.0 / temperature], logits.device)
    logprobs, stats, ent = ops.token_logprobs(logits, targets, mask, inv_temperature, entropy)
    return logprobs, ent if entropy else None, stats.detach()


# ----------------------------------------------------------------------------------------- public functions
class TokenLogprobsOptions(TypedDict, total=False):
    """The keywords of :func:`token_logprobs` besides ``entropy``, for its typed overloads (whose return type
    follows ``entropy``); their defaults and meaning: :func:`token_logprobs`."""

    temperature: float
    tp_group: Optional[distributed.ProcessGroup]
    vocab_start: Optional[int]
    backend: str
    check_values: Optional[bool]


class LinearTokenLogprobsOptions(TokenLogprobsOptions, total=False):
    """The keywords of :func:`linear_token_logprobs` besides ``entropy``, as :class:`TokenLogprobsOptions`."""

    bias: Optional[Tensor]
    logit_scale: float
    logit_softcap: Optional[float]
    reduce_hidden_grad: bool


@overload
def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    entropy: Literal[False] = ...,
    **options: Unpack[TokenLogprobsOptions],
) -> Tensor: ...
@overload
def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    entropy: Literal[True],
    **options: Unpack[TokenLogprobsOptions],
) -> tuple[Tensor, Tensor]: ...
@overload
def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    entropy: bool = ...,
    **options: Unpack[TokenLogprobsOptions],
) -> LogprobsResult: ...


def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    tp_group: Optional[distributed.ProcessGroup] = None,
    vocab_start: Optional[int] = None,
    backend: str = "auto",
    check_values: Optional[bool] = None,
) -> LogprobsResult:
    """log π(y_t) [B, T] (fp32) of ``targets`` [B, T] under ``logits`` [B, T, V] / τ; also the entropy
    [B, T] (fp32) when ``entropy=True``. Both differentiable w.r.t. ``logits``.

    ``check_values`` (None: the global default, see ``fastgrpo.set_check_values``): check that the ids are in
    [0, V), at the cost of one host sync (none when False or under torch.compile). The logits are never
    scanned: a NaN or inf logit propagates to its row's log-prob.

    ``tp_group`` (kernel backends): ``logits`` [.., V_r] are this rank's vocabulary shard (equal shards in rank
    order, or from ``vocab_start``), ``targets`` global ids; one all_gather of [N, 8] fp32 per call, the same
    values on every rank, the gradient of the shard in the backward (MATH §7.1).

    PyTorch equivalent::

        logp = torch.log_softmax(logits.float() / temperature, -1)
        lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
    """
    check_logits(logits, targets)
    check_temperature(temperature)
    checks = _checks.ValueChecks(check_values, logits)
    parallel = distributed.resolve(
        checks, targets.shape, logits.device, vocab=logits.shape[-1], tp_group=tp_group, vocab_start=vocab_start
    )
    checks.token_ids("targets", targets, distributed.checked_vocab(parallel, logits.shape[-1]))
    checks.run()
    impl = backends.select(backend, logits.device)
    if parallel is not None and parallel.tp is not None:
        ops = backends.require_kernels(impl, "tp_group").ops
        lp, ent, _ = distributed.vocab_parallel_logprobs(ops, logits, targets, parallel.tp, temperature, entropy)
    else:
        lp, ent = impl.token_logprobs(logits, targets, temperature, entropy)
    return (lp, cast(Tensor, ent)) if entropy else lp  # a backend returns the entropy when asked


@overload
def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    entropy: Literal[False] = ...,
    **options: Unpack[LinearTokenLogprobsOptions],
) -> Tensor: ...
@overload
def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    entropy: Literal[True],
    **options: Unpack[LinearTokenLogprobsOptions],
) -> tuple[Tensor, Tensor]: ...
@overload
def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    entropy: bool = ...,
    **options: Unpack[LinearTokenLogprobsOptions],
) -> LogprobsResult: ...


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    entropy: bool = False,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    tp_group: Optional[distributed.ProcessGroup] = None,
    vocab_start: Optional[int] = None,
    reduce_hidden_grad: bool = True,
    backend: str = "auto",
    check_values: Optional[bool] = None,
) -> LogprobsResult:
    """:func:`token_logprobs` of ``softcap(logit_scale · (hidden @ weight.T + bias))`` (hidden [B, T, H],
    weight [V, H]), differentiable w.r.t. hidden, weight and bias. ``check_values`` as in :func:`token_logprobs`.
    ``tp_group``, ``vocab_start``, ``reduce_hidden_grad``: the weight (and bias) are a vocabulary shard, as in
    :func:`fastgrpo.linear_grpo_loss`."""
    check_temperature(temperature)
    with lm_head_operands(hidden, weight, targets, bias, logit_scale, logit_softcap) as (hidden, head):
        vocab = head.weight.shape[0]
        checks = _checks.ValueChecks(check_values, hidden)
        parallel = distributed.resolve(
            checks,
            targets.shape,
            hidden.device,
            vocab=vocab,
            tp_group=tp_group,
            vocab_start=vocab_start,
            reduce_hidden_grad=reduce_hidden_grad,
        )
        checks.token_ids("targets", targets, distributed.checked_vocab(parallel, vocab))
        checks.run()
        impl = backends.select(backend, hidden.device)
        if parallel is not None:
            from .linear_grpo_loss import kernel_linear_token_logprobs

            ops = backends.require_kernels(impl, "tp_group").ops
            lp, ent = kernel_linear_token_logprobs(ops, hidden, head, targets, temperature, entropy, parallel)
        else:
            lp, ent = impl.linear_token_logprobs(hidden, head, targets, temperature, entropy)
    return (lp, cast(Tensor, ent)) if entropy else lp  # a backend returns the entropy when asked
