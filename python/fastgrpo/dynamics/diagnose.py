"""Heuristic diagnosis of a GRPO training log: :func:`diagnose` returns one :class:`Finding` per rule that fired.

These are rules of thumb *derived from* the literature, not results of it; every threshold is a keyword argument
of :func:`diagnose` with a default that is a judgement call, and a finding is a prompt to look at samples, not a
verdict. The rules and where they come from:

``advantage_degeneracy``
    GRPO's advantage ``(r - mean_group) / std_group`` is zero for a group whose rewards all tie, so such groups
    carry no policy gradient (the observation behind DAPO's dynamic sampling, Yu et al. 2025). Fires when the
    smoothed ``frac_reward_zero_std`` ends above ``zero_std_frac``, or the smoothed ``reward_std`` ends below
    ``reward_std_ratio`` times its initial value.
``policy_concentration``
    Entropy collapse: the policy's token entropy falls early and fast while the reward saturates (the entropy-
    reward trade-off described by Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs"); exploration
    is then gone. Fires when the smoothed ``entropy`` ends below ``entropy_ratio`` times its initial value.
``instability``
    The reward curve rings or its fluctuations grow. Fires when the damped-oscillator model is the preferred fit
    (:func:`fastgrpo.dynamics.models.fit`), underdamped, with ``zeta < zeta_threshold``, and its first overshoot
    peak (half the damped period after the first step) lies within the first ``max_peak_fraction`` of the run, so
    the overshoot and the fall after it are in the data (an S-shaped rise is otherwise fitted as half a slow
    cosine with ζ at its lower bound), and the oscillation's amplitude ``|R0 - R∞|`` is at least ``min_ringing_snr``
    times the RMS of the fit's residuals (on a flat, noisy reward the oscillator often wins the AICc comparison by
    fitting a sinusoid to the noise, with an amplitude about the noise level); or when the residuals of
    the preferred fit, detrended per third of the run (and divided by the Bernoulli scale ``sqrt(m(1-m))`` of the
    fitted mean ``m`` when every reward lies in [0, 1], so that a reward moving towards 0.5 does not count),
    have an RMS in the last third more than ``residual_growth`` times that of the first third.
``reward_hacking`` (possible)
    The reward keeps rising while the policy moves far from where it started: KL to the reference, the clipped
    fraction or the mean ``|ratio - 1|`` grows past a threshold. Reward-model over-optimisation shows as a
    proxy reward rising with KL while the true objective falls (Gao, Schulman & Hilton 2023); a log holds only
    the proxy, so this can say "possible", never "is". Fires when the reward rises (Spearman rank correlation with
    the step above ``reward_trend``) and a drift metric grows (its last-third mean above its first-third mean)
    and its smoothed value ends above its threshold: ``kl_threshold``, ``clip_threshold``, ``ratio_threshold``.

"Smoothed" is a trailing mean over ``window`` points (default: a tenth of the points present, at least 3);
"initial" is the mean of the first ``window`` points. A rule whose metric is absent from the log is not checked
(:func:`unchecked` lists them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .logs import TrainingLog

if TYPE_CHECKING:
    from .models import ModelChoice

__all__ = ["Finding", "RULE_METRICS", "diagnose", "model_name", "unchecked"]

#: the canonical metrics each kind of finding reads (reward is always present in a TrainingLog)
RULE_METRICS: dict[str, tuple[str, ...]] = {
    "advantage_degeneracy": ("frac_reward_zero_std", "reward_std"),
    "policy_concentration": ("entropy",),
    "instability": ("reward",),
    "reward_hacking": ("kl", "clip_fraction", "ratio_deviation"),
}


@dataclass(frozen=True)
class Finding:
    """One rule that fired: which ``kind`` of problem, on which canonical ``metric``, by which ``rule`` and
    ``threshold``; ``value`` is what was compared with the threshold and ``step`` where the condition began to
    hold (None for whole-run rules)."""

    kind: str
    metric: str
    rule: str
    threshold: float
    value: float
    step: float | None
    message: str


def _window(n: int, window: int | None) -> int:
    return max(1, min(n, window if window is not None else max(3, n // 10)))


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (fewer at the start)."""
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def _since(steps: np.ndarray, holds: np.ndarray) -> float | None:
    """The step from which ``holds`` is true through the end of the run, or None if it is false at the end."""
    if not len(holds) or not holds[-1]:
        return None
    false = np.flatnonzero(~holds)
    return float(steps[false[-1] + 1] if len(false) else steps[0])


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3:
        return 0.0
    rx = np.argsort(np.argsort(x)).astype(float)
    ry = np.argsort(np.argsort(y)).astype(float)
    sx, sy = rx.std(), ry.std()
    return 0.0 if sx == 0 or sy == 0 else float(np.mean((rx - rx.mean()) * (ry - ry.mean())) / (sx * sy))


def _thirds(n: int) -> tuple[slice, slice, slice]:
    a, b = n // 3, (2 * n) // 3
    return slice(0, a), slice(a, b), slice(b, n)


def _detrended_rms(x: np.ndarray, y: np.ndarray) -> float:
    if len(y) < 3:
        return float(np.sqrt(np.mean(y**2)))
    coef = np.polyfit(x - x.mean(), y, 1)
    return float(np.sqrt(np.mean((y - np.polyval(coef, x - x.mean())) ** 2)))


def _name(log: TrainingLog, metric: str) -> str:
    original = log.names.get(metric, metric)
    return metric if original == metric else f"{metric} ({original})"


def unchecked(log: TrainingLog) -> list[str]:
    """The canonical metrics the rules read that this log lacks (so the rules on them were not checked)."""
    metrics = sorted({m for ms in RULE_METRICS.values() for m in ms})
    return [m for m in metrics if not log.has(m)]


def _collapse(log: TrainingLog, kind: str, metric: str, ratio: float, window: int | None, why: str) -> "Finding | None":
    """A finding when the smoothed ``metric`` has stayed below ``ratio`` × its initial mean (reward std, entropy)."""
    if not log.has(metric):
        return None
    s, v = log.series(metric)
    w = _window(len(v), window)
    initial = float(np.mean(v[:w]))
    if initial <= 0:
        return None
    rel = _smooth(v, w) / initial
    since = _since(s, rel < ratio)
    if since is None:
        return None
    return Finding(
        kind,
        metric,
        f"smoothed {metric} / initial {metric} < threshold",
        ratio,
        float(rel[-1]),
        since,
        f"{_name(log, metric)} fell to {rel[-1]:.2f}x its initial {initial:.3g} (< {ratio:g}x) since step "
        f"{since:g}: {why}",
    )


def diagnose(
    log: TrainingLog,
    *,
    choice: ModelChoice | None = None,
    window: int | None = None,
    zero_std_frac: float = 0.5,
    reward_std_ratio: float = 0.2,
    entropy_ratio: float = 0.3,
    zeta_threshold: float = 0.3,
    max_peak_fraction: float = 0.5,
    min_ringing_snr: float = 2.5,
    residual_growth: float = 2.0,
    min_points_residual: int = 24,
    reward_trend: float = 0.3,
    kl_threshold: float = 0.1,
    clip_threshold: float = 0.1,
    ratio_threshold: float = 0.1,
) -> list[Finding]:
    """Run every heuristic of this module on ``log``; see the module docstring for each rule.

    ``choice`` is a :func:`fastgrpo.dynamics.models.fit` of the log's reward curve, computed here (needs scipy)
    when not given. Thresholds: ``zero_std_frac`` (fraction of groups), ``reward_std_ratio`` and ``entropy_ratio``
    (fractions of the initial value), ``zeta_threshold`` (damping ratio), ``max_peak_fraction`` (fraction of the
    run's span), ``min_ringing_snr`` (oscillation amplitude over residual RMS), ``residual_growth`` (ratio of RMS,
    last third over first third; checked with at least ``min_points_residual`` reward points), ``reward_trend``
    (Spearman correlation), ``kl_threshold`` (nats per token, as the trainer logs it), ``clip_threshold``
    (fraction of tokens), ``ratio_threshold`` (mean ``|ratio - 1|``). ``window``: points in the trailing mean.
    """
    findings: list[Finding] = []
    steps, reward = log.series("reward")

    # --- advantage degeneracy
    if log.has("frac_reward_zero_std"):
        s, v = log.series("frac_reward_zero_std")
        sm = _smooth(v, _window(len(v), window))
        since = _since(s, sm > zero_std_frac)
        if since is not None:
            findings.append(
                Finding(
                    "advantage_degeneracy",
                    "frac_reward_zero_std",
                    "smoothed frac_reward_zero_std > threshold",
                    zero_std_frac,
                    float(sm[-1]),
                    since,
                    f"{_name(log, 'frac_reward_zero_std')} is {sm[-1]:.2f} > {zero_std_frac:g} since step "
                    f"{since:g}: most groups' rewards tie, so their advantages are zero and carry no gradient",
                )
            )
    for kind, metric, ratio, why in (
        ("advantage_degeneracy", "reward_std", reward_std_ratio, "rewards barely differ, advantages vanish"),
        ("policy_concentration", "entropy", entropy_ratio, "the policy has concentrated, little exploration left"),
    ):
        found = _collapse(log, kind, metric, ratio, window, why)
        if found is not None:
            findings.append(found)

    # --- instability
    if choice is None and len(reward) >= 5:
        from .models import fit

        choice = fit(steps, reward)
    if choice is not None:
        findings.extend(
            _instability(
                steps,
                reward,
                choice,
                zeta_threshold,
                max_peak_fraction,
                min_ringing_snr,
                residual_growth,
                min_points_residual,
            )
        )

    # --- possible reward hacking
    trend = _spearman(steps, reward)
    if trend > reward_trend:
        drift = {
            "kl": (kl_threshold, "KL to the reference"),
            "clip_fraction": (clip_threshold, "clipped fraction"),
            "ratio_deviation": (ratio_threshold, "mean |ratio - 1|"),
        }
        for metric, (threshold, what) in drift.items():
            if not log.has(metric):
                continue
            s, v = log.series(metric)
            if len(v) < 3:
                continue
            first, _, last = _thirds(len(v))
            sm = _smooth(v, _window(len(v), window))
            growing = float(np.mean(v[last])) > float(np.mean(v[first]))
            since = _since(s, sm > threshold)
            if growing and since is not None:
                findings.append(
                    Finding(
                        "reward_hacking",
                        metric,
                        f"reward rising (Spearman > {reward_trend:g}) while smoothed {metric} grows > threshold",
                        threshold,
                        float(sm[-1]),
                        since,
                        f"possible reward hacking: reward rising (Spearman {trend:.2f}) while {what} "
                        f"{_name(log, metric)} grew to {sm[-1]:.3g} > {threshold:g} since step {since:g}; "
                        "read samples before trusting the reward",
                    )
                )
    return findings


def model_name(choice: ModelChoice) -> str:
    """``"oscillator"`` or ``"saturation"``: which of the two fits ``choice.best`` is."""
    return "oscillator" if choice.oscillator is not None and choice.best is choice.oscillator else "saturation"


def _instability(
    steps: np.ndarray,
    reward: np.ndarray,
    choice: ModelChoice,
    zeta_threshold: float,
    max_peak_fraction: float,
    min_ringing_snr: float,
    residual_growth: float,
    min_points: int,
) -> list[Finding]:
    findings = []
    osc = choice.oscillator
    span = float(steps[-1] - steps[0])
    if (
        model_name(choice) == "oscillator"
        and osc is not None
        and osc.regime == "underdamped"
        and np.isfinite(osc.zeta)
        and osc.zeta < zeta_threshold
        and osc.period / 2 <= max_peak_fraction * span
    ):
        amplitude = abs(osc.r0 - osc.r_inf)
        rms = float(np.sqrt(np.mean((reward - osc.predict(steps)[0]) ** 2)))
        if amplitude >= min_ringing_snr * rms:
            peak = float(steps[np.argmin(np.abs(steps - steps[0] - osc.period / 2))])  # the logged step nearest
            findings.append(
                Finding(
                    "instability",
                    "reward",
                    "oscillator preferred (AICc), underdamped, zeta < threshold "
                    f"(first peak observed, |R0 - Rinf| >= {min_ringing_snr:g} x residual RMS)",
                    zeta_threshold,
                    float(osc.zeta),
                    peak,
                    f"the reward rings: the damped-oscillator fit is preferred ({choice.criterion}) and underdamped "
                    f"with zeta = {osc.zeta:.3g} < {zeta_threshold:g}; period {osc.period:.3g} steps, first "
                    f"overshoot peak near step {peak:g}, amplitude {amplitude / rms:.1f}x the residual RMS",
                )
            )
    n = len(reward)
    if n >= min_points:
        mean = np.asarray(choice.predict(steps)[0], dtype=float)
        resid = reward - mean
        if np.all((reward >= 0) & (reward <= 1)):
            m = np.clip(mean, 0.05, 0.95)
            resid = resid / np.sqrt(m * (1 - m))
        first, _, last = _thirds(n)
        early = _detrended_rms(steps[first], resid[first])
        late = _detrended_rms(steps[last], resid[last])
        ratio = late / early if early > 0 else (np.inf if late > 0 else 1.0)
        if ratio > residual_growth:
            since = float(steps[last][0])
            findings.append(
                Finding(
                    "instability",
                    "reward",
                    "RMS of detrended fit residuals, last third / first third > threshold",
                    residual_growth,
                    float(ratio),
                    since,
                    f"the reward's fluctuations around the fit grow: residual RMS in the last third (from step "
                    f"{since:g}) is {ratio:.2f}x that of the first third (> {residual_growth:g})",
                )
            )
    return findings
