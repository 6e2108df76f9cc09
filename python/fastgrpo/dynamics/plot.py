"""``dynamics.png`` and ``python -m fastgrpo dynamics``: a log's reward curve with the preferred fit, its ~95%
band, the regime and the findings; the CLI prints the fits, the choice, the regime and the findings as text.

matplotlib is optional and imported only inside :func:`plot_dynamics`; without it no PNG is written and the
function returns None (the CLI says so). scipy is imported only when the fits run.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

import numpy as np

from .diagnose import Finding, diagnose, model_name, unchecked
from .logs import TrainingLog, read_log

if TYPE_CHECKING:
    from .models import ModelChoice

__all__ = ["plot_dynamics", "report", "run"]

_COLORS = {
    "advantage_degeneracy": "tab:purple",
    "policy_concentration": "tab:orange",
    "instability": "tab:red",
    "reward_hacking": "tab:brown",
}
_AUX = ("entropy", "frac_reward_zero_std", "reward_std", "kl", "clip_fraction", "ratio_deviation")


def plot_dynamics(
    log: TrainingLog, choice: ModelChoice, findings: list[Finding], path: str | os.PathLike[str]
) -> str | None:
    """Write the PNG to ``path`` and return its path, or None when matplotlib is not installed.

    Top panel: the logged reward, the preferred model's mean and ~95% band, the other model dashed, a box with
    the fitted parameters and regime, and one vertical line per finding (at the step its condition began).
    Bottom panel (when the log has them): the other canonical metrics, each divided by its largest magnitude.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state is touched
    except ImportError:
        return None

    steps, reward = log.series("reward")
    aux = [m for m in _AUX if log.has(m)]
    fig = Figure(figsize=(11, 7 if aux else 4.8), layout="constrained")
    axes = fig.subplots(2 if aux else 1, 1, sharex=True, squeeze=False)
    ax = axes[0, 0]
    grid = np.linspace(float(steps.min()), float(steps.max()), 400)
    ax.plot(
        steps,
        reward,
        ".",
        color="0.45",
        ms=4,
        label="reward" if log.names.get("reward", "reward") == "reward" else f"reward ({log.names['reward']})",
    )
    best = model_name(choice)
    mean, lower, upper = (np.asarray(a, dtype=float) for a in choice.predict(grid))
    ax.fill_between(grid, lower, upper, color="tab:blue", alpha=0.2, lw=0, label="~95% band")
    ax.plot(grid, mean, color="tab:blue", lw=2, label=f"{best} fit (preferred)")
    other = choice.saturation if best == "oscillator" else choice.oscillator
    other_name = "saturation" if best == "oscillator" else "oscillator"
    if other is not None:
        try:
            ax.plot(
                grid,
                np.asarray(other.predict(grid)[0], dtype=float),
                "--",
                color="tab:green",
                lw=1.2,
                label=f"{other_name} fit",
            )
        except Exception:  # noqa: BLE001 - a failed alternative fit is not worth losing the plot for
            pass
    sat, osc = choice.saturation, choice.oscillator
    lines = [f"preferred: {best} ({choice.criterion})"]
    if sat is not None:
        lines.append(f"saturation: r∞={sat.r_inf:.3g}  τ={sat.tau:.3g}  R²={sat.r2:.3f}")
    if osc is not None:
        lines.append(f"oscillator: ω0={osc.omega0:.3g}  ζ={osc.zeta:.3g}  R²={osc.r2:.3f}")
        lines.append(f"regime (oscillator fit): {osc.regime}")
    ax.text(
        0.99,
        0.03,
        "\n".join(lines),
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=8,
        bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9},
    )
    for i, f in enumerate(findings):
        color = _COLORS.get(f.kind, "black")
        x = f.step if f.step is not None else float(steps.max())
        for a in axes[:, 0]:
            a.axvline(x, color=color, ls=":", lw=1.2)
        ax.annotate(
            f"{f.kind}: {f.metric}",
            (x, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -4 - 13 * i),
            textcoords="offset points",
            fontsize=7,
            color=color,
            va="top",
            ha="left" if x <= 0.6 * float(steps.max() - steps.min()) + float(steps.min()) else "right",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
        )
    ax.set_ylabel("reward")
    title = os.path.basename(log.path) or "log"
    ax.set_title(f"{title} ({log.source}): {len(findings)} finding{'s' if len(findings) != 1 else ''}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    if aux:
        ax2 = axes[1, 0]
        for m in aux:
            s, v = log.series(m)
            scale = float(np.max(np.abs(v))) or 1.0
            ax2.plot(s, v / scale, lw=1.2, label=f"{m} / {scale:.3g}")
        ax2.set_ylabel("metric / max |metric|")
        ax2.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes[-1, 0].set_xlabel("step")
    out = os.fspath(path)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


# --------------------------------------------------------------------------------------------- CLI


def _pm(value: float, se: float) -> str:
    return f"{value:.4g} ± {se:.2g}" if np.isfinite(se) else f"{value:.4g} ± n/a"


def _group_logs(specs: list[str]) -> dict[int, TrainingLog]:
    logs: dict[int, TrainingLog] = {}
    for spec in specs:
        g, sep, path = spec.partition("=")
        if not sep or not g.strip().isdigit() or int(g) < 1 or not path:
            raise ValueError(f"--group-size {spec!r}: expected G=LOG with G a positive integer, e.g. 8=run_g8.csv")
        if int(g) in logs:
            raise ValueError(f"--group-size {spec!r}: group size {int(g)} given twice")
        logs[int(g)] = read_log(path)
    return logs


def report(log: TrainingLog, choice: ModelChoice, findings: list[Finding]) -> str:
    """The plain-text report the CLI prints: both fits (± SE), the chosen model and why, the regime, findings."""
    steps, reward = log.series("reward")
    mapped = ", ".join(f"{k}<-{v}" for k, v in log.names.items())
    out = [
        f"log: {log.path} ({log.source}; {len(log.steps)} steps, {len(reward)} with reward, "
        f"steps {steps[0]:g}..{steps[-1]:g})",
        f"metrics: {mapped}",
        "",
        f"{'model':<11} {'parameter':<10} {'value ± SE':<22} fit",
    ]
    sat, osc = choice.saturation, choice.oscillator
    rows: list[tuple[str, str, str, str]] = [
        ("saturation", "r_inf", _pm(sat.r_inf, sat.r_inf_se), f"R² = {sat.r2:.4f}, n = {sat.n}"),
        ("", "r0", _pm(sat.r0, sat.r0_se), f"AICc = {sat.aicc:.2f}"),
        ("", "tau", _pm(sat.tau, sat.tau_se), sat.note),
    ]
    if osc is not None:
        rows += [
            ("oscillator", "r_inf", _pm(osc.r_inf, osc.r_inf_se), f"R² = {osc.r2:.4f}, n = {osc.n}"),
            ("", "r0", _pm(osc.r0, osc.r0_se), f"AICc = {osc.aicc:.2f}"),
            ("", "omega0", _pm(osc.omega0, osc.omega0_se), f"regime: {osc.regime}"),
            ("", "zeta", _pm(osc.zeta, osc.zeta_se), osc.note),
        ]
    out += [f"{a:<11} {b:<10} {c:<22} {d}".rstrip() for a, b, c, d in rows]
    out += ["", f"chosen: {model_name(choice)} ({choice.criterion}): {choice.reason}"]
    if osc is not None:
        out.append(f"regime: {osc.regime} (oscillator fit, zeta = {_pm(osc.zeta, osc.zeta_se)})")
    else:
        out.append("regime: n/a (too few points for the oscillator fit)")
    out += ["", f"findings: {len(findings) or 'none'}"]
    if findings:
        header = f"{'kind':<21} {'metric':<21} {'threshold':>9} {'value':>9} {'step':>8}  rule"
        out += [header, "-" * len(header)]
        for f in findings:
            step = "-" if f.step is None else f"{f.step:g}"
            out.append(f"{f.kind:<21} {f.metric:<21} {f.threshold:>9.3g} {f.value:>9.3g} {step:>8}  {f.rule}")
        out += [""] + [f"- {f.message}" for f in findings]
    missing = unchecked(log)
    if missing:
        out.append(f"not checked (metric absent from the log): {', '.join(missing)}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    """``python -m fastgrpo dynamics``: read, fit, diagnose, print; the PNG when matplotlib is installed."""
    from .models import fit, fluctuation_scaling  # scipy: only when the subcommand runs

    try:
        log = read_log(args.log)
        groups = _group_logs(args.group_size)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if len(groups) == 1:
        print("error: --group-size needs two or more G=LOG runs to fit a scaling exponent", file=sys.stderr)
        return 2
    steps, reward = log.series("reward")
    try:
        choice = fit(steps, reward)
    except ValueError as err:
        print(f"error: {log.path}: cannot fit the reward curve: {err}", file=sys.stderr)
        return 2
    findings = diagnose(log, choice=choice)
    print(report(log, choice, findings))
    if groups:
        try:
            scaling = fluctuation_scaling({g: lg.series("reward") for g, lg in groups.items()})
        except ValueError as err:
            print(f"error: fluctuation scaling: {err}", file=sys.stderr)
            return 2
        print()
        print(f"{'G':>6} {'var(reward) about its fit':>26}  log")
        for g, var in zip(scaling.group_sizes, scaling.variances):
            print(f"{int(g):>6} {var:>26.4g}  {groups[int(g)].path}")
        print(
            f"fluctuation scaling: var(reward) ~ G^b, b = {_pm(scaling.exponent, scaling.exponent_se)} "
            f"(independent samples predict b = -1)"
        )
    out_dir = args.out if args.out is not None else (os.path.dirname(os.path.abspath(log.path)) or ".")
    png = plot_dynamics(log, choice, findings, os.path.join(out_dir, "dynamics.png"))
    print()
    print(f"wrote {png}" if png else "matplotlib is not installed: no PNG written (pip install matplotlib)")
    return 0
