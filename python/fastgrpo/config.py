"""The loss configuration shared by every entry point and backend (MATH §2–§3), and the output type."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Union, get_args

import torch

PolicyLossType = Literal[
    "ppo", "cispo", "sapo", "gmpo", "reinforce", "dppo_tv", "dppo_kl", "dro", "vespo", "clip_cov", "kl_cov"
]
RatioLevel = Literal["token", "sequence"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"]
KLEstimator = Literal["k1", "abs", "k2", "k3", "k1+", "abs+", "k3+"]
Normalizer = Union[float, torch.Tensor, None]  # a call's replacement of the aggregation's denominator
RolloutCorrection = Literal[
    "token_truncate",
    "token_mask",
    "sequence_truncate",
    "sequence_mask",
    "sequence_geomean_mask",
    "token_binary_kl_mask",
    "token_tv_mask",
    "sequence_binary_kl_mask",
    "sequence_tv_mask",
    "unweighted",
]
RolloutFilterKind = Literal[
    "token_k1",
    "token_k2",
    "token_k3",
    "seq_sum_k1",
    "seq_sum_k2",
    "seq_sum_k3",
    "seq_mean_k1",
    "seq_mean_k2",
    "seq_mean_k3",
    "seq_max_k2",
    "seq_max_k3",
]
# (kind, low, high): see LossConfig.rollout_rejection
RolloutFilter = tuple[RolloutFilterKind, Optional[float], Optional[float]]
AdvantageEstimator = Literal[
    "grpo",
    "rloo",
    "reinforce_baseline",
    "pass_at_k",
    "length_weighted_baseline",
    "rescaled_group_baseline",
    "batch_baseline",
    "greedy_baseline",
    "discounted_return",
    "normalize_then_sum",
    "optimal_token_baseline",
]
AdvantageScale = Literal["group", "batch", "none"]
SingletonGroup = Literal["zero", "raw"]
Whitening = Literal["none", "sequence", "token", "token_biased", "token_center"]
MaskedSteps = Literal["skip", "count"]

POLICY_LOSSES: tuple[str, ...] = get_args(PolicyLossType)
TeacherEstimator = Literal["k1", "abs", "k2", "k3"]
TEACHER_ESTIMATORS: tuple[str, ...] = get_args(TeacherEstimator)
RATIO_LEVELS = ("token", "sequence")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm")
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "k1+", "abs+", "k3+")
ROLLOUT_CORRECTIONS: tuple[str, ...] = get_args(RolloutCorrection)
# the rollout corrections whose bounds apply to a divergence (any sign), not to a ratio (>= 0)
ROLLOUT_DIVERGENCE_GATES = ("token_binary_kl_mask", "token_tv_mask", "sequence_binary_kl_mask", "sequence_tv_mask")
# verl's rejection filters (rollout_rs): the statistic k1/k2/k3 per token, or its sum/mean/max per sequence
ROLLOUT_FILTERS: tuple[str, ...] = get_args(RolloutFilterKind)
ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)
ADVANTAGE_SCALES = ("group", "batch", "none")
SINGLETON_GROUPS = ("zero", "raw")
WHITENINGS: tuple[str, ...] = get_args(Whitening)
MASKED_STEPS: tuple[str, ...] = get_args(MaskedSteps)


def _error(exc: type, fields: tuple[str, ...], message: str) -> Exception:
    """An error about config ``fields``; ``.fields`` lets a preset name the trainer option that set them."""
    err = exc(message)
    err.fields = fields
    return err


def _one_of(name: str, value: object, allowed: tuple, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or value not in allowed:
        raise _error(
            ValueError, (name,), f"{name} must be one of {allowed}{' or None' if optional else ''}, got {value!r}"
        )


def _number(name: str, value: object, rule: str, ok: Callable[[float], bool], optional: bool = False) -> None:
    """A finite int or float (never a bool) for which ``ok`` holds; ``rule`` says that in words."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _error(
            TypeError,
            (name,),
            f"{name} must be a number{' or None' if optional else ''}, got {type(value).__name__} {value!r}",
        )
    if not (math.isfinite(value) and ok(value)):
        raise _error(ValueError, (name,), f"{name} must be {rule}{' or None' if optional else ''}, got {value!r}")


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _error(TypeError, (name,), f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _rollout_filters(value: object) -> None:
    """``LossConfig.rollout_rejection``: a tuple of (kind, low, high) triples. k1 kinds bound an importance ratio
    (low >= 0 and high > 0, at least one given); k2/k3 kinds bound a divergence from above (low None)."""
    name = "rollout_rejection"
    if not isinstance(value, tuple):
        raise _error(
            TypeError,
            (name,),
            f"{name} must be a tuple of (kind, low, high) tuples, got {type(value).__name__} {value!r}",
        )
    for item in value:
        if not isinstance(item, tuple) or len(item) != 3:
            raise _error(TypeError, (name,), f"{name} entries must be (kind, low, high) tuples, got {item!r}")
        kind, low, high = item
        if not isinstance(kind, str) or kind not in ROLLOUT_FILTERS:
            raise _error(ValueError, (name,), f"{name} kind must be one of {ROLLOUT_FILTERS}, got {kind!r}")
        for bound in (low, high):
            if bound is None:
                continue
            if isinstance(bound, bool) or not isinstance(bound, (int, float)):
                raise _error(TypeError, (name,), f"{name} bounds must be numbers or None, got {item!r}")
            if not math.isfinite(bound):
                raise _error(ValueError, (name,), f"{name} bounds must be finite, got {item!r}")
        if kind.endswith("k1"):
            if (low is None and high is None) or (low is not None and low < 0) or (high is not None and high <= 0):
                raise _error(
                    ValueError,
                    (name,),
                    f"{name}: {kind} bounds an importance ratio: low >= 0 and high > 0 (at least one), got {item!r}",
                )
            if low is not None and high is not None and low > high:
                raise _error(ValueError, (name,), f"{name}: {kind} needs low <= high, got {item!r}")
        elif low is not None or high is None or high <= 0:
            raise _error(
                ValueError,
                (name,),
                f"{name}: {kind} bounds a divergence from above: (kind, None, high > 0), got {item!r}",
            )


_FINITE = ("a finite number", lambda v: True)
_POSITIVE = ("a finite number > 0", lambda v: v > 0)
_NON_NEGATIVE = ("a finite number >= 0", lambda v: v >= 0)


@dataclass(frozen=True)
class AdvantageConfig:
    """The reward side (MATH §3): how rewards become advantages. Every field is checked at construction; an error
    names the field (``err.fields``). The trainer option each estimator reproduces is in its docstring in
    ``fastgrpo.reward.estimators``; ``fastgrpo.presets`` maps the trainers' option names here.

    estimator: ``grpo`` (R − mean_g)/(std_g + eps) with the unbiased std; ``rloo`` R − mean of the others;
        ``reinforce_baseline`` R − mean_g, then whitened over the batch (REINFORCE++ baseline);
        ``pass_at_k`` only each group's best response, by (R_max − R_second)/(std_g + eps) (verl ``grpo_passk``);
        ``length_weighted_baseline`` R − Σ L·R / Σ L over the group, L the response lengths (verl ``opo``);
        ``rescaled_group_baseline`` (R − mean_g)·B / #{R ≠ 0} (verl ``gpg``);
        ``batch_baseline`` R − the batch mean (OpenRLHF ``flash_reinforce``);
        ``greedy_baseline`` the return − the greedy response's reward (verl ``remax``);
        ``discounted_return`` each token's γ-discounted return-to-go (verl ``reinforce_plus_plus``, OpenRLHF
        ``reinforce``); ``normalize_then_sum`` each reward function normalized per group as ``grpo``, then
        their weighted sum (TRL ``multi_objective_aggregation="normalize_then_sum"``, verl ``gdpo``);
        ``optimal_token_baseline`` the return − a per-token baseline weighted by the path variance (verl
        ``optimal_token_baseline``, ``tir_optimal_token_baseline``).
    scale: ``group`` (per-group std), ``batch`` (std of all rewards, TRL ``scale_rewards="batch"``) or
        ``none`` (Dr. GRPO: no division). Used by ``grpo``; ``group``/``none`` also by ``pass_at_k`` and
        ``normalize_then_sum``.
    eps: added to the std (TRL 1e-4, verl 1e-6); ``optimal_token_baseline``: added to its denominator (verl 1e-8).
    singleton: a group of one gets advantage 0 (``zero``, TRL: its mean is itself) or keeps its reward
        (``raw``, verl: mean 0 and std 1 for a group of one, so R/(1 + eps) under ``grpo``).
    whitening: the batch-wide step after the estimator; None: the estimator's own (``sequence`` for
        ``reinforce_baseline`` and ``normalize_then_sum``, ``token`` for ``discounted_return``, else ``none``).
        ``sequence``: (A − mean)/(std + eps) over the sequences, unbiased std. Over the response tokens (so each
        sequence weighs by its length; needs a response mask): ``token`` (A − mean)·rsqrt(var + 1e-8) with the
        unbiased var (verl ``masked_whiten``), ``token_biased`` (A − mean)·rsqrt(max(var, 1e-8)) with the biased
        var (OpenRLHF), ``token_center`` A − mean (OpenRLHF ``no_std_norm``). Not for ``grpo``/``rloo``, which
        the fused kernels compute from the rewards alone.
    gamma: the discount of ``discounted_return`` (verl ``algorithm.gamma``, OpenRLHF ``gamma``); the other
        estimators' returns are undiscounted (gamma must be 1).
    masked_steps: whether a masked token inside a response (a tool output in a multi-turn rollout) is a time step:
        ``skip`` (verl ``reinforce_plus_plus``: the return crosses it undiscounted; ``optimal_token_baseline``
        aligns the baselines by response-token rank, verl ``tir_optimal_token_baseline``) or ``count`` (OpenRLHF
        ``reinforce`` discounts at it; verl ``optimal_token_baseline`` aligns by position).
    zero_tail: ``optimal_token_baseline`` only: a group's single longest response gets no baseline past the
        second longest one's length (verl ``handle_zero_tail``).
    """

    estimator: AdvantageEstimator = "grpo"
    scale: AdvantageScale = "group"
    eps: float = 1e-4
    singleton: SingletonGroup = "zero"
    whitening: Optional[Whitening] = None
    gamma: float = 1.0
    masked_steps: MaskedSteps = "skip"
    zero_tail: bool = True

    def __post_init__(self) -> None:
        _one_of("estimator", self.estimator, ADVANTAGE_ESTIMATORS)
        _one_of("scale", self.scale, ADVANTAGE_SCALES)
        _one_of("singleton", self.singleton, SINGLETON_GROUPS)
        _number("eps", self.eps, *_NON_NEGATIVE)
        _one_of("whitening", self.whitening, WHITENINGS, optional=True)
        _number("gamma", self.gamma, "in [0, 1] (a discount)", lambda v: 0 <= v <= 1)
        _one_of("masked_steps", self.masked_steps, MASKED_STEPS)
        _flag("zero_tail", self.zero_tail)
        if self.estimator in ("grpo", "rloo") and self.whitening not in (None, "none"):
            # the fused loss normalizes grpo/rloo rewards inside its kernel, which has no whitening pass
            raise _error(
                ValueError,
                ("whitening", "estimator"),
                f"whitening={self.whitening!r} is not defined for estimator={self.estimator!r} (computed from the "
                "rewards alone by the fused kernels): use estimator='reinforce_baseline' for a whitened group baseline",
            )
        if self.gamma != 1 and self.estimator != "discounted_return":
            raise _error(
                ValueError,
                ("gamma", "estimator"),
                f"gamma={self.gamma!r} discounts only estimator='discounted_return' (the other estimators' returns "
                f"are undiscounted), got estimator={self.estimator!r}",
            )
        if self.scale == "batch" and self.estimator in ("pass_at_k", "normalize_then_sum"):
            raise _error(
                ValueError,
                ("scale", "estimator"),
                f"scale='batch' is not defined for estimator={self.estimator!r}, which divides by each group's std "
                "(scale='group') or not at all (scale='none')",
            )

    @property
    def effective_whitening(self) -> Whitening:
        """``whitening``, or the estimator's own when it is None."""
        if self.whitening is not None:
            return self.whitening
        own: dict[str, Whitening] = {
            "reinforce_baseline": "sequence",
            "normalize_then_sum": "sequence",
            "discounted_return": "token",
        }
        return own.get(self.estimator, "none")

    @property
    def needs_response_mask(self) -> bool:
        """Whether the advantages need the response mask (per-token estimators, response lengths, token
        whitening): such a config cannot turn :class:`Rewards` into advantages inside a loss call."""
        token_estimators = ("length_weighted_baseline", "discounted_return", "optimal_token_baseline")
        return self.estimator in token_estimators or self.effective_whitening.startswith("token")


@dataclass(frozen=True)
class LossConfig:
    """Every knob of the trajectory side (MATH §2), as a frozen, hashable value.

    Use ``fastgrpo.presets.trl/verl/openrlhf`` to get the config that reproduces a trainer's loss. Every field's
    type and range is checked at construction; an error names the field (``err.fields``).

    Policy term
        policy_loss: ``ppo`` (GRPO, DAPO, Dr. GRPO, GSPO, dual-clip PPO), ``cispo``, ``sapo``, ``gmpo``,
            ``reinforce`` (GPG, REINFORCE, on-policy distillation with token advantages), and
            ``dppo_tv`` / ``dppo_kl`` (DPPO-Binary, arXiv 2602.04879; verl ``dppo_tv``/``dppo_kl``):
                −sg[min(ρ, ratio_cap)]·A·ℓ on the tokens inside a trust region of the sampled token's
                probability, p − p_old ≤ ε_high for A > 0 and ≥ −ε_low otherwise (TV), or the binary KL
                p_old·log(p_old/p) + (1 − p_old)·log((1 − p_old + 1e-8)/(1 − p + 1e-8)) ≤ ε_high (A > 0) / ε_low
                unless the step moves p away from the bound's side (KL);
            ``dro`` (Direct Reward Optimization; verl ``dro``): −(ℓ·A − ½β·(ℓ − ℓ^old)²), β = ``dro_beta``;
            ``vespo`` (TRL ``loss_type="vespo"``): −sg[φ(w_i)]·A·ℓ with the gamma weight
                φ(w) = e^λ·w^k·e^(−λw) (φ(1) = 1) of the sequence ratio w_i = exp(Σ_t m·clamp(log r_t, ±20)
                [+ Σ_t log IS weight]) clamped to [1e-8, e^20], (k, λ) = ``vespo_k_pos``, ``vespo_lambda_pos``
                for A ≥ 0 and ``vespo_k_neg``, ``vespo_lambda_neg`` otherwise;
            ``clip_cov`` / ``kl_cov`` (Entropy Mechanism of RL, arXiv 2505.22617; verl ``clip_cov``/``kl_cov``):
                the PPO loss on the tokens with the largest covariance (A − Ā)(ℓ − ℓ̄): ``clip_cov`` drops
                the gradient of ``cov_fraction``·N tokens drawn at random (a call's ``generator``) among the
                unclipped ones with covariance in (``clip_cov_low``, ``clip_cov_high``); ``kl_cov`` adds
                ``kl_cov_coef``·|log r| on the top ``cov_fraction``·N tokens by covariance (ρ unclipped).
        ratio_level: ``token`` or ``sequence`` (GSPO: the length-normalized sequence ratio, broadcast to
            every token, differentiable through every token of the sequence).
        sequence_ratio_grad: ``sequence`` (TRL, OpenRLHF: ρ_t = s_i differentiates through the whole sequence)
            or ``token`` (verl's GSPO-token: log ρ_t = ℓ_t − sg[ℓ_t] + sg[log s_i], each token's own log-prob).
            The two give the same gradient unless per-token weights vary within a sequence.
        epsilon_low, epsilon_high: PPO clip range [1 − ε_low, 1 + ε_high]; for ``gmpo`` the log-space
            clip range [−ε_low, ε_high].
        ratio_cap: TRL ``delta``: the unclipped branch uses min(ρ, δ).
        dual_clip: dual-clip constant c > 1 (verl ``clip_ratio_c``): where A < 0, P = min(P, −c·A).
        log_ratio_clamp: clamp log r_t to [−c, c] before anything else (verl and OpenRLHF use 20).
        seq_log_ratio_max: upper clamp of the sequence log-ratio (verl GSPO uses 10).
        cispo_low, cispo_high: absolute bounds of the CISPO weight sg[clamp(ρ, lo, hi)] (None: unbounded).
        sapo_tau_pos, sapo_tau_neg: SAPO gate temperatures for A > 0 and A ≤ 0.

    Weights (all detached, multiply the policy term only)
        rollout_correction: importance weights w from log w_t = ℓ^old_t − ℓ^samp_t (ℓ^old = sg[ℓ] without
            ``old_logprobs``: verl's bypass mode) when ``is_weights`` is not given (they replace all of the
            rollout options): ``token_*`` per token, ``sequence_*`` from the masked sum per sequence,
            ``*_truncate`` clamps w to [rollout_min, rollout_max] (TIS), ``*_mask`` zeroes w outside it
            (IcePop); ``sequence_geomean_mask`` (OpenRLHF ``seq-mask-tis``) keeps the token weight and zeroes
            whole sequences whose geometric-mean weight is outside the range; ``{token,sequence}_{binary_kl,
            tv}_mask`` (OpenRLHF ``is_correction_gating``) keep the token weight where a divergence of
            p = e^ℓ^samp from q = e^ℓ^old (both clamped to [1e-6, 1 − 1e-6]), the binary KL
            p·log(p/q) + (1 − p)·log((1 − p)/(1 − q)) or |p − q|, per token or its mean over the sequence,
            lies in [rollout_min, rollout_max] (bounds of any sign here), and zero it elsewhere;
            ``unweighted``: w = 1, for ``rollout_rejection`` alone (verl ``rollout_is=None``).
        rollout_min, rollout_max: those bounds (None: unbounded).
        rollout_log_ratio_clamp: clamps log w_t to [−c, c], and a sequence's Σ_t m·log w_t before its exp,
            in the weights and the rejection statistics (verl's safety bound: 20).
        rollout_batch_normalize: divides w by its batch mean (verl ``rollout_is_batch_normalize``): the
            masked token mean, or for ``sequence_truncate``/``sequence_mask`` the mean of the sequence weights
            over the non-empty sequences (means Σ m·x / (Σ m + 1e-8)); unchanged where that mean is ≤ 1e-8.
            Over the call's tokens (verl all-reduces it over data-parallel ranks).
        rollout_rejection: verl's rejection filters (``rollout_rs``): (kind, low, high) triples a token must all
            pass, on x_t = log w_t (clamped): ``token_k1`` keeps low ≤ e^x ≤ high, ``token_k2`` ½x² ≤ high,
            ``token_k3`` e^x − 1 − x ≤ high; ``seq_sum_*``, ``seq_mean_*`` (Σ m·k / (Σ m + 1e-8)) and
            ``seq_max_*`` (0 for an empty sequence) of the per-token statistic keep or drop whole sequences, the
            k1 ones bounding the sequence's importance ratio e^Σx or its geometric mean. k2/k3 take ``high``
            only; a None bound is absent. A rejected token leaves the policy term's mask as in verl's
            bypass-mode loss, not the weight alone: its term is 0 and under ``seq_mean_token_mean`` a
            sequence's token mean is over its kept tokens, while the batch denominators (token count, number of
            sequences, or the call's ``normalizer``) are the full mask's, as verl's trainer passes global counts
            of the unmodified response mask; the KL and entropy terms keep the full mask. Needs a
            ``rollout_correction``; not with ``gmpo`` or ``vespo``.
        top_entropy_quantile: keep tokens whose entropy is ≥ the (1 − q) quantile of the masked entropies
            (TRL); 1.0 keeps all. Needs the entropy.
        off_policy_mask_threshold: drop sequence i if A < 0 and mean_t(ℓ^samp − sg[ℓ]) > δ (TRL).

    KL to the reference policy
        beta: KL coefficient (0 disables the term and ``ref_logprobs`` is not needed).
        kl_estimator: ``k1`` D, ``abs`` |D|, ``k2`` D²/2, ``k3`` exp(−D) + D − 1 with D = ℓ − ℓ^ref; a
            trailing ``+`` (verl) keeps the value and takes the gradient of k2 (straight-through).
        kl_input_clamp, kl_output_clamp: clamp D to [−c, c] before, and the estimate to [−c, c] after.
        kl_ratio_weighted: TRL ``use_bias_correction_kl``: K ← K·ρ (ρ not detached).
        kl_aggregation: aggregation of the KL term when it differs from the policy term (OpenRLHF
            always takes a token mean of the KL; verl uses ``loss_agg_mode`` even for GSPO/SAPO).
        kl_importance_gradient: OpenRLHF ``--algo.kl.unbiased_gradient``: keep the estimate's value, take the
            gradient sg[min(ρ, kl_importance_cap)]·D·∇ℓ, the reverse-KL gradient importance-weighted to the
            old policy that sampled the tokens (so k1/k2/k3 differ only in value).

    On-policy distillation (a call's ``teacher_logprobs``: the teacher's log-probs ℓ^T of the sampled tokens)
        teacher_coef: λ; 0 disables the term and ``teacher_logprobs`` is not needed.
        teacher_estimator: the per-token reverse-KL estimate K^T of D^T = ℓ − ℓ^T: ``k1``, ``abs``, ``k2``,
            ``k3`` (as ``kl_estimator``), clamped by ``teacher_input_clamp`` / ``teacher_output_clamp``.
        teacher_form: ``advantage`` (the policy-gradient form; tinker, verl ``use_policy_gradient``): the
            reverse KL is a per-token reward, A_t ← A_t − λ·K^T(sg[ℓ^s] − ℓ^T), inside the policy term;
            ``loss`` (verl without the policy gradient): loss += λ·aggregate(K^T(ℓ − ℓ^T)), differentiated.
        teacher_reward_at: the student log-prob ℓ^s of the ``advantage`` form: ``old`` (the policy that sampled
            the tokens, ``old_logprobs``, or sg[ℓ] on-policy; tinker) or ``current`` (sg[ℓ]; verl).

    Aggregation
        aggregation: ``token_mean``, ``seq_mean_token_mean``, ``seq_mean_token_sum``, ``token_sum_norm``.
            A call's ``normalizer`` replaces the local denominator. ``gmpo`` is always a mean over
            sequences.
        max_length: L_max of ``token_sum_norm`` (default: the padded T, or the longest packed sequence).
        divide_by_num_sequences: ``token_sum_norm`` divides by S·L_max (TRL Dr. GRPO, verl
            ``seq-mean-token-sum-norm``) or by L_max alone (with L_max = 1: verl's ``token-sum``).
        count_empty_sequences: every division by a number of sequences S counts every sequence (TRL) or
            only those with at least one unmasked token (verl, OpenRLHF).

    Entropy bonus and scaling
        entropy_coef: loss −= coef · aggregate(H) (over tokens kept by the entropy mask).
        entropy_aggregation: its aggregation (None: same as ``aggregation``).
        temperature: logits are divided by it before the softmax (logit levels only).
        loss_scale: multiplies the final loss (fold 1/gradient_accumulation_steps here).
        advantage: how raw ``rewards`` become advantages when a call passes them.

    Diagnostics
        effective_rank_sketch: k > 0 adds the metric ``gradient/effective_rank`` (logit levels): the effective rank
            of the per-sequence gradient matrix, estimated through a fixed random projection of width k ≤ 1024 (MATH
            §8.8): one more read of the logits, O(N·k) after it, the projection kept in memory (V·k·4 bytes), and
            on CUDA one host sync (the SVD). 0 (default): off, nothing computed.
    """

    policy_loss: PolicyLossType = "ppo"
    ratio_level: RatioLevel = "token"
    sequence_ratio_grad: Literal["sequence", "token"] = "sequence"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    ratio_cap: Optional[float] = None
    dual_clip: Optional[float] = None
    log_ratio_clamp: Optional[float] = None
    seq_log_ratio_max: Optional[float] = None
    cispo_low: Optional[float] = None
    cispo_high: Optional[float] = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    dro_beta: float = 1.0
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    cov_fraction: float = 2e-4
    clip_cov_low: float = 1.0
    clip_cov_high: float = 5.0
    kl_cov_coef: float = 1.0

    rollout_correction: Optional[RolloutCorrection] = None
    rollout_min: Optional[float] = None
    rollout_max: Optional[float] = None
    rollout_log_ratio_clamp: Optional[float] = None
    rollout_batch_normalize: bool = False
    rollout_rejection: tuple[RolloutFilter, ...] = ()
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: Optional[float] = None

    beta: float = 0.0
    kl_estimator: KLEstimator = "k3"
    kl_input_clamp: Optional[float] = None
    kl_output_clamp: Optional[float] = None
    kl_ratio_weighted: bool = False
    kl_aggregation: Optional[Aggregation] = None
    kl_importance_gradient: bool = False
    kl_importance_cap: Optional[float] = None

    teacher_coef: float = 0.0
    teacher_estimator: TeacherEstimator = "k1"
    teacher_form: Literal["advantage", "loss"] = "advantage"
    teacher_reward_at: Literal["old", "current"] = "old"
    teacher_input_clamp: Optional[float] = None
    teacher_output_clamp: Optional[float] = None

    aggregation: Aggregation = "token_mean"
    max_length: Optional[int] = None
    divide_by_num_sequences: bool = True
    count_empty_sequences: bool = True

    entropy_coef: float = 0.0
    entropy_aggregation: Optional[Aggregation] = None
    temperature: float = 1.0
    loss_scale: float = 1.0
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    effective_rank_sketch: int = 0

    def __post_init__(self) -> None:
        """Every field's type and range, each error naming its field (``err.fields``)."""
        allowed: tuple[str, ...]
        for name, allowed in (
            ("policy_loss", POLICY_LOSSES),
            ("ratio_level", RATIO_LEVELS),
            ("sequence_ratio_grad", ("sequence", "token")),
            ("aggregation", AGGREGATIONS),
            ("kl_estimator", KL_ESTIMATORS),
            ("teacher_estimator", TEACHER_ESTIMATORS),
            ("teacher_form", ("advantage", "loss")),
            ("teacher_reward_at", ("old", "current")),
        ):
            _one_of(name, getattr(self, name), allowed)
        for name, allowed in (
            ("rollout_correction", ROLLOUT_CORRECTIONS),
            ("kl_aggregation", AGGREGATIONS),
            ("entropy_aggregation", AGGREGATIONS),
        ):
            _one_of(name, getattr(self, name), allowed, optional=True)
        _number("epsilon_low", self.epsilon_low, "in [0, 1)", lambda v: 0 <= v < 1)
        _number("epsilon_high", self.epsilon_high, *_NON_NEGATIVE)
        _number("dual_clip", self.dual_clip, "> 1 (it bounds -c*A for A < 0)", lambda v: v > 1, optional=True)
        for name in (
            "ratio_cap",
            "log_ratio_clamp",
            "kl_input_clamp",
            "kl_output_clamp",
            "kl_importance_cap",
            "teacher_input_clamp",
            "teacher_output_clamp",
        ):
            _number(name, getattr(self, name), *_POSITIVE, optional=True)
        _number("seq_log_ratio_max", self.seq_log_ratio_max, *_FINITE, optional=True)
        # bounds of a ratio (CISPO weight, rollout importance weight), which is >= 0; those of a divergence gate
        # may have any sign (OpenRLHF's lower bound is <= 0)
        gate = self.rollout_correction in ROLLOUT_DIVERGENCE_GATES
        _number("cispo_low", self.cispo_low, *_NON_NEGATIVE, optional=True)
        rule, ok = _FINITE if gate else _NON_NEGATIVE
        _number("rollout_min", self.rollout_min, rule, ok, optional=True)
        _number("cispo_high", self.cispo_high, *_POSITIVE, optional=True)
        rule, ok = _FINITE if gate else _POSITIVE
        _number("rollout_max", self.rollout_max, rule, ok, optional=True)
        for low, high in (("cispo_low", "cispo_high"), ("rollout_min", "rollout_max")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise _error(ValueError, (low, high), f"{low} ({lo}) must be <= {high} ({hi})")
        _number("rollout_log_ratio_clamp", self.rollout_log_ratio_clamp, *_POSITIVE, optional=True)
        _flag("rollout_batch_normalize", self.rollout_batch_normalize)
        _rollout_filters(self.rollout_rejection)
        if self.rollout_correction is None and (self.rollout_rejection or self.rollout_batch_normalize):
            raise _error(
                ValueError,
                ("rollout_correction", "rollout_rejection" if self.rollout_rejection else "rollout_batch_normalize"),
                "rollout_rejection and rollout_batch_normalize need a rollout_correction "
                "(rollout_correction='unweighted' applies rejection filters without importance weights)",
            )
        if self.rollout_correction == "unweighted":
            for name in ("rollout_min", "rollout_max", "rollout_batch_normalize"):
                if getattr(self, name) not in (None, False):
                    raise _error(
                        ValueError,
                        ("rollout_correction", name),
                        f"rollout_correction='unweighted' has no importance weight for {name} to act on",
                    )
        if self.rollout_rejection and self.policy_loss in ("gmpo", "vespo"):
            raise _error(
                ValueError,
                ("policy_loss", "rollout_rejection"),
                f"rollout_rejection is not supported with policy_loss={self.policy_loss!r}: its sequence "
                "statistics would have to be taken over the kept tokens (apply the filter to the mask instead)",
            )
        for name in ("sapo_tau_pos", "sapo_tau_neg", "temperature", "loss_scale", "dro_beta"):
            _number(name, getattr(self, name), *_POSITIVE)
        # the gamma weight's shape k >= 0 and rate λ > 0 (TRL clamps λ at 1e-4)
        for name in ("vespo_k_pos", "vespo_k_neg"):
            _number(name, getattr(self, name), *_NON_NEGATIVE)
        for name in ("vespo_lambda_pos", "vespo_lambda_neg", "kl_cov_coef"):
            _number(name, getattr(self, name), *_POSITIVE)
        _number("cov_fraction", self.cov_fraction, "in (0, 1]", lambda v: 0 < v <= 1)
        _number("clip_cov_low", self.clip_cov_low, *_FINITE)
        _number("clip_cov_high", self.clip_cov_high, *_FINITE)
        if self.clip_cov_low > self.clip_cov_high:
            raise _error(
                ValueError,
                ("clip_cov_low", "clip_cov_high"),
                f"clip_cov_low ({self.clip_cov_low}) must be <= clip_cov_high ({self.clip_cov_high})",
            )
        _number("teacher_coef", self.teacher_coef, "a finite number >= 0 (a KL to the teacher)", lambda v: v >= 0)
        _number("top_entropy_quantile", self.top_entropy_quantile, "in (0, 1]", lambda v: 0 < v <= 1)
        # a threshold on a mean KL-like divergence, which a sequence must exceed to be dropped
        _number("off_policy_mask_threshold", self.off_policy_mask_threshold, *_NON_NEGATIVE, optional=True)
        _number("beta", self.beta, "a finite number >= 0 (a KL penalty)", lambda v: v >= 0)
        _number("entropy_coef", self.entropy_coef, *_FINITE)
        k = self.effective_rank_sketch
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 1024:
            raise _error(
                ValueError, ("effective_rank_sketch",), f"effective_rank_sketch must be an int in [0, 1024], got {k!r}"
            )
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)):
            raise _error(
                TypeError,
                ("max_length",),
                f"max_length must be a positive int or None, got {type(self.max_length).__name__} {self.max_length!r}",
            )
        if self.max_length is not None and self.max_length <= 0:
            raise _error(ValueError, ("max_length",), f"max_length must be a positive int, got {self.max_length!r}")
        for name in ("kl_ratio_weighted", "kl_importance_gradient", "divide_by_num_sequences", "count_empty_sequences"):
            _flag(name, getattr(self, name))
        if not isinstance(self.advantage, AdvantageConfig):
            raise _error(
                TypeError, ("advantage",), f"advantage must be an AdvantageConfig, got {type(self.advantage).__name__}"
            )
        if self.kl_importance_gradient and self.kl_estimator.endswith("+"):
            raise _error(
                ValueError,
                ("kl_importance_gradient", "kl_estimator"),
                f"kl_importance_gradient replaces the gradient of kl_estimator={self.kl_estimator!r}: use "
                f"{self.kl_estimator.rstrip('+')!r}",
            )
        for kind in ("cispo", "gmpo", "dppo_tv", "dppo_kl", "dro", "vespo", "clip_cov", "kl_cov"):
            if self.policy_loss == kind and self.ratio_level != "token":
                why = "builds its own sequence ratio" if kind in ("gmpo", "vespo") else "is token level only"
                raise _error(
                    ValueError, ("policy_loss", "ratio_level"), f"policy_loss={kind!r} {why}: set ratio_level='token'"
                )
        if self.policy_loss == "gmpo" and self.top_entropy_quantile < 1.0:
            raise _error(
                ValueError,
                ("policy_loss", "top_entropy_quantile"),
                "top_entropy_quantile < 1 is not defined for policy_loss='gmpo' (a sequence loss)",
            )

    @property
    def needs_entropy(self) -> bool:
        """Whether the loss itself needs the per-token entropy (bonus or entropy mask)."""
        return self.entropy_coef != 0.0 or self.top_entropy_quantile < 1.0


@dataclass(frozen=True)
class Rewards:
    """Raw rewards passed where advantages go: each backend normalizes them per group (MATH §3, with
    ``LossConfig.advantage``) inside the loss call, in the same launch where it can. Also the reward side's input
    to the backends (``Backend.advantages``)."""

    rewards: torch.Tensor
    group_size: Optional[int] = None
    group_ids: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None


@dataclass
class LossOutput:
    """What every loss entry point returns.

    loss: 0-d fp32, differentiable. logprobs: per-token ℓ (fp32, detached, shaped like the targets, 0 at
    masked tokens, which no kernel reads).
    entropy: per-token entropy (fp32, detached, 0 at masked tokens) when asked or needed, else None.
    metrics: 0-d tensors of MATH §4 (no host sync).
    grad_norms: from logits or hidden states, ‖∂loss/∂logits‖ of each sequence's tokens ([S] fp32, MATH §8.7;
    their mean and max are the metrics ``gradient/seq_norm_mean``/``_max``); None from given log-probs.
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor]
    metrics: dict[str, torch.Tensor]
    grad_norms: Optional[torch.Tensor] = None
