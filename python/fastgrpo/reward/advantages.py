"""The reward side's op (MATH §3): rewards → group-normalized advantages.

Kernel: ``kernels/advantages.py`` (Triton, one program per reward; its ``group_advantage`` also runs inside the
fused loss kernel, which normalizes each token's reward itself), ``csrc/cpu/advantages.cpp`` and
``csrc/cuda/advantages.cu`` (``advantages``). This module, top to bottom: the Triton launcher, the op's
registration (fake), the PyTorch form (arbitrary ``group_ids``, which need a relabelling, and raw rewards in
the two-phase loss), the kernel
backends' host code (``kernel_advantages``) and the public function ``advantages``.

    advantages(rewards, params, codes) -> (advantages, group mean, group std)

``params``: ``ADVANTAGE_SCALARS`` (eps, batch std), ``codes``: ``ADVANTAGE_CODES`` (kernels/params.py).

The op computes ``grpo``, ``rloo`` and ``reinforce_baseline``; the trainers' other estimators (pass@k, OPO, GPG,
ReMax, REINFORCE++, GDPO, the optimal token baseline ...) are O(B·T) PyTorch in ``reward/estimators.py``, which
``advantages`` calls for them (``estimator_advantages``), per token with a ``response_mask``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional, Sequence, TypedDict, Union, overload

import torch
from torch import Tensor

from .. import _checks, _library, backends
from ..config import (
    AdvantageConfig,
    AdvantageEstimator,
    AdvantageScale,
    MaskedSteps,
    Rewards,
    SingletonGroup,
    Whitening,
)
from ..inputs import check_rewards
from ..kernels import params as P
from . import estimators

if TYPE_CHECKING:
    from typing_extensions import Unpack


# ------------------------------------------------------------------------------------------ Triton launcher
def advantages_launcher(rewards: Tensor, params: Tensor, codes: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels import advantages as K

    _library.check_codes(codes, len(P.ADVANTAGE_CODES))
    named = dict(zip(P.ADVANTAGE_CODES, codes))
    if named["group_size"] <= 0 or rewards.numel() % named["group_size"]:  # (a partial group would read past the end)
        raise ValueError(f"group_size ({named['group_size']}) must divide the number of rewards ({rewards.numel()})")
    groups = rewards.numel() // named["group_size"]
    adv, mean, std = torch.empty_like(rewards), rewards.new_empty(groups), rewards.new_empty(groups)
    if groups > 0:
        _library.launch(K.advantages_kernel)[(rewards.numel(),)](
            rewards,
            _library.float_params(params, rewards, len(P.ADVANTAGE_SCALARS), "params"),
            adv,
            mean,
            std,
            **named,
            BLOCK=K.GROUP_BLOCK,
            num_warps=1,
        )
    return adv, mean, std


# ------------------------------------------------------------------------------------------- registration
def register_triton() -> None:
    _library.register_triton_op("advantages", advantages_launcher)


def _fake(rewards, params, codes):
    groups = rewards.numel() // dict(zip(P.ADVANTAGE_CODES, codes))["group_size"]
    return torch.empty_like(rewards), rewards.new_empty(groups), rewards.new_empty(groups)


def register(prefix: str) -> None:
    """The fake of ``fastgrpo::<prefix>advantages`` (no autograd: advantages are constants of the loss)."""
    torch.library.register_fake(f"fastgrpo::{prefix}advantages", _fake)


# ---------------------------------------------------------------------------------------------- PyTorch
def _group_index(num: int, group_size: Optional[int], group_ids: Optional[Tensor], device) -> tuple[Tensor, int]:
    if group_ids is not None:
        _, inverse = torch.unique(group_ids, return_inverse=True)
        return inverse, int(inverse.max()) + 1 if inverse.numel() else 0
    assert group_size is not None
    return torch.arange(num, device=device) // group_size, num // group_size


def torch_advantages(
    rewards: Rewards, config: AdvantageConfig = AdvantageConfig(), metrics: bool = True
) -> tuple[Tensor, dict[str, Tensor]]:
    """Group-normalized advantages [B] (fp32, detached) and the reward metrics of MATH §3 (``{}`` without
    ``metrics``).

    The group std is that of (r − mean)/s times s, with s the group's largest |r − mean|: (r − mean)² overflows
    fp32 from |r − mean| ~ 1e19, and the advantages would all become 0."""
    if not computed_by_kernels(config):
        return estimator_advantages(
            rewards.rewards, rewards.group_size, rewards.group_ids, config, rewards.weights, metrics
        )
    r = combine_rewards(rewards.rewards, rewards.weights)
    g, num_groups = _group_index(r.shape[0], rewards.group_size, rewards.group_ids, r.device)
    count = r.new_zeros(num_groups).index_add_(0, g, torch.ones_like(r))
    mean = r.new_zeros(num_groups).index_add_(0, g, r) / count.clamp(min=1)
    deviation = r - mean[g]
    scale = r.new_zeros(num_groups).scatter_reduce_(0, g, deviation.abs(), "amax")
    unit = deviation / torch.where(scale > 0, scale, 1.0)[g]
    sq = r.new_zeros(num_groups).index_add_(0, g, unit * unit)
    std = scale * (sq / (count - 1).clamp(min=1)).sqrt()  # unbiased; a group of one has std 0
    single = (count == 1)[g]

    cfg = config
    if cfg.singleton == "raw":  # verl: a group of one has mean 0 and std 1
        mean_t = torch.where(single, torch.zeros_like(r), mean[g])
        std_t = torch.where(single, torch.ones_like(r), std[g])
    else:
        mean_t, std_t = mean[g], std[g]
    centered = r - mean_t
    if cfg.estimator == "grpo":
        if cfg.scale == "group":
            adv = centered / (std_t + cfg.eps)
        elif cfg.scale == "batch":
            adv = centered / (r.std() + cfg.eps) if r.numel() > 1 else torch.zeros_like(r)
        else:
            adv = centered
    elif cfg.estimator == "rloo":
        n = count[g]
        adv = torch.where(n > 1, centered * n / (n - 1).clamp(min=1), centered)
    else:  # reinforce_baseline: whiten R − mean_g over the batch
        std_b = centered.std() if centered.numel() > 1 else torch.ones(())
        adv = (centered - centered.mean()) / (std_b + cfg.eps)

    return adv, advantage_metrics(r, adv, g, mean, std) if metrics else {}


def resolve_advantages(advantages_or_rewards: Union[Tensor, Rewards], config: AdvantageConfig) -> Tensor:
    """Advantages as given, or computed from :class:`Rewards`."""
    if not isinstance(advantages_or_rewards, Rewards):
        return advantages_or_rewards
    return torch_advantages(advantages_or_rewards, config, metrics=False)[0]


def computed_by_kernels(config: AdvantageConfig) -> bool:
    """Whether the ``advantages`` op computes ``config`` (``grpo``, ``rloo``, ``reinforce_baseline`` with its own
    whitening); the other estimators are PyTorch (reward/estimators.py)."""
    return config.estimator in ("grpo", "rloo") or (
        config.estimator == "reinforce_baseline" and config.effective_whitening == "sequence"
    )


def estimator_advantages(
    rewards: Tensor,
    group_size: Optional[int],
    group_ids: Optional[Tensor],
    config: AdvantageConfig,
    reward_weights: Optional[Tensor],
    metrics: bool,
    **token_inputs: Optional[Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """An estimator of reward/estimators.py on validated inputs: advantages [B], or [B, T] with a
    ``response_mask`` in ``token_inputs``, and the metrics of MATH §3 (for [B, T]: of each sequence's mean
    advantage over its tokens). Without the token inputs it needs (``Rewards`` in a loss call), a clear error."""
    mask = token_inputs.get("response_mask")
    needs = "response_mask" if config.needs_response_mask else None
    if config.estimator == "greedy_baseline" and token_inputs.get("baseline_rewards") is None:
        needs = "baseline_rewards"
    if mask is None and needs is not None:
        raise ValueError(
            f"advantage estimator {config.estimator!r} (whitening={config.effective_whitening!r}) needs {needs}: "
            f"compute the advantages with fastgrpo.advantages(..., {needs}=...) and pass them instead of Rewards"
        )
    r = _library.accumulate(rewards.detach())
    weights = None if reward_weights is None else _library.accumulate(reward_weights.detach())
    if config.estimator != "normalize_then_sum":
        r = combine_rewards(r, weights)
    groups = estimators.groups_of(r.shape[0], group_size, group_ids, r[:, 0] if r.dim() == 2 else r)
    given = {
        k: None if v is None else _library.accumulate(v.detach())
        for k, v in token_inputs.items()
        if k != "response_mask"
    }
    given["mask"] = None if mask is None else mask.detach() != 0
    adv = estimators.estimate(r, groups, config, reward_weights=weights, **given)
    if not metrics:
        return adv, {}
    combined = combine_rewards(r, weights)
    per_sequence = adv
    if given["mask"] is not None:
        per_sequence = adv.sum(-1) / given["mask"].sum(-1).clamp(min=1).to(adv.dtype)
    mean, std = estimators.group_mean_std(combined, groups)
    return adv, advantage_metrics(combined, per_sequence, groups.ids, mean, std)


def combine_rewards(rewards: Tensor, reward_weights: Optional[Tensor]) -> Tensor:
    """[B] rewards as they are; [B, K] reward functions summed with their weights (TRL "sum_then_normalize")."""
    r = _library.accumulate(rewards.detach())
    if r.dim() == 2:
        w = torch.ones(r.shape[1], device=r.device) if reward_weights is None else _library.accumulate(reward_weights)
        r = (r * w).sum(-1)
    return r


def advantage_metrics(r: Tensor, adv: Tensor, g: Tensor, mean: Tensor, std: Tensor) -> dict[str, Tensor]:
    """MATH §3 metrics from the rewards, the advantages, each reward's group and the group statistics.
    All solved / all failed are the zero-std groups whose rewards are all 1 / all 0 (binary rewards)."""
    num_groups = mean.numel()
    zero_std = std == 0
    nonempty = max(num_groups, 1)
    frac = lambda x: x.float().sum() / nonempty  # noqa: E731
    return {
        "reward": r.mean() if r.numel() else r.new_zeros(()),  # TRL's names
        "reward_std": r.std() if r.numel() > 1 else r.new_zeros(()),
        "reward/group_std_mean": std.sum() / nonempty,
        "frac_reward_zero_std": frac(zero_std),
        "frac_groups_all_solved": frac(zero_std & (mean == 1)),
        "frac_groups_all_failed": frac(zero_std & (mean == 0)),
        "advantage/group_sum_abs_max": torch.zeros(num_groups, device=r.device, dtype=adv.dtype)
        .index_add_(0, g, adv)
        .abs()
        .max()
        if num_groups
        else r.new_zeros(()),
    }


# ------------------------------------------------------------------------------- kernel backends' host code
def batch_std(r: Tensor, config: AdvantageConfig) -> tuple[bool, Tensor]:
    """(whether TRL's batch scale applies, the batch std as a 1-element tensor; 1 where unused)."""
    batch = config.estimator == "grpo" and config.scale == "batch"
    return batch, (r.std().reshape(1) if batch and r.numel() > 1 else r.new_ones(1))


def advantage_codes(config: AdvantageConfig, group_size: int, batch: bool) -> list[int]:
    """The op's ``codes`` (``ADVANTAGE_CODES``) for ``config``."""
    # The estimators without a kernel get grpo's code: the fused loss reads the codes only for the rewards it
    # normalizes itself (adv_from_rewards, grpo/rloo), and its codes are built for every config it is given.
    named = dict(
        group_size=group_size,
        adv_estimator=P.ADV_ESTIMATOR.get(config.estimator, P.ADV_ESTIMATOR["grpo"]),
        adv_divide=int(config.scale != "none"),
        adv_use_batch_std=int(batch),
        adv_singleton_raw=int(config.singleton == "raw"),
    )
    return [named[name] for name in P.ADVANTAGE_CODES]


def kernel_advantages(
    ops: _library.Ops, rewards: Rewards, config: AdvantageConfig, metrics: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """Contiguous groups in the kernel; arbitrary ``group_ids`` need a relabelling (``torch.unique``) and use the
    PyTorch form. Batch-wide steps (TRL's batch std, REINFORCE++ whitening) are O(B) torch ops. The estimators
    without a kernel (reward/estimators.py) are PyTorch on every backend."""
    group_size = rewards.group_size
    if rewards.group_ids is not None or group_size is None or not computed_by_kernels(config):
        return torch_advantages(rewards, config, metrics)
    r = combine_rewards(rewards.rewards, rewards.weights).float().contiguous()
    batch, std_b = batch_std(r, config)
    params = _library.params_of(P.ADVANTAGE_SCALARS, dict(adv_eps=config.eps, batch_std=std_b), r.device)
    adv, mean, std = ops.advantages(r, params, advantage_codes(config, group_size, batch))
    if batch and r.numel() <= 1:
        adv = torch.zeros_like(r)
    if config.estimator == "reinforce_baseline":  # whiten the centered rewards over the batch
        std_w = adv.std() if adv.numel() > 1 else adv.new_ones(())
        adv = (adv - adv.mean()) / (std_w + config.eps)
    if not metrics:
        return adv, {}
    g = torch.arange(r.numel(), device=r.device) // group_size
    return adv, advantage_metrics(r, adv, g, mean, std)


# ------------------------------------------------------------------------------------------ public function
class AdvantageOptions(TypedDict, total=False):
    """The keywords of :func:`advantages` besides ``return_metrics``, for its typed overloads (whose return type
    follows ``return_metrics``); their defaults and meaning: :func:`advantages`."""

    estimator: AdvantageEstimator
    scale: AdvantageScale
    eps: float
    singleton: SingletonGroup
    whitening: Optional[Whitening]
    gamma: float
    masked_steps: MaskedSteps
    zero_tail: bool
    reward_weights: Optional[Tensor]
    response_mask: Optional[Tensor]
    token_rewards: Optional[Tensor]
    baseline_rewards: Optional[Tensor]
    old_logprobs: Optional[Tensor]
    sum_pi_squared: Optional[Tensor]
    is_weights: Optional[Tensor]
    config: Optional[AdvantageConfig]
    backend: str
    check_values: Optional[bool]


@overload
def advantages(
    rewards: Tensor,
    group_size: Optional[int] = ...,
    group_ids: Optional[Tensor] = ...,
    *,
    return_metrics: Literal[False] = ...,
    **options: Unpack[AdvantageOptions],
) -> Tensor: ...
@overload
def advantages(
    rewards: Tensor,
    group_size: Optional[int] = ...,
    group_ids: Optional[Tensor] = ...,
    *,
    return_metrics: Literal[True],
    **options: Unpack[AdvantageOptions],
) -> tuple[Tensor, dict[str, Tensor]]: ...
@overload
def advantages(
    rewards: Tensor,
    group_size: Optional[int] = ...,
    group_ids: Optional[Tensor] = ...,
    *,
    return_metrics: bool = ...,
    **options: Unpack[AdvantageOptions],
) -> Union[Tensor, tuple[Tensor, dict[str, Tensor]]]: ...


def advantages(
    rewards: Tensor,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    *,
    estimator: AdvantageEstimator = "grpo",
    scale: AdvantageScale = "group",
    eps: float = 1e-4,
    singleton: SingletonGroup = "zero",
    whitening: Optional[Whitening] = None,
    gamma: float = 1.0,
    masked_steps: MaskedSteps = "skip",
    zero_tail: bool = True,
    reward_weights: Optional[Tensor] = None,
    response_mask: Optional[Tensor] = None,
    token_rewards: Optional[Tensor] = None,
    baseline_rewards: Optional[Tensor] = None,
    old_logprobs: Optional[Tensor] = None,
    sum_pi_squared: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    config: Optional[AdvantageConfig] = None,
    return_metrics: bool = False,
    backend: str = "auto",
    check_values: Optional[bool] = None,
) -> Union[Tensor, tuple[Tensor, dict[str, Tensor]]]:
    """Advantages [B] (fp32, no grad) from rewards [B] or [B, K] with weights [K]; per token [B, T] (0 at masked
    tokens) when a ``response_mask`` [B, T] is given.

    Groups are contiguous runs of ``group_size`` rewards, or share a value of ``group_ids`` [B]; the estimators
    without groups (``batch_baseline``, ``greedy_baseline``, ``discounted_return``) need neither. ``config``
    (an :class:`AdvantageConfig`) replaces ``estimator`` ... ``zero_tail`` when given (their meaning: there).
    PyTorch equivalent for ``estimator="grpo", scale="group"`` and contiguous groups of G::

        r = rewards.view(-1, G)
        ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)

    Per-token inputs ([B, T], read at the response tokens, where ``response_mask`` ≠ 0):

    - ``token_rewards``: rewards per token besides the outcome ``rewards`` (KL-in-reward, process rewards); the
      advantage of a token is then the return-to-go of the estimator's outcome advantage at the last response
      token plus these (discounted by ``gamma`` for ``discounted_return``, whose outcome advantage is the reward).
    - ``old_logprobs``, ``sum_pi_squared`` (Σ_v π_v² of each token's distribution) and optionally ``is_weights``
      (rollout importance weights): required by ``optimal_token_baseline``.

    ``baseline_rewards`` [B]: the reward of each prompt's greedy response, required by ``greedy_baseline``. The
    ``response_mask`` is required by ``length_weighted_baseline`` (lengths), ``discounted_return``,
    ``optimal_token_baseline`` and every ``token*`` whitening. A missing or unused input is a ValueError naming it.

    With ``return_metrics`` also returns 0-d tensors: ``reward``, ``reward_std`` (TRL's names),
    ``reward/group_std_mean``, ``frac_reward_zero_std``, ``advantage/group_sum_abs_max`` (≈ 0 for
    ``grpo``/``rloo``; per token: of each sequence's mean over its tokens) and, for 0/1 rewards,
    ``frac_groups_all_solved`` / ``frac_groups_all_failed``.

    ``backend`` computes ``grpo``, ``rloo`` and ``reinforce_baseline`` (the ``advantages`` op); the other
    estimators are O(B·T) PyTorch on every backend (reward/estimators.py).

    ``check_values`` (None: the global default, see ``fastgrpo.set_check_values``): reject non-finite rewards,
    reward weights and per-token inputs, at the cost of one host sync (none when False, under torch.compile or
    on meta tensors).
    """
    _checks.tensor("rewards", rewards)
    checks = _checks.ValueChecks(check_values, rewards)
    if config is not None and not isinstance(config, AdvantageConfig):
        raise TypeError(f"config must be a fastgrpo.AdvantageConfig or None, got {type(config).__name__}")
    cfg = config
    if cfg is None:
        cfg = AdvantageConfig(estimator, scale, eps, singleton, whitening, gamma, masked_steps, zero_tail)
    if cfg.estimator in UNGROUPED and group_size is None and group_ids is None:
        group_size = max(rewards.shape[0], 1) if rewards.dim() else None  # one group: only the metrics use it
    check_rewards(rewards, group_size, group_ids, reward_weights, checks)
    token_inputs = dict(
        token_rewards=token_rewards,
        baseline_rewards=baseline_rewards,
        old_logprobs=old_logprobs,
        sum_pi_squared=sum_pi_squared,
        is_weights=is_weights,
    )
    check_token_inputs(rewards, cfg, response_mask, token_inputs, checks)
    checks.run()
    impl = backends.select(backend, rewards.device)
    if computed_by_kernels(cfg):
        adv, metrics = impl.advantages(Rewards(rewards, group_size, group_ids, reward_weights), cfg, return_metrics)
        if response_mask is not None:
            tokens = None if token_rewards is None else _library.accumulate(token_rewards.detach())
            adv = estimators.token_advantages(adv, response_mask.detach() != 0, tokens, 1.0, cfg.masked_steps)
    else:
        adv, metrics = estimator_advantages(
            rewards,
            group_size,
            group_ids,
            cfg,
            reward_weights,
            return_metrics,
            response_mask=response_mask,
            **token_inputs,
        )
    return (adv, metrics) if return_metrics else adv


UNGROUPED = ("batch_baseline", "greedy_baseline", "discounted_return")  # estimators that use no group


def check_token_inputs(
    rewards: Tensor,
    config: AdvantageConfig,
    response_mask: Optional[Tensor],
    token_inputs: dict[str, Optional[Tensor]],
    checks: _checks.ValueChecks,
) -> None:
    """Shapes, dtypes and devices of ``advantages``' per-token inputs, which ones ``config`` requires and which
    ones it would not use (an error too: an input silently ignored is a bug waiting)."""
    b = rewards.shape[0]
    est = f"estimator={config.estimator!r}"
    if response_mask is not None:
        _checks.tensor("response_mask", response_mask)
        _checks.real("response_mask", response_mask, "the response tokens")
        if response_mask.dim() != 2 or response_mask.shape[0] != b:
            raise ValueError(
                f"response_mask must have shape [B, T] with B = {b} (a row per reward), got {list(response_mask.shape)}"
            )
        _checks.same_device(rewards.device, response_mask=response_mask)
        checks.set_mask(response_mask, None)
    elif config.needs_response_mask:
        why = (
            ""
            if config.estimator in ("length_weighted_baseline", "discounted_return", "optimal_token_baseline")
            else (f" with whitening={config.effective_whitening!r}")
        )
        raise ValueError(f"response_mask [B, T] is required by {est}{why}")
    for name, x in token_inputs.items():
        if x is None:
            continue
        _checks.tensor(name, x)
        _checks.floating(name, x)
        if name == "baseline_rewards":
            _checks.shape(name, x, (b,), "one baseline reward per reward")
        elif response_mask is None:
            raise ValueError(f"{name} is per token: it needs response_mask [B, T]")
        else:
            _checks.shape(name, x, tuple(response_mask.shape), "one value per token of response_mask")
        _checks.same_device(rewards.device, **{name: x})
    users = dict(
        baseline_rewards=("greedy_baseline",),
        old_logprobs=("optimal_token_baseline",),
        sum_pi_squared=("optimal_token_baseline",),
        is_weights=("optimal_token_baseline",),
    )
    for name, estimators_using in users.items():
        given = token_inputs[name] is not None
        if given and config.estimator not in estimators_using:
            raise ValueError(f"{name} is only used by estimator={estimators_using[0]!r}, got {est}")
        if not given and config.estimator in estimators_using and name != "is_weights":
            raise ValueError(f"{name} is required by {est}")
    checks.finite("token_rewards", token_inputs["token_rewards"])
    checks.finite("baseline_rewards", token_inputs["baseline_rewards"], masked=False)
    checks.logprobs("old_logprobs", token_inputs["old_logprobs"])
    checks.finite("sum_pi_squared", token_inputs["sum_pi_squared"])
    checks.weights("is_weights", token_inputs["is_weights"])
