"""``python -m fastgrpo check``: every compiled backend against the fp32 reference over a grid of ops, loss variants,
dtypes, vocabularies, layouts and flags, each output judged against PyTorch's own error in the same dtype.

For each case the inputs are drawn once, on the device, from a seeded generator. The reference runs once on fp32
copies of them (``backend="reference"``), eager PyTorch once in the case's dtype (``log_softmax`` in that dtype, then
the reference's loss on those log-probs: what a trainer without fastgrpo computes), and every compiled backend that
``backends.available`` lists for the device (``triton`` and ``cuda`` on CUDA, ``cpu`` on CPU; Triton's interpreter,
``TRITON_INTERPRET=1``, runs on CPU tensors when named) on the inputs themselves.

Tolerance (tests/test_grpo_loss.py's rule, made to hold at 4096 tokens). For every output x (the loss, each gradient,
log-probs, entropy, the gradient norms, every metric)::

    max|x_backend − x_ref| ≤ K·max(max|x_torch − x_ref|, c_x) + r·s,    K = 2

- x_torch: eager PyTorch in the case's dtype. Its gradients backpropagate the reference's coefficients ∂L/∂ℓ, ∂L/∂H
  through its softmax in that dtype: the error of that softmax, not of the clip decisions its rounded log-probs flip
  (in bf16 at 4096 tokens many do, by a whole coefficient, which would let any gradient pass).
- c_x: the conditioning of the objective, which fp32 log-probs alone cannot beat (``settle``): how much x moves when
  the log-probs and entropies move by 16 ulps (VESPO's weight of a product of 512 ratios moves by ~1e-4).
  ``settle`` also redraws the sampled log-probs of any token within those 16 ulps of a kink (a clip bound, a mask
  threshold, a top-k or quantile boundary), where a backend and the reference could land on different sides.
- r = max(3e-5, eps of x's dtype): the fp32 rounding of a log-sum-exp over the vocabulary, or the half-ulp every
  bf16/fp16 output carries; s the scale that rounding is relative to: max(1, max|x_ref|) for O(1) values (loss,
  log-probs, entropy, metrics: a loss that cancels to ≈ 0 keeps an absolute floor); max|x_ref| for a gradient, whose
  entries shrink with the number of tokens (an absolute floor would pass anything at 4096 tokens), and for the logit
  gradient at least the largest coefficients (a row c·(onehot − p) + c'·∂H/∂z rounds relative to c and c', and
  cancels to ≈ 0 where p → onehot, exactly 0 at V = 1).

In fp32 torch's own error is ≈ 0: the floor and the conditioning bound. The metric ``grad_active_fraction`` counts
exact zeros: one token of slack. A NaN or inf where the reference is finite fails, as do a missing output and an
exception.

Grid (``grid(name)``; every case runs every backend):

- ``grpo_loss`` variants: every entry of ``LOSS_VARIANTS`` (every policy loss, token and sequence ratios, the
  KL estimators, entropy bonus and mask, rollout corrections, distillation, the trainers' presets) and of
  ``ADVANTAGE_CONFIGS`` (raw ``rewards=`` and ``group_size=``: advantages inside the loss call), × fp32, bf16, fp16,
  contiguous [B, T, V], at the grid's first vocabulary;
- the other vocabularies × the three dtypes for ``FUSED`` (token-local: one fused kernel) and ``TWO_PHASE``
  (sequence ratios: the log-prob op, the objective, the log-prob op's backward);
- at every vocabulary in bf16 (what trainers run): the view ``logits[:, :-1]`` (as trainers shift) and packed
  [N, V] with ``cu_seqlens`` (an empty sequence among them) for both; ``inplace_grad=True`` (contiguous and
  packed) for ``FUSED``;
- ``torch.compile(fullgraph=True)`` of the loss call (inductor on CUDA, aot_eager on CPU, as the tests), first
  vocabulary, bf16, ``FUSED`` and ``TWO_PHASE``;
- ``token_logprobs`` forward and backward without and with the entropy (τ = 0.7), every vocabulary × dtype;
- ``linear_grpo_loss`` (hidden @ weight + bias, the [N, V] logits never materialized), every vocabulary × dtype,
  ``FUSED`` and ``TWO_PHASE``;
- ``advantages``, every ``ADVANTAGE_CONFIGS`` entry (fp32 rewards).

``small``: 4 sequences × 2 tokens, V = 1000 (the variant sweep), 17 and 1 (awkward tails, a one-token vocabulary),
H = 16: 224 cases, ~7 s with the C++ backend on 2 CPU cores, ~35 s with Triton under its interpreter as well.
``full``: 8 sequences × 512 tokens = 4096 tokens, the vocabularies of Qwen2.5 (151936, the variant sweep), Llama 3
(128256) and Gemma 2/3 (256000), H = 4096 (Llama 3 8B's). Every combination would be thousands of cases at a second
or more each; each axis is instead swept once around a base case: the same 224 cases, 448 backend runs with Triton
and CUDA. Budget on an H100 (an estimate: not yet measured): a logit case moves ~200 GB (the drawing of its inputs,
the fp32 reference forward and backward, eager torch, the backends, the comparisons in fp32), ~0.1 s at 2–3 TB/s,
plus ~0.2 s of host work, so ~1 min for the 200 logit cases; the 18 linear cases ~0.5–2 s each (fp32 matmuls without
TF32: ~35 TFLOP for the reference at V = 256000); a first run also JIT-compiles ~100 Triton specializations (variant
codes × dtype, ~1 s each) and four inductor graphs (~20 s each): ~3–6 minutes in all, less once the Triton cache is
warm. Memory: the fp32 reference holds ~14 [N, V] fp32 tensors at its peak (measured on CPU), ~60 GB at V = 256000,
which with the case's other buffers fits an 80 GB H100 with little to spare.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence, cast, get_args

import torch
from torch import Tensor

from . import backends, presets, reference
from .config import AdvantageConfig, KLEstimator, LossConfig, LossOutput
from .reward.advantages import advantages
from .trajectory.grpo_loss import grpo_loss, policy_loss
from .trajectory.linear_grpo_loss import linear_grpo_loss
from .trajectory.token_logprobs import token_logprobs

K = 2.0  # times PyTorch's own error in the same dtype
ATOL = 3e-5  # fp32 rounding of an online log-sum-exp over ~1e5 logits against log_softmax's
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TAU = 0.7  # the temperature of the token_logprobs cases (a division every backend must fold in)
REFERENCE = "reference"

# --------------------------------------------------------------------------------------------------- variants
# One config per policy loss with the terms that touch the gradient switched on, the KL estimators, the masks and
# rollout weights, distillation, and the trainers' presets (MATH §5). Token-local configs run the fused kernel,
# the others (sequence ratios, entropy quantile, off-policy and rejection masks) the two-phase path.
LOSS_VARIANTS: dict[str, LossConfig] = {
    "grpo seq-mean k3": LossConfig(aggregation="seq_mean_token_mean", beta=0.05),
    "dapo entropy bonus": LossConfig(epsilon_high=0.28, entropy_coef=0.01),
    "dr_grpo k3+": LossConfig(aggregation="token_sum_norm", beta=0.1, kl_estimator="k3+"),
    "dual_clip k2": LossConfig(dual_clip=3.0, log_ratio_clamp=20.0, beta=0.1, kl_estimator="k2"),
    "cispo entropy bonus": LossConfig(policy_loss="cispo", cispo_high=5.0, entropy_coef=0.02),
    "reinforce τ=0.7": LossConfig(policy_loss="reinforce", aggregation="seq_mean_token_sum", temperature=0.7),
    **{f"kl {e} clamped": LossConfig(beta=0.1, kl_estimator=e, kl_input_clamp=1.0) for e in get_args(KLEstimator)},
    "kl importance grad": LossConfig(
        beta=0.1, kl_estimator="k3", kl_output_clamp=10.0, kl_importance_gradient=True, kl_importance_cap=1.1
    ),
    "dppo_tv": presets.verl(loss_mode="dppo_tv", clip_ratio=0.05),
    "dppo_kl": presets.verl(loss_mode="dppo_kl", clip_ratio=0.02),
    "dro k2": presets.verl(loss_mode="dro", dro_beta=0.5, use_kl_loss=True, kl_loss_type="k2"),
    "clip_cov": presets.verl(loss_mode="clip_cov", clip_cov_lb=-1.0, clip_cov_ratio=0.3),
    "kl_cov": presets.verl(loss_mode="kl_cov", kl_cov_ratio=0.3),
    "distill adv k1": LossConfig(teacher_coef=0.5, epsilon_high=0.28),
    "distill adv k3 current": LossConfig(
        policy_loss="reinforce", teacher_coef=0.3, teacher_estimator="k3", teacher_reward_at="current"
    ),
    "distill loss k2": LossConfig(
        teacher_coef=0.4, teacher_form="loss", teacher_estimator="k2", teacher_input_clamp=0.1, beta=0.05
    ),
    "token_truncate IS": presets.openrlhf(
        is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.8, 1.2)
    ),
    "token_tv_mask IS": presets.openrlhf(
        is_correction_level="token",
        is_correction_mode="mask",
        is_correction_gating="tv",
        is_correction_threshold=(0.0, 0.05),
    ),
    "sequence_mask IS": presets.trl(use_vllm=True, vllm_importance_sampling_clip_min=0.5),
    "rollout rejection": LossConfig(
        rollout_correction="token_truncate",
        rollout_max=2.0,
        rollout_rejection=(("token_k1", 0.5, 2.0), ("seq_mean_k3", None, 0.05)),
    ),
    "trl grpo": presets.trl(loss_type="grpo", beta=0.04),
    "trl dapo": presets.trl(loss_type="dapo", beta=0.04, entropy_coef=0.01),
    "trl dr_grpo": presets.trl(loss_type="dr_grpo", beta=0.04),
    "trl cispo": presets.trl(loss_type="cispo", epsilon_high=5.0),
    "trl sapo": presets.trl(loss_type="sapo"),
    "trl entropy mask": presets.trl(loss_type="bnpo", entropy_coef=0.01, top_entropy_quantile=0.2),
    "trl off-policy mask": presets.trl(off_policy_mask_threshold=0.05),
    "trl gspo": presets.trl(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
    "trl luspo": presets.trl(loss_type="luspo", importance_sampling_level="sequence"),
    "trl vespo": presets.trl(loss_type="vespo"),
    "gspo k3 ratio-weighted": LossConfig(
        ratio_level="sequence",
        aggregation="seq_mean_token_mean",
        epsilon_low=3e-4,
        epsilon_high=4e-4,
        beta=0.02,
        kl_ratio_weighted=True,
    ),
    "gmpo k1": LossConfig(policy_loss="gmpo", beta=0.05, kl_estimator="k1"),
    "sapo entropy mask": LossConfig(policy_loss="sapo", aggregation="seq_mean_token_mean", top_entropy_quantile=0.5),
    "verl vanilla k3+": presets.verl(use_kl_loss=True, kl_loss_type="k3+"),
    "verl gspo-token": presets.verl(loss_mode="gspo", use_kl_loss=True),
    "verl geo_mean (gmpo)": presets.verl(loss_mode="geo_mean", clip_ratio=0.4),
    "verl gpg": presets.verl(loss_mode="gpg"),
    "openrlhf k2 unbiased": presets.openrlhf(
        use_kl_loss=True, init_kl_coef=0.1, kl_estimator="k2", unbiased_gradient=True
    ),
}
FUSED = "trl dapo"  # token-local, KL and entropy bonus: the fused kernel, with the most per-token terms
TWO_PHASE = "gspo k3 ratio-weighted"  # sequence ratios: the two-phase path

# How raw rewards become advantages: inside the loss call (with REWARDS_LOSS) and by the advantages op.
ADVANTAGE_CONFIGS: dict[str, AdvantageConfig] = {
    "grpo": AdvantageConfig(),
    "grpo scale=batch": AdvantageConfig(scale="batch"),
    "grpo scale=none": AdvantageConfig(scale="none"),
    "grpo singleton=raw": AdvantageConfig(singleton="raw", eps=1e-6),
    "rloo": AdvantageConfig(estimator="rloo"),
    "reinforce_baseline": AdvantageConfig(estimator="reinforce_baseline"),
}
REWARDS_LOSS = presets.trl(loss_type="bnpo", beta=0.1)
TOKEN_LOGPROBS_VARIANTS = {"logprobs": False, "logprobs+entropy": True}  # name → entropy


# ------------------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Sizes:
    """A grid's shapes: padded [sequences, tokens] (packed: the same sequences, of decreasing lengths)."""

    sequences: int
    tokens: int
    vocabs: tuple[int, ...]  # the first one carries the variant sweep
    hidden: int
    group_size: int


GRIDS = {
    "small": Sizes(sequences=4, tokens=2, vocabs=(1000, 17, 1), hidden=16, group_size=2),
    "full": Sizes(sequences=8, tokens=512, vocabs=(151936, 128256, 256000), hidden=4096, group_size=4),
}
LAYOUTS = ("contiguous", "view", "packed")


@dataclass(frozen=True)
class Case:
    """One comparison: an op on one set of inputs. ``variant`` is a key of LOSS_VARIANTS (grpo_loss,
    linear_grpo_loss), of ADVANTAGE_CONFIGS (advantages; grpo_loss with ``rewards``) or of TOKEN_LOGPROBS_VARIANTS."""

    op: str
    variant: str
    dtype: torch.dtype = torch.float32
    vocab: int = 0
    layout: str = "contiguous"
    rewards: bool = False  # raw rewards + group_size instead of advantages
    inplace: bool = False
    compiled: bool = False

    def flags(self, sizes: Sizes) -> str:
        parts = [self.layout]
        parts += [f"rewards G={sizes.group_size}"] if self.rewards else []
        parts += ["inplace"] if self.inplace else []
        parts += ["compile"] if self.compiled else []
        return "+".join(parts) if self.vocab else "-"  # the advantages op reads no logits

    @property
    def config(self) -> LossConfig:
        if self.rewards:
            return dataclasses.replace(REWARDS_LOSS, advantage=ADVANTAGE_CONFIGS[self.variant])
        return LOSS_VARIANTS[self.variant]


def grid(name: str) -> list[Case]:
    """The cases of grid ``name`` (module docstring: each axis swept once around a base case)."""
    vocabs = GRIDS[name].vocabs
    first, bf16 = vocabs[0], torch.bfloat16
    loss = [Case("grpo_loss", v, d, first) for v in LOSS_VARIANTS for d in DTYPES]
    loss += [Case("grpo_loss", a, d, first, rewards=True) for a in ADVANTAGE_CONFIGS for d in DTYPES]
    loss += [Case("grpo_loss", v, d, vocab) for vocab in vocabs[1:] for d in DTYPES for v in (FUSED, TWO_PHASE)]
    loss += [
        Case("grpo_loss", v, bf16, vocab, layout)
        for vocab in vocabs
        for layout in ("view", "packed")
        for v in (FUSED, TWO_PHASE)
    ]
    loss += [
        Case("grpo_loss", FUSED, bf16, vocab, layout, inplace=True)
        for vocab in vocabs
        for layout in ("contiguous", "packed")
    ]
    loss += [Case("grpo_loss", v, bf16, first, compiled=True) for v in (FUSED, TWO_PHASE)]
    logprobs = [
        Case("token_logprobs", v, d, vocab) for vocab in vocabs for d in DTYPES for v in TOKEN_LOGPROBS_VARIANTS
    ]
    linear = [Case("linear_grpo_loss", v, d, vocab) for vocab in vocabs for d in DTYPES for v in (FUSED, TWO_PHASE)]
    return loss + logprobs + linear + [Case("advantages", a) for a in ADVANTAGE_CONFIGS]


# ----------------------------------------------------------------------------------------------------- inputs
Results = dict[str, Tensor]  # output name → value; gradients are named "∂<leaf>"


@dataclass
class Batch:
    """One case's inputs on the device: the differentiable tensors in the case's dtype, the rest fp32."""

    leaves: dict[str, Tensor]  # what the gradients are taken of: logits, or hidden, weight and bias
    targets: Tensor  # the token ids; the advantages op's rewards
    keywords: dict[str, Any]  # mask, advantages or rewards, old/ref/sampling/teacher log-probs, cu_seqlens
    unmasked: int
    # [2, *tokens]: ∂L/∂ℓ and ∂L/∂H per token, the reference objective's at the fp32 reference log-probs
    # (token_logprobs: the weights of the backpropagated sum); None for the advantages op
    coefficients: Optional[Tensor] = None
    sensitivity: dict[str, float] = dataclasses.field(default_factory=dict)  # see settle()


def read(case: Case, logits: Tensor) -> Tensor:
    """The logits a call reads from its leaf: the trainers' shifted view ``logits[:, :-1]``, or the leaf."""
    return logits[:, :-1] if case.layout == "view" else logits


def _packed_lengths(sizes: Sizes) -> list[int]:
    """Sequences of decreasing length, the third one empty (a segment the kernels must skip)."""
    lengths = [sizes.tokens - (i * sizes.tokens) // sizes.sequences for i in range(sizes.sequences)]
    lengths[2] = 0
    return lengths


def _sequence_inputs(case: Case, sizes: Sizes, g: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Per sequence: advantages, or raw rewards of groups of ``group_size`` with a first group all equal (std 0)."""
    if not case.rewards:
        return dict(advantages=torch.randn(sizes.sequences, generator=g, device=device))
    rewards = (torch.rand(sizes.sequences, generator=g, device=device) > 0.5).float()
    rewards[: sizes.group_size] = 1.0
    return dict(rewards=rewards, group_size=sizes.group_size)


def loss_batch(case: Case, sizes: Sizes, device: torch.device) -> Batch:
    """Logits at the scale of a trained model's (3·N(0, 1): peaked softmaxes), a partly and a fully masked sequence
    (padding ids -100), and old/ref/rollout/teacher log-probs within ~0.2 of the policy's."""
    g = torch.Generator(device=device).manual_seed(0)
    keywords = _sequence_inputs(case, sizes, g, device)
    if case.layout == "packed":
        lengths = _packed_lengths(sizes)
        cu = torch.tensor([0, *lengths], device=device).cumsum(0)
        shape: tuple[int, ...] = (int(cu[-1]),)
        mask = torch.ones(shape, device=device)
        mask[int(cu[1]) + lengths[1] // 2 : int(cu[2])] = 0
        keywords["cu_seqlens"] = cu
    else:
        shape = (sizes.sequences, sizes.tokens)
        mask = torch.ones(shape, device=device)
        mask[1, sizes.tokens // 2 :] = 0
        mask[-1] = 0
    targets = torch.randint(0, case.vocab, shape, generator=g, device=device)
    targets[mask == 0] = -100  # padding ids: never read
    if case.op == "linear_grpo_loss":
        h = sizes.hidden
        drawn = dict(
            hidden=torch.randn(*shape, h, generator=g, device=device),
            weight=torch.randn(case.vocab, h, generator=g, device=device) * (2 / h**0.5),  # logits ~ 2·N(0, 1)
            bias=0.1 * torch.randn(case.vocab, generator=g, device=device),
        )
    else:
        padded = (sizes.sequences, sizes.tokens + 1) if case.layout == "view" else shape
        drawn = dict(logits=3 * torch.randn(*padded, case.vocab, generator=g, device=device))
    leaves = {name: x.to(case.dtype) for name, x in drawn.items()}
    del drawn  # at full size an fp32 copy of the logits is GBs
    exact = {name: x.float() for name, x in leaves.items()}  # the values every run sees
    # the log-probs and entropies the loss will see (at the config's temperature), which the sampled ones surround
    tau, ids = case.config.temperature, targets.clamp(min=0)
    if case.op == "linear_grpo_loss":
        lp, ent = reference.linear_token_logprobs(exact["hidden"], exact["weight"], ids, exact["bias"], tau, True)
    else:
        lp, ent = reference.token_logprobs(read(case, exact["logits"]), ids, tau, entropy=True)
    del exact
    for name in NOISY_LOGPROBS:
        keywords[name] = lp + 0.2 * torch.randn(shape, generator=g, device=device)
    keywords["mask"] = mask
    coefficients, sensitivity = settle(case.config, lp, cast(Tensor, ent), keywords, g)  # asked for: not None
    return Batch(leaves, targets, keywords, int(mask.sum()), coefficients, sensitivity)


NOISY_LOGPROBS = ("old_logprobs", "ref_logprobs", "sampling_logprobs", "teacher_logprobs")
# A backend's fp32 log-prob (a log-sum-exp over V) and the fp32 reference's differ by a few ulps of |ℓ| (~2e-5 at
# |ℓ| ≈ 24, V = 152k, with torch's CPU log_softmax): the perturbation below is 16 ulps, a margin over that.
PERTURBATION_ULPS = 16
JUMP = 0.1  # a change of ∂L/∂ℓ above this fraction of its largest value is a kink crossed, not a slope


def _objective(cfg: LossConfig, lp: Tensor, ent: Tensor, keywords: dict[str, Any]) -> tuple[LossOutput, Tensor]:
    """The reference objective on given log-probs and entropies; its coefficients [∂L/∂ℓ, ∂L/∂H] per token."""
    lp, ent = lp.detach().requires_grad_(), ent.detach().requires_grad_()
    out = policy_loss(
        lp, entropy=ent, config=cfg, backend=REFERENCE, generator=_draws(cfg), check_values=False, **keywords
    )
    grads = torch.autograd.grad(out.loss, (lp, ent), allow_unused=True)
    return out, torch.stack([g if g is not None else torch.zeros_like(lp) for g in grads])


def settle(
    cfg: LossConfig, lp: Tensor, ent: Tensor, keywords: dict[str, Any], g: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    """Makes the drawn inputs robust to fp32 rounding of the log-probs; returns the objective's coefficients
    [∂L/∂ℓ, ∂L/∂H] and how much the outputs still move.

    The objective is evaluated with the log-probs and entropies moved by ±``PERTURBATION_ULPS`` ulps (random signs
    per token). A token whose coefficient jumps sits on a kink (a clip bound, a mask threshold, a top-k or quantile
    boundary): a backend landing on its other side than the reference would fail by the whole coefficient, so its
    sampled log-probs are redrawn (up to three times). What remains is the conditioning of the objective, e.g.
    VESPO's weight of a product of 512 ratios: half each output's change between the two perturbations (the loss,
    every metric; for the gradients, the relative change of the coefficients), which the bound admits as fp32's own
    error.
    """
    eps = torch.finfo(torch.float32).eps * PERTURBATION_ULPS
    for attempt in range(4):
        signs = (torch.randint(0, 2, (2, *lp.shape), generator=g, device=lp.device) * 2 - 1).float()
        steps = signs * eps * torch.stack([lp.abs().max(), ent.abs().max()]).clamp(min=1).view(2, *[1] * lp.dim())
        (up, c_up), (down, c_down) = (
            _objective(cfg, lp + sign * steps[0], ent + sign * steps[1], keywords) for sign in (1, -1)
        )
        c = (c_up + c_down) / 2  # the coefficients at the drawn log-probs, once no kink lies in between
        largest = c.abs().flatten(1).amax(1)  # of each kind
        jumps = ((c_up - c_down).abs() > JUMP * largest.view(2, *[1] * lp.dim())).any(0)
        if not bool(jumps.any()) or attempt == 3:
            break
        for name in NOISY_LOGPROBS:
            redrawn = lp + 0.2 * torch.randn(lp.shape, generator=g, device=lp.device)
            keywords[name] = torch.where(jumps, redrawn, keywords[name])
    named = [{"loss": out.loss, **{f"metrics/{key}": v for key, v in out.metrics.items()}} for out in (up, down)]
    sensitivity = {name: float((named[0][name] - named[1][name]).detach().abs()) / 2 for name in named[0]}
    change = float((c_up - c_down).abs().flatten(1).amax(1).sum()) / 2
    sensitivity["∂"] = change / float(largest.sum()) if float(largest.sum()) > 0 else 0.0
    return c, sensitivity


def logprobs_batch(case: Case, sizes: Sizes, device: torch.device) -> Batch:
    """Logits, every id in range (the op takes no mask; both ends of the vocabulary among them), and the weights
    of the log-probs and entropies in the scalar that is backpropagated."""
    g = torch.Generator(device=device).manual_seed(0)
    shape = (sizes.sequences, sizes.tokens)
    logits = (4 * torch.randn(*shape, case.vocab, generator=g, device=device)).to(case.dtype)
    targets = torch.randint(0, case.vocab, shape, generator=g, device=device)
    targets[0, 0], targets[-1, -1] = 0, case.vocab - 1
    weights = torch.randn(2, *shape, generator=g, device=device)
    if not TOKEN_LOGPROBS_VARIANTS[case.variant]:
        weights[1] = 0.0  # no entropy asked for
    return Batch(dict(logits=logits), targets, {}, targets.numel(), weights)


def advantages_batch(case: Case, sizes: Sizes, device: torch.device) -> Batch:
    """0/1 rewards (a verifier's) of sequences × tokens responses, in groups of ``group_size``, one group all solved."""
    g = torch.Generator(device=device).manual_seed(0)
    count = sizes.sequences * sizes.tokens
    rewards = (torch.rand(count, generator=g, device=device) > 0.5).float()
    rewards[: sizes.group_size] = 1.0
    return Batch({}, rewards, dict(group_size=sizes.group_size), count)


# ------------------------------------------------------------------------------------------------------- runs
def _draws(cfg: LossConfig) -> Optional[torch.Generator]:
    """clip_cov's random draws: the same in every call compared (a fresh generator of the same seed each time)."""
    return torch.Generator().manual_seed(3) if cfg.policy_loss == "clip_cov" else None


def _leaves(batch: Batch, fp32: bool = False) -> dict[str, Tensor]:
    """Fresh leaves requiring grad; the reference's in fp32 (exact copies of the low-precision values)."""
    return {name: (x.float() if fp32 else x).detach().clone().requires_grad_() for name, x in batch.leaves.items()}


def _grad(leaf: Tensor) -> Tensor:
    """The leaf's gradient after a backward; zeros where none reached it (which the reference's then must be)."""
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def _loss_results(out: LossOutput, leaves: dict[str, Tensor], case: Case) -> Results:
    """The outputs of a loss call whose backward has run."""
    results = {"loss": out.loss, "logprobs": out.logprobs}
    results.update({f"∂{name}": read(case, _grad(x)) for name, x in leaves.items()})
    if out.entropy is not None:
        results["entropy"] = out.entropy
    if out.grad_norms is not None:
        results["grad_norms"] = out.grad_norms
    results.update({f"metrics/{key}": value for key, value in out.metrics.items()})
    return results


def _compiled(fn: Callable[[Tensor], LossOutput], device: torch.device) -> Callable[[Tensor], LossOutput]:
    """``fn`` under ``torch.compile(fullgraph=True)``: inductor on CUDA, aot_eager on CPU (as the tests; inductor's
    CPU code generation needs a C++ compiler and minutes)."""

    def fields(z: Tensor) -> tuple:
        out = fn(z)
        return out.loss, out.logprobs, out.entropy, out.metrics, out.grad_norms

    # every case compiles its own graph: the same code object with new closures would recompile up to Dynamo's
    # cache limit, then run eager without a word
    torch._dynamo.reset()
    compiled = torch.compile(fields, fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    return lambda z: LossOutput(*compiled(z))


def run_grpo_loss(case: Case, batch: Batch, backend: str) -> Results:
    cfg, leaves = case.config, _leaves(batch, backend == REFERENCE)
    logits = leaves["logits"]
    keywords = dict(batch.keywords, config=cfg, backend=backend, return_entropy=True, generator=_draws(cfg))
    if case.inplace and backend != REFERENCE:  # a non-leaf buffer, as a model's logits, holds the gradient after
        out = grpo_loss(logits * 1, batch.targets, inplace_grad=True, **keywords)
    elif case.compiled and backend != REFERENCE:
        out = _compiled(lambda z: grpo_loss(read(case, z), batch.targets, **keywords), logits.device)(logits)
    else:
        out = grpo_loss(read(case, logits), batch.targets, **keywords)
    out.loss.backward()
    return _loss_results(out, leaves, case)


def run_linear_grpo_loss(case: Case, batch: Batch, backend: str) -> Results:
    cfg, leaves = case.config, _leaves(batch, backend == REFERENCE)
    out = linear_grpo_loss(
        leaves["hidden"],
        leaves["weight"],
        batch.targets,
        bias=leaves["bias"],
        config=cfg,
        backend=backend,
        return_entropy=True,
        generator=_draws(cfg),
        **batch.keywords,
    )
    out.loss.backward()
    return _loss_results(out, leaves, case)


def run_token_logprobs(case: Case, batch: Batch, backend: str) -> Results:
    leaves = _leaves(batch, backend == REFERENCE)
    if TOKEN_LOGPROBS_VARIANTS[case.variant]:
        lp, ent = token_logprobs(leaves["logits"], batch.targets, temperature=TAU, entropy=True, backend=backend)
        return _logprobs_results(batch, leaves, lp, ent)
    lp = token_logprobs(leaves["logits"], batch.targets, temperature=TAU, backend=backend)
    return _logprobs_results(batch, leaves, lp, None)


def run_advantages(case: Case, batch: Batch, backend: str) -> Results:
    adv, metrics = advantages(
        batch.targets,
        batch.keywords["group_size"],
        config=ADVANTAGE_CONFIGS[case.variant],
        return_metrics=True,
        backend=backend,
    )
    return {"advantages": adv, **{f"metrics/{key}": value for key, value in metrics.items()}}


def _logprobs_results(batch: Batch, leaves: dict[str, Tensor], lp: Tensor, ent: Optional[Tensor]) -> Results:
    """Backpropagates Σ w·ℓ (+ Σ w'·H when the entropy was asked for)."""
    w = cast(Tensor, batch.coefficients)  # token_logprobs cases have their weights
    outputs = [lp] if ent is None else [lp, ent]
    torch.autograd.backward(outputs, list(w[: len(outputs)]))
    results = {"logprobs": lp, "∂logits": _grad(leaves["logits"])}
    return results if ent is None else dict(results, entropy=ent)


# Eager PyTorch in the case's dtype: what a trainer without fastgrpo computes, the yardstick of the tolerance. Its
# gradients are taken with the reference's coefficients ∂L/∂ℓ, ∂L/∂H: the error of its softmax in that dtype, not the
# clip decisions its rounded log-probs would flip (at 4096 tokens bf16 flips many, which would make any gradient pass).
def torch_logprobs(logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """log_softmax in the logits' dtype; the log-probs of ``targets`` and the entropies, as fp32."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    lp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp.float(), -(logp.exp() * logp).sum(-1).float()


def _torch_loss(case: Case, batch: Batch, leaves: dict[str, Tensor], logits: Tensor) -> Results:
    cfg, c = case.config, cast(Tensor, batch.coefficients)  # loss cases have theirs
    lp, ent = torch_logprobs(logits, batch.targets, cfg.temperature)
    out = policy_loss(
        lp.detach(), entropy=ent.detach(), config=cfg, backend=REFERENCE, generator=_draws(cfg), **batch.keywords
    )
    torch.autograd.backward([lp, ent], [c[0], c[1]])
    return _loss_results(out, leaves, case)


def torch_grpo_loss(case: Case, batch: Batch) -> Results:
    leaves = _leaves(batch)
    return _torch_loss(case, batch, leaves, read(case, leaves["logits"]))


def torch_linear_grpo_loss(case: Case, batch: Batch) -> Results:
    leaves = _leaves(batch)
    logits = torch.nn.functional.linear(leaves["hidden"], leaves["weight"], leaves["bias"])
    return _torch_loss(case, batch, leaves, logits)


def torch_token_logprobs(case: Case, batch: Batch) -> Results:
    leaves = _leaves(batch)
    lp, ent = torch_logprobs(leaves["logits"], batch.targets, TAU)
    return _logprobs_results(batch, leaves, lp, ent if TOKEN_LOGPROBS_VARIANTS[case.variant] else None)


def torch_advantages(case: Case, batch: Batch) -> Results:
    return {}  # fp32 rewards: the reference is PyTorch in that dtype; the floor alone bounds


class Op(NamedTuple):
    inputs: Callable[[Case, Sizes, torch.device], Batch]
    run: Callable[[Case, Batch, str], Results]
    torch_same_dtype: Callable[[Case, Batch], Results]
    value: str  # the output shown in the |Δloss| column


OPS = {
    "grpo_loss": Op(loss_batch, run_grpo_loss, torch_grpo_loss, "loss"),
    "linear_grpo_loss": Op(loss_batch, run_linear_grpo_loss, torch_linear_grpo_loss, "loss"),
    "token_logprobs": Op(logprobs_batch, run_token_logprobs, torch_token_logprobs, "logprobs"),
    "advantages": Op(advantages_batch, run_advantages, torch_advantages, "advantages"),
}


# --------------------------------------------------------------------------------------------------- judgement
class Error(NamedTuple):
    """max|ours − ref| of one output and its bound."""

    error: float
    bound: float

    @property
    def ratio(self) -> float:
        if self.bound > 0:
            return self.error / self.bound
        return 0.0 if self.error == 0 else math.inf


def _max_abs_diff(x: Tensor, ref: Tensor) -> float:
    """max|x − ref| in fp32 (exact for bf16/fp16 x; no fp64 copy of a GB-sized gradient). A NaN or inf where the
    reference is finite counts as infinite; a non-finite value equal to the reference's as 0."""
    x, ref = x.detach().float(), ref.detach().float()
    if not x.numel():
        return 0.0
    diff = (x - ref).abs()
    if not bool(torch.isfinite(diff).all()):  # rare: decide each non-finite entry (inf − inf and NaN are NaN)
        agrees = (x == ref) | (x.isnan() & ref.isnan())
        diff = torch.where(torch.isfinite(diff), diff, torch.where(agrees, 0.0, math.inf))
    return float(diff.max())


def judge(ours: Results, ref: Results, same: Results, batch: Batch) -> dict[str, Error]:
    """Each reference output's error and bound (module docstring); a missing or misshaped output fails."""
    errors = {}
    for name, r in ref.items():
        x = ours.get(name)
        if x is None or x.shape != r.shape:
            errors[name] = Error(math.inf, 0.0)
            continue
        rounding = max(ATOL, torch.finfo(x.dtype).eps)
        magnitude = float(r.detach().float().abs().max()) if r.numel() else 0.0
        scale = magnitude if name.startswith("∂") else max(1.0, magnitude)
        if name == "∂logits" and batch.coefficients is not None:
            # a row c·(onehot − p) + c'·∂H/∂z rounds relative to c and c', not to its entries, which cancel to ≈ 0
            # where p → onehot (all of them at V = 1, where the exact gradient is 0)
            scale = max(scale, float(batch.coefficients.abs().flatten(1).amax(1).sum()))
        torch_error = _max_abs_diff(same[name], r) if name in same else 0.0
        # gradients (and their norms) move with the coefficients ∂L/∂ℓ: relatively
        relative = name.startswith(("∂", "grad_norms", "metrics/gradient/"))
        conditioning = batch.sensitivity.get("∂", 0.0) * magnitude if relative else batch.sensitivity.get(name, 0.0)
        bound = K * max(torch_error if math.isfinite(torch_error) else 0.0, conditioning) + rounding * scale
        if name.endswith("grad_active_fraction"):  # exact zeros flip at a kink: one token of slack
            bound = max(bound, 1.0 / max(1, batch.unmasked))
        errors[name] = Error(_max_abs_diff(x, r), bound)
    return errors


# ------------------------------------------------------------------------------------------------------- check
def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


HEADER = (
    f"{'op':<16} {'variant':<24} {'backend':<7} {'dtype':<5} {'V':>6} {'layout/flags':<22} "
    f"{'|Δloss|':>8} {'/bound':>6} {'|Δgrad|':>8} {'/bound':>6} {'others':>6}  result"
)


def _row(case: Case, sizes: Sizes, backend: str, errors: dict[str, Error], value: str) -> tuple[str, bool]:
    """One printed row and whether it passed: the value's and the worst gradient's error and its fraction of the
    bound, the worst fraction among the other outputs; a failure names the outputs over their bound."""
    grads = {name: e for name, e in errors.items() if name.startswith("∂")}
    worst_grad = max(grads.values(), key=lambda e: e.ratio, default=Error(0.0, 0.0))
    others = [e.ratio for name, e in errors.items() if name != value and name not in grads]
    failed = sorted((name for name, e in errors.items() if not e.error <= e.bound), key=lambda n: -errors[n].ratio)
    v = errors.get(value, Error(0.0, 0.0))
    result = "PASS" if not failed else "FAIL " + ", ".join(f"{n} {errors[n].ratio:.3g}x" for n in failed[:4])
    dtype = _dtype_name(case.dtype)
    line = (
        f"{case.op:<16} {case.variant:<24} {backend:<7} {dtype:<5} {case.vocab or '-':>6} {case.flags(sizes):<22} "
        f"{v.error:8.1e} {v.ratio:6.2f} {worst_grad.error:8.1e} {worst_grad.ratio:6.2f} {max(others, default=0.0):6.2f}"
        f"  {result}"
    )
    return line, not failed


def check(
    device: torch.device,
    grid_name: str = "small",
    backend_names: Optional[Sequence[str]] = None,
    cases: Optional[Sequence[Case]] = None,
) -> bool:
    """Runs ``cases`` (default: the grid ``grid_name``) on ``backend_names`` (default: the compiled backends
    ``backends.available`` lists for ``device``; on CPU that leaves Triton's interpreter out, name it to include it)
    against the fp32 reference, printing one row per case and backend and a summary; True when every row passed."""
    sizes = GRIDS[grid_name]
    names = [b for b in backends.available(device) if b != REFERENCE] if backend_names is None else list(backend_names)
    cases = list(cases) if cases is not None else grid(grid_name)
    if not names:  # nothing to compare with the reference: a check that cannot fail is not a pass
        print(f"fastgrpo check on {device}: no compiled backend to check (available: {backends.available(device)})")
        return False
    start = time.perf_counter()
    print(
        f"fastgrpo check on {device} (torch {torch.__version__}): grid {grid_name!r}, {len(cases)} cases x backends "
        f"{names} against the fp32 reference; bound = {K:g} x torch's own error in the dtype + rounding floor",
        flush=True,
    )
    print(
        "|Δloss|: the loss (token_logprobs: the log-probs; advantages: the advantages); |Δgrad|: the worst gradient; "
        "/bound: the fraction of its bound; others: the worst fraction among the other outputs"
    )
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    rows = passed = 0
    for case in cases:
        op = OPS[case.op]
        try:
            batch = op.inputs(case, sizes, device)
            ref = op.run(case, batch, REFERENCE)
            same = op.torch_same_dtype(case, batch)
        except Exception as exc:  # a check that cannot run is a failed check, not the end of the grid
            print(
                f"{case.op:<16} {case.variant:<24} {'-':<7} reference/torch run raised {exc!r:.200}  FAIL", flush=True
            )
            rows += len(names)
            continue
        for name in names:
            try:
                errors = judge(op.run(case, batch, name), ref, same, batch)
                line, ok = _row(case, sizes, name, errors, op.value)
            except Exception as exc:
                line, ok = f"{case.op:<16} {case.variant:<24} {name:<7} raised {exc!r:.200}  FAIL", False
            print(line, flush=True)
            rows, passed = rows + 1, passed + ok
        del batch, ref, same
    failed = rows - passed
    verdict = "all passed" if not failed else f"{failed} FAILED (rows above)"
    print(
        f"{rows} checks ({len(cases)} cases x {len(names)} backends) in {time.perf_counter() - start:.0f} s: {verdict}"
    )
    return failed == 0
