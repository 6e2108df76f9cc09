"""Trainer presets (SPEC §5): each takes the trainer's own option names and returns the :class:`LossConfig`
that reproduces that trainer's loss, quirks included.

Read from the trainers' sources: TRL ``trl/trainer/grpo_trainer.py`` (``_compute_loss``, v1.10–1.16),
verl ``verl/trainer/ppo/core_algos.py`` + ``verl/workers/utils/losses.py`` (read at 0.9.1; tested against it) and
OpenRLHF ``openrlhf/models/loss.py`` + ``openrlhf/trainer/ray/ppo_actor.py`` (read at 0.11.2; tested against it).
What a config cannot carry (a global token count, the rollout log-probs) is a call argument: each preset's
docstring says which.
"""

from __future__ import annotations

from typing import Optional

from .config import AdvantageConfig, LossConfig

_TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")


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
) -> LossConfig:
    """TRL ``GRPOConfig`` options → the loss of ``GRPOTrainer._compute_loss``.

    - ``grpo``/``sapo``: sequence mean of token means; ``bnpo``: token mean; ``dr_grpo``: token sum over
      B·max_completion_length; all three divided by ``gradient_accumulation_steps`` (folded into
      ``loss_scale``).
    - ``dapo``/``cispo``: token sum over ``num_items_in_batch / num_processes``: pass that as the call's
      ``normalizer`` (without it the local token count is used).
    - ``cispo``: TRL's convention, ``epsilon_high`` is an absolute cap on the detached ratio, no lower bound.
    - KL: k3 with no clamps (``beta``), times the ratio with ``use_bias_correction_kl``.
    - ``use_vllm`` with ``vllm_importance_sampling_correction``: the rollout weights of
      ``vllm_importance_sampling_mode`` from ``sampling_logprobs`` (or pass TRL's ``importance_sampling_ratio``
      as ``is_weights``).
    - Entropy bonus: token mean over the kept tokens (a token sum over ``normalizer`` for dapo/cispo).
    - ``scale_rewards`` picks the advantage normalization when rewards are passed.
    """
    if loss_type not in _TRL_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {_TRL_LOSS_TYPES} (TRL's vespo/luspo are not supported), "
                         f"got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps!r}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    aggregation = {"grpo": "seq_mean_token_mean", "sapo": "seq_mean_token_mean", "bnpo": "token_mean",
                   "dr_grpo": "token_sum_norm", "dapo": "token_mean", "cispo": "token_mean"}[loss_type]
    global_count = loss_type in ("dapo", "cispo")
    policy = {"cispo": "cispo", "sapo": "sapo"}.get(loss_type, "ppo")
    if policy == "cispo" and importance_sampling_level != "token":
        raise ValueError("loss_type='cispo' is token level only: set importance_sampling_level='token'")
    return LossConfig(
        policy_loss=policy,
        ratio_level=importance_sampling_level,
        epsilon_low=epsilon,
        epsilon_high=eps_high,
        ratio_cap=delta if policy == "ppo" else None,
        cispo_high=eps_high if policy == "cispo" else None,
        sapo_tau_pos=sapo_temperature_pos,
        sapo_tau_neg=sapo_temperature_neg,
        rollout_correction=vllm_importance_sampling_mode
        if use_vllm and vllm_importance_sampling_correction else None,
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
        advantage=AdvantageConfig(estimator="grpo", scale=scale_rewards, eps=1e-4, singleton="zero"),
    )


_VERL_AGG = {"token-mean": "token_mean", "token-sum": "token_sum_norm", "seq-mean-token-sum": "seq_mean_token_sum",
             "seq-mean-token-mean": "seq_mean_token_mean", "seq-mean-token-sum-norm": "token_sum_norm"}
_VERL_KL = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
_VERL_MODES = ("vanilla", "gspo", "sapo", "gpg", "geo_mean", "cispo")
_VERL_ADV = {"grpo": "grpo", "rloo": "rloo", "reinforce_plus_plus_baseline": "reinforce_baseline"}


def _verl_kl(kl_loss_type: str) -> tuple[str, Optional[float], Optional[float]]:
    """verl's kl_penalty: (estimator, input clamp, output clamp); a '+' suffix is straight-through to k2."""
    base, straight = (kl_loss_type[:-1], True) if kl_loss_type.endswith("+") else (kl_loss_type, False)
    if base not in _VERL_KL:
        raise ValueError(f"kl_loss_type must be one of {sorted(_VERL_KL)} (optionally with '+'), "
                         f"got {kl_loss_type!r}")
    est = _VERL_KL[base]
    if straight and est != "k2":  # k2+ is plain k2 in verl
        est += "+"
    return (est, 20.0, 10.0) if est.startswith("k3") else (est, None, None)


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
    adv_estimator: str = "grpo",
    norm_adv_by_std_in_grpo: bool = True,
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
    - Sequence means divide by the sequences with at least one token (verl's default when
      ``global_batch_size`` is not given: pass it as ``normalizer`` otherwise); ``seq-mean-token-sum-norm``
      is that sequence mean divided by ``loss_scale_factor`` (default: the padded length); ``token-sum`` is
      the plain token sum. ``token-mean`` clamps an all-masked batch's count to 1 where verl would return
      NaN.
    - KL (``use_kl_loss``): ``low_var_kl``/k3 clamps D to ±20 and the estimate to ±10; a ``+`` suffix keeps
      the value and takes k2's gradient.
    - ``gradient_accumulation_steps``: verl scales each micro-batch loss by 1/steps (``loss_scale``).
    - Pass verl's ``rollout_is_weights`` as ``is_weights``.
    """
    if loss_mode not in _VERL_MODES:
        raise ValueError(f"loss_mode must be one of {_VERL_MODES}, got {loss_mode!r}")
    if loss_agg_mode not in _VERL_AGG:
        raise ValueError(f"loss_agg_mode must be one of {tuple(_VERL_AGG)}, got {loss_agg_mode!r}")
    if adv_estimator not in _VERL_ADV:
        raise ValueError(f"adv_estimator must be one of {tuple(_VERL_ADV)}, got {adv_estimator!r}")
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    agg = _VERL_AGG[loss_agg_mode]
    kl_est, kl_in, kl_out = _verl_kl(kl_loss_type)
    policy = {"vanilla": "ppo", "gspo": "ppo", "sapo": "sapo", "gpg": "reinforce", "geo_mean": "gmpo",
              "cispo": "cispo"}[loss_mode]
    forced_seq_mean = loss_mode == "sapo"
    return LossConfig(
        policy_loss=policy,
        ratio_level="sequence" if loss_mode == "gspo" else "token",
        sequence_ratio_grad="token" if loss_mode == "gspo" else "sequence",
        epsilon_low=low,
        epsilon_high=high,
        dual_clip=clip_ratio_c if loss_mode == "vanilla" else None,
        log_ratio_clamp=20.0 if loss_mode in ("vanilla", "sapo", "cispo") else None,
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
        advantage=AdvantageConfig(
            estimator=_VERL_ADV[adv_estimator],
            scale="group" if norm_adv_by_std_in_grpo else "none", eps=1e-6, singleton="raw"),
    )


_OPENRLHF_IS = {("token", "clip"): "token_truncate", ("token", "mask"): "token_mask",
                ("seq", "mask"): "sequence_geomean_mask"}
_OPENRLHF_ADV = {"group_norm": ("grpo", "group", 1e-9), "dr_grpo": ("grpo", "none", 1e-9),
                 "rloo": ("rloo", "group", 1e-9), "reinforce_baseline": ("reinforce_baseline", "group", 1e-8)}


def openrlhf(
    *,
    policy_loss_type: str = "ppo",
    eps_clip_low_high: tuple[float, float] = (0.2, 0.2),
    dual_clip: Optional[float] = None,
    token_level_loss: bool = True,
    use_kl_loss: bool = False,
    init_kl_coef: float = 0.0,
    kl_estimator: str = "k1",
    entropy_coef: Optional[float] = None,
    is_correction_level: str = "off",
    is_correction_mode: str = "mask",
    is_correction_gating: str = "ratio",
    is_correction_threshold: tuple[float, float] = (0.5, 5.0),
    temperature: float = 1.0,
    advantage_estimator: str = "group_norm",
) -> LossConfig:
    """OpenRLHF ``PolicyLoss`` options + the actor's KL and entropy terms → OpenRLHF's actor loss.

    - ``ppo``: log-ratio clamped to ±20, optional ``dual_clip``; ``gspo``: sequence ratio without clamps and
      always a per-sample mean.
    - The KL (``use_kl_loss`` with ``init_kl_coef``; estimates clamped to ±10) and the entropy bonus are token
      means whatever ``token_level_loss`` says, as OpenRLHF's actor aggregates them with the default.
    - Sample means divide by the sequences with at least one token; pass OpenRLHF's ``batch_num_tokens`` or
      ``global_batch_size`` as ``normalizer``.
    - Train/rollout IS correction (``is_correction_*``, ppo only; read at 0.11.2), gated by the ratio:
      level ``token`` with mode ``clip`` truncates the token weights (TIS), ``mask`` zeroes those outside the
      band (ICEPOP); level ``seq`` with ``mask`` keeps token weights and drops whole sequences by their
      geometric mean; pass ``sampling_logprobs``. The ``binary_kl``/``tv`` gatings are not a config: pass
      the weights as ``is_weights`` (:class:`fastgrpo.integrations.openrlhf.PolicyLoss` computes them).
      For ``gspo`` with a correction level OpenRLHF instead measures the ratio against the rollout
      log-probs: pass those as ``old_logprobs``.
    """
    if policy_loss_type not in ("ppo", "gspo"):
        raise ValueError(f"policy_loss_type must be 'ppo' or 'gspo', got {policy_loss_type!r}")
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_estimator must be one of ('k1', 'k2', 'k3'), got {kl_estimator!r}")
    if is_correction_level not in ("off", "token", "seq"):
        raise ValueError(f"is_correction_level must be 'off', 'token' or 'seq', got {is_correction_level!r}")
    if is_correction_level != "off" and (is_correction_level, is_correction_mode) not in _OPENRLHF_IS:
        raise ValueError(f"is_correction_mode {is_correction_mode!r} is not supported at level "
                         f"{is_correction_level!r} (token: clip/mask, seq: mask)")
    if is_correction_level != "off" and is_correction_gating != "ratio" and policy_loss_type == "ppo":
        raise ValueError(f"is_correction_gating={is_correction_gating!r} is not a LossConfig: pass the weights "
                         "as is_weights")
    if advantage_estimator not in _OPENRLHF_ADV:
        raise ValueError(f"advantage_estimator must be one of {tuple(_OPENRLHF_ADV)}, got {advantage_estimator!r}")
    low, high = eps_clip_low_high
    gspo = policy_loss_type == "gspo"
    is_mode = None if is_correction_level == "off" or gspo else _OPENRLHF_IS[is_correction_level, is_correction_mode]
    estimator, scale, eps = _OPENRLHF_ADV[advantage_estimator]
    return LossConfig(
        policy_loss="ppo",
        ratio_level="sequence" if gspo else "token",
        epsilon_low=low,
        epsilon_high=high,
        dual_clip=dual_clip,
        log_ratio_clamp=None if gspo else 20.0,
        rollout_correction=is_mode,
        rollout_min=is_correction_threshold[0] if is_mode else None,
        rollout_max=is_correction_threshold[1] if is_mode else None,
        beta=init_kl_coef if use_kl_loss else 0.0,
        kl_estimator=kl_estimator,
        kl_output_clamp=10.0,
        kl_aggregation="token_mean",
        aggregation="token_mean" if token_level_loss and not gspo else "seq_mean_token_mean",
        count_empty_sequences=False,
        entropy_coef=entropy_coef or 0.0,
        entropy_aggregation="token_mean",
        temperature=temperature,
        advantage=AdvantageConfig(estimator=estimator, scale=scale, eps=eps, singleton="zero"),
    )
