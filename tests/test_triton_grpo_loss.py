"""``backend="triton"`` loss on logits against the fp32 reference: every variant × dtype × awkward shape,
loss, log-probs, metrics and logit gradients, judged against PyTorch's own same-dtype error."""

import pytest
import torch

import fastgrpo
from fastgrpo import presets
from test_reference_levels import CONFIGS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
K = 2.0
ATOL = 3e-5  # fp32 rounding of the online log-sum-exp (see test_triton_token_logprobs.py)

VARIANTS = dict(CONFIGS, **{
    "trl_dapo": presets.trl(loss_type="dapo", beta=0.04, entropy_coef=0.01),
    "verl_vanilla_k3+": presets.verl(use_kl_loss=True, kl_loss_type="k3+"),
    "verl_gspo": presets.verl(loss_mode="gspo", loss_agg_mode="token-mean"),
    "openrlhf_tis": presets.openrlhf(enable_vllm_is_correction=True, vllm_is_truncated_threshold=(0.8, 1.2)),
})

# (token shape, V, why)
SHAPES = [
    ((2, 5), 123, "V not a multiple of the block"),
    ((3, 4), 4113, "one full block and a ragged tail"),
    ((1, 1), 50257, "a single token, GPT-2 vocabulary"),
]


def inputs(shape, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    mask = torch.ones(shape)
    if len(shape) == 2 and shape[0] > 1:
        mask[1, shape[1] // 2:] = 0  # a partly masked sequence
        mask[-1] = 0 if shape[0] > 2 else mask[-1]  # and a fully masked one
        targets[mask == 0] = -100
    lp, _ = fastgrpo.reference.token_logprobs(logits.float(), targets.clamp(min=0))
    noise = lambda: 0.2 * torch.randn(shape, generator=g)  # noqa: E731
    kw = dict(advantages=torch.randn(shape[0], generator=g), mask=mask, old_logprobs=lp + noise(),
              ref_logprobs=lp + noise(), sampling_logprobs=lp + noise())
    to = lambda x: x.to(DEVICE)  # noqa: E731
    return to(logits), to(targets), {k: to(v) for k, v in kw.items()}


def run(logits, targets, kw, cfg, backend):
    z = logits.detach().clone().requires_grad_()
    out = fastgrpo.grpo_loss(z, targets, config=cfg, backend=backend, return_entropy=True, **kw)
    out.loss.backward()
    return out, z.grad


def torch_same_dtype(logits, targets, kw, cfg):
    """An eager trainer: log-softmax in the logits' dtype, then the loss (reference math on those values)."""
    z = logits.detach().clone().requires_grad_()
    logp = torch.log_softmax(z / cfg.temperature, dim=-1)
    safe = targets.clamp(min=0)
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1).float()
    ent = -(logp.exp() * logp).sum(-1).float()
    out = fastgrpo.policy_loss(lp, entropy=ent, config=cfg, backend="reference", **kw)
    out.loss.backward()
    return out, z.grad


def bound_ok(ours, ref, same, what):
    """max|ours − ref| ≤ K·max|torch − ref| + (rounding of the output dtype)·max|ref|: the last term is the
    half-ulp every bf16 output carries, which torch's error on a handful of values may happen to miss."""
    rounding = max(ATOL, torch.finfo(ours.dtype).eps)
    ours, ref, same = ours.double(), ref.double(), same.double()
    err = (ours - ref).abs().max().item() if ours.numel() else 0.0
    bound = K * ((same - ref).abs().max().item() if ours.numel() else 0.0) + rounding * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, vocab, why", SHAPES, ids=[s[2] for s in SHAPES])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(variant, shape, vocab, why, dtype):
    cfg = VARIANTS[variant]
    logits, targets, kw = inputs(shape, vocab, dtype)
    ours, g_ours = run(logits, targets, kw, cfg, "triton")
    ref, g_ref = run(logits.float(), targets, kw, cfg, "reference")
    same, g_same = torch_same_dtype(logits, targets, kw, cfg)
    bound_ok(ours.loss, ref.loss, same.loss, "loss")
    bound_ok(g_ours, g_ref, g_same, "grad")
    bound_ok(ours.logprobs, ref.logprobs, same.logprobs, "logprobs")
    bound_ok(ours.entropy, ref.entropy, same.entropy, "entropy")
    assert ours.metrics.keys() == ref.metrics.keys()
    for key in ref.metrics:
        if key == "grad_active_fraction":  # a count of exact zeros: flips only where a token sits on a kink
            assert abs(ours.metrics[key] - ref.metrics[key]) <= 1.0 / max(1, int(kw["mask"].sum()))
        else:
            bound_ok(ours.metrics[key], ref.metrics[key], same.metrics[key], key)
    assert g_ours.dtype == dtype and torch.all(g_ours[kw["mask"] == 0] == 0)


def test_packed_with_cu_seqlens():
    cfg = CONFIGS["gspo"]
    logits, targets, kw = inputs((5,), 300, torch.bfloat16)
    kw["advantages"] = kw["advantages"][:2]
    cu = torch.tensor([0, 2, 5], device=DEVICE)
    ours, g_ours = run(logits, targets, dict(kw, cu_seqlens=cu), cfg, "triton")
    ref, g_ref = run(logits.float(), targets, dict(kw, cu_seqlens=cu), cfg, "reference")
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours.float(), g_ref, rtol=2e-2, atol=1e-3)  # bf16 gradient rounding


def test_rewards_in_the_same_call():
    logits, targets, kw = inputs((4, 3), 200, torch.float32)
    kw.pop("advantages")
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0], device=DEVICE)
    a = fastgrpo.grpo_loss(logits, targets, rewards=rewards, group_size=2, backend="triton", **kw)
    b = fastgrpo.grpo_loss(logits, targets, rewards=rewards, group_size=2, backend="reference", **kw)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
@pytest.mark.parametrize("variant", ["grpo", "gspo", "cispo", "trl_dapo"])
def test_full_size_on_gpu(variant):
    cfg = VARIANTS[variant]
    logits, targets, kw = inputs((8, 512), 151936, torch.bfloat16)
    ours, g_ours = run(logits, targets, kw, cfg, "triton")
    ref, g_ref = run(logits.float(), targets, kw, cfg, "reference")
    same, g_same = torch_same_dtype(logits, targets, kw, cfg)
    bound_ok(ours.loss, ref.loss, same.loss, "loss")
    bound_ok(g_ours, g_ref, g_same, "grad")
