"""``python -m fastgrpo demo``: GRPO from scratch on a tiny causal transformer, in well under a minute on a CPU.

Task (verifiable, like a math checker): the prompt is ``DIGITS`` random digits; the policy writes as many
tokens and is rewarded by the fraction that spell the prompt reversed. A random policy scores 0.1; one
that learned to read its prompt backwards scores 1. The loop is the example of fastgrpo in a home-grown trainer:

1. sample ``GROUP`` completions per prompt (no gradient), score them;
2. ``fastgrpo.advantages(rewards, GROUP)``: group-normalized advantages;
3. the rollout's log-probs become ``old_logprobs``; ``ITERATIONS`` optimizer steps on the same batch, each
   ``fastgrpo.grpo_loss(logits, completions, advantages, old_logprobs=…, config=…)`` + ``loss.backward()``.
"""

from __future__ import annotations

import pathlib
import time

import torch
from torch import nn

import fastgrpo
from fastgrpo import backends

VOCAB, BOS, DIGITS, PROMPTS, GROUP, ITERATIONS = 11, 10, 3, 16, 8, 2
CONFIG = fastgrpo.LossConfig(policy_loss="ppo", epsilon_low=0.2, epsilon_high=0.28, aggregation="token_mean")


class TinyLM(nn.Module):
    """A 2-layer causal transformer over 11 tokens (the digits and BOS)."""

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4, context: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(t)
        return self.head(self.blocks(self.embed(tokens) + self.position[:t], mask=causal, is_causal=True))


@torch.no_grad()
def sample(model: TinyLM, prompts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[BOS, prompt] followed by DIGITS sampled digits (BOS is never sampled)."""
    seq = torch.cat([torch.full_like(prompts[:, :1], BOS), prompts], dim=1)
    for _ in range(DIGITS):
        logits = model(seq)[:, -1, :BOS]
        seq = torch.cat([seq, torch.multinomial(logits.softmax(-1), 1, generator=generator)], dim=1)
    return seq


def reward(seq: torch.Tensor) -> torch.Tensor:
    """The verifier: fraction of the completion equal to the prompt reversed."""
    prompt, completion = seq[:, 1 : 1 + DIGITS], seq[:, 1 + DIGITS :]
    return (completion == prompt.flip(1)).float().mean(1)


def train(steps: int = 600, seed: int = 0, log_every: int = 50, quiet: bool = False) -> list[float]:
    """Runs the loop; returns the mean reward of each step's rollout."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    curve = []
    start = time.perf_counter()
    for step in range(steps):
        prompts = torch.randint(0, 10, (PROMPTS, DIGITS), generator=gen).repeat_interleave(GROUP, dim=0)
        seq = sample(model, prompts, gen)
        rewards = reward(seq)
        curve.append(rewards.mean().item())
        adv = fastgrpo.advantages(rewards, GROUP)  # group-normalized, one per completion
        completions = seq[:, 1 + DIGITS :]
        old = None
        for _ in range(ITERATIONS):
            logits = model(seq[:, :-1])[:, DIGITS:]  # the positions that predict the completion
            out = fastgrpo.grpo_loss(logits, completions, adv, old_logprobs=old, config=CONFIG)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            old = out.logprobs if old is None else old  # the rollout policy's log-probs
        if not quiet and (step % log_every == 0 or step == steps - 1):
            print(
                f"step {step:3d}  reward {curve[-1]:.3f}  loss {out.loss.item():+.4f}  "
                f"clipped {out.metrics['clip_ratio/region_mean'].item():.2f}  {time.perf_counter() - start:5.1f}s"
            )
    return curve


def plot(curve: list[float], out: str) -> str:
    """The reward curve as a PNG (or a CSV when matplotlib is missing); returns the path written."""
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path = path.with_suffix(".csv")
        path.write_text("step,reward\n" + "".join(f"{i},{r}\n" for i, r in enumerate(curve)))
        return str(path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(curve, label="mean reward of the rollout")
    ax.axhline(0.1, color="gray", ls=":", label="random policy")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_ylim(0, 1.05)
    ax.set_title("fastgrpo demo: GRPO on a tiny transformer (reverse the prompt)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def main(steps: int = 600, out: str = "bench/results/demo_reward.png") -> int:
    print(
        f"GRPO demo: {PROMPTS} prompts x {GROUP} completions per step, {ITERATIONS} updates per rollout, "
        f"backends on this device: {backends.available(torch.device('cpu'))}"
    )
    curve = train(steps)
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    print(f"reward {first:.3f} (first 5 steps) -> {last:.3f} (last 5 steps); curve: {plot(curve, out)}")
    return 0 if last > first else 1
