"""The advantage estimators of reward/estimators.py against the trainers' own code, on random batches with groups
(non-contiguous, a group of one, a group of equal rewards), masked tokens (right padding, an empty response,
multi-turn gaps) and fp32/fp64/bf16; a worked example per family; the errors.

verl 0.9.1: its registered functions (``get_adv_estimator_fn``) with the keywords its trainer passes.
OpenRLHF 0.11.2: ``openrlhf/__init__`` pulls in ray, deepspeed and math graders (not installable on a CPU
machine), so the methods of ``RemoteExperienceMaker`` that compute advantages (``compute_advantages_and_returns``,
``get_cumulative_returns``), ``compute_reward`` and ``apply_length_penalties`` are compiled from the installed
files themselves (``ast``) and run on a stand-in ``self``: the code under test is the package's.
TRL 1.16: the reward → advantage branch of ``GRPOTrainer._generate_and_score_completions`` (both
``multi_objective_aggregation`` values) and ``nanstd``, compiled from the installed files the same way.
"""

import ast
import importlib.util
import itertools
import pathlib
import types
import typing

import numpy as np
import pytest
import torch

import fastgrpo
from fastgrpo import AdvantageConfig, presets
from fastgrpo.config import Rewards
from fastgrpo.reward import advantages as reward_advantages

verl_core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="install tests/requirements-trainers.txt")
from verl.trainer.config import AlgoConfig  # noqa: E402

from fastgrpo.integrations import verl as fg_verl  # noqa: E402

SIZES = (3, 1, 4, 2, 3, 3)  # group 1 is a group of one, group 3 has equal rewards
T = 8


# ------------------------------------------------------------------------------------------------- data
def make_batch(seed, dtype=torch.float32, sizes=SIZES, contiguous=False, mask_dtype=torch.float32):
    """Rewards of a verl-style batch: the outcome reward at each response's last token plus a small per-token
    term (a KL penalty), a mask with right padding, two multi-turn gaps and one empty response."""
    g = torch.Generator().manual_seed(seed)
    b = sum(sizes)
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    if not contiguous:
        group = group[torch.randperm(b, generator=g)]
    score = torch.randint(0, 3, (b,), generator=g).double() / 2  # ties and zeros
    score[group == 3] = 1.0
    lengths = torch.randint(2, T + 1, (b,), generator=g)
    lengths[:2] = T
    mask = torch.arange(T) < lengths[:, None]
    mask[0, 1] = False  # tool outputs inside a response
    mask[1, 2:4] = False
    empty = int((group == 2).nonzero()[0])  # in a group of 4: its group keeps a response with tokens
    mask[empty] = False
    last = torch.where(mask.any(-1), lengths - 1, T - 1)
    tokens = 0.1 * torch.randn(b, T, generator=g, dtype=torch.float64) * mask
    tokens[torch.arange(b), last] += score
    pi = torch.rand(b, T, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return dict(
        token_level_rewards=tokens.to(dtype),
        response_mask=mask.to(mask_dtype),
        index=np.array([f"uid-{int(i)}" for i in group], dtype=object),
        group=group,
        reward_baselines=(torch.rand(b, generator=g, dtype=torch.float64)).to(dtype),
        old_log_probs=pi.log().to(dtype),
        sum_pi_squared=(pi**2 + (1 - pi**2) * torch.rand(b, T, generator=g, dtype=torch.float64) * 0.3).to(dtype),
        rollout_is_weights=(0.5 + torch.rand(b, T, generator=g, dtype=torch.float64)).to(dtype),
    )


def verl_kwargs(name, d, config):
    """The keywords verl's ``compute_advantage`` (ray_trainer.py) passes to the estimator ``name``."""
    kw = dict(token_level_rewards=d["token_level_rewards"], response_mask=d["response_mask"], config=config)
    kw["index"] = d["index"]
    if name == "remax":
        kw["reward_baselines"] = d["reward_baselines"]
    if name in ("optimal_token_baseline", "tir_optimal_token_baseline"):
        kw.update(sum_pi_squared=d["sum_pi_squared"], old_log_probs=d["old_log_probs"])
        kw["rollout_is_weights"] = d["rollout_is_weights"]
    return kw


# fp64: verl builds a group of one's mean 0 and std 1 as fp32 tensors (std + eps rounds to fp32 there)
TOLERANCE = {torch.float64: dict(rtol=2e-7, atol=1e-9), torch.float32: dict(rtol=1e-5, atol=1e-5)}
VERL = [n for n in fg_verl.ADV_ESTIMATORS if n != "grpo_passk"]  # grpo_passk refuses the group of one


# ------------------------------------------------------------------------------------------------- verl
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", fg_verl.ADV_ESTIMATORS)
def test_verl_estimators(name, dtype):
    sizes = (3, 2, 4, 2, 3, 3) if name == "grpo_passk" else SIZES
    d = make_batch(1, dtype, sizes)
    config = AlgoConfig(gamma=0.9, norm_adv_by_std_in_grpo=True)
    kw = verl_kwargs(name, d, config)
    adv, ret = verl_core.get_adv_estimator_fn(name)(**kw)
    ours_adv, ours_ret = fg_verl.advantage_fn(name)(**kw)
    assert ours_adv.dtype == adv.dtype and ours_adv.shape == adv.shape
    if name == "remax":  # verl leaves the return at masked tokens inside a response: compare the others
        adv = adv * d["response_mask"]
    # grpo_vectorized computes its group statistics in fp32 whatever the dtype (verl's group_mean_std)
    tolerance = TOLERANCE[torch.float32 if name == "grpo_vectorized" else dtype]
    torch.testing.assert_close(ours_adv, adv, **tolerance)
    torch.testing.assert_close(ours_ret, ret, **tolerance)


@pytest.mark.parametrize("name", ["grpo", "grpo_passk", "grpo_vectorized", "gdpo"])
def test_verl_norm_adv_by_std(name):
    """verl honours norm_adv_by_std_in_grpo=False for grpo (argument) and grpo_passk (config) only."""
    d = make_batch(2, sizes=(3, 2, 4, 2, 3, 3))
    config = AlgoConfig(norm_adv_by_std_in_grpo=False)
    kw = verl_kwargs(name, d, config)
    if name == "grpo":
        kw["norm_adv_by_std_in_grpo"] = False
    adv, _ = verl_core.get_adv_estimator_fn(name)(**kw)
    ours, _ = fg_verl.advantage_fn(name)(**kw)
    torch.testing.assert_close(ours, adv, rtol=1e-5, atol=1e-5)
    if name == "grpo":  # through the registry verl's trainer passes no argument: ours reads the config
        del kw["norm_adv_by_std_in_grpo"]
        torch.testing.assert_close(fg_verl.advantage_fn(name)(**kw)[0], adv, rtol=1e-5, atol=1e-5)
    else:  # the argument: grpo_passk ignores it, the two others follow it
        kw["norm_adv_by_std_in_grpo"] = name == "grpo_passk"
        adv, _ = verl_core.get_adv_estimator_fn(name)(**kw)
        torch.testing.assert_close(fg_verl.advantage_fn(name)(**kw)[0], adv, rtol=1e-5, atol=1e-5)
        without_config = fg_verl.advantage_fn(name)(**dict(kw, config=None))[0]  # True for grpo_passk
        assert torch.allclose(adv, without_config) == (name != "grpo_passk")


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_verl_reinforce_plus_plus_gamma(gamma):
    d = make_batch(3, torch.float64, mask_dtype=torch.int64)
    kw = verl_kwargs("reinforce_plus_plus", d, AlgoConfig(gamma=gamma))
    for theirs, ours in zip(
        verl_core.get_adv_estimator_fn("reinforce_plus_plus")(**kw), fg_verl.advantage_fn("reinforce_plus_plus")(**kw)
    ):  # an integer mask: verl's Bessel factor is an integer division, so fp32
        torch.testing.assert_close(ours, theirs, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("handle_zero_tail", [True, False])
@pytest.mark.parametrize("name", ["optimal_token_baseline", "tir_optimal_token_baseline"])
def test_verl_optimal_token_baseline_zero_tail(name, handle_zero_tail):
    """A group of an empty and a non-empty response: the multi-turn form leaves the empty one out of the group
    (no baseline), the positional one keeps it (a baseline of the other's own return, but for eps)."""
    d = make_batch(12, torch.float64, sizes=(3, 1, 2, 2, 3, 3))
    kw = dict(verl_kwargs(name, d, None), handle_zero_tail=handle_zero_tail, epsilon=1e-3)
    for theirs, ours in zip(verl_core.get_adv_estimator_fn(name)(**kw), fg_verl.advantage_fn(name)(**kw)):
        torch.testing.assert_close(ours, theirs, **TOLERANCE[torch.float64])


def test_verl_gdpo_reward_keys():
    """GDPO with two reward dimensions from non_tensor_batch, weighted, then whitened per token."""
    d = make_batch(4)
    b, prompt = d["response_mask"].shape[0], 3
    g = torch.Generator().manual_seed(4)
    non_tensor = {
        "uid": d["index"],
        "acc": (torch.rand(b, generator=g) > 0.5).float().numpy(),
        "fmt": torch.rand(b, generator=g).numpy(),
    }
    batch = {
        "prompts": torch.zeros(b, prompt, dtype=torch.long),
        "attention_mask": torch.cat([torch.ones(b, prompt), d["response_mask"]], -1).long(),
    }
    config = AlgoConfig(gdpo_reward_keys=["acc", "fmt"], gdpo_reward_weights=[1.0, 0.5])
    kw = dict(verl_kwargs("gdpo", d, config), non_tensor_batch=non_tensor, batch=batch)
    adv, _ = verl_core.get_adv_estimator_fn("gdpo")(**kw)
    ours, _ = fg_verl.advantage_fn("gdpo")(**kw)
    torch.testing.assert_close(ours, adv, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, fg_verl.advantage_fn("gdpo")(**verl_kwargs("gdpo", d, None))[0])
    with pytest.raises(ValueError, match="gdpo_reward_keys is set but non_tensor_batch"):
        fg_verl.advantage_fn("gdpo")(**verl_kwargs("gdpo", d, config))


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_plus_plus", "gdpo", "opo", "optimal_token_baseline"])
def test_verl_bf16(name):
    """bf16 rewards: fastgrpo computes in fp32 and rounds once, so it equals verl on the same values in fp32 to
    one bf16 rounding; verl's own bf16 arithmetic rounds at every step, so it is only close."""
    d = make_batch(5, torch.bfloat16)
    kw = verl_kwargs(name, d, AlgoConfig(gamma=0.9))
    ours, _ = fg_verl.advantage_fn(name)(**kw)
    assert ours.dtype == torch.bfloat16
    upcast = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    exact, _ = verl_core.get_adv_estimator_fn(name)(**upcast)
    torch.testing.assert_close(ours.float(), exact, rtol=8e-3, atol=8e-3)
    in_bf16, _ = verl_core.get_adv_estimator_fn(name)(**kw)
    torch.testing.assert_close(ours.float(), in_bf16.float(), rtol=5e-2, atol=5e-2)


def test_verl_positional_signatures_and_registry():
    d = make_batch(6)
    r, m = d["token_level_rewards"], d["response_mask"]
    for name, args in [
        ("remax", (r, d["reward_baselines"], m)),
        ("reinforce_plus_plus", (r, m, AlgoConfig(gamma=0.8))),
        ("rloo", (r, m, d["index"], 1e-6)),
        ("tir_optimal_token_baseline", (r, m, d["index"], d["old_log_probs"], d["sum_pi_squared"])),
    ]:
        theirs, ours = verl_core.get_adv_estimator_fn(name)(*args), fg_verl.advantage_fn(name)(*args)
        torch.testing.assert_close(ours[0], theirs[0] * (m if name == "remax" else 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    prefix = f"fastgrpo_test{id(d)}_"
    names = fg_verl.register_advantage_estimators(prefix)
    assert names == [prefix + n for n in fg_verl.ADV_ESTIMATORS]
    kw = verl_kwargs("grpo", d, AlgoConfig())
    torch.testing.assert_close(
        verl_core.get_adv_estimator_fn(prefix + "grpo")(**kw)[0], verl_core.get_adv_estimator_fn("grpo")(**kw)[0]
    )


def test_verl_errors():
    d = make_batch(7)
    kw = verl_kwargs("grpo", d, None)
    with pytest.raises(ValueError, match="index .* is required by verl's grpo"):
        fg_verl.advantage_fn("grpo")(**{k: v for k, v in kw.items() if k != "index"})
    with pytest.raises(ValueError, match="reward_baselines .* is required by verl's remax"):
        fg_verl.advantage_fn("remax")(**kw)
    with pytest.raises(ValueError, match="old_log_probs is required by verl's optimal_token_baseline"):
        fg_verl.advantage_fn("optimal_token_baseline")(**kw)
    with pytest.raises(ValueError, match="gae needs a critic"):
        fg_verl.advantage_fn("gae")
    with pytest.raises(TypeError, match="multiple values for argument 'response_mask'"):
        fg_verl.advantage_fn("rloo")(d["token_level_rewards"], d["response_mask"], response_mask=d["response_mask"])
    with pytest.raises(ValueError, match="at least 2 responses per group"):
        fg_verl.advantage_fn("grpo_passk")(**kw)
    with pytest.raises(ValueError, match="at least 2 samples per group"):  # verl refuses it too
        verl_core.get_adv_estimator_fn("grpo_passk")(**dict(kw, config=AlgoConfig()))


# ------------------------------------------------------------------------------------------------ OpenRLHF
def _installed(package, *parts):
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed (tests/requirements-trainers.txt)")
    return pathlib.Path(spec.submodule_search_locations[0]).joinpath(*parts)


def _functions(path, names, namespace, cls=None):
    """Compiles the functions ``names`` of the installed file ``path`` (methods of ``cls``) into ``namespace``."""
    tree = ast.parse(path.read_text())
    body = tree.body
    if cls is not None:
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    found = [n for n in body if isinstance(n, ast.FunctionDef) and (names is None or n.name in names)]
    assert names is None or {f.name for f in found} == set(names), f"{path}: {names}"
    exec(compile(ast.Module(body=found, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def openrlhf_maker():
    namespace = dict(torch=torch, itertools=itertools, logger=types.SimpleNamespace(info=print, warning=print))
    namespace.update((name, getattr(typing, name)) for name in ("List", "Optional", "Tuple", "Union"))
    namespace.update(Experience=object, RayActorGroup=object)  # names in annotations only
    _functions(_installed("openrlhf", "models", "utils.py"), ["compute_reward"], namespace)
    _functions(_installed("openrlhf", "trainer", "ppo_utils", "length_penalty.py"), None, namespace)
    methods = ["compute_advantages_and_returns", "get_cumulative_returns", "get_advantages_and_returns"]
    path = _installed("openrlhf", "trainer", "ppo_utils", "experience_maker.py")
    _functions(path, methods, namespace, cls="RemoteExperienceMaker")
    return type("ExperienceMaker", (), {m: namespace[m] for m in methods})


def run_openrlhf(maker_cls, estimator, rewards, mask, kl, n, gamma=1.0, kl_coef=0.0, no_std_norm=False):
    """OpenRLHF's advantages [B, T] for rewards [B] in contiguous groups of n, over two experiences."""
    advantage = types.SimpleNamespace(estimator=estimator, gamma=gamma, lambd=1.0, no_std_norm=no_std_norm)
    args = types.SimpleNamespace(
        algo=types.SimpleNamespace(advantage=advantage),
        rollout=types.SimpleNamespace(n_samples_per_prompt=n),
        reward=types.SimpleNamespace(clip_range=None, overlong_buffer_len=None, stop_properly_penalty_coef=None),
    )
    maker = maker_cls()
    maker.strategy, maker.advantage_estimator = types.SimpleNamespace(args=args), estimator
    maker.kl_ctl = types.SimpleNamespace(value=kl_coef)
    b = rewards.shape[0]
    order = torch.randperm(b, generator=torch.Generator().manual_seed(0))  # experiences hold shuffled samples
    parts = [order[: b // 2], order[b // 2 :]]
    experiences = [
        types.SimpleNamespace(
            rewards=rewards[p].clone(), index=p.tolist(), info={}, kl=kl[p], action_mask=mask[p], values=None
        )
        for p in parts
    ]
    maker.compute_advantages_and_returns(experiences)
    out = torch.zeros(b, mask.shape[1], dtype=torch.float32)
    for p, e in zip(parts, experiences):
        out[p] = e.advantages.float()
    return out


OPENRLHF = ["group_norm", "dr_grpo", "rloo", "reinforce_baseline", "reinforce", "flash_reinforce"]


@pytest.mark.parametrize("kl_coef", [0.0, 0.05], ids=["no-kl", "kl-in-reward"])
@pytest.mark.parametrize("estimator", OPENRLHF)
def test_openrlhf_estimators(openrlhf_maker, estimator, kl_coef):
    n = 4
    d = make_batch(8, sizes=(n,) * 5, contiguous=True)
    mask = d["response_mask"].bool()
    rewards = d["token_level_rewards"].sum(-1)
    kl = torch.randn(mask.shape, generator=torch.Generator().manual_seed(8))
    gamma = 0.9 if estimator == "reinforce" else 1.0
    theirs = run_openrlhf(openrlhf_maker, estimator, rewards, mask, kl, n, gamma, kl_coef)
    cfg = presets.openrlhf(advantage_estimator=estimator, gamma=gamma).advantage
    ours = fastgrpo.advantages(rewards, n, config=cfg, response_mask=mask, token_rewards=-kl_coef * kl)
    # OpenRLHF leaves values at masked positions (whitened zeros, carried returns): the loss reads none of them
    torch.testing.assert_close(ours, theirs * mask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["reinforce", "reinforce_baseline"])
def test_openrlhf_no_std_norm(openrlhf_maker, estimator):
    d = make_batch(9, sizes=(3,) * 6, contiguous=True)
    mask, rewards = d["response_mask"].bool(), d["token_level_rewards"].sum(-1)
    theirs = run_openrlhf(openrlhf_maker, estimator, rewards, mask, torch.zeros(mask.shape), 3, no_std_norm=True)
    cfg = presets.openrlhf(advantage_estimator=estimator, no_std_norm=True).advantage
    torch.testing.assert_close(fastgrpo.advantages(rewards, 3, config=cfg, response_mask=mask), theirs * mask)


@pytest.mark.filterwarnings("ignore:std\\(\\)")  # OpenRLHF's std of one sample
def test_openrlhf_single_sample_groups(openrlhf_maker):
    """n_samples_per_prompt = 1: OpenRLHF's group_norm divides by the std of one sample (NaN); fastgrpo's
    ``zero`` singleton rule gives 0, which is what its dr_grpo (r − r) gives."""
    d = make_batch(10, sizes=(1,) * 6, contiguous=True)
    mask, rewards = d["response_mask"].bool(), d["token_level_rewards"].sum(-1)
    kl = torch.zeros(mask.shape)
    assert run_openrlhf(openrlhf_maker, "group_norm", rewards, mask, kl, 1)[mask].isnan().all()
    ours = fastgrpo.advantages(rewards, 1, config=presets.openrlhf().advantage, response_mask=mask)
    torch.testing.assert_close(ours, run_openrlhf(openrlhf_maker, "dr_grpo", rewards, mask, kl, 1) * mask)
    assert (ours == 0).all()


# ------------------------------------------------------------------------------------------------- TRL
@pytest.fixture(scope="module")
def trl_advantages():
    namespace = dict(torch=torch)
    _functions(_installed("trl", "trainer", "utils.py"), ["nanstd"], namespace)
    path = _installed("trl", "trainer", "grpo_trainer.py")
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GRPOTrainer")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "_generate_and_score_completions")

    def is_branch(node):
        return isinstance(node, ast.If) and "multi_objective_aggregation" in ast.unparse(node.test)

    start = next(i for i, n in enumerate(fn.body) if is_branch(n))
    end = next(i for i, n in enumerate(fn.body) if i > start and "nan_to_num" in ast.unparse(n))
    code = compile(ast.Module(body=fn.body[start : end + 1], type_ignores=[]), str(path), "exec")

    def run(rewards_per_func, weights, num_generations, aggregation, scale_rewards="group"):
        trainer = types.SimpleNamespace(
            multi_objective_aggregation=aggregation,
            reward_weights=weights,
            reward_funcs=[None] * rewards_per_func.shape[1],
            scale_rewards=scale_rewards,
        )
        local = dict(
            namespace,
            self=trainer,
            rewards_per_func=rewards_per_func,
            num_generations=num_generations,
            device=rewards_per_func.device,
            unscorable_mask=torch.isnan(rewards_per_func).all(dim=1),
        )
        exec(code, local)
        return local["advantages"]

    return run


@pytest.mark.parametrize("num_generations", [1, 2, 4])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_trl_multi_objective_aggregation(trl_advantages, aggregation, num_generations):
    g = torch.Generator().manual_seed(num_generations)
    rewards = torch.randint(0, 3, (8, 3), generator=g).float()
    rewards[:4, 0] = 1.0  # a reward function constant over a group (several groups when num_generations < 4)
    rewards[:, 2] = 10 * torch.rand(8, generator=g)  # a function with a large spread
    weights = torch.tensor([1.0, 0.5, 2.0])
    theirs = trl_advantages(rewards, weights, num_generations, aggregation)
    cfg = presets.trl(multi_objective_aggregation=aggregation).advantage
    ours = fastgrpo.advantages(rewards, num_generations, config=cfg, reward_weights=weights)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ by hand
def test_worked_examples():
    adv = fastgrpo.advantages
    # pass@k: group [1, 0, 0.5]: only the best, margin 1 − 0.5 over std 0.5; a tie for the best: margin 0
    torch.testing.assert_close(
        adv(torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 0.0]), 3, estimator="pass_at_k", eps=0.0),
        torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
    )
    # length-weighted baseline: lengths 3 and 1 → (3·1 + 1·0)/4 = 0.75
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(
        adv(torch.tensor([1.0, 0.0]), 2, estimator="length_weighted_baseline", response_mask=mask),
        torch.tensor([[0.25, 0.25, 0.25], [-0.75, 0.0, 0.0]]),
    )
    # GPG: α = B / #nonzero = 4, baseline 0.25
    torch.testing.assert_close(
        adv(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, estimator="rescaled_group_baseline"),
        torch.tensor([3.0, -1.0, -1.0, -1.0]),
    )
    torch.testing.assert_close(
        adv(torch.tensor([1.0, 2.0, 3.0]), estimator="batch_baseline"), torch.tensor([-1.0, 0.0, 1.0])
    )
    # ReMax: the return minus the greedy reward, at the response tokens
    torch.testing.assert_close(
        adv(
            torch.tensor([2.0]),
            estimator="greedy_baseline",
            baseline_rewards=torch.tensor([0.5]),
            response_mask=torch.tensor([[1, 1, 0]]),
            token_rewards=torch.tensor([[0.25, 0.0, 9.0]]),
        ),
        torch.tensor([[1.75, 1.5, 0.0]]),
    )
    # discounted return, γ = 0.5, reward 1 at the last token; a gap is skipped (verl) or counted (OpenRLHF)
    one = torch.tensor([1.0])
    for steps, expected in (("skip", [0.5, 0.0, 1.0]), ("count", [0.25, 0.0, 1.0])):
        got = adv(
            one,
            estimator="discounted_return",
            gamma=0.5,
            whitening="none",
            masked_steps=steps,
            response_mask=torch.tensor([[1, 0, 1]]),
        )
        torch.testing.assert_close(got, torch.tensor([expected]))
    # token whitening of the centered rewards [−1, 1] over tokens {−1, −1, 1}: mean −1/3, unbiased var 4/3
    mask = torch.tensor([[1, 1], [1, 0]])
    got = adv(torch.tensor([0.0, 2.0]), 2, estimator="reinforce_baseline", whitening="token", response_mask=mask)
    z = (torch.tensor([-1.0, 1.0]) + 1 / 3) / (4 / 3 + 1e-8) ** 0.5
    torch.testing.assert_close(got, torch.tensor([[z[0], z[0]], [z[1], 0.0]]))
    # token whitening's 1e-8: added to the unbiased var (verl), a floor of the biased var (OpenRLHF); rewards
    # [0, 2e-4] on one token each: var 2e-8 → ±1e-4/√3e-8 = ±0.57735, biased var 1e-8 → ±1
    mask = torch.tensor([[1], [1]])
    for whitening, z in (("token", 0.5773503), ("token_biased", 1.0), ("token_center", 1e-4)):
        got = adv(torch.tensor([0.0, 2e-4]), estimator="discounted_return", whitening=whitening, response_mask=mask)
        torch.testing.assert_close(got, torch.tensor([[-z], [z]]), rtol=1e-4, atol=0.0)
    # normalize-then-sum: two functions that disagree cancel; summed first, the large one would dominate
    rk = torch.tensor([[1.0, 0.0], [0.0, 10.0]])
    torch.testing.assert_close(
        adv(rk, 2, estimator="normalize_then_sum", whitening="none", eps=0.0), torch.tensor([0.0, 0.0])
    )
    torch.testing.assert_close(adv(rk, 2, eps=0.0), torch.tensor([-0.7071068, 0.7071068]))
    # optimal token baseline: π = 0.5 and Σπ² = 0.5 give w = 0.5 at every token, so W_t = 0.5·(t + 1) and
    # B_t = Σ G·W / Σ W; the longer response's second token has no baseline (zero_tail)
    mask = torch.tensor([[1, 1], [1, 0]])
    got = adv(
        torch.tensor([1.0, 0.0]),
        2,
        estimator="optimal_token_baseline",
        eps=0.0,
        response_mask=mask,
        old_logprobs=torch.full((2, 2), 0.5).log(),
        sum_pi_squared=torch.full((2, 2), 0.5),
    )
    torch.testing.assert_close(got, torch.tensor([[0.5, 1.0], [-0.5, 0.0]]))


def test_kernel_estimators_per_token_and_rewards_in_the_loss():
    """grpo/rloo/reinforce_baseline keep the kernels' op and broadcast over the response tokens; a per-sequence
    estimator passed as Rewards to a loss resolves in PyTorch; a per-token one is refused there."""
    d = make_batch(11)
    r, mask, ids = d["token_level_rewards"].sum(-1), d["response_mask"], d["group"]
    for backend in ("reference", "auto"):
        per_token = fastgrpo.advantages(r, group_ids=ids, response_mask=mask, backend=backend)
        torch.testing.assert_close(per_token, fastgrpo.advantages(r, group_ids=ids)[:, None] * mask)
    cfg = AdvantageConfig(estimator="rescaled_group_baseline")
    resolved = reward_advantages.resolve_advantages(Rewards(r, group_ids=ids), cfg)
    torch.testing.assert_close(resolved, fastgrpo.advantages(r, group_ids=ids, config=cfg))
    with pytest.raises(ValueError, match="needs response_mask: compute the advantages with fastgrpo.advantages"):
        reward_advantages.resolve_advantages(Rewards(r, group_ids=ids), AdvantageConfig("discounted_return"))
    adv, metrics = fastgrpo.advantages(r, group_ids=ids, config=cfg, response_mask=mask, return_metrics=True)
    assert set(metrics) == set(fastgrpo.advantages(r, group_ids=ids, return_metrics=True)[1])


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(estimator="discounted_return"), ValueError, r"response_mask \[B, T\] is required by estimator="),
        (dict(estimator="reinforce_baseline", whitening="token"), ValueError, "with whitening='token'"),
        (dict(estimator="greedy_baseline"), ValueError, "baseline_rewards is required by estimator='greedy_bas"),
        (dict(estimator="optimal_token_baseline", response_mask=torch.ones(4, 2)), ValueError, "old_logprobs is req"),
        (dict(baseline_rewards=torch.ones(4)), ValueError, "baseline_rewards is only used by estimator='greedy_"),
        (dict(token_rewards=torch.ones(4, 2)), ValueError, r"token_rewards is per token: it needs response_mask"),
        (dict(response_mask=torch.ones(3, 2)), ValueError, r"response_mask must have shape \[B, T\] with B = 4"),
        (dict(response_mask=torch.ones(4, 2), token_rewards=torch.ones(4, 3)), ValueError, r"token_rewards must"),
        (dict(response_mask=torch.ones(4, 2), token_rewards=torch.ones(4, 2, dtype=torch.long)), TypeError, "float"),
        (dict(estimator="grpo", whitening="token"), ValueError, "whitening='token' is not defined for estimator="),
        (dict(estimator="rloo", gamma=0.9), ValueError, "gamma=0.9 discounts only estimator='discounted_return'"),
        (dict(estimator="pass_at_k", scale="batch"), ValueError, "scale='batch' is not defined for estimator='pass"),
        (dict(estimator="discounted_return", gamma=1.5), ValueError, r"gamma must be in \[0, 1\]"),
        (dict(estimator="reinforce"), ValueError, "estimator must be one of"),
        (dict(masked_steps="all"), ValueError, "masked_steps must be one of"),
        (dict(zero_tail=1), TypeError, "zero_tail must be a bool"),
    ],
)
def test_errors(kwargs, error, message):
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    with pytest.raises(error, match=message):
        fastgrpo.advantages(rewards, 2, **kwargs)


def test_errors_of_groups_and_values():
    with pytest.raises(ValueError, match="pass exactly one of group_size"):
        fastgrpo.advantages(torch.ones(4), estimator="pass_at_k")
    with pytest.raises(ValueError, match="at least 2 responses per group"):
        fastgrpo.advantages(torch.ones(4), group_ids=torch.tensor([0, 0, 1, 2]), estimator="pass_at_k")
    mask = torch.tensor([[1, 0], [1, 1]])
    bad = torch.tensor([[0.0, float("nan")], [float("inf"), 0.0]])  # NaN at a masked token is not read
    with pytest.raises(ValueError, match="token_rewards"):
        fastgrpo.advantages(torch.ones(2), estimator="discounted_return", response_mask=mask, token_rewards=bad)
    ok = torch.tensor([[0.0, float("nan")], [1.0, 0.0]])
    fastgrpo.advantages(torch.ones(2), estimator="discounted_return", response_mask=mask, token_rewards=ok)


def test_presets_errors():
    with pytest.raises(ValueError, match="presets.verl: adv_estimator must be one of"):
        presets.verl(adv_estimator="gae")
    with pytest.raises(ValueError, match=r"presets.verl: gamma=2.0 is invalid \(AdvantageConfig.gamma"):
        presets.verl(adv_estimator="reinforce_plus_plus", gamma=2.0)
    with pytest.raises(ValueError, match="presets.openrlhf: advantage_estimator must be one of"):
        presets.openrlhf(advantage_estimator="gae")
    with pytest.raises(TypeError, match="presets.openrlhf: no_std_norm must be a bool"):
        presets.openrlhf(no_std_norm=1)
    with pytest.raises(ValueError, match="presets.trl: multi_objective_aggregation must be one of"):
        presets.trl(multi_objective_aggregation="sum")
    with pytest.raises(ValueError, match="presets.trl: scale_rewards must be one of"):
        presets.trl(multi_objective_aggregation="normalize_then_sum", scale_rewards="std")
