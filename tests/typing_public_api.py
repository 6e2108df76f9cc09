"""Checked by mypy (pyproject's [tool.mypy] files), never run: the types a user's checker infers from the public
functions. The return types follow the flags through the overloads, and a misspelt keyword of the shared
``**options`` (inputs.LossOptions, the overloads' TypedDicts) is an error (warn_unused_ignores makes each
``type: ignore`` below an assertion that the error is reported)."""

import torch
from torch import Tensor
from typing_extensions import assert_type

import fastgrpo


def public_api(logits: Tensor, targets: Tensor, hidden: Tensor, weight: Tensor, rewards: Tensor) -> None:
    assert_type(fastgrpo.token_logprobs(logits, targets), Tensor)
    assert_type(fastgrpo.token_logprobs(logits, targets, entropy=True, temperature=0.7), tuple[Tensor, Tensor])
    assert_type(fastgrpo.linear_token_logprobs(hidden, weight, targets, logit_scale=2.0), Tensor)
    assert_type(fastgrpo.linear_token_logprobs(hidden, weight, targets, entropy=True), tuple[Tensor, Tensor])
    assert_type(fastgrpo.advantages(rewards, 4, estimator="rloo"), Tensor)
    assert_type(fastgrpo.advantages(rewards, 4, return_metrics=True), tuple[Tensor, dict[str, Tensor]])
    out = fastgrpo.grpo_loss(logits, targets, rewards, old_logprobs=logits[..., 0], normalizer=torch.tensor(8.0))
    assert_type(out, fastgrpo.LossOutput)
    fastgrpo.token_logprobs(logits, targets, temperatur=0.7)  # type: ignore[call-overload]
    fastgrpo.advantages(rewards, 4, estimater="rloo")  # type: ignore[call-overload]
    fastgrpo.grpo_loss(logits, targets, rewards, old_logprob=logits[..., 0])  # type: ignore[call-arg]
    fastgrpo.policy_loss(logits[..., 0], rewards, group_size="4")  # type: ignore[arg-type]
    fastgrpo.linear_grpo_loss(hidden, weight, targets, rewards, normaliser=1.0)  # type: ignore[call-arg]
