"""Value checks of the public API (MATH §6): every non-finite or out-of-range value at an unmasked position is
rejected with an error naming the argument, the value and its position; masked positions are never checked;
all checks of a call cost one host sync, none with ``check_values=False``; meta tensors give meta outputs."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastgrpo
from fastgrpo import LossConfig, _checks

B, T, V, H = 2, 3, 5, 4
NAN, INF = math.nan, math.inf


def with_value(shape, index, value):
    x = torch.zeros(shape)
    x[index] = value
    return x


def partly_masked():
    mask = torch.ones(B, T)
    mask[0, 2] = 0  # (0, 2) is masked: values there are never checked
    mask[1] = 0  # sequence 1 is fully masked: its per-sequence values are never checked
    return mask


def call(entry, over, check_values=None, backend="reference"):
    g = torch.Generator().manual_seed(0)
    kw = dict(advantages=torch.randn(B, generator=g), mask=torch.ones(B, T), check_values=check_values, backend=backend)
    kw.update(over)
    targets = torch.randint(0, V, (B, T), generator=g)
    if entry == "grpo_loss":
        return fastgrpo.grpo_loss(torch.randn(B, T, V, generator=g), targets, **kw)
    if entry == "linear_grpo_loss":
        return fastgrpo.linear_grpo_loss(
            torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g), targets, **kw
        )
    return fastgrpo.policy_loss(-torch.rand(B, T, generator=g), **kw)


ENTRIES = ["policy_loss", "grpo_loss", "linear_grpo_loss"]
BAD = [  # (keywords, message): one case per argument and kind of bad value
    (
        dict(mask=with_value((B, T), (0, 1), -1.0)),
        r"mask must hold finite weights >= 0 .* found -1.0 at position \(0, 1\)",
    ),
    (
        dict(mask=with_value((B, T), (1, 0), NAN) + 1),
        r"mask must hold finite weights .* found nan at position \(1, 0\)",
    ),
    (dict(mask=with_value((B, T), (1, 2), INF)), r"mask must hold finite weights .* found inf"),
    (
        dict(old_logprobs=with_value((B, T), (0, 1), INF)),
        r"old_logprobs must hold finite log-probs .* found inf at position \(0, 1\)",
    ),
    (dict(old_logprobs=with_value((B, T), (1, 2), -INF)), r"old_logprobs must hold finite log-probs .* found -inf"),
    (dict(old_logprobs=with_value((B, T), (1, 2), NAN)), "old_logprobs must hold finite log-probs .* found nan"),
    (dict(ref_logprobs=with_value((B, T), (0, 0), NAN), config=LossConfig(beta=0.1)), "ref_logprobs must hold finite"),
    (
        dict(
            sampling_logprobs=with_value((B, T), (0, 0), -INF),
            old_logprobs=torch.zeros(B, T),
            config=LossConfig(rollout_correction="token_truncate", rollout_max=2.0),
        ),
        "sampling_logprobs must hold finite",
    ),
    (
        dict(advantages=torch.tensor([1.0, NAN])),
        "advantages must be finite at unmasked positions, found nan at index 1",
    ),
    (
        dict(advantages=with_value((B, T), (1, 1), -INF)),
        r"advantages must be finite .* found -inf at position \(1, 1\)",
    ),
    (dict(advantages=torch.tensor([[INF], [1.0]])), r"advantages must be finite .* found inf at position \(0, 0\)"),
    (dict(is_weights=torch.tensor([1.0, -0.5])), "is_weights must hold finite weights >= 0 .* found -0.5 at index 1"),
    (dict(is_weights=with_value((B, T), (0, 2), NAN)), "is_weights must hold finite weights >= 0 .* found nan"),
    (dict(is_weights=with_value((B, T), (0, 2), INF)), "is_weights must hold finite weights >= 0 .* found inf"),
    (dict(normalizer=torch.tensor(0.0)), "normalizer must be finite and > 0, found 0.0"),
    (dict(normalizer=torch.tensor(-3)), "normalizer must be finite and > 0, found -3"),
    (dict(normalizer=torch.tensor(NAN)), "normalizer must be finite and > 0, found nan"),
    (
        dict(advantages=None, rewards=torch.tensor([1.0, INF]), group_size=2),
        "rewards must be finite, found inf at index 1",
    ),
    (
        dict(
            advantages=None,
            rewards=torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
            group_size=2,
            reward_weights=torch.tensor([1.0, NAN]),
        ),
        "reward_weights must be finite, found nan at index 1",
    ),
]


@pytest.mark.parametrize("over, match", BAD, ids=lambda x: "-".join(x) if isinstance(x, dict) else None)
@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_values_are_rejected(entry, over, match):
    with pytest.raises(ValueError, match=match):
        call(entry, over)


@pytest.mark.parametrize(
    "over, match",
    [
        (
            dict(entropy=with_value((B, T), (1, 0), NAN)),
            r"entropy must be finite at unmasked positions, found nan at position \(1, 0\)",
        ),
        (dict(entropy=with_value((B, T), (0, 0), INF)), "entropy must be finite"),
    ],
)
def test_bad_entropy_is_rejected(over, match):
    with pytest.raises(ValueError, match=match):
        call("policy_loss", over)


@pytest.mark.parametrize("entry", ENTRIES)
def test_masked_positions_are_not_checked(entry):
    """Non-finite values where the mask is 0 (a masked token, or the per-sequence value of a fully masked
    sequence) are accepted: validation rejects none of them (that backends then ignore them is tested with
    the kernels)."""
    mask = partly_masked()
    old = torch.full((B, T), -1.0)
    old[0, 2], old[1] = NAN, -INF
    w = torch.ones(B, T)
    w[0, 2], w[1, 0] = -1.0, INF
    call(
        entry,
        dict(
            mask=mask,
            old_logprobs=old,
            advantages=torch.tensor([0.7, NAN]),
            is_weights=w,
            ref_logprobs=old,
            config=LossConfig(beta=0.1),
        ),
    )
    call(entry, dict(mask=mask, advantages=torch.where(mask > 0, 1.0, NAN), is_weights=torch.tensor([[1.0], [-1.0]])))


def test_packed_per_sequence_values_of_empty_sequences_are_not_checked():
    """Packed input: the advantage of a sequence whose tokens are all masked is not checked, the one of a
    sequence with an unmasked token is (cu_seqlens decides which tokens are whose)."""
    cu = torch.tensor([0, 2, 5, 6])
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    lp = -torch.rand(6)
    adv = torch.tensor([0.5, NAN, -1.0])  # sequence 1 (tokens 2..4) is fully masked
    fastgrpo.policy_loss(lp, adv, mask, cu_seqlens=cu, backend="reference")
    mask[3] = 1.0
    with pytest.raises(ValueError, match="advantages must be finite at unmasked positions, found nan at index 1"):
        fastgrpo.policy_loss(lp, adv, mask, cu_seqlens=cu, backend="reference")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fractional_mask_is_a_soft_weight(backend):
    """TRL multiplies the per-token loss by the mask: fractional entries are weights, not errors."""
    mask = torch.tensor([[1.0, 0.5, 0.0], [0.25, 1.0, 1.0]])
    adv = torch.tensor([1.5, -0.5])
    out = fastgrpo.grpo_loss(torch.randn(B, T, V), torch.randint(0, V, (B, T)), adv, mask, backend=backend)
    m, a = mask.double(), adv.double()[:, None]
    expected = -(m * a).sum() / m.sum()  # on-policy PPO: ratio 1, so the token loss is -A
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("entry", ENTRIES)
def test_check_values_false_skips_the_checks(entry):
    """Off, a non-finite input is not rejected: it propagates to the loss (here the reference's)."""
    out = call(entry, dict(old_logprobs=with_value((B, T), (0, 0), NAN)), check_values=False)
    assert torch.isnan(out.loss)


def test_set_check_values_is_the_default_a_call_overrides():
    bad = dict(old_logprobs=with_value((B, T), (0, 0), NAN))
    assert fastgrpo.set_check_values(False) is True
    try:
        assert torch.isnan(call("grpo_loss", bad).loss)
        assert torch.isnan(
            fastgrpo.GRPOLoss(backend="reference")(
                torch.randn(B, T, V), torch.zeros(B, T, dtype=torch.long), torch.ones(B), **bad
            ).loss
        )
        with pytest.raises(ValueError, match="old_logprobs must hold finite"):
            call("grpo_loss", bad, check_values=True)
        with pytest.raises(ValueError, match="old_logprobs must hold finite"):
            fastgrpo.GRPOLoss(backend="reference", check_values=True)(
                torch.randn(B, T, V), torch.zeros(B, T, dtype=torch.long), torch.ones(B), **bad
            )
    finally:
        assert fastgrpo.set_check_values(True) is False
    with pytest.raises(ValueError, match="old_logprobs must hold finite"):
        call("grpo_loss", bad)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        fastgrpo.set_check_values(None)
    with pytest.raises(TypeError, match="check_values must be None or a bool"):
        call("grpo_loss", {}, check_values="yes")


@pytest.mark.parametrize(
    "call_fn, match",
    [
        (
            lambda: fastgrpo.grpo_loss(torch.randn(B, T, 0), torch.zeros(B, T, dtype=torch.long), torch.ones(B)),
            r"logits has an empty vocabulary \(V = 0\)",
        ),
        (
            lambda: fastgrpo.grpo_loss(
                torch.randn(B, T, 0), torch.zeros(B, T, dtype=torch.long), torch.ones(B), backend="reference"
            ),
            r"logits has an empty vocabulary",
        ),
        (
            lambda: fastgrpo.token_logprobs(torch.randn(B, T, 0), torch.zeros(B, T, dtype=torch.long)),
            r"logits has an empty vocabulary",
        ),
        (
            lambda: fastgrpo.linear_grpo_loss(
                torch.randn(B, T, H), torch.randn(0, H), torch.zeros(B, T, dtype=torch.long), torch.ones(B)
            ),
            r"weight has an empty vocabulary \(V = 0\)",
        ),
        (
            lambda: fastgrpo.linear_token_logprobs(
                torch.randn(B, T, H), torch.randn(0, H), torch.zeros(B, T, dtype=torch.long)
            ),
            "weight has an empty vocabulary",
        ),
    ],
)
def test_empty_vocabulary_is_rejected(call_fn, match):
    """V = 0: one clear error (Triton returned 0 silently, the reference failed with an IndexError)."""
    with pytest.raises(ValueError, match=match):
        call_fn()


@pytest.mark.parametrize(
    "entry, over, match",
    [
        ("grpo_loss", dict(mask=torch.ones(B, T, dtype=torch.complex64)), "mask must be a bool, integer or floating"),
        ("policy_loss", dict(entropy=torch.ones(B, T, dtype=torch.long)), "entropy must be a floating tensor"),
        ("linear_grpo_loss", dict(bias=torch.zeros(V, dtype=torch.long)), "bias must be a floating tensor"),
        (
            "grpo_loss",
            dict(
                advantages=None, rewards=torch.ones(B, 2), group_size=2, reward_weights=torch.ones(2, dtype=torch.long)
            ),
            "reward_weights must be a floating tensor",
        ),
        ("grpo_loss", dict(normalizer=torch.tensor(2.0 + 0j)), "normalizer must be a floating or integer tensor"),
        ("grpo_loss", dict(normalizer=torch.tensor(True)), "normalizer must be a floating or integer tensor"),
    ],
)
def test_dtypes_are_checked(entry, over, match):
    with pytest.raises(TypeError, match=match):
        call(entry, over)


def test_bool_and_integer_masks_are_accepted():
    base = call("grpo_loss", dict(mask=partly_masked())).loss
    for dtype in (torch.bool, torch.int64, torch.uint8):
        torch.testing.assert_close(call("grpo_loss", dict(mask=partly_masked().to(dtype))).loss, base)


# ------------------------------------------------------------------------------------------------ host syncs
class HostSyncs(TorchDispatchMode):
    """Counts the reads of device values into Python: ``item``/``bool``/``int`` (``_local_scalar_dense``),
    data-dependent shapes (``nonzero``, boolean indexing) and ``tolist`` (patched: it dispatches nothing)."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique")

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        tolist = torch.Tensor.tolist

        def counted_tolist(x):
            self.count += 1
            return tolist(x)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(self.SYNCING) or (
            name == "aten.index.Tensor" and any(i is not None and i.dtype == torch.bool for i in args[1])
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _sync_cases():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, V, (B, T), generator=g)
    full = dict(
        mask=partly_masked(),
        old_logprobs=-torch.rand(B, T, generator=g),
        ref_logprobs=-torch.rand(B, T, generator=g),
        is_weights=torch.rand(B, generator=g),
        normalizer=torch.tensor(4.0),
        config=LossConfig(beta=0.1),
        backend="reference",
    )
    return {
        "policy_loss": lambda cv: fastgrpo.policy_loss(
            -torch.rand(B, T), torch.randn(B), entropy=torch.rand(B, T), check_values=cv, **full
        ),
        "grpo_loss": lambda cv: fastgrpo.grpo_loss(torch.randn(B, T, V), y, torch.randn(B, T), check_values=cv, **full),
        "grpo_loss packed": lambda cv: fastgrpo.grpo_loss(
            torch.randn(6, V),
            y.reshape(6),
            advantages=None,
            rewards=torch.rand(2, 3),
            group_size=2,
            reward_weights=torch.ones(3),
            cu_seqlens=torch.tensor([0, 4, 6]),
            backend="reference",
            check_values=cv,
        ),
        "linear_grpo_loss": lambda cv: fastgrpo.linear_grpo_loss(
            torch.randn(B, T, H), torch.randn(V, H), y, torch.randn(B), check_values=cv, **full
        ),
        "token_logprobs": lambda cv: fastgrpo.token_logprobs(
            torch.randn(B, T, V), y, backend="reference", check_values=cv
        ),
        "linear_token_logprobs": lambda cv: fastgrpo.linear_token_logprobs(
            torch.randn(B, T, H), torch.randn(V, H), y, backend="reference", check_values=cv
        ),
        "advantages": lambda cv: fastgrpo.advantages(torch.rand(4), 2, backend="reference", check_values=cv),
    }


@pytest.mark.parametrize("entry", list(_sync_cases()))
def test_value_checks_cost_one_host_sync(entry, monkeypatch):
    """With every checked argument present: one host sync per call with checks on, none off (on the
    reference backend, which adds none of its own for these inputs)."""
    fn = _sync_cases()[entry]
    for check_values, expected in ((True, 1), (False, 0)):
        with HostSyncs(monkeypatch) as syncs:
            fn(check_values)
        assert syncs.count == expected, (check_values, syncs.count)


def test_value_checks_compile_without_graph_break():
    """Under torch.compile the checks are skipped (a read would break the graph), not traced."""

    def f(mask, adv, cu):
        checks = _checks.ValueChecks(True, mask)
        checks.cu_seqlens(cu, mask.shape[0])
        checks.set_mask(mask, cu)
        checks.finite("advantages", adv)
        checks.token_ids("targets", cu, 3)
        checks.run()
        return adv * 2

    out = torch.compile(f, fullgraph=True, backend="eager")(
        torch.ones(6), torch.full((2,), NAN), torch.tensor([0, 7, 6])
    )
    assert torch.isnan(out).all()


# ------------------------------------------------------------------------------------------------ meta tensors
def _meta(*shape, dtype=torch.float32, grad=False):
    return torch.empty(shape, device="meta", dtype=dtype, requires_grad=grad)


META_CALLS = {
    "policy_loss": lambda: fastgrpo.policy_loss(
        _meta(B, T, grad=True), _meta(B), old_logprobs=_meta(B, T), mask=_meta(B, T), is_weights=_meta(B, T)
    ),
    "grpo_loss": lambda: fastgrpo.grpo_loss(
        _meta(B, T, V, grad=True), _meta(B, T, dtype=torch.long), _meta(B), _meta(B, T), normalizer=_meta()
    ),
    "grpo_loss packed": lambda: fastgrpo.grpo_loss(
        _meta(6, V, grad=True), _meta(6, dtype=torch.long), _meta(2), cu_seqlens=_meta(3, dtype=torch.int32)
    ),
    "grpo_loss rewards": lambda: fastgrpo.grpo_loss(
        _meta(B, T, V, grad=True), _meta(B, T, dtype=torch.long), rewards=_meta(B), group_size=2
    ),
    "linear_grpo_loss": lambda: fastgrpo.linear_grpo_loss(
        _meta(B, T, H, grad=True), _meta(V, H, grad=True), _meta(B, T, dtype=torch.long), _meta(B), bias=_meta(V)
    ),
    "token_logprobs": lambda: fastgrpo.token_logprobs(_meta(B, T, V), _meta(B, T, dtype=torch.long)),
    "linear_token_logprobs": lambda: fastgrpo.linear_token_logprobs(
        _meta(B, T, H), _meta(V, H), _meta(B, T, dtype=torch.long)
    ),
    "advantages": lambda: fastgrpo.advantages(_meta(4), 2),
}


@pytest.mark.parametrize("entry", list(META_CALLS))
def test_meta_inputs_give_meta_outputs(entry):
    """FSDP meta init and tracing: no value is read (checks on), outputs and gradients are meta tensors."""
    out = META_CALLS[entry]()
    out = getattr(out, "loss", out)
    assert out.device.type == "meta"
    if out.requires_grad:
        out.backward()
