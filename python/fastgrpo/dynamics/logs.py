"""Read GRPO training logs (TRL, verl, plain CSV) into one trainer-neutral :class:`TrainingLog`.

Formats, chosen by the file's extension:

``trainer_state.json`` (any ``.json``; or a TRL output / checkpoint directory)
    TRL: ``transformers.TrainerState.log_history``, one dict per logging call, each with a ``"step"`` key
    (``Trainer.log`` appends ``{**logs, "step": global_step}``). ``GRPOTrainer.log`` averages its own
    ``_metrics`` into those dicts (``trl/trainer/grpo_trainer.py``): ``reward``, ``reward_std``,
    ``frac_reward_zero_std``, ``entropy``, ``kl`` (only when ``beta != 0``), ``clip_ratio/region_mean``
    (``clip_ratio/low_mean``, ``clip_ratio/high_mean`` for the clipped loss types), ``cispo_clip_ratio``.
    Values TRL could not average are ``null``; they read as NaN. Evaluation entries (``eval_*``) are kept
    under their own names and never mapped to the canonical ones.
``.jsonl`` / ``.ndjson``
    verl's file logger (``verl/utils/tracking.py``, ``FileLogger.log``): one ``{"step": s, "data": {...}}`` per
    line. Flat lines ``{"step": s, "metric": v, ...}`` (also ``_step``/``global_step``) are read too.
``.csv``
    A header row, a step column (``step``, ``_step``, ``Step``, ``global_step``, ``train/global_step``; without
    one the rows are numbered from 0) and metric columns under any of the names below, e.g. a plain
    ``step,reward`` file or a W&B export (TRL's W&B keys carry a ``train/`` prefix, which is stripped).
``.log`` / ``.txt``
    verl's console logger (``verl/utils/logger/aggregate_logger.py``): lines ``step:s - key:value - ...``,
    anything before ``step:`` on the line (a Ray prefix) ignored.

Canonical names (:data:`METRIC_NAMES`, first match wins): ``reward``, ``reward_std``, ``frac_reward_zero_std``,
``entropy``, ``kl`` (to the reference policy), ``clip_fraction`` and ``ratio_deviation`` (mean ``|ratio - 1|``;
neither trainer logs it by default, a CSV/JSONL column of that name is read). Every numeric column is also kept
under its own name in :attr:`TrainingLog.raw`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

__all__ = ["METRIC_NAMES", "STEP_COLUMNS", "TrainingLog", "read_log"]

#: canonical name → the trainers' names for it, in order of preference (each verified in the trainer's source)
METRIC_NAMES: dict[str, tuple[str, ...]] = {
    # TRL GRPOTrainer._generate_and_score_completions: mean of the summed (weighted) reward functions.
    # verl metric_utils.compute_data_metrics: critic/score/mean (sequence score from the reward function),
    # critic/rewards/mean (token-level rewards summed per sequence; includes the KL penalty with use_kl_in_reward)
    "reward": ("reward", "critic/score/mean", "critic/rewards/mean", "score"),
    # TRL: std of the rewards over the whole batch; verl logs no reward std
    "reward_std": ("reward_std",),
    # TRL: fraction of prompt groups whose rewards all tie (std 0), i.e. whose GRPO advantages are all zero
    "frac_reward_zero_std": ("frac_reward_zero_std",),
    # TRL: masked mean token entropy of the policy being trained; verl ray_trainer: actor/entropy (old policy)
    "entropy": ("entropy", "actor/entropy"),
    # TRL: mean per-token k3 KL to the reference model (beta != 0); verl: actor/kl_loss (use_kl_loss, with the
    # configured kl_loss_type), actor/reward_kl_penalty (use_kl_in_reward)
    "kl": ("kl", "actor/kl_loss", "actor/reward_kl_penalty"),
    # TRL: clip_ratio/region_mean (low or high clipped, for grpo/bnpo/dr_grpo/dapo/luspo), cispo_clip_ratio;
    # older TRL: clip_ratio. verl core_algos.compute_policy_loss_*: actor/pg_clipfrac
    "clip_fraction": ("clip_ratio/region_mean", "actor/pg_clipfrac", "cispo_clip_ratio", "clip_ratio"),
    # logged by neither trainer by default
    "ratio_deviation": (),
}

#: step-column names a CSV or flat JSONL line may use, in order of preference (compared case-insensitively)
STEP_COLUMNS: tuple[str, ...] = ("step", "global_step", "train/global_step", "_step", "trainer/global_step")

_STRIP_PREFIXES = ("train/",)  # transformers' W&B/trackio rewrite_logs: train/<key>; eval keys stay eval/<key>
_CONSOLE_STEP = re.compile(r"step:\s*(\d+)\s+-\s+")
_WRAPPED = re.compile(r"[A-Za-z_][\w.]*\(([^()]*)\)")


@dataclass
class TrainingLog:
    """One run's metrics, step-aligned.

    ``steps`` is sorted and unique; every array in ``metrics`` (canonical names) and ``raw`` (the file's own
    names) has the same length, NaN where a step lacks the metric. ``names`` maps each canonical name present to
    the file's name it was read from.
    """

    steps: np.ndarray
    metrics: dict[str, np.ndarray]
    source: str  # "trl", "verl" or "csv"
    path: str = ""
    raw: dict[str, np.ndarray] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        """Whether the canonical metric ``name`` is present with at least one finite value."""
        values = self.metrics.get(name)
        return values is not None and bool(np.isfinite(values).any())

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the canonical metric ``name`` at the steps where it is finite."""
        values = self.metrics.get(name)
        if values is None:
            raise KeyError(f"{name!r} is not in this log ({self.path}); present: {sorted(self.metrics)}")
        ok = np.isfinite(values)
        return self.steps[ok], values[ok]


def _number(value: object) -> float | None:
    """A float for numbers (None and NaN become NaN); None for anything that is not a metric value."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text == "" or text.lower() in {"nan", "none", "null"}:
            return math.nan
        try:
            return float(text)
        except ValueError:
            return None
    return None


def _build(records: list[tuple[float, dict[str, object]]], source: str, path: str) -> TrainingLog:
    """Merge ``(step, {name: value})`` records (a later record wins for the same step and name) into a log."""
    if not records:
        raise ValueError(f"{path}: no logged steps found (empty {source} log?)")
    merged: dict[float, dict[str, float]] = {}
    for step, entry in records:
        row = merged.setdefault(step, {})
        for name, value in entry.items():
            number = _number(value)
            if number is None:
                continue
            for prefix in _STRIP_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix) :]
            if math.isnan(number) and name in row:
                continue  # a later null does not erase an earlier value (TRL logs None for all-NaN averages)
            row[name] = number
    steps = np.array(sorted(merged), dtype=np.float64)
    columns = sorted({name for row in merged.values() for name in row})
    raw = {name: np.array([merged[s].get(name, math.nan) for s in steps], dtype=np.float64) for name in columns}
    metrics: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}
    for canonical, candidates in METRIC_NAMES.items():
        for name in (canonical, *candidates):
            if name in raw and np.isfinite(raw[name]).any():
                metrics[canonical], names[canonical] = raw[name], name
                break
    if "reward" not in metrics:
        expected = ", ".join(repr(n) for n in ("reward", *METRIC_NAMES["reward"][1:]))
        found = ", ".join(repr(n) for n in columns[:20]) or "none"
        raise ValueError(
            f"{path}: no reward metric found; expected one of {expected} with at least one numeric value "
            f"(columns found: {found}{', ...' if len(columns) > 20 else ''})"
        )
    return TrainingLog(steps=steps, metrics=metrics, source=source, path=path, raw=raw, names=names)


def _step_of(entry: dict[str, object]) -> float | None:
    lowered = {str(k).lower(): v for k, v in entry.items()}
    for key in STEP_COLUMNS:
        if key in lowered:
            number = _number(lowered[key])
            if number is not None and math.isfinite(number):
                return number
    return None


def _read_trl(path: str) -> TrainingLog:
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected TRL's trainer_state.json") from err
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise ValueError(
            f"{path}: expected TRL's trainer_state.json, a JSON object with a 'log_history' list "
            "(one dict per logging step, each with a 'step' key)"
        )
    records = []
    for entry in state["log_history"]:
        if isinstance(entry, dict) and (step := _number(entry.get("step"))) is not None and math.isfinite(step):
            records.append((step, {k: v for k, v in entry.items() if k != "step"}))
    if not records:
        raise ValueError(f"{path}: 'log_history' holds no entries with a 'step' key (empty TRL log?)")
    return _build(records, "trl", path)


def _read_jsonl(path: str) -> TrainingLog:
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: not valid JSON ({err}); expected one JSON object per line, as verl's "
                    'file logger writes: {"step": N, "data": {"critic/score/mean": ..., ...}}'
                ) from err
            if not isinstance(entry, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(entry).__name__}")
            data = entry.get("data")
            metrics = data if isinstance(data, dict) else entry
            step = _step_of(entry)
            if step is None:
                raise ValueError(
                    f"{path}:{lineno}: no 'step' key; expected verl's file-logger lines "
                    '{"step": N, "data": {...}} or flat {"step": N, "metric": value, ...}'
                )
            records.append((step, {k: v for k, v in metrics.items() if k.lower() not in STEP_COLUMNS}))
    return _build(records, "verl", path)


def _read_csv(path: str) -> TrainingLog:
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{path}: empty CSV; expected a header row (e.g. 'step,reward') and one row per step")
    header = [cell.strip() for cell in rows[0]]
    if all(_number(cell) is not None for cell in header):
        raise ValueError(f"{path}: the first row is all numbers; expected a header row naming the columns")
    lowered = [h.lower() for h in header]
    step_col = next((lowered.index(k) for k in STEP_COLUMNS if k in lowered), None)
    records: list[tuple[float, dict[str, object]]] = []
    for index, row in enumerate(rows[1:]):
        entry: dict[str, object] = {n: (row[i] if i < len(row) else "") for i, n in enumerate(header) if i != step_col}
        step = float(index) if step_col is None else _number(row[step_col] if step_col < len(row) else "")
        if step is None or not math.isfinite(step):
            continue
        records.append((step, entry))
    if not records:
        raise ValueError(f"{path}: no data rows with a numeric step; expected e.g. 'step,reward' then numbers")
    return _build(records, "csv", path)


def _read_console(path: str) -> TrainingLog:
    records = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            match = _CONSOLE_STEP.search(line)
            if match is None:
                continue
            entry: dict[str, object] = {}
            for item in line[match.end() :].strip().split(" - "):
                key, sep, value = item.rpartition(":")
                if sep:
                    wrapped = _WRAPPED.fullmatch(value.strip())  # numpy 2 reprs: np.float64(0.5)
                    entry[key.strip()] = wrapped.group(1) if wrapped else value.strip()
            records.append((float(match.group(1)), entry))
    if not records:
        raise ValueError(
            f"{path}: no 'step:N - key:value - ...' lines; expected verl's console log (or use a .csv/.jsonl/.json)"
        )
    return _build(records, "verl", path)


def _trainer_state_in(directory: str) -> str:
    direct = os.path.join(directory, "trainer_state.json")
    if os.path.isfile(direct):
        return direct
    checkpoints = []
    for name in os.listdir(directory):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isfile(os.path.join(directory, name, "trainer_state.json")):
            checkpoints.append((int(match.group(1)), name))
    if not checkpoints:
        raise ValueError(
            f"{directory}: a directory without trainer_state.json (nor checkpoint-*/trainer_state.json); "
            "expected a TRL output or checkpoint directory, or pass the log file itself"
        )
    return os.path.join(directory, max(checkpoints)[1], "trainer_state.json")


def read_log(path: str | os.PathLike[str]) -> TrainingLog:
    """Read a TRL ``trainer_state.json`` (or TRL output directory), a verl JSONL / console log, or a CSV.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` naming the file and what was expected for
    an unknown extension, an empty file, a file in the wrong shape, or a log without any reward metric.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        path = _trainer_state_in(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in {".json", ".jsonl", ".ndjson", ".csv", ".log", ".txt"} and os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file; expected a training log ({ext})")
    if ext == ".json":
        return _read_trl(path)
    if ext in {".jsonl", ".ndjson"}:
        return _read_jsonl(path)
    if ext == ".csv":
        return _read_csv(path)
    if ext in {".log", ".txt"}:
        return _read_console(path)
    raise ValueError(
        f"{path}: unknown log format {ext or '(no extension)'!r}; expected TRL's trainer_state.json (.json), "
        "verl's file logger output (.jsonl), verl's console log (.log/.txt) or a CSV with step,reward columns (.csv)"
    )
