"""The loss configuration shared by every entry point and backend (MATH §2–§3), and the output type."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Union

import torch

PolicyLossType = Literal["ppo", "cispo", "sapo", "gmpo", "reinforce"]
RatioLevel = Literal["token", "sequence"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"]
KLEstimator = Literal["k1", "abs", "k2", "k3", "k1+", "abs+", "k3+"]
Normalizer = Union[float, torch.Tensor, None]  # a call's replacement of the aggregation's denominator
RolloutCorrection = Literal[
    "token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "sequence_geomean_mask"
]
AdvantageEstimator = Literal["grpo", "rloo", "reinforce_baseline"]
AdvantageScale = Literal["group", "batch", "none"]
SingletonGroup = Literal["zero", "raw"]

POLICY_LOSSES = ("ppo", "cispo", "sapo", "gmpo", "reinforce")
RATIO_LEVELS = ("token", "sequence")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm")
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "k1+", "abs+", "k3+")
ROLLOUT_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "sequence_geomean_mask")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_baseline")
ADVANTAGE_SCALES = ("group", "batch", "none")
SINGLETON_GROUPS = ("zero", "raw")


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


_FINITE = ("a finite number", lambda v: True)
_POSITIVE = ("a finite number > 0", lambda v: v > 0)
_NON_NEGATIVE = ("a finite number >= 0", lambda v: v >= 0)


@dataclass(frozen=True)
class AdvantageConfig:
    """The reward side (MATH §3): how rewards become advantages.

    estimator: ``grpo`` (R − mean_g)/(std_g + eps) with the unbiased std; ``rloo`` R − mean of the others;
        ``reinforce_baseline`` R − mean_g, then whitened over the batch (REINFORCE++ baseline).
    scale: ``group`` (per-group std), ``batch`` (std of all rewards, TRL ``scale_rewards="batch"``) or
        ``none`` (Dr. GRPO: no division). Only used by ``grpo``.
    eps: added to the std (TRL 1e-4, verl 1e-6).
    singleton: a group of one gets advantage 0 (``zero``, TRL: its mean is itself) or keeps its reward
        (``raw``, verl: mean 0 and std 1 for a group of one, so R/(1 + eps) under ``grpo``).
    """

    estimator: AdvantageEstimator = "grpo"
    scale: AdvantageScale = "group"
    eps: float = 1e-4
    singleton: SingletonGroup = "zero"

    def __post_init__(self) -> None:
        _one_of("estimator", self.estimator, ADVANTAGE_ESTIMATORS)
        _one_of("scale", self.scale, ADVANTAGE_SCALES)
        _one_of("singleton", self.singleton, SINGLETON_GROUPS)
        _number("eps", self.eps, *_NON_NEGATIVE)


@dataclass(frozen=True)
class LossConfig:
    """Every knob of the trajectory side (MATH §2), as a frozen, hashable value.

    Use ``fastgrpo.presets.trl/verl/openrlhf`` to get the config that reproduces a trainer's loss. Every field's
    type and range is checked at construction; an error names the field (``err.fields``).

    Policy term
        policy_loss: ``ppo`` (GRPO, DAPO, Dr. GRPO, GSPO, dual-clip PPO), ``cispo``, ``sapo``, ``gmpo``,
            ``reinforce`` (GPG, REINFORCE, on-policy distillation with token advantages).
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
        rollout_correction: importance weights from ℓ^old − ℓ^samp when ``is_weights`` is not given:
            ``token_*`` per token, ``sequence_*`` from the masked sum per sequence, ``*_truncate`` clamps
            w to [rollout_min, rollout_max], ``*_mask`` zeroes w outside it; ``sequence_geomean_mask``
            (OpenRLHF ``seq-mask-tis``) keeps the token weight and zeroes whole sequences whose
            geometric-mean weight is outside the range.
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

    rollout_correction: Optional[RolloutCorrection] = None
    rollout_min: Optional[float] = None
    rollout_max: Optional[float] = None
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: Optional[float] = None

    beta: float = 0.0
    kl_estimator: KLEstimator = "k3"
    kl_input_clamp: Optional[float] = None
    kl_output_clamp: Optional[float] = None
    kl_ratio_weighted: bool = False
    kl_aggregation: Optional[Aggregation] = None

    aggregation: Aggregation = "token_mean"
    max_length: Optional[int] = None
    divide_by_num_sequences: bool = True
    count_empty_sequences: bool = True

    entropy_coef: float = 0.0
    entropy_aggregation: Optional[Aggregation] = None
    temperature: float = 1.0
    loss_scale: float = 1.0
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)

    def __post_init__(self) -> None:
        """Every field's type and range, each error naming its field (``err.fields``)."""
        for name, allowed in (
            ("policy_loss", POLICY_LOSSES),
            ("ratio_level", RATIO_LEVELS),
            ("sequence_ratio_grad", ("sequence", "token")),
            ("aggregation", AGGREGATIONS),
            ("kl_estimator", KL_ESTIMATORS),
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
        for name in ("ratio_cap", "log_ratio_clamp", "kl_input_clamp", "kl_output_clamp"):
            _number(name, getattr(self, name), *_POSITIVE, optional=True)
        _number("seq_log_ratio_max", self.seq_log_ratio_max, *_FINITE, optional=True)
        # bounds of a ratio (CISPO weight, rollout importance weight), which is >= 0
        for name in ("cispo_low", "rollout_min"):
            _number(name, getattr(self, name), *_NON_NEGATIVE, optional=True)
        for name in ("cispo_high", "rollout_max"):
            _number(name, getattr(self, name), *_POSITIVE, optional=True)
        for low, high in (("cispo_low", "cispo_high"), ("rollout_min", "rollout_max")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise _error(ValueError, (low, high), f"{low} ({lo}) must be <= {high} ({hi})")
        for name in ("sapo_tau_pos", "sapo_tau_neg", "temperature", "loss_scale"):
            _number(name, getattr(self, name), *_POSITIVE)
        _number("top_entropy_quantile", self.top_entropy_quantile, "in (0, 1]", lambda v: 0 < v <= 1)
        # a threshold on a mean KL-like divergence, which a sequence must exceed to be dropped
        _number("off_policy_mask_threshold", self.off_policy_mask_threshold, *_NON_NEGATIVE, optional=True)
        _number("beta", self.beta, "a finite number >= 0 (a KL penalty)", lambda v: v >= 0)
        _number("entropy_coef", self.entropy_coef, *_FINITE)
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)):
            raise _error(
                TypeError,
                ("max_length",),
                f"max_length must be a positive int or None, got {type(self.max_length).__name__} {self.max_length!r}",
            )
        if self.max_length is not None and self.max_length <= 0:
            raise _error(ValueError, ("max_length",), f"max_length must be a positive int, got {self.max_length!r}")
        for name in ("kl_ratio_weighted", "divide_by_num_sequences", "count_empty_sequences"):
            _flag(name, getattr(self, name))
        if not isinstance(self.advantage, AdvantageConfig):
            raise _error(
                TypeError, ("advantage",), f"advantage must be an AdvantageConfig, got {type(self.advantage).__name__}"
            )
        for kind in ("cispo", "gmpo"):
            if self.policy_loss == kind and self.ratio_level != "token":
                why = "is token level only" if kind == "cispo" else "builds its own sequence ratio"
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
    ``LossConfig.advantage``) inside the loss call, in the same launch where it can."""

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
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor]
    metrics: dict[str, torch.Tensor]
