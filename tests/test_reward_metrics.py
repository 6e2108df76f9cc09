"""Raw rewards passed to a loss entry point: the reward side's metrics (MATH §3, TRL's names where TRL has them)
join LossOutput.metrics, the same on every backend and level, without a host sync."""

import pytest
import torch

import fastgrpo

from conftest import DEVICE, KERNEL_BACKENDS, kernel_backend

# 3 groups of 2: all solved, all failed, mixed (0/1 rewards)
REWARDS = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
EXPECTED = {
    "reward": 0.5,
    "reward_std": REWARDS.std().item(),
    "frac_reward_zero_std": 2 / 3,
    "frac_groups_all_solved": 1 / 3,
    "frac_groups_all_failed": 1 / 3,
    "advantage/group_sum_abs_max": 0.0,
}


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_reward_metrics_on_every_entry_point(backend):
    if backend != "reference":
        kernel_backend(backend)
    g = torch.Generator().manual_seed(0)
    b, t, v, h = 6, 3, 11, 4
    hidden, weight = torch.randn(b, t, h, generator=g), torch.randn(v, h, generator=g)
    targets = torch.randint(0, v, (b, t), generator=g)
    logits = hidden @ weight.T
    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    kw = dict(rewards=REWARDS.to(DEVICE), group_size=2, backend=backend)
    to = lambda x: x.to(DEVICE)  # noqa: E731
    outputs = {
        "policy_loss": fastgrpo.policy_loss(to(lp), **kw),
        "grpo_loss": fastgrpo.grpo_loss(to(logits), to(targets), **kw),
    }
    if backend != "reference":
        outputs["linear_grpo_loss"] = fastgrpo.linear_grpo_loss(to(hidden), to(weight), to(targets), **kw)
    for entry, out in outputs.items():
        for key, value in EXPECTED.items():
            assert out.metrics[key].item() == pytest.approx(value, abs=1e-6), (entry, key)


def test_reward_metrics_need_no_host_sync(monkeypatch):
    """With the value checks off, a loss from rewards reads nothing on the host; on, the checks' one read."""
    from test_value_checks import HostSyncs

    kernel_backend("cpu")
    lp = torch.randn(6, 3)
    for check, syncs in ((True, 1), (False, 0)):
        counter = HostSyncs(monkeypatch)
        with counter:
            out = fastgrpo.policy_loss(lp, rewards=REWARDS, group_size=2, backend="cpu", check_values=check)
        assert "frac_reward_zero_std" in out.metrics and counter.count == syncs, check
