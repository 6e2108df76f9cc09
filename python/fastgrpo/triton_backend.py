"""``backend="triton"``: Triton kernels for every pass over the vocabulary, PyTorch for the O(N) rest.

The logits are read by the ``fastgrpo::token_logprobs`` kernel (ℓ, H, lse: one read, fp32 per token, masked
rows skipped); the per-token objective of SPEC §2 runs on those [N] vectors with the reference's own code,
so every variant, weight and metric is exactly the reference's; its gradient w.r.t. ℓ and H comes back
through the op's backward kernel, which reads the logits once more and writes ∂L/∂logits once. No [N, V]
intermediate exists besides that gradient.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import reference
from .config import LossConfig, LossOutput
from .triton_token_logprobs import token_logprobs

advantages = reference.advantages
policy_loss = reference.policy_loss


def linear_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                          temperature: float = 1.0, entropy: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    # fp32 logits until the fused linear path ([4/6]) keeps them on chip.
    return token_logprobs(reference.hidden_to_logits(hidden, weight, bias), targets, temperature, entropy)


def grpo_loss(logits: Tensor, targets: Tensor, advantages: Tensor, mask: Tensor, *, return_entropy: bool = False,
              config: LossConfig = LossConfig(), **kwargs) -> LossOutput:
    lp, ent = token_logprobs(logits, targets, config.temperature,
                             entropy=return_entropy or config.needs_entropy, mask=mask)
    return reference.policy_loss(lp, advantages, mask, entropy=ent, config=config, **kwargs)


def linear_grpo_loss(hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor, mask: Tensor, *,
                     bias: Optional[Tensor] = None, return_entropy: bool = False,
                     config: LossConfig = LossConfig(), **kwargs) -> LossOutput:
    return grpo_loss(reference.hidden_to_logits(hidden, weight, bias), targets, advantages, mask,
                     return_entropy=return_entropy, config=config, **kwargs)
