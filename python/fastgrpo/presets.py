"""Trainer presets (MATH §5): each takes the trainer's own option names and returns the :class:`LossConfig`
that reproduces that trainer's loss, quirks included.

Read from the trainers' sources: TRL ``trl/trainer/grpo_trainer.py`` (``_compute_loss``, v1.10–1.16),
verl ``verl/trainer/ppo/core_algos.py`` + ``verl/workers/utils/losses.py`` (read at 0.9.1; tested against it) and
OpenRLHF ``openrlhf/models/loss.py`` + ``openrlhf/trainer/ray/ppo_actor.py`` (read at 0.11.2; tested against it).
What a config cannot carry (a global token count, the rollout log-probs) is a call argument: each preset's
docstring says which.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, cast

from .config import (
    AdvantageConfig,
    AdvantageScale,
    Aggregation,
    KLEstimator,
    LossConfig,
    PolicyLossType,
    RatioLevel,
    RolloutCorrection,
)

_ADVANTAGE_FIELDS = ("estimator", "scale", "eps", "singleton", "whitening", "gamma", "masked_steps", "zero_tail")


def _names_options(preset: str, sources: Mapping[str, tuple[str, ...]]) -> Callable:
    """Re-raises a LossConfig/AdvantageConfig error about a field (``err.fields``) naming the trainer option
    the user passed instead: ``sources`` maps each field to the options that may set it, in order of
    precedence (the first one the call set to a value other than None wins)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def preset_fn(**options):
            try:
                return fn(**options)
            except (TypeError, ValueError) as exc:
                names = []
                for field in getattr(exc, "fields", ()):
                    candidates = sources.get(field, ())
                    given = [c for c in candidates if options.get(c) is not None]
                    names += [n for n in given[:1] or candidates[:1] if n not in names]
                if not names:
                    raise
                shown = ", ".join(f"{n}={options[n]!r}" if n in options else f"{n} (default)" for n in names)
                owner = "AdvantageConfig" if exc.fields[0] in _ADVANTAGE_FIELDS else "LossConfig"
                raise type(exc)(f"presets.{preset}: {shown} is invalid ({owner}.{exc})") from exc

        return preset_fn

    return wrap


def _choice(preset: str, name: str, value: object, allowed: tuple) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"presets.{preset}: {name} must be one of {allowed}, got {value!r}")


def _flag(preset: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"presets.{preset}: {name} must be a bool, got {type(value).__name__} {value!r}")


def _steps(preset: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"presets.{preset}: {name} must be an int >= 1, got {value!r}")


def _number(preset: str, name: str, value: object) -> None:
    """Options the preset does arithmetic on (their range is LossConfig's to check)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"presets.{preset}: {name} must be a number, got {type(value).__name__} {value!r}")


def _pair(preset: str, name: str, value: object) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"presets.{preset}: {name} must be a pair (low, high), got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise TypeError(f"presets.{preset}: {name} must be a pair of numbers (low, high), got {value!r}")
    return value[0], value[1]


_TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
_TRL_AGGREGATION: dict[str, Aggregation] = {
    "grpo": "seq_mean_token_mean",
    "sapo": "seq_mean_token_mean",
    "bnpo": "token_mean",
    "dr_grpo": "token_sum_norm",
    "dapo": "token_mean",
    "cispo": "token_mean",
    "luspo": "seq_mean_token_sum",  # (Σ_t m·P).mean() over every sequence of the micro-batch
    "vespo": "token_mean",
}
# the other loss types: ppo
_TRL_POLICY: dict[str, PolicyLossType] = {"cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}
_TRL_GLOBAL_COUNT = ("dapo", "cispo", "vespo")  # token sums over num_items_in_batch (the call's normalizer)


_TRL_SOURCES = {
    "policy_loss": ("loss_type",),
    "ratio_level": ("importance_sampling_level",),
    "epsilon_low": ("epsilon",),
    "epsilon_high": ("epsilon_high", "epsilon"),
    "cispo_high": ("epsilon_high", "epsilon"),
    "ratio_cap": ("delta",),
    "sapo_tau_pos": ("sapo_temperature_pos",),
    "sapo_tau_neg": ("sapo_temperature_neg",),
    "vespo_k_pos": ("vespo_k_pos",),
    "vespo_lambda_pos": ("vespo_lambda_pos",),
    "vespo_k_neg": ("vespo_k_neg",),
    "vespo_lambda_neg": ("vespo_lambda_neg",),
    "rollout_correction": ("vllm_importance_sampling_mode",),
    "rollout_min": ("vllm_importance_sampling_clip_min",),
    "rollout_max": ("vllm_importance_sampling_clip_max",),
    "top_entropy_quantile": ("top_entropy_quantile",),
    "off_policy_mask_threshold": ("off_policy_mask_threshold",),
    "beta": ("beta",),
    "kl_ratio_weighted": ("use_bias_correction_kl",),
    "max_length": ("max_completion_length",),
    "entropy_coef": ("entropy_coef",),
    "temperature": ("temperature",),
    "scale": ("scale_rewards",),
}


@_names_options("trl", _TRL_SOURCES)
def trl(
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    delta: Optional[float] = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    temperature: float = 1.0,
    max_completion_length: int = 512,
    use_bias_correction_kl: bool = False,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    top_entropy_quantile: float = 1.0,
    off_policy_mask_threshold: Optional[float] = None,
    entropy_coef: float = 0.0,
    use_vllm: bool = False,
    vllm_importance_sampling_correction: bool = True,
    vllm_importance_sampling_mode: str = "sequence_mask",
    vllm_importance_sampling_clip_min: Optional[float] = None,
    vllm_importance_sampling_clip_max: Optional[float] = 3.0,
    scale_rewards: str = "group",
    gradient_accumulation_steps: int = 1,
    multi_objective_aggregation: str = "sum_then_normalize",
) -> LossConfig:
    """TRL ``GRPOConfig`` options → the loss of ``GRPOTrainer._compute_loss``.

    - ``grpo``/``sapo``: sequence mean of token means; ``bnpo``: token mean; ``dr_grpo``: token sum over
      B·max_completion_length; all three divided by ``gradient_accumulation_steps`` (folded into
      ``loss_scale``).
    - ``luspo``: the clipped loss (as ``grpo``), aggregated as TRL's ``(per_token_loss * mask).sum(-1).mean()``:
      each sequence's token sum, averaged over every sequence of the micro-batch, then divided by
      ``gradient_accumulation_steps``. TRL quirk, reproduced (``count_empty_sequences=True``): all-masked rows
      (e.g. completions removed by ``mask_truncated_completions``) still count in that mean, so they shrink the
      loss of the others. TRL recommends ``importance_sampling_level="sequence"`` (a warning) but runs either
      level; so does the preset.
    - ``dapo``/``cispo``/``vespo``: token sum over ``num_items_in_batch / num_processes``: pass that as the
      call's ``normalizer`` (without it the local token count is used).
    - ``cispo``: TRL's convention, ``epsilon_high`` is an absolute cap on the detached ratio, no lower bound.
    - ``vespo``: −sg[φ(w_i)]·A·ℓ with TRL's gamma weight of the sequence ratio (``vespo_k_*``,
      ``vespo_lambda_*``); TRL builds it from the token log-ratios whatever ``importance_sampling_level`` says
      (that option then only picks the ratio of ``use_bias_correction_kl``, which the preset refuses at
      sequence level). The vLLM correction must be a token mode (TRL's check): its log-weights join log w_i
      instead of multiplying the loss. TRL sums them over every position, not just the loss mask (its ratio is
      1 at padding), and a token that ``token_mask`` zeroed puts log w_i at the floor log 1e-8, so its
      sequence gets φ ≈ 0: pass TRL's ``importance_sampling_ratio`` as ``is_weights`` to get exactly that.
    - KL: k3 with no clamps (``beta``), times the ratio with ``use_bias_correction_kl``.
    - ``use_vllm`` with ``vllm_importance_sampling_correction``: the rollout weights of
      ``vllm_importance_sampling_mode`` from ``sampling_logprobs`` (or pass TRL's ``importance_sampling_ratio``
      as ``is_weights``).
    - Entropy bonus: token mean over the kept tokens (a token sum over ``normalizer`` for dapo/cispo/vespo).
      TRL's adaptive controller (``use_adaptive_entropy``) is state across steps, not a config: pass the
      coefficient it applies this step as ``entropy_coef`` (``fastgrpo.integrations.trl`` runs the controller).
    - ``scale_rewards`` picks the advantage normalization when rewards are passed;
      ``multi_objective_aggregation="normalize_then_sum"`` normalizes each reward function first (GDPO:
      ``estimator="normalize_then_sum"``, pass the [B, K] rewards and TRL's ``reward_weights``).
    """
    if not isinstance(loss_type, str) or loss_type not in _TRL_LOSS_TYPES:
        raise ValueError(f"presets.trl: loss_type must be one of {_TRL_LOSS_TYPES}, got {loss_type!r}")
    _choice("trl", "importance_sampling_level", importance_sampling_level, ("token", "sequence"))
    _steps("trl", "gradient_accumulation_steps", gradient_accumulation_steps)
    for name, value in (
        ("use_vllm", use_vllm),
        ("vllm_importance_sampling_correction", vllm_importance_sampling_correction),
    ):
        _flag("trl", name, value)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    aggregation = _TRL_AGGREGATION[loss_type]
    global_count = loss_type in _TRL_GLOBAL_COUNT
    policy = _TRL_POLICY.get(loss_type, "ppo")
    if policy == "cispo" and importance_sampling_level != "token":
        raise ValueError("presets.trl: loss_type='cispo' is token level only: set importance_sampling_level='token'")
    rollout_correction = (  # checked by LossConfig, whose error names the TRL option
        vllm_importance_sampling_mode if use_vllm and vllm_importance_sampling_correction else None
    )
    ratio_level = importance_sampling_level
    if policy == "vespo":  # its own sequence weight; the level only picks the bias-corrected KL's ratio
        if importance_sampling_level == "sequence" and use_bias_correction_kl and beta != 0.0:
            raise ValueError(
                "presets.trl: loss_type='vespo' with importance_sampling_level='sequence' and "
                "use_bias_correction_kl=True (a KL weighted by the sequence ratio) is not supported"
            )
        if rollout_correction not in (None, "token_truncate", "token_mask"):
            raise ValueError(
                "presets.trl: loss_type='vespo' needs vllm_importance_sampling_mode 'token_truncate' or "
                f"'token_mask' (as TRL), got {vllm_importance_sampling_mode!r}"
            )
        ratio_level = "token"
    return LossConfig(
        policy_loss=policy,
        ratio_level=cast(RatioLevel, ratio_level),  # one of them: checked above
        epsilon_low=epsilon,
        epsilon_high=eps_high,
        ratio_cap=delta if policy == "ppo" else None,
        cispo_high=eps_high if policy == "cispo" else None,
        sapo_tau_pos=sapo_temperature_pos,
        sapo_tau_neg=sapo_temperature_neg,
        vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg,
        rollout_correction=cast(Optional[RolloutCorrection], rollout_correction),
        rollout_min=vllm_importance_sampling_clip_min,
        rollout_max=vllm_importance_sampling_clip_max,
        top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=off_policy_mask_threshold,
        beta=beta,
        kl_estimator="k3",
        kl_ratio_weighted=use_bias_correction_kl,
        aggregation=aggregation,
        max_length=max_completion_length if loss_type == "dr_grpo" else None,
        entropy_coef=entropy_coef,
        entropy_aggregation="token_mean",
        temperature=temperature,
        loss_scale=1.0 if global_count else 1.0 / gradient_accumulation_steps,
        advantage=_trl_advantage(scale_rewards, multi_objective_aggregation),
    )


def _trl_advantage(scale_rewards: str, multi_objective_aggregation: str) -> AdvantageConfig:
    """TRL's reward → advantage step (``_generate_and_score_completions``) for [B, K] rewards of K functions:
    ``sum_then_normalize`` sums them with their weights, then normalizes as ``scale_rewards`` says;
    ``normalize_then_sum`` (GDPO) normalizes each function per group, sums them with their weights and whitens
    the sum over the batch, all with eps 1e-4; TRL ignores ``scale_rewards`` there (still checked here)."""
    _choice("trl", "multi_objective_aggregation", multi_objective_aggregation, _TRL_AGGREGATIONS)
    if multi_objective_aggregation == "normalize_then_sum":
        _choice("trl", "scale_rewards", scale_rewards, ("group", "batch", "none"))
        return AdvantageConfig(
            estimator="normalize_then_sum", scale="group", eps=1e-4, singleton="zero", whitening="sequence"
        )
    # scale_rewards is checked by AdvantageConfig, whose error names the TRL option
    return AdvantageConfig(estimator="grpo", scale=cast(AdvantageScale, scale_rewards), eps=1e-4, singleton="zero")


_TRL_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


_VERL_AGG: dict[str, Aggregation] = {
    "token-mean": "token_mean",
    "token-sum": "token_sum_norm",
    "seq-mean-token-sum": "seq_mean_token_sum",
    "seq-mean-token-mean": "seq_mean_token_mean",
    "seq-mean-token-sum-norm": "token_sum_norm",
}
_VERL_KL = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
_VERL_POLICY: dict[str, PolicyLossType] = {
    "vanilla": "ppo",
    "gspo": "ppo",
    "sapo": "sapo",
    "gpg": "reinforce",
    "geo_mean": "gmpo",
    "cispo": "cispo",
    "dppo_tv": "dppo_tv",
    "dppo_kl": "dppo_kl",
    "dro": "dro",
    "clip_cov": "clip_cov",
    "kl_cov": "kl_cov",
}
# verl's advantage estimators (core_algos.py, register_adv_est; gae needs a critic) → the AdvantageConfig fields
# that reproduce them, over eps 1e-6 (the functions' default: verl's compute_advantage passes none), singleton "raw"
# (verl: mean 0, std 1 for a group of one) and scale "group".
_VERL_ADV: dict[str, dict[str, Any]] = {
    "grpo": dict(estimator="grpo"),
    "grpo_vectorized": dict(estimator="grpo"),
    "rloo": dict(estimator="rloo"),
    "rloo_vectorized": dict(estimator="rloo", singleton="zero"),  # its (count > 1) factor zeroes a group of one
    "reinforce_plus_plus_baseline": dict(estimator="reinforce_baseline", whitening="token"),
    "reinforce_plus_plus": dict(estimator="discounted_return", whitening="token", masked_steps="skip"),
    "remax": dict(estimator="greedy_baseline"),
    "opo": dict(estimator="length_weighted_baseline"),
    "grpo_passk": dict(estimator="pass_at_k"),
    "gpg": dict(estimator="rescaled_group_baseline"),
    "gdpo": dict(estimator="normalize_then_sum", whitening="token"),
    "optimal_token_baseline": dict(estimator="optimal_token_baseline", masked_steps="count", eps=1e-8),
    "tir_optimal_token_baseline": dict(estimator="optimal_token_baseline", masked_steps="skip", eps=1e-8),
}
# The estimators that honour norm_adv_by_std_in_grpo: verl's trainer passes it to grpo alone, and grpo_passk reads
# it from the algorithm config; grpo_vectorized and gdpo keep their argument's default (True) whatever it says.
_VERL_NORM_BY_STD = ("grpo", "grpo_passk")


def _verl_advantage(adv_estimator: str, norm_adv_by_std_in_grpo: bool, gamma: float) -> AdvantageConfig:
    """verl's ``algorithm.adv_estimator`` (with ``norm_adv_by_std_in_grpo`` and ``gamma``, which only
    ``reinforce_plus_plus`` discounts with) → the AdvantageConfig of ``fastgrpo.advantages``."""
    fields: dict[str, Any] = dict(scale="group", eps=1e-6, singleton="raw")
    if adv_estimator in _VERL_NORM_BY_STD:
        fields["scale"] = "group" if norm_adv_by_std_in_grpo else "none"
    fields.update(_VERL_ADV[adv_estimator])
    if adv_estimator == "reinforce_plus_plus":
        fields["gamma"] = gamma
    return AdvantageConfig(**fields)


def _verl_kl(kl_loss_type: str) -> tuple[KLEstimator, Optional[float], Optional[float]]:
    """verl's kl_penalty: (estimator, input clamp, output clamp); a '+' suffix is straight-through to k2."""
    base, straight = (kl_loss_type[:-1], True) if kl_loss_type.endswith("+") else (kl_loss_type, False)
    if base not in _VERL_KL:
        raise ValueError(
            f"presets.verl: kl_loss_type must be one of {sorted(_VERL_KL)} (optionally with '+'), got {kl_loss_type!r}"
        )
    est = _VERL_KL[base]
    if straight and est != "k2":  # k2+ is plain k2 in verl
        est += "+"
    kind = cast(KLEstimator, est)  # k1, abs, k2 or k3 (_VERL_KL's values), maybe with "+"
    return (kind, 20.0, 10.0) if est.startswith("k3") else (kind, None, None)


_VERL_SOURCES = {
    "policy_loss": ("loss_mode",),
    "aggregation": ("loss_agg_mode",),
    "epsilon_low": ("clip_ratio_low", "clip_ratio"),
    "epsilon_high": ("clip_ratio_high", "clip_ratio"),
    "cispo_low": ("clip_ratio_low", "clip_ratio"),
    "cispo_high": ("clip_ratio_high", "clip_ratio"),
    "dual_clip": ("clip_ratio_c",),
    "sapo_tau_pos": ("tau_pos",),
    "sapo_tau_neg": ("tau_neg",),
    "beta": ("kl_loss_coef",),
    "kl_estimator": ("kl_loss_type",),
    "entropy_coef": ("entropy_coeff",),
    "max_length": ("loss_scale_factor",),
    "temperature": ("temperature",),
    "loss_scale": ("gradient_accumulation_steps",),
    "ratio_cap": ("clip_ratio_c",),
    "dro_beta": ("dro_beta",),
    "cov_fraction": ("clip_cov_ratio", "kl_cov_ratio"),
    "clip_cov_low": ("clip_cov_lb",),
    "clip_cov_high": ("clip_cov_ub",),
    "kl_cov_coef": ("ppo_kl_coef",),
    "estimator": ("adv_estimator",),
    "gamma": ("gamma",),
}


@_names_options("verl", _VERL_SOURCES)
def verl(
    *,
    loss_mode: str = "vanilla",
    loss_agg_mode: str = "token-mean",
    clip_ratio: float = 0.2,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    clip_ratio_c: float = 3.0,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    use_kl_loss: bool = False,
    kl_loss_coef: float = 0.001,
    kl_loss_type: str = "low_var_kl",
    entropy_coeff: float = 0.0,
    loss_scale_factor: Optional[int] = None,
    temperature: float = 1.0,
    gradient_accumulation_steps: int = 1,
    dro_beta: Optional[float] = None,
    clip_cov_ratio: float = 0.0002,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_ratio: float = 0.0002,
    ppo_kl_coef: float = 1.0,
    adv_estimator: str = "grpo",
    norm_adv_by_std_in_grpo: bool = True,
    gamma: float = 1.0,
) -> LossConfig:
    """verl actor options (``policy_loss.loss_mode``, ``loss_agg_mode``, ``clip_ratio*``, ``use_kl_loss``,
    ``kl_loss_coef``, ``kl_loss_type``, ``entropy_coeff``, ``loss_scale_factor``) → verl's actor loss.

    - ``vanilla``: log-ratio clamped to ±20 and dual clip always on with ``clip_ratio_c``.
    - ``gspo``: verl's GSPO-token form (``sequence_ratio_grad="token"``: each token's ratio has the value of
      the sequence ratio and the gradient of its own log-prob), log upper clamp 10, ``loss_agg_mode`` as
      given (verl ≤ 0.8 forced ``seq-mean-token-mean``).
    - ``sapo``: ±20 clamp, policy term always ``seq-mean-token-mean`` (KL and entropy keep
      ``loss_agg_mode``); ``gpg``: −A·ℓ; ``geo_mean``: GMPO with log-space bounds and token weights folded
      per sequence by geometric mean; ``cispo``: ±20 clamp and bounds 1 − low, 1 + high.
    - ``dppo_tv`` / ``dppo_kl``: ±20 clamp, ``clip_ratio_low/high`` are the trust-region thresholds and
      ``clip_ratio_c`` truncates the detached ratio; ``dro``: ``dro_beta`` (required, > 0), no clamp;
      ``clip_cov`` (``clip_cov_ratio``, ``clip_cov_lb``, ``clip_cov_ub``; no dual clip, no clamp, random draws
      from torch's global generator unless the call passes ``generator``) and ``kl_cov`` (``kl_cov_ratio``,
      ``ppo_kl_coef``).
    - Sequence means divide by the sequences with at least one token (verl's default when
      ``global_batch_size`` is not given: pass it as ``normalizer`` otherwise); ``seq-mean-token-sum-norm``
      is that sequence mean divided by ``loss_scale_factor`` (default: the padded length); ``token-sum`` is
      the plain token sum. ``token-mean`` clamps an all-masked batch's count to 1 where verl would return
      NaN.
    - KL (``use_kl_loss``): ``low_var_kl``/k3 clamps D to ±20 and the estimate to ±10; a ``+`` suffix keeps
      the value and takes k2's gradient.
    - ``gradient_accumulation_steps``: verl scales each micro-batch loss by 1/steps (``loss_scale``).
    - Pass verl's ``rollout_is_weights`` as ``is_weights``.
    - ``adv_estimator`` (``algorithm.*``, with ``norm_adv_by_std_in_grpo`` and ``gamma``): every estimator of
      verl but the critic's ``gae`` → ``advantage`` (see ``_VERL_ADV``; ``fastgrpo.integrations.verl``
      registers them in verl's registry). As in verl, ``norm_adv_by_std_in_grpo`` reaches only ``grpo`` and
      ``grpo_passk``, and ``gamma`` only ``reinforce_plus_plus``.
    """
    _choice("verl", "loss_mode", loss_mode, tuple(_VERL_POLICY))
    _choice("verl", "loss_agg_mode", loss_agg_mode, tuple(_VERL_AGG))
    _choice("verl", "adv_estimator", adv_estimator, tuple(_VERL_ADV))
    if not isinstance(kl_loss_type, str):
        raise ValueError(f"presets.verl: kl_loss_type must be a string, got {kl_loss_type!r}")
    _steps("verl", "gradient_accumulation_steps", gradient_accumulation_steps)
    for name, value in (("use_kl_loss", use_kl_loss), ("norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo)):
        _flag("verl", name, value)
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    _number("verl", "clip_ratio_low" if clip_ratio_low is not None else "clip_ratio", low)
    _number("verl", "clip_ratio_high" if clip_ratio_high is not None else "clip_ratio", high)
    _number("verl", "gamma", gamma)  # its range is AdvantageConfig's to check where it is used
    agg = _VERL_AGG[loss_agg_mode]
    kl_est, kl_in, kl_out = _verl_kl(kl_loss_type)
    policy = _VERL_POLICY[loss_mode]
    forced_seq_mean = loss_mode == "sapo"
    if loss_mode == "dro" and (dro_beta is None or isinstance(dro_beta, bool) or not dro_beta > 0):
        raise ValueError(f"presets.verl: dro_beta must be a positive number with loss_mode='dro', got {dro_beta!r}")
    return LossConfig(
        policy_loss=policy,
        ratio_level="sequence" if loss_mode == "gspo" else "token",
        sequence_ratio_grad="token" if loss_mode == "gspo" else "sequence",
        epsilon_low=low,
        epsilon_high=high,
        dual_clip=clip_ratio_c if loss_mode == "vanilla" else None,
        log_ratio_clamp=20.0 if loss_mode in ("vanilla", "sapo", "cispo", "dppo_tv", "dppo_kl") else None,
        ratio_cap=clip_ratio_c if loss_mode in ("dppo_tv", "dppo_kl") else None,
        dro_beta=dro_beta if loss_mode == "dro" and dro_beta is not None else 1.0,
        cov_fraction=kl_cov_ratio if loss_mode == "kl_cov" else clip_cov_ratio,
        clip_cov_low=clip_cov_lb,
        clip_cov_high=clip_cov_ub,
        kl_cov_coef=ppo_kl_coef,
        seq_log_ratio_max=10.0 if loss_mode == "gspo" else None,
        cispo_low=1.0 - low if policy == "cispo" else None,
        cispo_high=1.0 + high if policy == "cispo" else None,
        sapo_tau_pos=tau_pos,
        sapo_tau_neg=tau_neg,
        beta=kl_loss_coef if use_kl_loss else 0.0,
        kl_estimator=kl_est,
        kl_input_clamp=kl_in,
        kl_output_clamp=kl_out,
        kl_aggregation=agg if forced_seq_mean else None,
        aggregation="seq_mean_token_mean" if forced_seq_mean else agg,
        max_length=1 if loss_agg_mode == "token-sum" else loss_scale_factor,
        divide_by_num_sequences=loss_agg_mode != "token-sum",
        count_empty_sequences=False,
        entropy_coef=entropy_coeff,
        entropy_aggregation=agg if forced_seq_mean else None,
        temperature=temperature,
        loss_scale=1.0 / gradient_accumulation_steps,
        advantage=_verl_advantage(adv_estimator, norm_adv_by_std_in_grpo, gamma),
    )


# (is_correction_level, is_correction_mode, is_correction_gating) → the rollout correction
_OPENRLHF_IS: dict[tuple[str, str, str], RolloutCorrection] = {
    ("token", "clip", "ratio"): "token_truncate",
    ("token", "mask", "ratio"): "token_mask",
    ("seq", "mask", "ratio"): "sequence_geomean_mask",
    ("token", "mask", "binary_kl"): "token_binary_kl_mask",
    ("token", "mask", "tv"): "token_tv_mask",
    ("seq", "mask", "binary_kl"): "sequence_binary_kl_mask",
    ("seq", "mask", "tv"): "sequence_tv_mask",
}
# OpenRLHF's algo.advantage.estimator (experience_maker.py, compute_advantages_and_returns; gae needs a critic) →
# AdvantageConfig fields, over singleton "zero" (a group of one is centered on itself). Its whitening of
# reinforce/reinforce_baseline is over the response tokens, biased var, rsqrt(max(var, 1e-8)).
_OPENRLHF_ADV: dict[str, dict[str, Any]] = {
    "group_norm": dict(estimator="grpo", scale="group", eps=1e-9),
    "dr_grpo": dict(estimator="grpo", scale="none", eps=1e-9),
    "rloo": dict(estimator="rloo", eps=1e-9),
    "reinforce_baseline": dict(estimator="reinforce_baseline", whitening="token_biased"),
    "reinforce": dict(estimator="discounted_return", whitening="token_biased", masked_steps="count"),
    "flash_reinforce": dict(estimator="batch_baseline"),
}


def _openrlhf_advantage(advantage_estimator: str, gamma: float, no_std_norm: bool) -> AdvantageConfig:
    """OpenRLHF's estimator with ``gamma`` (it resets gamma to 1 for every estimator but ``reinforce``) and
    ``no_std_norm`` (its whitening then only centers)."""
    fields: dict[str, Any] = dict(eps=1e-8, singleton="zero")
    fields.update(_OPENRLHF_ADV[advantage_estimator])
    if fields.get("whitening") == "token_biased" and no_std_norm:
        fields["whitening"] = "token_center"
    if advantage_estimator == "reinforce":
        fields["gamma"] = gamma
    return AdvantageConfig(**fields)


_OPENRLHF_SOURCES = {
    "epsilon_low": ("eps_clip_low_high",),
    "epsilon_high": ("eps_clip_low_high",),
    "dual_clip": ("dual_clip",),
    "rollout_min": ("is_correction_threshold",),
    "rollout_max": ("is_correction_threshold",),
    "beta": ("init_kl_coef",),
    "entropy_coef": ("entropy_coef",),
    "temperature": ("temperature",),
    "gamma": ("gamma",),
}


@_names_options("openrlhf", _OPENRLHF_SOURCES)
def openrlhf(
    *,
    policy_loss_type: str = "ppo",
    eps_clip_low_high: tuple[float, float] = (0.2, 0.2),
    dual_clip: Optional[float] = None,
    token_level_loss: bool = True,
    use_kl_loss: bool = False,
    init_kl_coef: float = 0.0,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
    entropy_coef: Optional[float] = None,
    is_correction_level: str = "off",
    is_correction_mode: str = "mask",
    is_correction_gating: str = "ratio",
    is_correction_threshold: tuple[float, float] = (0.5, 5.0),
    temperature: float = 1.0,
    advantage_estimator: str = "group_norm",
    gamma: float = 1.0,
    no_std_norm: bool = False,
) -> LossConfig:
    """OpenRLHF ``PolicyLoss`` options + the actor's KL and entropy terms → OpenRLHF's actor loss.

    - ``ppo``: log-ratio clamped to ±20, optional ``dual_clip``; ``gspo``: sequence ratio without clamps and
      always a per-sample mean.
    - The KL (``use_kl_loss`` with ``init_kl_coef``; estimates clamped to ±10) and the entropy bonus are token
      means whatever ``token_level_loss`` says, as OpenRLHF's actor aggregates them with the default.
      ``unbiased_gradient`` (``--algo.kl.unbiased_gradient``): the estimate's value with the gradient
      sg[min(π/π_old, 10)]·D·∇ℓ (``kl_importance_gradient``; pass the old log-probs as ``old_logprobs``).
    - Sample means divide by the sequences with at least one token; pass OpenRLHF's ``batch_num_tokens`` or
      ``global_batch_size`` as ``normalizer``.
    - Train/rollout IS correction (``is_correction_*``, ppo only; read at 0.11.2); pass ``sampling_logprobs``.
      Gated by the ratio: level ``token`` with mode ``clip`` truncates the token weights (TIS), ``mask``
      zeroes those outside the band (ICEPOP); level ``seq`` with ``mask`` keeps token weights and drops whole
      sequences by their geometric mean. Gated by ``binary_kl``/``tv`` (mode ``mask``, threshold (low ≤ 0,
      δ)): the token weight e^(ℓ^old − ℓ^samp) is kept where the divergence between the sampled token's
      rollout and train probabilities (per token, or its mean over the sequence) lies in the band, else 0
      (``rollout_correction="{token,sequence}_{binary_kl,tv}_mask"``). For ``gspo`` with a correction level
      OpenRLHF instead measures the ratio against the rollout log-probs: pass those as ``old_logprobs``.
    - ``advantage_estimator`` (with ``gamma``, ``no_std_norm``) → ``advantage`` (see ``_OPENRLHF_ADV``):
      ``reinforce``, ``reinforce_baseline`` and ``flash_reinforce`` are per token: pass ``response_mask`` (the
      action mask) and, with the KL in the reward (``use_kl_loss=False``, ``init_kl_coef`` > 0), −β·KL as
      ``token_rewards`` to ``fastgrpo.advantages``. Where OpenRLHF's ``n_samples_per_prompt`` is 1,
      ``group_norm`` and ``rloo`` divide 0 by 0 there (NaN advantages); the ``zero`` singleton rule gives 0.
    """
    _choice("openrlhf", "policy_loss_type", policy_loss_type, ("ppo", "gspo"))
    _choice("openrlhf", "kl_estimator", kl_estimator, ("k1", "k2", "k3"))
    _choice("openrlhf", "is_correction_level", is_correction_level, ("off", "token", "seq"))
    _choice("openrlhf", "is_correction_mode", is_correction_mode, ("clip", "mask"))
    _choice("openrlhf", "is_correction_gating", is_correction_gating, ("ratio", "binary_kl", "tv"))
    for name, value in (
        ("token_level_loss", token_level_loss),
        ("use_kl_loss", use_kl_loss),
        ("unbiased_gradient", unbiased_gradient),
    ):
        _flag("openrlhf", name, value)
    low, high = _pair("openrlhf", "eps_clip_low_high", eps_clip_low_high)
    threshold = _pair("openrlhf", "is_correction_threshold", is_correction_threshold)
    # OpenRLHF's own checks (PolicyLoss.__init__), whatever the policy loss type and level
    if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
        raise ValueError(
            f"presets.openrlhf: is_correction_mode={is_correction_mode!r} needs is_correction_level='token' and "
            f"is_correction_gating='ratio' (a weight that can be clamped), got is_correction_level="
            f"{is_correction_level!r}, is_correction_gating={is_correction_gating!r}"
        )
    if is_correction_gating != "ratio" and is_correction_level != "off" and threshold[0] > 0:
        raise ValueError(
            f"presets.openrlhf: is_correction_gating={is_correction_gating!r} bounds a divergence from above: "
            f"is_correction_threshold must be (low <= 0, delta), got {is_correction_threshold!r}"
        )
    _choice("openrlhf", "advantage_estimator", advantage_estimator, tuple(_OPENRLHF_ADV))
    gspo = policy_loss_type == "gspo"
    is_mode = (
        None
        if is_correction_level == "off" or gspo
        else _OPENRLHF_IS[is_correction_level, is_correction_mode, is_correction_gating]
    )
    _number("openrlhf", "gamma", gamma)  # its range is AdvantageConfig's to check where it is used
    _flag("openrlhf", "no_std_norm", no_std_norm)
    return LossConfig(
        policy_loss="ppo",
        ratio_level="sequence" if gspo else "token",
        epsilon_low=low,
        epsilon_high=high,
        dual_clip=dual_clip,
        log_ratio_clamp=None if gspo else 20.0,
        rollout_correction=is_mode,
        rollout_min=threshold[0] if is_mode else None,
        rollout_max=threshold[1] if is_mode else None,
        beta=init_kl_coef if use_kl_loss else 0.0,
        kl_estimator=cast(KLEstimator, kl_estimator),  # k1, k2 or k3: checked above
        kl_output_clamp=10.0,
        kl_importance_gradient=unbiased_gradient,
        kl_importance_cap=10.0 if unbiased_gradient else None,
        kl_aggregation="token_mean",
        aggregation="token_mean" if token_level_loss and not gspo else "seq_mean_token_mean",
        count_empty_sequences=False,
        entropy_coef=entropy_coef or 0.0,
        entropy_aggregation="token_mean",
        temperature=temperature,
        advantage=_openrlhf_advantage(advantage_estimator, gamma, no_std_norm),
    )
