"""fastgrpo.dynamics.models (MATH §8): the closed forms, parameter recovery with honest standard errors, the
model choice, the fluctuation scaling, input errors, and that ``import fastgrpo`` stays scipy-free."""

import math
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("scipy")

from scipy.integrate import solve_ivp  # noqa: E402
from scipy.signal import savgol_filter  # noqa: E402

from fastgrpo import dynamics  # noqa: E402
from fastgrpo.dynamics import (  # noqa: E402
    ModelChoice,
    OscillatorFit,
    SaturationFit,
    damped_response,
    fit,
    fit_oscillator,
    fit_saturation,
    fluctuation_scaling,
    oscillator_curve,
    saturation_curve,
)
from fastgrpo.dynamics import models as M  # noqa: E402

STEPS = np.arange(200.0)
SAT = dict(r_inf=0.8, r0=0.2, tau=50.0)
REGIMES = {  # (omega0, zeta) per step
    "underdamped": (0.1, 0.3),
    "critical": (0.05, 1.0),
    "overdamped": (0.05, 3.0),
}


def sat_curve(t=STEPS, **kw):
    p = {**SAT, **kw}
    return saturation_curve(t, p["r_inf"], p["r0"], p["tau"])


def osc_curve(regime, t=STEPS):
    w, z = REGIMES[regime]
    return oscillator_curve(t, 0.8, 0.2, w, z)


def assert_within(fitted, truth, k=3.0):
    """Each fitted parameter within k standard errors of the truth."""
    for name, value in truth.items():
        est, se = getattr(fitted, name), getattr(fitted, name + "_se")
        assert np.isfinite(se) and se > 0, (name, se)
        assert abs(est - value) <= k * se, f"{name}: {est} vs {value}, se {se}"


# --------------------------------------------------------------------------------------------- import


def test_import_fastgrpo_does_not_import_scipy():
    code = (
        "import sys, fastgrpo\n"
        "bad = [m for m in ('scipy', 'fastgrpo.dynamics') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_package_reexports_the_api():
    for name in M.__all__:
        assert name in dynamics.__all__ and getattr(dynamics, name) is getattr(M, name)


# --------------------------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("zeta", [0.05, 0.3, 0.9, 1.0, 1.1, 3.0, 30.0])
def test_response_solves_the_ode_from_rest(zeta):
    """g solves x'' + 2ζω0x' + ω0²x = 0, x(0) = 1, x'(0) = 0 (integrated numerically, independently)."""
    w = 0.2
    t = np.linspace(0.0, 100.0, 401)
    sol = solve_ivp(
        lambda _, s: [s[1], -2 * zeta * w * s[1] - w**2 * s[0]],
        (0.0, 100.0),
        [1.0, 0.0],
        t_eval=t,
        rtol=1e-11,
        atol=1e-13,
        method="LSODA",
    )
    np.testing.assert_allclose(damped_response(t, w, zeta), sol.y[0], atol=1e-8)


def test_response_matches_the_textbook_form_of_each_regime():
    t = np.linspace(0.0, 80.0, 161)
    w = 0.15
    z = 0.4
    wd = w * math.sqrt(1 - z**2)
    under = np.exp(-z * w * t) * (np.cos(wd * t) + z * w / wd * np.sin(wd * t))
    np.testing.assert_allclose(damped_response(t, w, z), under, atol=1e-13)
    np.testing.assert_allclose(damped_response(t, w, 1.0), np.exp(-w * t) * (1 + w * t), atol=1e-13)
    z = 2.5
    l1, l2 = w * (z - math.sqrt(z**2 - 1)), w * (z + math.sqrt(z**2 - 1))
    over = (l2 * np.exp(-l1 * t) - l1 * np.exp(-l2 * t)) / (l2 - l1)
    np.testing.assert_allclose(damped_response(t, w, z), over, atol=1e-13)


def test_response_is_continuous_across_critical_damping():
    t = np.linspace(0.0, 200.0, 401)
    crit = damped_response(t, 0.1, 1.0)
    for eps in (1e-3, 1e-6, 1e-10):
        for z in (1 - eps, 1 + eps):
            assert np.max(np.abs(damped_response(t, 0.1, z) - crit)) < 2 * eps


def test_response_has_no_overflow_when_strongly_overdamped():
    t = np.linspace(0.0, 1e6, 101)
    with np.errstate(all="raise"):
        g = damped_response(t, 5.0, 1e4)
    assert np.all(np.isfinite(g)) and np.all((g >= 0) & (g <= 1))


@pytest.mark.parametrize("zeta", [10.0, 100.0, 1000.0])
def test_overdamped_limit_is_the_saturation_law_with_tau_c_over_k(zeta):
    """At fixed τ = c/k = 2ζ/ω0, g → e^(−t/τ) as ζ → ∞ (the slow root; the fast mode's weight vanishes)."""
    tau = 50.0
    t = np.linspace(0.0, 400.0, 801)
    g = damped_response(t, 2 * zeta / tau, zeta)
    assert np.max(np.abs(g - np.exp(-t / tau))) < 1.0 / zeta**2


# --------------------------------------------------------------------------------------------- saturation


def test_saturation_clean_recovers_exactly():
    f = fit_saturation(STEPS, sat_curve())
    assert isinstance(f, SaturationFit)
    np.testing.assert_allclose([f.r_inf, f.r0, f.tau], [0.8, 0.2, 50.0], rtol=1e-6)
    assert f.r2 >= 0.9 and not f.smoothed and f.n == STEPS.size and f.note == "raw fit"


@pytest.mark.parametrize("sigma, smoothed", [(0.02, False), (0.25, True)])
def test_saturation_noisy_within_three_standard_errors(sigma, smoothed):
    rng = np.random.default_rng(3)
    t = np.arange(600.0)
    y = sat_curve(t, tau=150.0) + sigma * rng.standard_normal(t.size)
    f = fit_saturation(t, y)
    assert f.smoothed is smoothed
    assert ("Savitzky" in f.note) is smoothed
    assert_within(f, dict(r_inf=0.8, r0=0.2, tau=150.0))


def _monte_carlo(fitter, t, y, sigma, names, reps, seed):
    rng = np.random.default_rng(seed)
    fits = [fitter(t, y + sigma * rng.standard_normal(t.size)) for _ in range(reps)]
    est = np.array([[getattr(f, n) for n in names] for f in fits])
    se = np.array([[getattr(f, n + "_se") for n in names] for f in fits])
    return fits, est.std(axis=0, ddof=1), np.median(se, axis=0)


@pytest.mark.parametrize(
    "t, tau, sigma, smoothed, reps, bounds",
    [
        (np.arange(200.0), 50.0, 0.02, False, 300, (0.85, 1.18)),
        (np.arange(1000.0), 250.0, 0.2, True, 60, (0.7, 1.4)),
    ],
    ids=["raw", "smoothed"],
)
def test_saturation_standard_errors_match_monte_carlo(t, tau, sigma, smoothed, reps, bounds):
    """The reported SEs agree with the spread of the estimates over repeated noise, also for a smoothed fit (its
    sandwich covariance). Bounds: the Monte-Carlo SD has a relative error of about 1/√(2·reps) (4% for 300,
    9% for 60), three of those plus the delta method's small-sample bias."""
    fits, sd, se = _monte_carlo(fit_saturation, t, sat_curve(t, tau=tau), sigma, ["r_inf", "r0", "tau"], reps, 7)
    assert all(f.smoothed is smoothed for f in fits)
    ratio = se / sd
    assert np.all((ratio > bounds[0]) & (ratio < bounds[1])), ratio


def test_irregular_steps_and_offset_origin():
    rng = np.random.default_rng(11)
    steps = 1000.0 + np.sort(rng.choice(np.arange(2000), 250, replace=False)).astype(float)
    t = steps - steps[0]
    y = saturation_curve(t, 0.7, 0.1, 300.0) + 0.01 * rng.standard_normal(t.size)
    f = fit_saturation(steps, y)
    assert f.t0 == steps[0]
    assert_within(f, dict(r_inf=0.7, r0=0.1, tau=300.0))
    mean, _, _ = f.predict(steps)
    np.testing.assert_allclose(mean, saturation_curve(t, f.r_inf, f.r0, f.tau))


# --------------------------------------------------------------------------------------------- oscillator


@pytest.mark.parametrize("regime", list(REGIMES))
def test_oscillator_clean_recovers_each_regime(regime):
    w, z = REGIMES[regime]
    f = fit_oscillator(STEPS, osc_curve(regime))
    assert isinstance(f, OscillatorFit)
    np.testing.assert_allclose([f.r_inf, f.r0, f.omega0, f.zeta], [0.8, 0.2, w, z], rtol=1e-5)
    assert f.regime == regime and f.r2 >= 0.9 and not f.smoothed


@pytest.mark.parametrize("regime", list(REGIMES))
def test_oscillator_noisy_within_three_standard_errors(regime):
    w, z = REGIMES[regime]
    rng = np.random.default_rng(5)
    f = fit_oscillator(STEPS, osc_curve(regime) + 0.01 * rng.standard_normal(STEPS.size))
    assert_within(f, dict(r_inf=0.8, r0=0.2, omega0=w, zeta=z))
    assert f.r2 >= 0.9 and f.regime == regime  # critical: |ζ − 1| < CRITICAL_TOL = 0.05 (ζ's SE here ≈ 0.015)
    if regime == "underdamped":
        assert abs(f.period - 2 * math.pi / (w * math.sqrt(1 - z**2))) < 3.0


def test_oscillator_heavy_noise_is_smoothed_and_still_recovers():
    rng = np.random.default_rng(2)
    t = np.arange(400.0)
    w, z = 0.05, 0.3
    y = oscillator_curve(t, 0.8, 0.2, w, z) + 0.2 * rng.standard_normal(t.size)
    f = fit_oscillator(t, y)
    assert f.smoothed and "Savitzky" in f.note and "autocorrelation" in f.note
    assert f.r2 < 0.5  # R² on the raw rewards
    assert_within(f, dict(r_inf=0.8, r0=0.2, omega0=w, zeta=z))


def test_oscillator_standard_errors_match_monte_carlo():
    names = ["r_inf", "r0", "omega0", "zeta"]
    t = np.arange(100.0)
    y = oscillator_curve(t, 0.8, 0.2, 0.2, 0.3)
    _, sd, se = _monte_carlo(fit_oscillator, t, y, 0.02, names, 60, 13)
    ratio = se / sd
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio


def test_oscillator_crosses_critical_damping_from_either_side():
    """Data with ζ = 1.15 (overdamped) and 0.85 (underdamped): the fit lands on the right side of ζ = 1."""
    rng = np.random.default_rng(8)
    for z in (0.85, 1.15):
        y = oscillator_curve(STEPS, 0.8, 0.2, 0.08, z) + 0.002 * rng.standard_normal(STEPS.size)
        f = fit_oscillator(STEPS, y)
        assert abs(f.zeta - z) < 0.03 and f.regime == ("underdamped" if z < 1 else "overdamped")


def test_overdamped_oscillator_agrees_with_saturation_tau():
    """ζ = 10: the saturation law's τ, the oscillator's slow time and c/k = 2ζ/ω0 agree (MATH §8.3)."""
    w, z = 0.2, 10.0
    t = np.arange(400.0)
    y = oscillator_curve(t, 0.8, 0.2, w, z) + 0.002 * np.random.default_rng(4).standard_normal(t.size)
    sat, osc = fit_saturation(t, y), fit_oscillator(t, y)
    c_over_k = 2 * z / w
    assert abs(sat.tau - c_over_k) / c_over_k < 0.01
    assert abs(osc.tau - sat.tau) <= 3 * math.hypot(osc.tau_se, sat.tau_se)
    assert abs(osc.c_over_k - c_over_k) / c_over_k < 0.05
    assert osc.regime == "overdamped"


# --------------------------------------------------------------------------------------------- model choice


def test_fit_picks_the_oscillator_for_an_underdamped_curve():
    rng = np.random.default_rng(1)
    choice = fit(STEPS, osc_curve("underdamped") + 0.02 * rng.standard_normal(STEPS.size))
    assert isinstance(choice, ModelChoice) and choice.criterion == "AICc"
    assert choice.best is choice.oscillator
    assert choice.reason.startswith("oscillator") and f"{choice.oscillator.aicc:.2f}" in choice.reason
    assert f"{choice.saturation.aicc:.2f}" in choice.reason


@pytest.mark.parametrize("sigma", [0.0, 0.02])
def test_fit_picks_saturation_for_a_pure_exponential(sigma):
    rng = np.random.default_rng(6)
    choice = fit(STEPS, sat_curve() + sigma * rng.standard_normal(STEPS.size))
    assert choice.best is choice.saturation and choice.oscillator is not None
    assert choice.reason.startswith("saturation") and f"{choice.saturation.aicc:.2f}" in choice.reason
    for a, b in zip(choice.predict(STEPS), choice.saturation.predict(STEPS)):
        np.testing.assert_array_equal(a, b)


def test_fit_with_too_few_points_for_the_oscillator():
    choice = fit([0, 1, 3, 7, 12], [0.1, 0.3, 0.5, 0.6, 0.62])
    assert choice.oscillator is None and choice.best is choice.saturation and "too few" in choice.reason


def test_aic_formulas():
    f = fit_saturation(STEPS, sat_curve() + 0.02 * np.random.default_rng(0).standard_normal(STEPS.size))
    n, k = f.n, 4
    assert f.aic == pytest.approx(n * math.log(f.rss / n) + 2 * k)
    assert f.aicc == pytest.approx(f.aic + 2 * k * (k + 1) / (n - k - 1))
    resid = f.predict(STEPS)[0] - (sat_curve() + 0.02 * np.random.default_rng(0).standard_normal(STEPS.size))
    assert f.rss == pytest.approx(float(resid @ resid))


def test_predict_band_covers_the_true_curve():
    """The ~95% delta-method band covers the true mean curve about 95% of the time (pointwise)."""
    rng = np.random.default_rng(9)
    t_eval = np.array([0.0, 20.0, 60.0, 150.0, 199.0, 260.0])
    truth = sat_curve(t_eval)
    hits = []
    for _ in range(60):
        f = fit_saturation(STEPS, sat_curve() + 0.03 * rng.standard_normal(STEPS.size))
        mean, lo, hi = f.predict(t_eval)
        assert np.all(lo < mean) and np.all(mean < hi)
        hits.append((lo <= truth) & (truth <= hi))
    coverage = np.mean(hits)
    assert 0.85 <= coverage <= 1.0, coverage


def test_savgol_matrix_is_scipy_savgol_filter():
    y = np.random.default_rng(0).standard_normal(57)
    for window in (5, 11, 57):
        np.testing.assert_allclose(M._savgol_matrix(57, window) @ y, savgol_filter(y, window, 2, mode="interp"))


# --------------------------------------------------------------------------------------------- fluctuations


def _fluctuation_curves(power, with_steps, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(300.0)
    curves = {}
    for g in (2, 4, 8, 16, 32, 64):
        y = sat_curve(t, tau=60.0) + 0.3 * g ** (power / 2) * rng.standard_normal(t.size)
        curves[g] = (t, y) if with_steps else y
    return curves


@pytest.mark.parametrize("with_steps", [True, False])
def test_fluctuation_scaling_recovers_minus_one(with_steps):
    fs = fluctuation_scaling(_fluctuation_curves(-1.0, with_steps))
    assert abs(fs.exponent + 1.0) <= 3 * fs.exponent_se and fs.exponent_se < 0.1
    assert list(fs.group_sizes) == [2, 4, 8, 16, 32, 64]
    np.testing.assert_allclose(fs.variances, 0.09 / fs.group_sizes, rtol=0.3)
    assert fs.prefactor == pytest.approx(0.09, rel=0.3)


def test_fluctuation_scaling_standard_error_of_two_group_sizes():
    """With two group sizes the SE is the sampling error alone: Var ln s² ≈ 2/dof for each of the two variances,
    so SE(b) = √(2/dof + 2/dof)/ln(G₂/G₁)."""
    curves = _fluctuation_curves(-1.0, True)
    fs = fluctuation_scaling({4: curves[4], 32: curves[32]})
    dof = 300 - 3  # both curves are pure exponentials: the saturation law (3 parameters) is chosen
    assert fs.exponent_se == pytest.approx(math.sqrt(4.0 / dof) / math.log(8.0), rel=1e-6)
    assert abs(fs.exponent + 1.0) <= 3 * fs.exponent_se


def test_fluctuation_scaling_tells_other_exponents_apart():
    fs = fluctuation_scaling(_fluctuation_curves(-2.0, True))
    assert abs(fs.exponent + 2.0) <= 3 * fs.exponent_se and abs(fs.exponent + 1.0) > 10 * fs.exponent_se


# --------------------------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "fitter, steps, rewards, match",
    [
        (fit_saturation, [0, 1, 2, 3], [0.1, 0.2, 0.3], r"steps and rewards: different lengths \(4 and 3\)"),
        (fit_saturation, [0, 1, 2], [0.1, 0.2, 0.3], r"rewards: the saturation fit needs at least 4 points, got 3"),
        (fit_oscillator, range(5), [0.1] * 5, r"rewards: the oscillator fit needs at least 6 points, got 5"),
        (fit, [0, 1, 2], [0.1, 0.2, 0.3], r"rewards: .*at least 4 points"),
        (fit_saturation, [0, 1, 2, 3, 4], [0.1, np.nan, 0.3, 0.4, 0.5], r"rewards: non-finite value nan at index 1"),
        (fit_oscillator, [0, 1, np.inf, 3, 4, 5], [0.1] * 6, r"steps: non-finite value inf at index 2"),
        (fit_saturation, [0, 1, 1, 3, 4], [0.1] * 5, r"steps: must be strictly increasing, got 1.0 after 1.0"),
        (fit_saturation, [0, 2, 1, 3, 4], [0.1] * 5, r"steps: must be strictly increasing"),
        (fit_saturation, [[0, 1], [2, 3]], [0.1] * 4, r"steps: expected a 1-D sequence"),
        (fit_saturation, [0, 1, 2, 3], ["a", "b", "c", "d"], r"rewards: expected a sequence of numbers"),
    ],
)
def test_bad_input_names_the_argument(fitter, steps, rewards, match):
    with pytest.raises(ValueError, match=match):
        fitter(steps, rewards)


def test_fluctuation_scaling_bad_input():
    with pytest.raises(ValueError, match="curves: expected a non-empty dict"):
        fluctuation_scaling({})
    with pytest.raises(ValueError, match="curves: need at least 2 different group sizes"):
        fluctuation_scaling({4: np.linspace(0, 1, 10)})
    with pytest.raises(ValueError, match="curves: group sizes must be positive integers"):
        fluctuation_scaling({0: np.linspace(0, 1, 10), 2: np.linspace(0, 1, 10)})
    with pytest.raises(ValueError, match=r"curves\[8\]: rewards: non-finite"):
        fluctuation_scaling({4: np.linspace(0, 1, 10), 8: [0.1, 0.2, np.nan, 0.3, 0.4]})
