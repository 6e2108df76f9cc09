"""Training dynamics of GRPO runs (MATH §8): reward-curve models and their fits (``models``); training logs of
TRL, verl or CSV read into one trainer-neutral form (``logs``), their heuristic diagnosis (``diagnose``), and the
``python -m fastgrpo dynamics`` report and plot (``plot``).

Needs scipy (``pip install fastgrpo[dynamics]``). ``import fastgrpo`` does not import this package, so the
core library stays scipy-free; ``import fastgrpo.dynamics`` imports scipy.
"""

from .diagnose import Finding, diagnose
from .logs import TrainingLog, read_log
from .models import (
    CRITICAL_TOL,
    FluctuationScaling,
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

__all__ = [
    "CRITICAL_TOL",
    "Finding",
    "FluctuationScaling",
    "ModelChoice",
    "OscillatorFit",
    "SaturationFit",
    "TrainingLog",
    "damped_response",
    "diagnose",
    "fit",
    "fit_oscillator",
    "fit_saturation",
    "fluctuation_scaling",
    "oscillator_curve",
    "read_log",
    "saturation_curve",
]
