"""Reward-curve models of "Predictable GRPO" (MATH §8): the saturation law, the damped oscillator, their choice
by AICc, and the fluctuation scaling of the reward noise with the group size G.

The expected reward R(t) at training step t is modelled as a stochastically forced damped oscillator started at
rest,

    m·R'' + c·R' + k·(R − R∞) = noise,    R(0) = R0,  R'(0) = 0,

whose mean, with ω0 = √(k/m) (per step), ζ = c/(2√(k·m)) and x = R − R∞, solves x'' + 2ζω0·x' + ω0²·x = 0:

    R(t) = R∞ + (R0 − R∞)·g(t; ω0, ζ),   g = e^(−ζω0·t)·(C(t) + ζω0·S(t)),
    C(t) = cos(√q·t),  S(t) = sin(√q·t)/√q,  q = ω0²·(1 − ζ²),

an entire function of q: q > 0 is the underdamped cosine, q = 0 the critical e^(−ω0·t)·(1 + ω0·t), q < 0 the
overdamped cosh/sinh (a sum of the slow and fast exponentials). The overdamped limit m → 0 leaves the slow root
1/τ = k/c, the saturation law

    R(t) = R∞ − (R∞ − R0)·e^(−t/τ).

Both fits are nonlinear least squares (``scipy.optimize.least_squares``, trust-region reflective with bounds) in
a log parameterisation of the time scales, started from a profile grid (the models are linear in R∞, R0 for
fixed time scales, so the grid solves those exactly), the saturation fit and the first overshoot. Standard
errors are the delta method on σ̂²·(JᵀJ)⁻¹ (a sandwich when a smoothed series was fitted). Steps may be
irregular: t is continuous, measured from the first step (``t0``). Importing this module imports scipy;
``import fastgrpo`` does not import ``fastgrpo.dynamics``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional, Sequence, Union

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, sparse, stats
from scipy.signal import savgol_coeffs

__all__ = [
    "CRITICAL_TOL",
    "FluctuationScaling",
    "ModelChoice",
    "OscillatorFit",
    "SaturationFit",
    "damped_response",
    "fit",
    "fit_oscillator",
    "fit_saturation",
    "fluctuation_scaling",
    "oscillator_curve",
    "saturation_curve",
]

Regime = Literal["overdamped", "critical", "underdamped"]

#: |ζ − 1| below this is reported as the critical regime
CRITICAL_TOL = 0.05
#: fewest points for each fit (3 and 4 parameters: at least one residual degree of freedom more than that)
MIN_POINTS_SATURATION = 4
MIN_POINTS_OSCILLATOR = 6
#: the noise rule: a first raw saturation fit with R² below NOISY_R2 (the noise variance exceeds the explained
#: variance) and lag-1 residual autocorrelation below NOISY_RHO1 (the misfit is step-to-step noise, not slow
#: structure that a smoother would keep anyway) marks the series noisy; it is then smoothed before fitting
NOISY_R2 = 0.5
NOISY_RHO1 = 0.5
#: the Savitzky–Golay smoother: local quadratic, window of 5 to 101 points of the uniform grid
SMOOTH_ORDER = 2
SMOOTH_MIN_WINDOW = 5
SMOOTH_MAX_WINDOW = 101
#: the oscillator is chosen only when its AICc is lower than the saturation law's by more than this
AICC_MARGIN = 2.0
#: time-scale bounds, relative to the span of the steps: τ ≤ TAU_MAX_SPANS·span, ω0 ≥ 1/(OMEGA_MIN_SPANS·span)
TAU_MAX_SPANS = 100.0
OMEGA_MIN_SPANS = 100.0
ZETA_BOUNDS = (1e-2, 1e2)
#: residual RMS below this fraction of the reward range counts as an exact fit (keeps the AIC finite)
RSS_FLOOR_REL = 1e-10
_GRID_MAX_POINTS = 400  # the initial-guess grids run on at most this many points


# --------------------------------------------------------------------------------------------- model curves


def saturation_curve(t: ArrayLike, r_inf: float, r0: float, tau: float) -> np.ndarray:
    """R(t) = R∞ − (R∞ − R0)·e^(−t/τ), t measured from the start (MATH §8.1)."""
    t = np.asarray(t, dtype=float)
    return r_inf - (r_inf - r0) * np.exp(-t / tau)


def _response_parts(t: np.ndarray, omega0: ArrayLike, zeta: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(e^(−αt)·C(t), e^(−αt)·S(t)) with α = ζω0, q = ω0²(1 − ζ²), C = cos √q·t, S = sin(√q·t)/√q (MATH §8.2).

    Broadcasts t against omega0, zeta. For ζ > 1 the products are evaluated as e^(−αt)·(cosh u, t·sinh(u)/u),
    u = γ|t| ≤ 1, γ = ω0√(ζ² − 1), and beyond as the exponentials ½(e^(−λ₁t) ± e^(−λ₂t))·(1, 1/γ) with the slow
    and fast rates λ₁ = ω0/(ζ + √(ζ² − 1)) (cancellation-free form of α − γ) and λ₂ = α + γ: no overflow for any ζ.
    """
    w = np.asarray(omega0, dtype=float)
    z = np.asarray(zeta, dtype=float)
    alpha = z * w
    with np.errstate(all="ignore"):
        decay = np.exp(-alpha * t)
        # ζ ≤ 1: β = ω0√(1 − ζ²); sinc(x) = sin(πx)/(πx) is exact at 0 (critical damping: C = 1, S = t)
        beta = w * np.sqrt(np.clip((1.0 - z) * (1.0 + z), 0.0, None))
        ec_under = decay * np.cos(beta * t)
        es_under = decay * t * np.sinc(beta * t / np.pi)
        # ζ > 1
        root = np.sqrt(np.clip((z - 1.0) * (z + 1.0), 0.0, None))
        gamma = w * root
        u = gamma * np.abs(t)
        small = u <= 1.0
        us = np.where(small, u, 0.0)
        sinhc = np.where(us > 0.0, np.sinh(us) / np.where(us > 0.0, us, 1.0), 1.0)
        ec_small = decay * np.cosh(us)
        es_small = decay * t * sinhc
        slow = np.exp(-(w / (z + root)) * t)
        fast = np.exp(-(alpha + gamma) * t)
        gamma_safe = np.where(gamma > 0.0, gamma, 1.0)
        ec_big = 0.5 * (slow + fast)
        es_big = 0.5 * (slow - fast) / gamma_safe
        under = z <= 1.0
        ec = np.where(under, ec_under, np.where(small, ec_small, ec_big))
        es = np.where(under, es_under, np.where(small, es_small, es_big))
    return ec, es


def damped_response(t: ArrayLike, omega0: ArrayLike, zeta: ArrayLike) -> np.ndarray:
    """g(t) = x(t)/x(0) for x'' + 2ζω0·x' + ω0²·x = 0, x'(0) = 0: g = e^(−ζω0·t)·(C(t) + ζω0·S(t)) (MATH §8.2).

    One formula, continuous (analytic) in ζ across ζ = 1: underdamped e^(−ζω0t)(cos ω_d t + (ζω0/ω_d) sin ω_d t),
    critical e^(−ω0t)(1 + ω0t), overdamped (λ₂e^(−λ₁t) − λ₁e^(−λ₂t))/(λ₂ − λ₁).
    """
    t = np.asarray(t, dtype=float)
    ec, es = _response_parts(t, omega0, zeta)
    return ec + np.asarray(zeta, dtype=float) * np.asarray(omega0, dtype=float) * es


def oscillator_curve(t: ArrayLike, r_inf: float, r0: float, omega0: float, zeta: float) -> np.ndarray:
    """R(t) = R∞ + (R0 − R∞)·g(t; ω0, ζ): the damped oscillator's mean started at rest at R0 (MATH §8.2)."""
    return r_inf + (r0 - r_inf) * damped_response(t, omega0, zeta)


def _slowest_time(omega0: float, zeta: float) -> float:
    """The slowest e-folding time: 1/(ζω0) (the envelope) for ζ ≤ 1, 1/λ₁ = (ζ + √(ζ² − 1))/ω0 for ζ > 1."""
    if zeta <= 1.0:
        return 1.0 / (zeta * omega0)
    return (zeta + math.sqrt((zeta - 1.0) * (zeta + 1.0))) / omega0


# --------------------------------------------------------------------------------------------- the models


class _Model:
    """One curve family: natural parameters p (reported), fit parameters θ (time scales as logs), Jacobians."""

    names: tuple[str, ...]

    def curve(self, t: np.ndarray, p: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def jac(self, t: np.ndarray, p: np.ndarray) -> np.ndarray:
        """∂R(t)/∂p, shape [len(t), len(p)]."""
        raise NotImplementedError

    def natural(self, theta: np.ndarray) -> np.ndarray:
        """θ → p: exp of the log time scales (the first two entries, R∞ and R0, are shared)."""
        return np.concatenate([theta[:2], np.exp(theta[2:])])

    def dnatural(self, theta: np.ndarray) -> np.ndarray:
        """diag(∂p/∂θ)."""
        return np.concatenate([np.ones(2), np.exp(theta[2:])])


class _Saturation(_Model):
    names = ("r_inf", "r0", "tau")

    def curve(self, t: np.ndarray, p: np.ndarray) -> np.ndarray:
        return saturation_curve(t, p[0], p[1], p[2])

    def jac(self, t: np.ndarray, p: np.ndarray) -> np.ndarray:
        e = np.exp(-t / p[2])
        return np.stack([1.0 - e, e, -(p[0] - p[1]) * e * t / p[2] ** 2], axis=1)


class _Oscillator(_Model):
    names = ("r_inf", "r0", "omega0", "zeta")

    def curve(self, t: np.ndarray, p: np.ndarray) -> np.ndarray:
        return oscillator_curve(t, p[0], p[1], p[2], p[3])

    def jac(self, t: np.ndarray, p: np.ndarray) -> np.ndarray:
        r_inf, r0, w, z = (float(v) for v in p)
        ec, es = _response_parts(t, w, z)
        g = ec + z * w * es
        # g depends on ω0 through ω0·t: ∂g/∂ω0 = (t/ω0)·∂g/∂t = −ω0·t·e^(−αt)·S(t)
        dg_dw = -w * t * es
        h = 1e-6 * z  # ∂g/∂ζ by central differences (g is analytic in ζ, also across ζ = 1)
        dg_dz = (damped_response(t, w, z + h) - damped_response(t, w, z - h)) / (2.0 * h)
        a = r0 - r_inf
        return np.stack([1.0 - g, g, a * dg_dw, a * dg_dz], axis=1)


_SATURATION = _Saturation()
_OSCILLATOR = _Oscillator()


# --------------------------------------------------------------------------------------------- fit results


def _band(
    model: _Model, t: np.ndarray, p: np.ndarray, cov: Optional[np.ndarray], dof: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean curve and its ~95% confidence band ±t_{0.975, dof}·√(∇Rᵀ Σ ∇R) (delta method on the parameters)."""
    mean = model.curve(t, p)
    if cov is None:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan
    grad = model.jac(t, p)
    with np.errstate(invalid="ignore", over="ignore"):
        var = np.einsum("ij,jk,ik->i", grad, cov, grad)
    half = float(stats.t.ppf(0.975, max(dof, 1))) * np.sqrt(np.clip(var, 0.0, None))
    return mean, mean - half, mean + half


def _aic(rss: float, n: int, k: int) -> float:
    """AIC = n·ln(RSS/n) + 2k of a Gaussian least-squares fit, k counting σ²."""
    return n * math.log(rss / n) + 2.0 * k


def _aicc(rss: float, n: int, k: int) -> float:
    """AICc = AIC + 2k(k + 1)/(n − k − 1); +inf when n ≤ k + 1."""
    if n - k - 1 <= 0:
        return math.inf
    return _aic(rss, n, k) + 2.0 * k * (k + 1) / (n - k - 1)


class _Curve:
    """What both fits share: ``predict`` and the information criteria, from the fields ``t0``, ``rss``, ``cov``,
    ``n``, ``params`` and the class's ``n_params`` and ``_model``."""

    _model: _Model
    n_params: int
    t0: float
    rss: float
    cov: Optional[np.ndarray]
    n: int

    @property
    def params(self) -> np.ndarray:
        raise NotImplementedError

    def predict(self, steps: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, lower, upper) at ``steps``: the fitted curve and its ~95% confidence band (delta method)."""
        t = np.asarray(steps, dtype=float) - self.t0
        return _band(self._model, t, self.params, self.cov, self.n - self.n_params)

    @property
    def aic(self) -> float:
        """AIC = n·ln(RSS/n) + 2k, k = n_params + 1 (σ² counted)."""
        return _aic(self.rss, self.n, self.n_params + 1)

    @property
    def aicc(self) -> float:
        """AICc = AIC + 2k(k + 1)/(n − k − 1), the small-sample correction used by :func:`fit`."""
        return _aicc(self.rss, self.n, self.n_params + 1)


@dataclass(frozen=True)
class SaturationFit(_Curve):
    """R(t) = R∞ − (R∞ − R0)·e^(−t/τ), t = step − t0 (MATH §8.1).

    ``*_se`` are standard errors (delta method); ``r2`` = 1 − RSS/TSS on the raw rewards; ``smoothed`` says a
    smoothed series was fitted (``note`` says how and why). ``rss`` is the raw residual sum of squares (floored
    at n·(1e-10·range)² so an exact fit keeps a finite AIC); ``cov`` the covariance of (R∞, R0, τ).
    """

    r_inf: float
    r0: float
    tau: float
    r_inf_se: float
    r0_se: float
    tau_se: float
    r2: float
    n: int
    smoothed: bool
    note: str
    t0: float = 0.0
    rss: float = math.nan
    cov: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    n_params = 3
    _model = _SATURATION

    @property
    def params(self) -> np.ndarray:
        return np.array([self.r_inf, self.r0, self.tau])


@dataclass(frozen=True)
class OscillatorFit(_Curve):
    """R(t) = R∞ + (R0 − R∞)·g(t; ω0, ζ), t = step − t0 (MATH §8.2), ω0 in radians per step.

    ``regime`` is "critical" when |ζ − 1| < :data:`CRITICAL_TOL`, else "underdamped" (ζ < 1) or "overdamped".
    Only ω0 = √(k/m) and ζ = c/(2√(km)) are identified (the equation can be divided by m): k/m = ω0²,
    c/m = 2ζω0, c/k = 2ζ/ω0. ``cov`` is the covariance of (R∞, R0, ω0, ζ); the other fields as in
    :class:`SaturationFit`.
    """

    r_inf: float
    r0: float
    omega0: float
    zeta: float
    regime: Regime
    r_inf_se: float
    r0_se: float
    omega0_se: float
    zeta_se: float
    r2: float
    n: int
    smoothed: bool
    note: str
    t0: float = 0.0
    rss: float = math.nan
    cov: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    n_params = 4
    _model = _OSCILLATOR

    @property
    def params(self) -> np.ndarray:
        return np.array([self.r_inf, self.r0, self.omega0, self.zeta])

    @property
    def tau(self) -> float:
        """The slowest e-folding time: (ζ + √(ζ² − 1))/ω0 overdamped (→ c/k as ζ → ∞), 1/(ζω0) otherwise."""
        return _slowest_time(self.omega0, self.zeta)

    @property
    def tau_se(self) -> float:
        """Standard error of :attr:`tau` by the delta method."""
        if self.cov is None:
            return math.nan
        w, z = self.omega0, self.zeta
        hw, hz = 1e-6 * w, 1e-6 * z
        grad = np.array(
            [
                (_slowest_time(w + hw, z) - _slowest_time(w - hw, z)) / (2 * hw),
                (_slowest_time(w, z + hz) - _slowest_time(w, z - hz)) / (2 * hz),
            ]
        )
        with np.errstate(invalid="ignore", over="ignore"):
            return float(np.sqrt(max(grad @ self.cov[2:, 2:] @ grad, 0.0)))

    @property
    def c_over_k(self) -> float:
        """c/k = 2ζ/ω0: the saturation law's τ in the overdamped limit."""
        return 2.0 * self.zeta / self.omega0

    @property
    def period(self) -> float:
        """2π/ω_d, ω_d = ω0√(1 − ζ²), for ζ < 1; +inf otherwise."""
        if self.zeta >= 1.0:
            return math.inf
        return 2.0 * math.pi / (self.omega0 * math.sqrt((1.0 - self.zeta) * (1.0 + self.zeta)))


Fit = Union[SaturationFit, OscillatorFit]


@dataclass(frozen=True)
class ModelChoice:
    """The two fits and the one chosen by AICc (``best``); ``reason`` says why, with the AICc values.

    ``oscillator`` is None when there are fewer than 6 points.
    """

    best: Fit
    saturation: SaturationFit
    oscillator: Optional[OscillatorFit]
    criterion: str
    reason: str

    def predict(self, steps: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``best.predict(steps)``."""
        return self.best.predict(steps)


@dataclass(frozen=True)
class FluctuationScaling:
    """Residual reward variance against the group size G: var ≈ prefactor·G^exponent (the paper predicts −1)."""

    exponent: float
    exponent_se: float
    group_sizes: np.ndarray = field(compare=False)
    variances: np.ndarray = field(compare=False)
    prefactor: float = math.nan


# --------------------------------------------------------------------------------------------- input checks


def _as_1d(value: ArrayLike, name: str) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a sequence of numbers ({exc})") from None
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {a.shape}")
    return a


def _prepare(steps: ArrayLike, rewards: ArrayLike, min_points: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated float arrays (steps, rewards); each error names the argument."""
    t = _as_1d(steps, "steps")
    y = _as_1d(rewards, "rewards")
    if t.size != y.size:
        raise ValueError(f"steps and rewards: different lengths ({t.size} and {y.size})")
    if y.size < min_points:
        raise ValueError(f"rewards: the {what} fit needs at least {min_points} points, got {y.size}")
    for a, name in ((t, "steps"), (y, "rewards")):
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise ValueError(f"{name}: non-finite value {a[bad[0]]} at index {bad[0]}")
    dt = np.diff(t)
    if np.any(dt <= 0):
        i = int(np.flatnonzero(dt <= 0)[0])
        raise ValueError(f"steps: must be strictly increasing, got {t[i + 1]} after {t[i]} at index {i + 1}")
    return t, y


# --------------------------------------------------------------------------------------------- fitting core


@dataclass
class _Core:
    """A least-squares solution: natural parameters, their covariance, raw-data RSS and R², notes."""

    p: np.ndarray
    theta: np.ndarray
    cov: np.ndarray
    rss: float
    r2: float
    resid: np.ndarray
    smoothed: bool = False
    notes: list[str] = field(default_factory=list)
    at_lower: tuple[bool, ...] = ()
    at_upper: tuple[bool, ...] = ()


@dataclass
class _Smoother:
    """A linear smoother z = S·y: linear interpolation onto a uniform grid, then Savitzky–Golay."""

    grid: np.ndarray
    matrix: sparse.csr_matrix
    window: int
    width: float


def _profile(g: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row g_k: the least-squares (R∞, R0) of y ≈ R∞ + (R0 − R∞)·g_k and its RSS (exact, closed form)."""
    gm = g.mean(axis=-1)
    yc = y - y.mean()
    gc = g - gm[..., None]
    sgg = np.einsum("...i,...i->...", gc, gc)
    sgy = gc @ yc
    ok = sgg > 1e-300
    d = np.where(ok, sgy / np.where(ok, sgg, 1.0), 0.0)
    a = y.mean() - d * gm
    rss = float(yc @ yc) - np.where(ok, d * sgy, 0.0)
    return np.clip(rss, 0.0, None), a, a + d


def _thin(t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if t.size <= _GRID_MAX_POINTS:
        return t, y
    idx = np.unique(np.linspace(0, t.size - 1, _GRID_MAX_POINTS).round().astype(int))
    return t[idx], y[idx]


def _lag1(r: np.ndarray) -> float:
    rc = r - r.mean()
    den = float(rc @ rc)
    return float(rc[:-1] @ rc[1:]) / den if den > 0 else 0.0


def _solve(
    model: _Model,
    t_fit: np.ndarray,
    y_fit: np.ndarray,
    starts: Sequence[np.ndarray],
    bounds: tuple[np.ndarray, np.ndarray],
    t_raw: np.ndarray,
    y_raw: np.ndarray,
    smoother: Optional[_Smoother],
) -> _Core:
    """Least squares from each start (keeping the lowest cost), then the covariance.

    Unsmoothed: Σ_θ = σ̂²·(JᵀJ)⁻¹, σ̂² = RSS/(n − p). Smoothed (y_fit = S·y_raw): the estimate is
    θ̂ ≈ θ + (JᵀJ)⁻¹Jᵀ·S·ε, so Σ_θ = σ̂²·(JᵀJ)⁻¹·(SᵀJ)ᵀ(SᵀJ)·(JᵀJ)⁻¹ with σ̂² from the raw residuals
    (white noise assumed, as the noise rule checked). Σ_p = D·Σ_θ·D, D = diag(∂p/∂θ).
    """
    lower, upper = bounds

    def residual(theta: np.ndarray) -> np.ndarray:
        return model.curve(t_fit, model.natural(theta)) - y_fit

    def jacobian(theta: np.ndarray) -> np.ndarray:
        return model.jac(t_fit, model.natural(theta)) * model.dnatural(theta)

    best: Optional[optimize.OptimizeResult] = None
    span = upper - lower
    for start in starts:
        finite = np.isfinite(span)
        margin = np.where(finite, 1e-9 * np.where(finite, span, 0.0), 0.0)
        x0 = np.clip(np.where(np.isfinite(start), start, 0.0), lower + margin, upper - margin)
        with np.errstate(all="ignore"):
            res = optimize.least_squares(
                residual, x0, jac=jacobian, bounds=(lower, upper), method="trf", x_scale="jac", xtol=1e-12,
                ftol=1e-12, gtol=1e-12, max_nfev=2000,
            )  # fmt: skip
        if np.isfinite(res.cost) and (best is None or res.cost < best.cost):
            best = res
    if best is None:  # pragma: no cover - every start non-finite
        raise RuntimeError(f"{type(model).__name__[1:].lower()} fit: no start gave a finite residual")
    theta = best.x
    p = model.natural(theta)
    resid = y_raw - model.curve(t_raw, p)
    rss = float(resid @ resid)
    n, k = y_raw.size, theta.size
    yc = y_raw - y_raw.mean()
    tss = float(yc @ yc)
    r2 = 1.0 - rss / tss if tss > 0 else (1.0 if rss == 0 else math.nan)
    sigma2 = rss / (n - k)
    jac = jacobian(theta)
    u, s, vt = np.linalg.svd(jac, full_matrices=False)
    if not np.all(np.isfinite(s)) or s[-1] <= s[0] * max(jac.shape) * np.finfo(float).eps:
        cov_theta = np.full((k, k), np.inf)
    else:
        a_inv = (vt.T / s**2) @ vt
        if smoother is None:
            cov_theta = sigma2 * a_inv
        else:
            sj = np.asarray(smoother.matrix.T @ jac)
            cov_theta = sigma2 * a_inv @ (sj.T @ sj) @ a_inv
    d = model.dnatural(theta)
    with np.errstate(invalid="ignore"):
        cov = cov_theta * np.outer(d, d)
    tol = 1e-6 * span
    return _Core(
        p=p,
        theta=theta,
        cov=cov,
        rss=rss,
        r2=r2,
        resid=resid,
        smoothed=smoother is not None,
        at_lower=tuple(bool(v) for v in theta - lower < tol),
        at_upper=tuple(bool(v) for v in upper - theta < tol),
    )


def _span(t: np.ndarray) -> float:
    return float(t[-1] - t[0])


def _saturation_bounds(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ln τ ∈ [ln(min Δt/100), ln(TAU_MAX_SPANS·span)]; R∞, R0 free."""
    dt_min = float(np.min(np.diff(t)))
    lower = np.array([-np.inf, -np.inf, math.log(dt_min / 100.0)])
    upper = np.array([np.inf, np.inf, math.log(TAU_MAX_SPANS * _span(t))])
    return lower, upper


def _oscillator_bounds(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ln ω0 ∈ [ln(1/(OMEGA_MIN_SPANS·span)), ln(π/min Δt)] (Nyquist), ln ζ ∈ ln ZETA_BOUNDS; R∞, R0 free."""
    dt_min = float(np.min(np.diff(t)))
    lower = np.array([-np.inf, -np.inf, -math.log(OMEGA_MIN_SPANS * _span(t)), math.log(ZETA_BOUNDS[0])])
    upper = np.array([np.inf, np.inf, math.log(math.pi / dt_min), math.log(ZETA_BOUNDS[1])])
    return lower, upper


def _saturation_starts(t: np.ndarray, y: np.ndarray, bounds: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """The best point of a profile grid of 80 τ (log-spaced over the bounds), R∞ and R0 solved exactly."""
    tg, yg = _thin(t, y)
    log_tau = np.linspace(bounds[0][2], bounds[1][2], 80)
    rss, r_inf, r0 = _profile(np.exp(-tg[None, :] / np.exp(log_tau)[:, None]), yg)
    i = int(np.argmin(rss))
    return [np.array([r_inf[i], r0[i], log_tau[i]])]


def _fit_saturation_core(
    t_fit: np.ndarray,
    y_fit: np.ndarray,
    t_raw: np.ndarray,
    y_raw: np.ndarray,
    smoother: Optional[_Smoother],
    extra: Sequence[np.ndarray] = (),
) -> _Core:
    bounds = _saturation_bounds(t_raw)
    starts = _saturation_starts(t_fit, y_fit, bounds) + list(extra)
    core = _solve(_SATURATION, t_fit, y_fit, starts, bounds, t_raw, y_raw, smoother)
    if np.ptp(y_raw) == 0:
        core.notes.append("constant rewards: no dynamics to fit, τ is arbitrary")
    elif core.at_upper[2]:
        core.notes.append(
            f"τ at its upper bound ({TAU_MAX_SPANS:g}× the span of the steps): the curve has not saturated "
            "within the data, R∞ is an extrapolation"
        )
    elif core.at_lower[2]:
        core.notes.append("τ at its lower bound (1/100 of the smallest step gap): R0 rests on the first point alone")
    return core


def _overshoot_start(t: np.ndarray, y: np.ndarray, r_inf: float, r0: float) -> Optional[np.ndarray]:
    """(R∞, R0, ln ω0, ln ζ) from the first overshoot beyond R∞ (MATH §8.4).

    From rest the first extremum is at ω_d·t_p = π with relative overshoot M = e^(−ζπ/√(1 − ζ²)), so
    ζ = L/√(π² + L²), L = −ln M, and ω0 = π/(t_p·√(1 − ζ²)). None when the data never pass R∞.
    """
    amp = r_inf - r0
    if amp == 0 or not np.isfinite(amp):
        return None
    excess = (y - r_inf) / amp
    beyond = excess > 0
    if not beyond.any():
        return None
    i0 = int(np.argmax(beyond))
    back = np.flatnonzero(~beyond[i0:])
    i1 = i0 + int(back[0]) if back.size else y.size
    k = i0 + int(np.argmax(excess[i0:i1]))
    m, tp = float(excess[k]), float(t[k])
    if not (0.0 < m < 1.0) or tp <= 0:
        return None
    lm = -math.log(m)
    zeta = lm / math.hypot(math.pi, lm)
    omega0 = math.pi / (tp * math.sqrt(1.0 - zeta**2))
    return np.array([r_inf, r0, math.log(omega0), math.log(zeta)])


def _oscillator_starts(
    t: np.ndarray, y: np.ndarray, bounds: tuple[np.ndarray, np.ndarray], sat: _Core
) -> list[np.ndarray]:
    """Initial guesses: a profile grid over (ω0, ζ) (R∞, R0 exact) — its best point overall, below and above
    ζ = 1 — the first overshoot, and the overdamped curve whose slow time equals the saturation τ (ζ = 3)."""
    tg, yg = _thin(t, y)
    span = _span(t)
    dt_med = float(np.median(np.diff(tg)))
    lo_w = max(bounds[0][2], math.log(0.1 / span))
    hi_w = min(bounds[1][2], math.log(math.pi / dt_med))
    log_w = np.linspace(lo_w, max(hi_w, lo_w), 48)
    log_z = np.linspace(math.log(0.02), math.log(20.0), 25)
    mesh_w, mesh_z = np.meshgrid(log_w, log_z, indexing="ij")
    ww, zz = mesh_w.ravel(), mesh_z.ravel()
    g = damped_response(tg[None, :], np.exp(ww)[:, None], np.exp(zz)[:, None])
    rss, r_inf, r0 = _profile(g, yg)
    starts = []
    for mask in (np.ones_like(zz, dtype=bool), zz < 0.0, zz >= 0.0):
        i = int(np.argmin(np.where(mask, rss, np.inf)))
        starts.append(np.array([r_inf[i], r0[i], ww[i], zz[i]]))
    r_inf_s, r0_s, tau_s = (float(v) for v in sat.p)
    over = _overshoot_start(t, y, r_inf_s, r0_s)
    if over is not None:
        starts.append(over)
    z3 = 3.0
    starts.append(np.array([r_inf_s, r0_s, math.log((z3 + math.sqrt(z3**2 - 1.0)) / tau_s), math.log(z3)]))
    return starts


def _fit_oscillator_core(
    t_fit: np.ndarray,
    y_fit: np.ndarray,
    t_raw: np.ndarray,
    y_raw: np.ndarray,
    smoother: Optional[_Smoother],
    sat: _Core,
    extra: Sequence[np.ndarray] = (),
) -> _Core:
    bounds = _oscillator_bounds(t_raw)
    starts = _oscillator_starts(t_fit, y_fit, bounds, sat) + list(extra)
    core = _solve(_OSCILLATOR, t_fit, y_fit, starts, bounds, t_raw, y_raw, smoother)
    if core.at_upper[3]:
        core.notes.append(
            f"ζ at its upper bound ({ZETA_BOUNDS[1]:g}): indistinguishable from the saturation law; only "
            "c/k = 2ζ/ω0 is identified"
        )
    elif core.p[3] > 5.0:
        core.notes.append(
            "strongly overdamped (ζ > 5): ω0 and ζ are weakly identified separately, the slow time "
            "(ζ + √(ζ² − 1))/ω0 ≈ c/k is the robust quantity"
        )
    if core.at_lower[3]:
        core.notes.append(f"ζ at its lower bound ({ZETA_BOUNDS[0]:g}): no damping visible within the data")
    if core.at_upper[2]:
        core.notes.append("ω0 at its upper bound (π per smallest step gap, the Nyquist limit)")
    if core.at_lower[2]:
        core.notes.append(f"ω0 at its lower bound (1/({OMEGA_MIN_SPANS:g}× the span)): the curve barely moves")
    return core


# --------------------------------------------------------------------------------------------- smoothing


def _savgol_matrix(n_grid: int, window: int) -> sparse.csr_matrix:
    """The Savitzky–Golay smoother (order 2) as a sparse [n_grid, n_grid] matrix, identical to
    ``scipy.signal.savgol_filter(·, window, 2, mode="interp")``: each point is the value at its position of the
    least-squares quadratic over its window (centred inside, the first/last window at the edges)."""
    half = window // 2
    table = np.stack([savgol_coeffs(window, SMOOTH_ORDER, pos=pos, use="dot") for pos in range(window)])
    rows = np.arange(n_grid)
    start = np.clip(rows - half, 0, n_grid - window)
    pos = rows - start
    cols = start[:, None] + np.arange(window)[None, :]
    return sparse.csr_matrix((table[pos].ravel(), (np.repeat(rows, window), cols.ravel())), shape=(n_grid, n_grid))


def _interp_matrix(t: np.ndarray, grid: np.ndarray) -> sparse.csr_matrix:
    """Linear interpolation from the points t onto ``grid`` (inside [t₀, t_end]) as a sparse matrix."""
    i = np.clip(np.searchsorted(t, grid, side="right") - 1, 0, t.size - 2)
    frac = np.clip((grid - t[i]) / (t[i + 1] - t[i]), 0.0, 1.0)
    rows = np.arange(grid.size)
    return sparse.csr_matrix(
        (np.concatenate([1.0 - frac, frac]), (np.concatenate([rows, rows]), np.concatenate([i, i + 1]))),
        shape=(grid.size, t.size),
    )


def _smoother(t: np.ndarray, width: float) -> Optional[_Smoother]:
    """Interpolate onto a uniform grid of n points, then Savitzky–Golay over ``width`` steps (odd window of
    SMOOTH_MIN_WINDOW..SMOOTH_MAX_WINDOW grid points); None when ``width`` covers fewer than the minimum."""
    n = t.size
    h = _span(t) / (n - 1)
    window = int(width / h) + 1
    window = min(window - (1 - window % 2), SMOOTH_MAX_WINDOW, n - (1 - n % 2))
    if not np.isfinite(width) or window < SMOOTH_MIN_WINDOW:
        return None
    grid = t[0] + h * np.arange(n)
    grid[-1] = t[-1]
    matrix = (_savgol_matrix(n, window) @ _interp_matrix(t, grid)).tocsr()
    return _Smoother(grid=grid, matrix=matrix, window=window, width=(window - 1) * h)


def _noise_rule(y: np.ndarray, raw_sat: _Core) -> tuple[bool, str]:
    """Noisy when the raw saturation fit has R² < NOISY_R2 and lag-1 residual autocorrelation < NOISY_RHO1."""
    rho = _lag1(raw_sat.resid)
    noisy = bool(np.isfinite(raw_sat.r2) and raw_sat.r2 < NOISY_R2 and rho < NOISY_RHO1)
    why = (
        f"R² of a first raw saturation fit {raw_sat.r2:.2f} (rule: < {NOISY_R2}), lag-1 residual autocorrelation "
        f"{rho:.2f} (rule: < {NOISY_RHO1})"
    )
    return noisy, why


def _smoothing_note(sm: _Smoother, why: str) -> str:
    return (
        f"noisy series ({why}): fitted a Savitzky–Golay smoothed series (order {SMOOTH_ORDER}, window "
        f"{sm.window} points = {sm.width:.4g} steps, on a uniform grid of {sm.grid.size} points); standard errors "
        "account for the smoothing, R² and AIC are on the raw rewards"
    )


def _fmt(v: float, se: float) -> str:
    return f"{v:.4g} ± {se:.2g}"


# --------------------------------------------------------------------------------------------- public fits


def fit_saturation(steps: ArrayLike, rewards: ArrayLike) -> SaturationFit:
    """Least-squares fit of R(t) = R∞ − (R∞ − R0)·e^(−t/τ), t = step − steps[0] (MATH §8.1, §8.4).

    A noisy series (see :data:`NOISY_R2`) is smoothed first (``smoothed=True``, explained in ``note``).
    Raises ValueError naming the argument for fewer than 4 points, different lengths, non-finite values or
    steps that are not strictly increasing.
    """
    t_abs, y = _prepare(steps, rewards, MIN_POINTS_SATURATION, "saturation")
    t0 = float(t_abs[0])
    t = t_abs - t0
    core = _fit_saturation_core(t, y, t, y, None)
    notes: list[str] = []
    noisy, why = _noise_rule(y, core)
    if noisy:
        sm = _smoother(t, min(float(core.p[2]), _span(t) / 5.0))
        if sm is None:
            notes.append(f"noisy series ({why}), but τ spans too few steps to smooth without bias: raw fit")
        else:
            core = _fit_saturation_core(sm.grid, sm.matrix @ y, t, y, sm, extra=[core.theta])
            notes.append(_smoothing_note(sm, why))
    notes = core.notes + notes
    se = np.sqrt(np.diag(core.cov))
    return SaturationFit(
        r_inf=float(core.p[0]),
        r0=float(core.p[1]),
        tau=float(core.p[2]),
        r_inf_se=float(se[0]),
        r0_se=float(se[1]),
        tau_se=float(se[2]),
        r2=core.r2,
        n=int(y.size),
        smoothed=core.smoothed,
        note="; ".join(notes) if notes else "raw fit",
        t0=t0,
        rss=_floored_rss(core.rss, y),
        cov=core.cov,
    )


def _floored_rss(rss: float, y: np.ndarray) -> float:
    scale = float(np.ptp(y)) or max(float(np.max(np.abs(y))), 1.0)
    return max(rss, y.size * (RSS_FLOOR_REL * scale) ** 2)


def _regime(zeta: float) -> Regime:
    if abs(zeta - 1.0) < CRITICAL_TOL:
        return "critical"
    return "underdamped" if zeta < 1.0 else "overdamped"


def fit_oscillator(steps: ArrayLike, rewards: ArrayLike) -> OscillatorFit:
    """Least-squares fit of the damped oscillator started at rest, R = R∞ + (R0 − R∞)·g(t; ω0, ζ) (MATH §8.2).

    Fitted in (R∞, R0, ln ω0, ln ζ) with the one formula of :func:`damped_response`, so the optimizer crosses
    ζ = 1 freely; bounds ω0 ∈ [1/(100·span), π/min Δt], ζ ∈ [0.01, 100]; several starts (profile grid,
    saturation fit, first overshoot), the lowest residual kept. Noisy series as in :func:`fit_saturation`,
    the smoothing window also kept under a third of the period 2π/ω_d when the raw fit is underdamped. Raises ValueError
    naming the argument for fewer than 6 points and the other bad inputs of :func:`fit_saturation`.
    """
    t_abs, y = _prepare(steps, rewards, MIN_POINTS_OSCILLATOR, "oscillator")
    t0 = float(t_abs[0])
    t = t_abs - t0
    sat = _fit_saturation_core(t, y, t, y, None)
    core = _fit_oscillator_core(t, y, t, y, None, sat)
    notes: list[str] = []
    noisy, why = _noise_rule(y, sat)
    if noisy:
        # the window stays under the saturation τ and, when the raw fit oscillates, a third of its period
        period = 2.0 * math.pi / (float(core.p[2]) * math.sqrt(1.0 - core.p[3] ** 2)) if core.p[3] < 1 else math.inf
        width = min(float(sat.p[2]), period / 3.0, _span(t) / 5.0)
        sm = _smoother(t, width)
        if sm is None:
            notes.append(f"noisy series ({why}), but the fitted time scales span too few steps to smooth: raw fit")
        else:
            z = sm.matrix @ y
            sat_s = _fit_saturation_core(sm.grid, z, t, y, sm, extra=[sat.theta])
            core = _fit_oscillator_core(sm.grid, z, t, y, sm, sat_s, extra=[core.theta])
            notes.append(_smoothing_note(sm, why))
    se = np.sqrt(np.diag(core.cov))
    zeta, zeta_se = float(core.p[3]), float(se[3])
    regime = _regime(zeta)
    lo, hi = zeta - 2.0 * zeta_se, zeta + 2.0 * zeta_se
    if not np.isfinite(zeta_se) or _regime(lo) != regime or _regime(hi) != regime:
        notes.append(f"regime uncertain: ζ = {_fmt(zeta, zeta_se)}, the interval ζ ± 2 SE reaches another regime")
    notes = core.notes + notes
    return OscillatorFit(
        r_inf=float(core.p[0]),
        r0=float(core.p[1]),
        omega0=float(core.p[2]),
        zeta=zeta,
        regime=regime,
        r_inf_se=float(se[0]),
        r0_se=float(se[1]),
        omega0_se=float(se[2]),
        zeta_se=zeta_se,
        r2=core.r2,
        n=int(y.size),
        smoothed=core.smoothed,
        note="; ".join(notes) if notes else "raw fit",
        t0=t0,
        rss=_floored_rss(core.rss, y),
        cov=core.cov,
    )


def fit(steps: ArrayLike, rewards: ArrayLike) -> ModelChoice:
    """Fit both models and choose by AICc (MATH §8.5).

    The oscillator (one parameter more; the saturation law is its ζ → ∞ limit) is chosen only when its AICc is
    lower by more than :data:`AICC_MARGIN` = 2; otherwise the simpler saturation law. Both AICc are computed on
    the raw rewards, also when a fit used a smoothed series. With fewer than 6 points only the saturation law
    is fitted.
    """
    _, y = _prepare(steps, rewards, MIN_POINTS_SATURATION, "saturation")
    sat = fit_saturation(steps, rewards)
    if y.size < MIN_POINTS_OSCILLATOR:
        reason = (
            f"saturation: {y.size} points are too few for the oscillator (needs {MIN_POINTS_OSCILLATOR}); "
            f"AICc {sat.aicc:.2f}"
        )
        return ModelChoice(best=sat, saturation=sat, oscillator=None, criterion="AICc", reason=reason)
    osc = fit_oscillator(steps, rewards)
    a_s, a_o = sat.aicc, osc.aicc
    delta = a_s - a_o
    if delta > AICC_MARGIN:
        best: Fit = osc
        reason = (
            f"oscillator ({osc.regime}, ζ = {_fmt(osc.zeta, osc.zeta_se)}): AICc {a_o:.2f} vs {a_s:.2f} for the "
            f"saturation law, lower by {delta:.2f} > {AICC_MARGIN:g}"
        )
    else:
        best = sat
        reason = (
            f"saturation: AICc {a_s:.2f} vs {a_o:.2f} for the oscillator; the oscillator is lower by "
            f"{delta:.2f} ≤ {AICC_MARGIN:g}, not enough for its extra parameter"
        )
    return ModelChoice(best=best, saturation=sat, oscillator=osc, criterion="AICc", reason=reason)


# --------------------------------------------------------------------------------------------- fluctuations


CurveInput = Union[ArrayLike, tuple[ArrayLike, ArrayLike]]


def _curve_pair(value: object, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    name = f"curves[{group_size}]"
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(np.ndim(v) == 1 for v in value):
        steps, rewards = value
        t, y = _as_1d(steps, f"{name} steps"), _as_1d(rewards, f"{name} rewards")
    else:
        y = _as_1d(value, f"{name} rewards")  # type: ignore[arg-type]
        t = np.arange(y.size, dtype=float)
    try:
        return _prepare(t, y, MIN_POINTS_SATURATION, "saturation")
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def fluctuation_scaling(curves: Mapping[int, CurveInput]) -> FluctuationScaling:
    """The reward-noise variance against the group size G: ln var_G = ln A + b·ln G by weighted least squares
    (MATH §8.6). The paper predicts b = −1.

    ``curves`` maps G to ``(steps, rewards)`` or to ``rewards`` alone (steps 0, 1, …). var_G is the residual
    variance RSS/(n − p) about the curve's own AICc-chosen fit (:func:`fit`), which detrends it. ln s² of n − p
    degrees of freedom has variance ≈ 2/(n − p), so the weights are (n − p)/2; the standard error of b is the
    larger of that sampling error and the one the scatter about the line implies (≥ 3 group sizes).
    """
    if not isinstance(curves, Mapping) or len(curves) == 0:
        raise ValueError("curves: expected a non-empty dict {group size G: (steps, rewards) or rewards}")
    sizes, variances, dofs = [], [], []
    for g_key in sorted(curves):
        if isinstance(g_key, bool) or not isinstance(g_key, (int, np.integer)) or g_key < 1:
            raise ValueError(f"curves: group sizes must be positive integers, got {g_key!r}")
        t, y = _curve_pair(curves[g_key], int(g_key))
        best = fit(t, y).best
        dof = best.n - best.n_params
        variances.append(float(np.sum((y - best.predict(t)[0]) ** 2)) / dof)
        sizes.append(int(g_key))
        dofs.append(dof)
    if len(sizes) < 2:
        raise ValueError(f"curves: need at least 2 different group sizes, got {sizes}")
    var = np.array(variances)
    if np.any(var <= 0):
        raise ValueError(f"curves: a curve has zero residual variance (G = {sizes[int(np.argmin(var))]})")
    x, ly, w = np.log(np.array(sizes, dtype=float)), np.log(var), np.array(dofs, dtype=float) / 2.0
    xm, ym = np.average(x, weights=w), np.average(ly, weights=w)
    sxx = float(np.sum(w * (x - xm) ** 2))
    slope = float(np.sum(w * (x - xm) * (ly - ym)) / sxx)
    intercept = float(ym - slope * xm)
    se = math.sqrt(1.0 / sxx)
    if len(sizes) >= 3:
        chi2 = float(np.sum(w * (ly - intercept - slope * x) ** 2))
        se = max(se, math.sqrt(chi2 / (len(sizes) - 2) / sxx))
    return FluctuationScaling(
        exponent=slope,
        exponent_se=se,
        group_sizes=np.array(sizes),
        variances=var,
        prefactor=math.exp(intercept),
    )
