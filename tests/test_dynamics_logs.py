"""fastgrpo.dynamics.logs / diagnose / plot: the TRL, verl and CSV readers on files written the way the trainers
write them, each diagnosis heuristic firing (and none on a healthy run), clear errors, and the ``dynamics`` CLI
end to end."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("scipy")

from fastgrpo.dynamics.diagnose import Finding, diagnose, unchecked  # noqa: E402
from fastgrpo.dynamics.logs import METRIC_NAMES, TrainingLog, read_log  # noqa: E402

N = 200
STEPS = np.arange(1, N + 1)
R_INF, R0, TAU = 0.8, 0.1, 40.0


def saturating(steps=STEPS, seed=0, batch=256):
    """A saturating expected reward with the binomial noise of a batch of 0/1 rewards."""
    p = R_INF - (R_INF - R0) * np.exp(-(np.asarray(steps, dtype=float) - steps[0]) / TAU)
    return np.random.default_rng(seed).binomial(batch, p) / batch


def healthy_metrics(steps=STEPS):
    """Canonical metrics of a run with nothing wrong: entropy down to ~0.7x, mild tie fraction, small KL."""
    s = np.asarray(steps, dtype=float)
    return {
        "reward_std": 0.35 + 0.0 * s,
        "frac_reward_zero_std": 0.1 + 0.05 * s / s[-1],
        "entropy": 0.8 * (0.7 + 0.3 * np.exp(-s / 100)),
        "kl": 0.02 * s / s[-1],
        "clip_fraction": 0.01 + 0.0 * s,
    }


def make_log(reward, steps=STEPS, **metrics):
    steps = np.asarray(steps, dtype=float)
    return TrainingLog(steps=steps, metrics={"reward": np.asarray(reward, float), **metrics}, source="csv")


# --------------------------------------------------------------------------------------------- writers


def write_trl(path, reward, metrics):
    """``trainer_state.json`` as transformers' Trainer saves it, log_history entries as GRPOTrainer.log fills
    them (its ``_metrics`` names, ``rewards/<func>/mean``, an eval entry, ``null`` values, the train summary)."""
    history = []
    for i, step in enumerate(STEPS):
        entry = {
            "loss": 0.01,
            "grad_norm": 0.5,
            "learning_rate": 1e-6,
            "num_tokens": 1000.0 * step,
            "completions/mean_length": 120.0,
            "completions/clipped_ratio": 0.0,
            "rewards/accuracy_reward/mean": float(reward[i]),
            "rewards/accuracy_reward/std": 0.4,
            "reward": float(reward[i]),
            "reward_std": float(metrics["reward_std"][i]),
            "frac_reward_zero_std": float(metrics["frac_reward_zero_std"][i]),
            "kl": float(metrics["kl"][i]),
            "entropy": float(metrics["entropy"][i]),
            "clip_ratio/low_mean": 0.0,
            "clip_ratio/low_min": 0.0,
            "clip_ratio/high_mean": float(metrics["clip_fraction"][i]),
            "clip_ratio/high_max": 0.0,
            "clip_ratio/region_mean": float(metrics["clip_fraction"][i]),
            "epoch": float(step) / N,
            "step": int(step),
        }
        if i == 3:
            entry["kl"] = None  # TRL logs None when every value it averaged was NaN
        history.append(entry)
        if step % 50 == 0:
            history.append({"eval_loss": 0.2, "eval_reward": 0.5, "epoch": float(step) / N, "step": int(step)})
    history.append({"train_runtime": 100.0, "train_loss": 0.01, "epoch": 1.0, "step": int(STEPS[-1])})
    state = {"best_metric": None, "epoch": 1.0, "global_step": int(STEPS[-1]), "log_history": history}
    path.write_text(json.dumps(state, indent=2))
    return path


def write_verl_jsonl(path, reward, metrics):
    """verl's FileLogger: one ``{"step": s, "data": {...}}`` per line; validation metrics every 50 steps only."""
    lines = []
    for i, step in enumerate(STEPS):
        data = {
            "critic/score/mean": float(reward[i]),
            "critic/score/max": 1.0,
            "critic/rewards/mean": float(reward[i]) - 0.05,
            "critic/advantages/mean": 0.0,
            "response_length/mean": 300.0,
            "actor/entropy": float(metrics["entropy"][i]),
            "actor/pg_clipfrac": float(metrics["clip_fraction"][i]),
            "actor/ppo_kl": 1e-4,
            "actor/kl_loss": float(metrics["kl"][i]),
            "actor/pg_loss": -0.01,
            "timing_s/gen": 3.0,
        }
        if step % 50 == 0:
            data["val-core/openai/gsm8k/acc/mean@1"] = 0.6
        lines.append(json.dumps({"step": int(step), "data": data}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(path, reward, steps=STEPS, header="step,reward"):
    rows = [header] + [f"{int(s)},{float(r)!r}" for s, r in zip(steps, reward)]
    path.write_text("\n".join(rows) + "\n")
    return path


# --------------------------------------------------------------------------------------------- readers


def test_read_trl_trainer_state(tmp_path):
    reward, metrics = saturating(), healthy_metrics()
    log = read_log(write_trl(tmp_path / "trainer_state.json", reward, metrics))
    assert log.source == "trl"
    np.testing.assert_array_equal(log.steps, STEPS)
    np.testing.assert_allclose(log.metrics["reward"], reward)
    np.testing.assert_allclose(log.metrics["entropy"], metrics["entropy"])
    np.testing.assert_allclose(log.metrics["clip_fraction"], metrics["clip_fraction"])
    assert log.names["clip_fraction"] == "clip_ratio/region_mean"
    assert math.isnan(log.metrics["kl"][3]) and np.isfinite(np.delete(log.metrics["kl"], 3)).all()
    assert "ratio_deviation" not in log.metrics and not log.has("ratio_deviation")
    # eval entries stay under their own names at their own steps; the summary adds no step
    assert np.isfinite(log.raw["eval_reward"]).sum() == 4 and "eval_reward" not in log.names.values()
    assert log.raw["train_loss"][-1] == 0.01 and log.metrics["reward"][-1] == reward[-1]
    s, v = log.series("kl")
    assert len(s) == N - 1 and np.isfinite(v).all()


def test_read_trl_output_and_checkpoint_directories(tmp_path):
    reward = saturating()
    for step in (100, 200):
        (tmp_path / f"checkpoint-{step}").mkdir()
        write_trl(tmp_path / f"checkpoint-{step}" / "trainer_state.json", reward * step / 200, healthy_metrics())
    log = read_log(tmp_path)  # the latest checkpoint, by number
    assert log.path.endswith(os.path.join("checkpoint-200", "trainer_state.json"))
    np.testing.assert_allclose(log.metrics["reward"], reward)


def test_read_verl_jsonl(tmp_path):
    reward, metrics = saturating(), healthy_metrics()
    log = read_log(write_verl_jsonl(tmp_path / "run.jsonl", reward, metrics))
    assert log.source == "verl"
    np.testing.assert_array_equal(log.steps, STEPS)
    assert log.names == {
        "reward": "critic/score/mean",
        "entropy": "actor/entropy",
        "kl": "actor/kl_loss",
        "clip_fraction": "actor/pg_clipfrac",
    }
    np.testing.assert_allclose(log.metrics["reward"], reward)  # the score, not critic/rewards/mean
    np.testing.assert_allclose(log.metrics["kl"], metrics["kl"])
    val = log.raw["val-core/openai/gsm8k/acc/mean@1"]
    assert np.isfinite(val).sum() == 4 and np.isnan(val[0])
    assert unchecked(log) == ["frac_reward_zero_std", "ratio_deviation", "reward_std"]


def test_read_verl_console_log(tmp_path):
    lines = ["(TaskRunner pid=42) Training Progress: 0%", "random line"]
    for step, r in zip(STEPS[:10], saturating()[:10]):
        lines.append(
            f"(TaskRunner pid=42) step:{step} - critic/score/mean:np.float64({float(r)!r}) - actor/entropy:0.8 - "
            "actor/pg_clipfrac:0.01 - timing_s/gen:3.5"
        )
    path = tmp_path / "train.log"
    path.write_text("\n".join(lines) + "\n")
    log = read_log(path)
    assert log.source == "verl" and len(log.steps) == 10
    np.testing.assert_allclose(log.metrics["reward"], saturating()[:10])
    np.testing.assert_allclose(log.metrics["entropy"], 0.8)


def test_read_csv_plain_and_wandb_export(tmp_path):
    reward = saturating()
    log = read_log(write_csv(tmp_path / "r.csv", reward))
    assert log.source == "csv" and list(log.metrics) == ["reward"]
    np.testing.assert_array_equal(log.steps, STEPS)
    np.testing.assert_allclose(log.metrics["reward"], reward)
    # a W&B export of a TRL run: "Step", train/-prefixed keys, empty cells
    rows = ["Step,train/reward,train/entropy,train/frac_reward_zero_std"]
    rows += [f"{s},{r},{'' if s == 5 else 0.5},0.2" for s, r in zip(STEPS[:20], reward[:20])]
    (tmp_path / "wandb.csv").write_text("\n".join(rows) + "\n")
    log = read_log(tmp_path / "wandb.csv")
    assert set(log.metrics) == {"reward", "entropy", "frac_reward_zero_std"}
    assert math.isnan(log.metrics["entropy"][4]) and log.metrics["entropy"][5] == 0.5
    # no step column: rows numbered from 0
    (tmp_path / "nostep.csv").write_text("reward\n0.1\n0.2\n0.3\n")
    np.testing.assert_array_equal(read_log(tmp_path / "nostep.csv").steps, [0, 1, 2])


def test_canonical_names_cover_both_trainers():
    assert METRIC_NAMES["reward"][:3] == ("reward", "critic/score/mean", "critic/rewards/mean")
    assert "actor/entropy" in METRIC_NAMES["entropy"] and "actor/pg_clipfrac" in METRIC_NAMES["clip_fraction"]
    assert {"kl", "actor/kl_loss"} <= set(METRIC_NAMES["kl"])


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("run.yaml", "reward: 1\n", r"run\.yaml: unknown log format '\.yaml'; expected .*trainer_state\.json"),
        ("empty.csv", "", r"empty\.csv: empty file"),
        ("blank.jsonl", "\n\n", r"blank\.jsonl: no logged steps"),
        ("noreward.csv", "step,loss\n1,0.5\n", r"noreward\.csv: no reward metric found; expected one of 'reward'"),
        ("nums.csv", "1,0.5\n2,0.6\n", r"nums\.csv: the first row is all numbers; expected a header row"),
        ("state.json", '{"global_step": 3}', r"state\.json: expected TRL's trainer_state\.json.*'log_history'"),
        ("state2.json", '{"log_history": []}', r"state2\.json: 'log_history' holds no entries"),
        ("bad.json", "{not json", r"bad\.json: not valid JSON"),
        ("nostep.jsonl", '{"critic/score/mean": 0.5}\n', r"nostep\.jsonl:1: no 'step' key; expected verl"),
        ("badline.jsonl", '{"step": 1, "data": {}}\n[1,\n', r"badline\.jsonl:2: not valid JSON"),
        ("console.log", "nothing here\n", r"console\.log: no 'step:N - key:value"),
    ],
)
def test_clear_errors(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        read_log(tmp_path / name)


def test_missing_file_and_bare_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_log(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="without trainer_state.json"):
        read_log(tmp_path)


# --------------------------------------------------------------------------------------------- diagnosis


def kinds(findings):
    return sorted({(f.kind, f.metric) for f in findings})


def test_healthy_run_has_no_findings():
    for seed in range(3):
        assert diagnose(make_log(saturating(seed=seed), **healthy_metrics())) == []


def test_advantage_degeneracy_from_tied_groups():
    metrics = healthy_metrics()
    metrics["frac_reward_zero_std"] = np.clip(STEPS / 120, 0, 1.0)
    findings = diagnose(make_log(saturating(), **metrics))
    assert kinds(findings) == [("advantage_degeneracy", "frac_reward_zero_std")]
    (f,) = findings
    assert f.threshold == 0.5 and f.value > 0.9 and 60 < f.step < 75
    assert "frac_reward_zero_std" in f.message and "0.5" in f.message
    assert diagnose(make_log(saturating(), **metrics), zero_std_frac=1.0) == []  # the threshold is the knob


def test_advantage_degeneracy_from_vanishing_reward_std():
    metrics = healthy_metrics()
    metrics["reward_std"] = 0.4 * np.exp(-STEPS / 30) + 0.005
    (f,) = diagnose(make_log(saturating(), **metrics))
    assert (f.kind, f.metric, f.threshold) == ("advantage_degeneracy", "reward_std", 0.2)
    assert f.value < 0.2 and "reward_std / initial" in f.rule


def test_policy_concentration_from_entropy_collapse():
    metrics = healthy_metrics()
    metrics["entropy"] = 1.2 * np.exp(-STEPS / 40)
    (f,) = diagnose(make_log(saturating(), **metrics))
    assert (f.kind, f.metric, f.threshold) == ("policy_concentration", "entropy", 0.3)
    assert f.value < 0.3 and f.step is not None
    assert diagnose(make_log(saturating(), **metrics), entropy_ratio=0.001) == []


def test_instability_underdamped_reward():
    t = STEPS - 1.0
    p = 0.7 - 0.6 * np.exp(-0.02 * t) * np.cos(0.1 * t)  # zeta = 0.2
    reward = np.random.default_rng(1).binomial(256, np.clip(p, 0, 1)) / 256
    findings = diagnose(make_log(reward, **healthy_metrics()))
    assert kinds(findings) == [("instability", "reward")]
    (f,) = findings
    assert f.threshold == 0.3 and 0.1 < f.value < 0.3 and "zeta" in f.rule
    assert diagnose(make_log(reward, **healthy_metrics()), zeta_threshold=0.1) == []


def test_instability_growing_fluctuations():
    t = STEPS - 1.0
    wobble = 0.004 * np.exp(t / 55) * np.sin(0.6 * t)
    reward = saturating() + wobble
    (f,) = diagnose(make_log(reward, **healthy_metrics()))
    assert (f.kind, f.metric, f.threshold) == ("instability", "reward", 2.0)
    assert f.value > 2.0 and "residual" in f.rule and f.step == STEPS[2 * N // 3]


def test_sigmoid_rise_is_not_flagged_as_ringing():
    """An S-shaped rise is fitted as half a slow cosine (zeta at its bound): no overshoot peak in the data."""
    p = 0.1 + 0.7 / (1 + np.exp(-(STEPS - 100) / 15))
    reward = np.random.default_rng(0).binomial(64, p) / 64
    assert diagnose(make_log(reward, **healthy_metrics())) == []


@pytest.mark.parametrize("metric, drift", [("kl", 0.3), ("clip_fraction", 0.25), ("ratio_deviation", 0.3)])
def test_possible_reward_hacking(metric, drift):
    metrics = healthy_metrics()
    metrics[metric] = drift * (STEPS / N) ** 2
    findings = diagnose(make_log(saturating(), **metrics))
    assert kinds(findings) == [("reward_hacking", metric)]
    (f,) = findings
    assert f.threshold == 0.1 and f.value > 0.1 and "possible reward hacking" in f.message
    # the same drift with a flat reward is not flagged
    flat = np.random.default_rng(0).binomial(256, 0.5, N) / 256
    assert diagnose(make_log(flat, **metrics)) == []


def test_findings_carry_metric_rule_threshold():
    metrics = healthy_metrics()
    metrics["entropy"] = 1.2 * np.exp(-STEPS / 40)
    metrics["kl"] = 0.3 * STEPS / N
    findings = diagnose(make_log(saturating(), **metrics), kl_threshold=0.2)
    assert all(isinstance(f, Finding) and f.metric and f.rule and np.isfinite(f.threshold) for f in findings)
    assert {(f.metric, f.threshold) for f in findings} == {("entropy", 0.3), ("kl", 0.2)}


# --------------------------------------------------------------------------------------------- CLI


def run_cli(*args):
    cmd = [sys.executable, "-m", "fastgrpo", "dynamics", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def cli_main(*args):
    """The same CLI in this process (``python -m fastgrpo`` is ``main``; a subprocess costs seconds of imports)."""
    from fastgrpo.__main__ import main

    return main(["dynamics", *map(str, args)])


def test_cli_end_to_end(tmp_path):
    metrics = healthy_metrics()
    metrics["entropy"] = 1.2 * np.exp(-STEPS / 40)
    log = write_trl(tmp_path / "trainer_state.json", saturating(), metrics)
    groups = []
    for g, noise in [(4, 0.08), (8, 0.056), (16, 0.04)]:
        r = saturating(batch=10**6) + np.random.default_rng(g).normal(0, noise, N)
        groups += ["--group-size", f"{g}={write_csv(tmp_path / f'g{g}.csv', r)}"]
    out = tmp_path / "out"
    res = run_cli(log, "--out", out, *groups)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for needle in ("saturation", "oscillator", "r_inf", "tau", "omega0", "zeta", "R² =", "chosen: saturation", "±"):
        assert needle in text, needle
    assert "regime: overdamped" in text or "regime: critical" in text
    assert "findings: 1" in text and "policy_concentration" in text and "entropy" in text
    assert "not checked (metric absent from the log): ratio_deviation" in text
    line = next(x for x in text.splitlines() if x.startswith("fluctuation scaling"))
    b = float(line.split("b = ")[1].split(" ±")[0])
    assert -1.4 < b < -0.6, line
    png = out / "dynamics.png"
    assert png.is_file() and png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in text


def test_cli_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if matplotlib were absent
    log = write_csv(tmp_path / "r.csv", saturating())
    assert cli_main(log, "--out", tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "findings: none" in out and "matplotlib is not installed: no PNG written" in out
    assert "chosen: saturation" in out and "R² =" in out
    assert not (tmp_path / "out" / "dynamics.png").exists()


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "x.yaml"
    bad.write_text("a: 1\n")
    assert cli_main(bad) == 2
    err = capsys.readouterr().err
    assert "unknown log format" in err and "x.yaml" in err
    good = write_csv(tmp_path / "r.csv", saturating())
    assert cli_main(good, "--group-size", f"4={good}") == 2
    assert "two or more" in capsys.readouterr().err
    assert cli_main(good, "--group-size", "four=r.csv") == 2
    assert "expected G=LOG" in capsys.readouterr().err
    tiny = write_csv(tmp_path / "tiny.csv", [0.1, 0.2], steps=[1, 2])
    assert cli_main(tiny) == 2
    assert "cannot fit the reward curve" in capsys.readouterr().err
