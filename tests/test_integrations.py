"""Integration helpers checked by hand-computed values (the drop-ins against the real packages:
test_integration_packages.py and test_integration_trl.py)."""

import math

import pytest
import torch

from fastgrpo.integrations import verl as fg_verl


def test_verl_metrics_by_hand():
    # ρ = [0.5, 1.1, 1.5, 3.5] (old = 0), A = −1, ε = 0.2, c = 3: clipped where −A·clip > −A·ρ, i.e. ρ < 0.8
    # (token 0); dual clip where A < 0 and max(ρ, clip ρ) > c (token 3); ppo_kl = mean(−log ρ)
    rho = torch.tensor([[0.5, 1.1, 1.5, 3.5]], dtype=torch.float64)
    lp, old, adv, mask = rho.log(), torch.zeros(1, 4, dtype=torch.float64), -torch.ones(1, 4), torch.ones(1, 4)
    _, m = fg_verl.policy_loss_fn("vanilla")(old, lp, adv, mask, config=dict(clip_ratio=0.2, clip_ratio_c=3.0))
    assert m["actor/pg_clipfrac"] == pytest.approx(0.25) and m["actor/pg_clipfrac_lower"] == pytest.approx(0.25)
    assert m["actor/ppo_kl"] == pytest.approx(-sum(math.log(r) for r in (0.5, 1.1, 1.5, 3.5)) / 4)
    _, m = fg_verl.policy_loss_fn("cispo")(old, lp, adv, mask, config=dict(clip_ratio=0.2))
    assert m["actor/pg_clipfrac"] == pytest.approx(0.75)  # every ρ outside [0.8, 1.2] but 1.1
