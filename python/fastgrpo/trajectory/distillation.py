"""Forward KL to a teacher's top-k distribution (on-policy distillation; verl's ``forward_kl_topk``), on logits.

The teacher gives, per token, its k most likely ids and their log-probs (ids, log q) [.., k]. The student's
log-probs at those ids need the row's log-sum-exp, which the log-prob kernel computes while streaming the row:
log p_j = z_{id_j}/τ − lse with lse = z_{id_1}/τ − ℓ(id_1), so one kernel pass (its log-prob at the first id) and
an O(N·k) gather give every student log-prob; nothing of size [N, V] is built besides the logits' gradient. The
per-token loss is Σ_j q_j·(log q_j − log p_j), clamped at 0 as verl does (a partial top-k mass can make it
negative). The reverse-KL estimators of the sampled token (``LossConfig.teacher_*``) are inside the fused loss.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import _checks
from ..inputs import LMHead, autocast_operands
from .token_logprobs import linear_token_logprobs, token_logprobs


def _check_topk(leading: torch.Size, ids: Tensor, logprobs: Tensor, vocab: int, check_values: Optional[bool]) -> None:
    """Types and shapes; with value checks on, every id in [0, vocab) (one host sync)."""
    _checks.tensor("teacher_topk_ids", ids)
    _checks.integer("teacher_topk_ids", ids)
    _checks.tensor("teacher_topk_logprobs", logprobs)
    _checks.floating("teacher_topk_logprobs", logprobs)
    if ids.shape[:-1] != leading or ids.dim() != len(leading) + 1:
        raise ValueError(
            f"teacher_topk_ids must be [..., k] with the token dims {list(leading)}, got {list(ids.shape)}"
        )
    _checks.shape("teacher_topk_logprobs", logprobs, ids.shape, "one per teacher id")
    if ids.shape[-1] == 0:
        raise ValueError("teacher_topk_ids must hold at least one id per token (k >= 1)")
    checks = _checks.ValueChecks(check_values, logprobs)
    checks.token_ids("teacher_topk_ids", ids, vocab)
    checks.run()


def _forward_kl(z: Tensor, lp_first: Tensor, teacher: Tensor, clamp: Optional[float]) -> Tensor:
    """max(0, Σ_j q_j(log q_j − log p_j)) from the student's scaled logits z [.., k] at the teacher's ids and its
    log-prob at the first of them (log p_j = z_j − lse, lse = z_1 − ℓ_1)."""
    student = z - (z[..., :1] - lp_first.unsqueeze(-1))
    teacher = teacher.float()
    if clamp is not None:
        student, teacher = student.clamp_min(clamp), teacher.clamp_min(clamp)
    q = teacher.exp()  # an id the teacher gives q = 0 (log q = −inf) adds 0, not 0·inf
    return torch.where(q > 0, q * (teacher - student), 0.0).sum(-1).clamp_min(0.0)


def forward_kl_topk(
    logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    log_prob_min_clamp: Optional[float] = None,
    backend: str = "auto",
    check_values: Optional[bool] = None,
) -> Tensor:
    """Per-token forward KL(q_topk ‖ p) [B, T] (fp32, differentiable w.r.t. ``logits`` [B, T, V] / τ) to the
    teacher's top-k distribution ``teacher_topk_ids`` / ``teacher_topk_logprobs`` [B, T, k], clamped at 0:
    max(0, Σ_j q_j·(log q_j − log p_{id_j})). ``log_prob_min_clamp`` (verl's option) clamps both log-probs from
    below first. Aggregate it with the mask as the policy loss is (verl: ``agg_loss`` with ``loss_agg_mode``)
    and add it with its coefficient.

    The gradient of a token's row is c·[(Σ_j q_j)·p_v − Σ_j q_j·1[v = id_j]]/τ (c = ∂L/∂KL_t): the log-prob
    kernel's backward for the p_v part, a scatter of the k entries for the rest (autograd sums the two
    gradients, one more [N, V] buffer for that moment).

    PyTorch equivalent::

        logp = torch.log_softmax(logits / temperature, -1).gather(-1, teacher_topk_ids)
        kl = (teacher_topk_logprobs.exp() * (teacher_topk_logprobs - logp)).sum(-1).clamp_min(0)
    """
    _checks.tensor("logits", logits)
    _check_topk(logits.shape[:-1], teacher_topk_ids, teacher_topk_logprobs, logits.shape[-1], check_values)
    lp_first = token_logprobs(  # checks the logits and (with check_values) the ids
        logits, teacher_topk_ids[..., 0], temperature=temperature, backend=backend, check_values=check_values
    )
    z = logits.gather(-1, teacher_topk_ids.long()).float() / temperature
    return _forward_kl(z, lp_first, teacher_topk_logprobs, log_prob_min_clamp)


def linear_forward_kl_topk(
    hidden: Tensor,
    weight: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    chunk_tokens: int = 1024,
    log_prob_min_clamp: Optional[float] = None,
    backend: str = "auto",
    check_values: Optional[bool] = None,
) -> Tensor:
    """:func:`forward_kl_topk` of ``softcap(logit_scale · (hidden @ weight.T + bias))`` without the logits: the
    log-sum-exp from the linear log-prob path (chunked, never [N, V]), the k logits of each token as k dot products
    with the teacher ids' weight rows, ``chunk_tokens`` tokens at a time and recomputed in the backward
    (checkpointed), so the gathered rows take k·H per token of one chunk. Differentiable w.r.t. hidden, weight
    and bias."""
    _checks.tensor("hidden", hidden)
    _checks.tensor("weight", weight)
    _check_topk(hidden.shape[:-1], teacher_topk_ids, teacher_topk_logprobs, weight.shape[0], check_values)
    lp_first = linear_token_logprobs(
        hidden,
        weight,
        teacher_topk_ids[..., 0],
        bias=bias,
        temperature=temperature,
        logit_scale=logit_scale,
        logit_softcap=logit_softcap,
        backend=backend,
        check_values=check_values,
    )
    ids = teacher_topk_ids.long().reshape(-1, teacher_topk_ids.shape[-1])
    rows = hidden.reshape(-1, hidden.shape[-1])
    head = LMHead(weight, bias, logit_scale, logit_softcap)  # validated by linear_token_logprobs above

    def logits_at(h: Tensor, chunk_ids: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        # the operands the log-prob path's GEMMs take (the autocast dtype under autocast), products in fp32
        with autocast_operands(h, w, b) as (h, w, b):
            z = torch.einsum("nh,nkh->nk", h.float(), w[chunk_ids].float())
            if b is not None:
                z = z + b[chunk_ids].float()
        return head.transform(z) / temperature

    chunks = [
        checkpoint(logits_at, rows[i : i + chunk_tokens], ids[i : i + chunk_tokens], weight, bias, use_reentrant=False)
        for i in range(0, rows.shape[0], max(1, chunk_tokens))
    ]
    z = torch.cat(chunks) if chunks else rows.new_zeros((0, ids.shape[-1]), dtype=torch.float32)
    return _forward_kl(z.reshape(teacher_topk_ids.shape), lp_first, teacher_topk_logprobs, log_prob_min_clamp)
