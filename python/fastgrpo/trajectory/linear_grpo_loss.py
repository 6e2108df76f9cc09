"""The ``linear_grpo_loss`` op: hidden states + LM-head weight → loss, metrics and the gradients of hidden, weight
and bias, the logits never alive beyond one chunk of tokens on the kernel backends. It runs the ``grpo_loss`` and
``token_logprobs`` ops on chunks of logits it computes itself (no kernel of its own). This module, top to bottom:
the chunk GEMMs, the kernel backends' host code (``kernel_linear_token_logprobs``, ``kernel_linear_grpo_loss``)
and the public function ``linear_grpo_loss``.

Masked tokens are compacted away first (one host sync: padding then costs no FLOPs), and the unmasked ones
are processed in chunks of ``chunk_tokens`` rows, so peak extra memory is one [chunk, V] fp32 block, whatever N:
- token-local configs: z = h·Wᵀ (+ b) for the chunk, the fused op turns z into ∂loss/∂z in place, then
  dX = dZ·W and dW += dZᵀ·X, accumulated in fp32: 3 GEMMs of 2·c·V·H, so 6·N·V·H FLOPs in all;
- the rest (sequence ratios, entropy quantile and off-policy masks) needs every log-prob first: one pass of
  z and the log-prob op, the O(N) objective and its gradient w.r.t. ℓ and H, then a second pass recomputing z
  for the gradient: 4 GEMMs, 8·N·V·H FLOPs.
The fp32 dW accumulator is V·H·4 bytes (2.5 GB for Qwen's 151936 × 4096). Above ``DW_ACCUMULATOR_BYTES`` the
gradient pass runs vocabulary-slice-outer instead: for each slice of ``SLICE_BYTES`` of fp32 weight rows, every
chunk of tokens recomputes its [chunk, slice] tile of z, turns it into ∂loss/∂z from the row statistics of the
first pass, adds dZ·W_slice into an fp32 dX and dZᵀ·X into the slice's fp32 dW, which is written out (in the
weight's dtype) once complete. Extra memory is then one slice and dX (N·H·4), at the cost of the second pass:
8·N·V·H FLOPs for every config.
Logit scale and soft-capping (z = c·tanh(scale·(X·Wᵀ + b)/c)) are applied per chunk and chained into dZ.
GEMMs read bf16/fp16 operands with fp32 outputs on CUDA (``torch.mm(..., out_dtype=float32)`` where this
torch has it), never rounding a product to bf16 before the log-sum-exp; elsewhere they run on fp32 copies of
one vocabulary slice of the weight at a time (``_Gemm``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks, _library, backends, distributed
from ..config import LossConfig, LossOutput
from ..inputs import LMHead, LossInputs, LossOptions, check_options, lm_head_operands, resolve
from ..kernels import params as P
from . import gradient_rank
from .grpo_loss import finish, is_token_local, objective_loss, prepare, with_reward_metrics
from .token_logprobs import kernel_token_logprobs

if TYPE_CHECKING:
    from typing_extensions import Unpack

# fp32 logits of one chunk. GPUs want tall GEMMs (256 MiB ≈ 440 tokens of a 151936-entry vocabulary). On CPU,
# dW += dZᵀ·X runs with K = chunk rows; at N = 4096, H = 1024, V = 32000, fp32, 2 cores, fwd+bwd took
# 4.76 / 4.55 / 4.34 / 4.17 s with 16 / 32 / 48 / 64 MiB chunks (peak above the inputs 158 / 175 / 192 / 209 MiB,
# of which 141 MiB are the hidden and weight gradients), against 1000 MiB for materialized logits: 48 MiB keeps
# the peak 5x below that.
CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 48 << 20}
# above this, dW is accumulated one vocabulary slice at a time (SLICE_BYTES of fp32 rows)
DW_ACCUMULATOR_BYTES = {"cuda": 1 << 30, "cpu": 1 << 30}
SLICE_BYTES = {"cuda": 256 << 20, "cpu": 64 << 20}


def _per_device(table: dict, device: torch.device) -> int:
    return table.get(device.type, table["cpu"])


def default_chunk_tokens(vocab: int, device: torch.device) -> int:
    return max(1, _per_device(CHUNK_BYTES, device) // (4 * max(vocab, 1)))


class _Gemm:
    """The chunk GEMMs with fp32 outputs, and the logit transform z = softcap(scale·(X·Wᵀ + b)).

    The weight is read as is where the GEMM can: fp32, or bf16/fp16 on CUDA with ``out_dtype``. Elsewhere (CPU,
    torch < 2.8) the GEMMs need fp32 operands, and the weight is converted one vocabulary slice of
    ``SLICE_BYTES`` at a time, for each chunk: a whole fp32 copy would be V·H·4 bytes (2.2 GB for a 7B model's
    LM head) for the call's lifetime. A weight that fits in one slice is converted once."""

    def __init__(self, head: LMHead) -> None:
        weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
        self.low_precision = weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16) and _has_out_dtype()
        as_is = self.low_precision or weight.dtype == torch.float32
        vocab, hid = weight.shape
        self.step = vocab if as_is else max(1, _per_device(SLICE_BYTES, weight.device) // (4 * hid))
        self.weight = weight.float() if not as_is and vocab <= self.step else weight
        self.bias = None if bias is None else bias.float()
        self.scale, self.softcap = head.logit_scale, head.logit_softcap
        self._tanh: Optional[Tensor] = None

    def _slices(self) -> Iterator[tuple[slice, Tensor]]:
        """(vocabulary rows, those rows of the weight as a GEMM operand)."""
        for v0 in range(0, self.weight.shape[0], self.step):
            rows = slice(v0, v0 + self.step)
            yield rows, self.weight[rows].float()  # a no-op unless the weight is converted per slice

    def _mm(self, a: Tensor, b: Tensor) -> Tensor:
        if self.low_precision:
            return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
        return a.float() @ b.float()

    def logits(self, h: Tensor) -> Tensor:
        if self.step >= self.weight.shape[0]:
            z = self._mm(h, self.weight.t())
        else:
            h = h.float()
            z = h.new_empty(h.shape[0], self.weight.shape[0])
            for rows, w in self._slices():
                z[:, rows] = h @ w.t()
        if self.bias is not None:
            z += self.bias
        # LMHead.transform, in place on the chunk, keeping tanh for the chain rule (to_raw_grad)
        if self.scale != 1.0:
            z *= self.scale
        if self.softcap is not None:  # keep tanh for the chain rule of this chunk
            self._tanh = torch.tanh(z.div_(self.softcap))
            z = self._tanh * self.softcap
        return z

    def to_raw_grad(self, dz: Tensor) -> Tensor:
        """∂/∂(X·Wᵀ + b) from ∂/∂z of the chunk last passed to ``logits``."""
        if self.softcap is not None:
            assert self._tanh is not None  # set by that call to ``logits``
            dz = dz * (1.0 - self._tanh * self._tanh)
            self._tanh = None
        return dz * self.scale if self.scale != 1.0 else dz

    def accumulate(self, dz: Tensor, h: Tensor, rows: Tensor, d_hidden: Tensor, d_weight: Tensor) -> None:
        """d_hidden[rows] += dZ·W and d_weight += dZᵀ·X for one tile, in fp32 (the latter without a temporary
        [V, H] product where the GEMM can accumulate in place). Token-outer, each row is added once to zeros;
        vocabulary-sliced, once per slice."""
        if self.step >= self.weight.shape[0]:
            dh = self._mm(dz, self.weight)
        else:
            dh = dz.new_zeros(dz.shape[0], self.weight.shape[1])
            for v, w in self._slices():
                dh.addmm_(dz[:, v], w)
        d_hidden.index_add_(0, rows, dh)
        if self.low_precision:
            d_weight.add_(self._mm(dz.t(), h))
        else:
            d_weight.addmm_(dz.t(), h.float())


def hidden_to_logits(hidden: Tensor, head: LMHead) -> Tensor:
    """The head's logits in fp32, materialized (differentiable log-probs need them)."""
    z = _library.accumulate(hidden) @ _library.accumulate(head.weight).t()
    return head.transform(z if head.bias is None else z + _library.accumulate(head.bias))


def _needs_grad(hidden: Tensor, head: LMHead) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, head.weight, head.bias))


def _has_out_dtype() -> bool:
    try:
        torch.mm(
            torch.zeros(1, 1, dtype=torch.bfloat16, device="meta"),
            torch.zeros(1, 1, dtype=torch.bfloat16, device="meta"),
            out_dtype=torch.float32,
        )
        return True
    except (TypeError, RuntimeError):
        return False


def kernel_linear_token_logprobs(
    ops: _library.Ops,
    hidden: Tensor,
    head: LMHead,
    targets: Tensor,
    temperature: float,
    entropy: bool,
    parallel: Optional[distributed.Parallel] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Log-probs (and entropy) of ``linear_token_logprobs``. Without gradients (old/ref policy log-probs) the logits
    are alive one chunk of tokens at a time; differentiable log-probs materialize the fp32 logits (the loss itself
    never does). ``parallel.tp``: ``weight`` (and ``bias``) are this rank's vocabulary shard."""
    tp = None if parallel is None else parallel.tp
    needs_grad = _needs_grad(hidden, head)
    if needs_grad:
        if tp is None:
            z = hidden_to_logits(hidden, head)
            return kernel_token_logprobs(ops, z, targets, temperature, entropy)[:2]
        assert parallel is not None
        if parallel.reduce_hidden_grad:  # the hidden states feed every shard: their gradient is the sum
            hidden = distributed.copy_to_tensor_parallel(hidden, tp.group)
        z = hidden_to_logits(hidden, head)
        return distributed.vocab_parallel_logprobs(ops, z, targets, tp, temperature, entropy)[:2]
    n, hid, vocab = targets.numel(), hidden.shape[-1], head.weight.shape[0]
    h, y = hidden.reshape(n, hid), targets.reshape(n)
    gemm = _Gemm(head)
    inv_t = _library.params_tensor([1.0 / temperature], hidden.device)
    chunks = torch.arange(n, device=hidden.device).split(default_chunk_tokens(vocab, hidden.device))
    if tp is not None:
        lp, _, ent, _ = _vocab_parallel_stats(ops, gemm, h, y, torch.ones(n), chunks, inv_t, entropy, tp)
        return lp.view(targets.shape), ent.view(targets.shape) if entropy else None
    lp = torch.empty(n, device=hidden.device, dtype=torch.float32)
    ent = torch.empty(n if entropy else 0, device=hidden.device, dtype=torch.float32)
    for rows in chunks:
        lp_c, _, ent_c = ops.token_logprobs(gemm.logits(h[rows]), y[rows], None, inv_t, entropy)
        lp[rows] = lp_c
        if entropy:
            ent[rows] = ent_c
    return lp.view(targets.shape), ent.view(targets.shape) if entropy else None


class _PrecomputedGrads(torch.autograd.Function):
    """Attaches gradients computed in the forward to (hidden, weight, bias); backward scales them by the incoming
    gradient and hands them over (see ``_library.precomputed_gradients``: in place and without a copy when the
    backward frees the graph, scaled copies when it keeps it, so a retained graph can be backpropagated again)."""

    @staticmethod
    def forward(ctx, loss, grads, scale_, hidden, weight, bias):
        ctx.grads, ctx.scale_ = list(grads), scale_
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        return (None, None, None, *_library.precomputed_gradients(ctx, grad_loss, ctx.scale_, "linear_grpo_loss"))


def _sliced_gradients(
    head: LMHead,
    h: Tensor,
    y: Tensor,
    rows: Tensor,
    g_lp: Tensor,
    g_ent: Optional[Tensor],
    stats: Tensor,
    ent: Tensor,
    inv_t: Tensor,
    d_hidden: Tensor,
    d_bias: Optional[Tensor],
) -> Tensor:
    """The gradient pass vocabulary-slice-outer (see the module docstring): returns dW in the weight's dtype,
    adds into the fp32 ``d_hidden`` (and ``d_bias``); ``inv_t``: 1/τ as a 1-element fp32 tensor. With u = z/τ,
    p = exp(u − lse):
    ∂/∂u_j = g_ℓ·(δ_jy − p_j) − g_H·p_j·(log p_j + H)."""
    weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
    vocab, hid = weight.shape
    d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    step_v = max(1, _per_device(SLICE_BYTES, weight.device) // (4 * hid))
    for v0 in range(0, vocab, step_v):
        v1 = min(v0 + step_v, vocab)
        sl = _Gemm(dataclasses.replace(head, weight=weight[v0:v1], bias=None if bias is None else bias[v0:v1]))
        dw = torch.zeros(v1 - v0, hid, device=weight.device, dtype=torch.float32)
        for r in rows.split(max(1, _per_device(CHUNK_BYTES, weight.device) // (4 * (v1 - v0)))):
            # log p over the slice relative to the row max, (z/τ − M) − log Σ, as the kernels keep it: M + log Σ
            # would round at the logits' magnitude (an ulp of 1e4 is 1e-3) and shift every p of the row
            logp = sl.logits(h[r]).mul_(inv_t).sub_(stats[r, 0:1]).sub_(stats[r, 1:2])
            p = logp.exp()
            # two tile buffers in all: the coefficient overwrites log p, ∂/∂u overwrites p
            coef = g_lp[r, None] if g_ent is None else logp.add_(ent[r, None]).mul_(g_ent[r, None]).add_(g_lp[r, None])
            du = p.mul_(coef).neg_()
            hit = (y[r] >= v0) & (y[r] < v1)  # the target's own entry: + g_ℓ
            du[hit, y[r][hit] - v0] += g_lp[r][hit]
            dz = sl.to_raw_grad(du.mul_(inv_t))
            sl.accumulate(dz, h[r], r, d_hidden, dw)
            if d_bias is not None:
                d_bias[v0:v1] += dz.sum(0)
            del logp, p, du, dz, coef  # before the next tile is allocated
        d_weight[v0:v1] = dw.to(weight.dtype)
    return d_weight


def _vocab_parallel_stats(
    ops: _library.Ops,
    gemm: _Gemm,
    h: Tensor,
    y: Tensor,
    mask: Tensor,
    chunks: Sequence[Tensor],
    inv_t: Tensor,
    with_entropy: bool,
    shard: distributed.VocabShard,
    on_chunk: Optional[Callable[[Tensor, Tensor], None]] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ℓ, row statistics, H) of the global vocabulary from this rank's weight shard, chunk by chunk (``on_chunk``
    sees each chunk's token indices and logits), and the target ids for the gradient pass (−1 where the target is
    another rank's): one all_gather in all."""
    n = y.numel()
    read, owned, ids = shard.local_targets(y)
    parts = torch.zeros(n, distributed.NUM_PARTIALS, device=h.device, dtype=torch.float32)
    for rows in chunks:
        z = gemm.logits(h[rows])
        if on_chunk is not None:
            on_chunk(rows, z)
        part = distributed.vocab_partials(ops, z, read[rows], owned[rows], None, inv_t, with_entropy)
        parts.index_copy_(0, rows, part)
        del z, part
    lp, stats, ent = distributed.combine_vocab_stats(
        distributed.gather(parts, shard.group), mask
    )  # masked: never computed
    return lp, stats, ent, ids


def kernel_linear_grpo_loss(
    ops: _library.Ops,
    hidden: Tensor,
    head: LMHead,
    targets: Tensor,
    inputs: LossInputs,
    return_entropy: bool,
    chunk_tokens: Optional[int],
) -> LossOutput:
    cfg, mask = inputs.config, inputs.mask
    weight, bias = head.weight, head.bias
    n, hid, vocab = targets.numel(), hidden.shape[-1], weight.shape[0]
    h, y = hidden.reshape(n, hid), targets.reshape(n)
    needs_grad = _needs_grad(hidden, head)
    chunks = mask.reshape(-1).nonzero().squeeze(1).split(chunk_tokens or default_chunk_tokens(vocab, hidden.device))
    gemm = _Gemm(head)
    f32: dict[str, Any] = dict(device=hidden.device, dtype=torch.float32)
    d_hidden = torch.zeros(n, hid, **f32) if needs_grad else None
    sliced = needs_grad and vocab * hid * 4 > _per_device(DW_ACCUMULATOR_BYTES, hidden.device)
    d_weight = torch.zeros(vocab, hid, **f32) if needs_grad and not sliced else None  # sliced: per slice
    d_bias = torch.zeros(vocab, **f32) if needs_grad and bias is not None else None

    def accumulate(rows: Tensor, dz: Tensor) -> None:
        assert d_hidden is not None and d_weight is not None  # called only when needs_grad and not sliced
        dz = gemm.to_raw_grad(dz)
        gemm.accumulate(dz, h[rows].detach(), rows, d_hidden, d_weight)
        if d_bias is not None:
            d_bias.add_(dz.sum(0))

    parallel = inputs.parallel
    tp = None if parallel is None else parallel.tp
    # opt-in (config.effective_rank_sketch = k): the projections of each chunk's logits, taken before the fused op
    # overwrites them; under tensor parallel over the shard, folded once the global statistics are known
    k = cfg.effective_rank_sketch
    sketch = torch.zeros(n, 3 * k, **f32) if k else None
    shard_lse = torch.zeros(n, **f32) if k and tp is not None else None

    global_ids = y  # (under tensor parallel y becomes the shard's ids after the statistics pass)

    def project(rows: Tensor, z: Tensor) -> None:
        if sketch is not None:
            r, lse = gradient_rank.logit_rows(
                z, global_ids[rows], 1.0 / cfg.temperature, k, 0 if tp is None else tp.start
            )
            sketch.index_copy_(0, rows, r)
            if shard_lse is not None:
                shard_lse.index_copy_(0, rows, lse)

    if is_token_local(inputs) and not sliced and inputs.parallel is None:
        f = prepare(ops, targets, inputs, return_entropy, hidden.device)
        outputs = torch.zeros(len(P.TOKEN_OUTPUTS), n, **f32)
        loss = torch.zeros((), **f32)
        for rows in chunks:
            z = gemm.logits(h[rows].detach())
            project(rows, z)
            args = (y[rows], *f.op_args(rows))
            if needs_grad:
                loss_c, out = ops.grpo_loss_fused_inplace_(z, *args)  # z is now ∂loss/∂z
                accumulate(rows, z)
            else:
                loss_c, out, _ = ops.grpo_loss_fused(z, *args, False)
            loss = loss + loss_c
            outputs.index_copy_(1, rows, out)
            del z, out  # else the next chunk's logits are allocated while these are still alive
        result = finish(f, cfg, loss, outputs, sketch)
    else:
        with_entropy = return_entropy or cfg.needs_entropy
        # 1/τ as the ops take it, built once for every chunk; a tensor also because a Python float living across
        # the graph breaks below would be specialized by torch.compile (a recompile per temperature)
        inv_t = _library.params_tensor([1.0 / cfg.temperature], hidden.device)
        if tp is None:
            lp, ent, stats = torch.zeros(n, **f32), torch.zeros(n, **f32), torch.zeros(n, len(P.ROW_STATS), **f32)
            for rows in chunks:
                z = gemm.logits(h[rows].detach())
                project(rows, z)
                lp_c, st_c, ent_c = ops.token_logprobs(z, y[rows], None, inv_t, with_entropy)
                del z
                lp.index_copy_(0, rows, lp_c)
                stats.index_copy_(0, rows, st_c)
                if with_entropy:
                    ent.index_copy_(0, rows, ent_c)
        else:  # the vocabulary shard's partial statistics, combined over the group (MATH §7.1)
            lp, stats, ent, y = _vocab_parallel_stats(
                ops, gemm, h.detach(), y, mask, chunks, inv_t, with_entropy, tp, project
            )
            if sketch is not None and shard_lse is not None:
                sketch = gradient_rank.fold_shards(sketch, shard_lse, stats[:, 0] + stats[:, 1], tp.group)
        inputs = dataclasses.replace(
            inputs,
            logit_stats=stats[:, 2:].view(*targets.shape, len(P.ROW_STATS) - 2),
            logit_sketch=None if sketch is None else sketch.view(*targets.shape, 3 * k),
        )
        lp_leaf = lp.view(targets.shape).requires_grad_(needs_grad)
        ent_leaf = ent.view(targets.shape).requires_grad_(needs_grad and with_entropy) if with_entropy else None
        with torch.enable_grad():
            result = distributed.policy_loss(objective_loss, lp_leaf, ent_leaf, inputs)
        if needs_grad:
            leaves = [x for x in (lp_leaf, ent_leaf) if x is not None and x.requires_grad]
            leaf_grads = torch.autograd.grad(result.loss, leaves, allow_unused=True)
            g_lp = torch.zeros(n, **f32) if leaf_grads[0] is None else leaf_grads[0].reshape(n)
            g_ent = leaf_grads[1].reshape(n) if len(leaf_grads) > 1 and leaf_grads[1] is not None else None
            if sliced:
                assert d_hidden is not None  # allocated when needs_grad
                d_weight = _sliced_gradients(
                    head,
                    h.detach(),
                    y,
                    torch.cat(chunks) if chunks else y.new_zeros(0),
                    g_lp,
                    g_ent,
                    stats,
                    ent,
                    inv_t,
                    d_hidden,
                    d_bias,
                )
            for rows in () if sliced else chunks:
                dz = ops.token_logprobs_backward(
                    g_lp[rows],
                    None if g_ent is None else g_ent[rows],
                    gemm.logits(h[rows].detach()),
                    y[rows],
                    None,
                    stats[rows],
                    ent[rows],
                    inv_t,
                )
                accumulate(rows, dz.float())
                del dz
        result.loss = result.loss.detach()

    if needs_grad:
        # allocated when needs_grad (d_weight: by the sliced pass when sliced), d_bias when there is a bias
        assert d_hidden is not None and d_weight is not None
        if tp is not None and parallel is not None and parallel.reduce_hidden_grad:
            dist.all_reduce(d_hidden, group=tp.group)  # Σ over the vocabulary shards; fp32, before the cast
        grads = (
            d_hidden.view(hidden.shape).to(hidden.dtype),
            d_weight.to(weight.dtype),  # no copy when sliced
            None if d_bias is None or bias is None else d_bias.to(bias.dtype),
        )
        result.loss = _PrecomputedGrads.apply(result.loss, grads, ops.scale_grad_, hidden, weight, bias)
    return result


# ----------------------------------------------------------------------------------------- public function
def linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    return_entropy: bool = False,
    chunk_tokens: Optional[int] = None,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    tp_group: Optional[distributed.ProcessGroup] = None,
    vocab_start: Optional[int] = None,
    cp_group: Optional[distributed.ProcessGroup] = None,
    reduce_hidden_grad: bool = True,
    config: LossConfig = LossConfig(),
    backend: str = "auto",
    check_values: Optional[bool] = None,
    **options: Unpack[LossOptions],
) -> LossOutput:
    """The loss of MATH §2 from ``hidden`` [B, T, H] (or [N, H]) and the LM-head ``weight`` [V, H] (+ ``bias``
    [V]); gradients flow to hidden, weight and bias. Same keywords as :func:`policy_loss`.

    The kernel backends never materialize the [N, V] logits: unmasked tokens are processed ``chunk_tokens`` at
    a time (default: 256 MiB of fp32 logits per chunk on CUDA, 48 MiB on CPU), and the gradients are computed
    in the forward.

    ``logit_scale`` and ``logit_softcap`` c apply z = c·tanh(scale·(hidden @ weightᵀ + bias)/c) (Cohere's
    logit_scale, Gemma's final_logit_softcapping) before the temperature. Under autocast the GEMMs take the
    autocast dtype (as ``F.linear`` would); the logits and everything after them stay fp32.

    ``check_values`` as in :func:`grpo_loss` (hidden and weight are never scanned).

    ``tp_group`` (kernel backends): ``weight`` [V_r, H] (and ``bias`` [V_r]) are this rank's vocabulary shard,
    ``hidden`` the same on every rank, ``targets`` global ids (MATH §7.1). The weight and bias gradients are the
    shard's; the hidden gradient is the sum over the shards: all-reduced here (``reduce_hidden_grad=True``), or
    left as this rank's partial sum for a caller that reduces it itself (``False``: e.g. Megatron's sequence
    parallel reduce-scatter). One all_gather of [N, 8] fp32 row statistics (+ the hidden-gradient all-reduce),
    and the two-pass schedule (statistics, then the gradient: 4 GEMMs). ``cp_group`` as in :func:`grpo_loss`.

    PyTorch equivalent: ``grpo_loss(hidden @ weight.T + bias, targets, ...)``.
    """
    check_options("linear_grpo_loss", options)
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
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
            cp_group=cp_group,
            cu_seqlens=options.get("cu_seqlens"),
            reduce_hidden_grad=reduce_hidden_grad,
        )
        inputs = resolve(targets.shape, hidden.device, checks, advantages, mask, config, parallel, options)
        checks.token_ids("targets", targets, distributed.checked_vocab(parallel, vocab))
        checks.run()
        impl = backends.select(backend, hidden.device)
        if parallel is not None:
            backends.require_kernels(impl, "tp_group" if tp_group is not None else "cp_group")
        out = impl.linear_grpo_loss(hidden, head, targets, inputs, return_entropy, chunk_tokens)
        return with_reward_metrics(out, inputs)
