"""The ``advantages`` op of every compiled backend against the reference: every estimator, scale and singleton
rule."""

import pytest
import torch

import fastgrpo
from fastgrpo import AdvantageConfig

from conftest import DEVICE, KERNEL_BACKENDS, kernel_backend

CONFIGS = [
    AdvantageConfig(estimator=e, scale=s, singleton=z, eps=eps)
    for e in ("grpo", "rloo", "reinforce_baseline")
    for s in ("group", "batch", "none")
    for z in ("zero", "raw")
    for eps in (1e-4,)
]


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    kernel_backend(request.param)  # skips when not built
    return request.param


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.estimator}-{c.scale}-{c.singleton}")
@pytest.mark.parametrize("group_size, groups", [(1, 5), (2, 3), (3, 4), (16, 2), (64, 1)])
def test_matches_reference(config, group_size, groups, backend):
    g = torch.Generator().manual_seed(group_size)
    rewards = torch.randint(0, 2, (group_size * groups,), generator=g).float().to(DEVICE)
    rewards[:group_size] = 1.0  # one all-solved group
    ours, m_ours = fastgrpo.advantages(rewards, group_size, config=config, backend=backend, return_metrics=True)
    ref, m_ref = fastgrpo.advantages(rewards, group_size, config=config, backend="reference", return_metrics=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert m_ours.keys() == m_ref.keys()
    for key in m_ref:
        torch.testing.assert_close(m_ours[key], m_ref[key], rtol=1e-5, atol=1e-6)


def test_weighted_reward_functions_and_group_ids(backend):
    rewards = torch.rand(8, 3, device=DEVICE)
    w = torch.tensor([1.0, 0.5, 2.0], device=DEVICE)
    torch.testing.assert_close(
        fastgrpo.advantages(rewards, 4, reward_weights=w, backend=backend),
        fastgrpo.advantages(rewards, 4, reward_weights=w, backend="reference"),
    )
    ids = torch.tensor([3, 1, 3, 1, 9, 9, 9, 1], device=DEVICE)
    torch.testing.assert_close(
        fastgrpo.advantages(rewards[:, 0], group_ids=ids, backend=backend),
        fastgrpo.advantages(rewards[:, 0], group_ids=ids, backend="reference"),
    )


def test_opcheck(backend):
    advantages_op = kernel_backend(backend).ops.advantages
    r = torch.rand(12, device=DEVICE)
    params = lambda eps, std: torch.tensor([eps, std], device=DEVICE)  # noqa: E731  (ADVANTAGE_SCALARS)
    for args in [
        (r, params(1e-4, 1.0), [4, 0, 1, 0, 0]),  # ADVANTAGE_CODES
        (r, params(1e-6, r.std().item()), [3, 1, 1, 1, 1]),
    ]:
        torch.library.opcheck(advantages_op, args)


def test_op_refuses_a_partial_group(backend):
    """A group size that does not divide the rewards would read past the end: refused by the C++ and Triton op."""
    advantages_op = kernel_backend(backend).ops.advantages
    params = torch.tensor([1e-4, 1.0], device=DEVICE)
    with pytest.raises((RuntimeError, ValueError), match=r"group_size \(2\) must divide the number of rewards \(5\)"):
        advantages_op(torch.rand(5, device=DEVICE), params, [2, 0, 1, 0, 0])
