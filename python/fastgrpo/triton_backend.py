"""``backend="triton"``: Triton kernels for every pass over the vocabulary, PyTorch for the O(N) rest.

Token-local configs (every token-level variant, KL, entropy bonus, rollout weights from given log-probs)
take the fused path (``triton_grpo_loss``): one launch computes the loss and writes ∂loss/∂logits in the
forward, logits read once. The rest (GSPO/GMPO sequence ratios, the entropy quantile and off-policy masks)
needs a statistic over other tokens first and runs in two phases: the ``fastgrpo::token_logprobs`` kernel
(ℓ, H: one read, masked rows skipped), the per-token objective on those [N] vectors with the reference's own
code, and its gradient w.r.t. ℓ and H through the op's backward kernel (one more read, one write). No
[N, V] intermediate exists besides the gradient.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import reference
from .config import LossConfig, LossOutput
from . import triton_grpo_loss
from .triton_advantages import advantages  # noqa: F401  (the backend's advantages)
from .triton_token_logprobs import token_logprobs

policy_loss = reference.policy_loss  # O(N) on given log-probs: no pass over a vocabulary to fuse
SUPPORTS_INPLACE_GRAD = True


def linear_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                          temperature: float = 1.0, entropy: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    # fp32 logits until the fused linear path ([4/6]) keeps them on chip.
    return token_logprobs(reference.hidden_to_logits(hidden, weight, bias), targets, temperature, entropy)


def grpo_loss(logits: Tensor, targets: Tensor, advantages: Tensor, mask: Tensor, *, return_entropy: bool = False,
              config: LossConfig = LossConfig(), inplace_grad: bool = False, **kwargs) -> LossOutput:
    has_old, has_is = kwargs.get("old_logprobs") is not None, kwargs.get("is_weights") is not None
    if triton_grpo_loss.is_token_local(config, has_old, has_is):
        return triton_grpo_loss.grpo_loss(logits, targets, advantages, mask, return_entropy=return_entropy,
                                          config=config, inplace_grad=inplace_grad, **kwargs)
    if inplace_grad:
        raise ValueError("inplace_grad=True needs a token-local config (token-level ratio, no entropy quantile "
                         "or off-policy mask, rollout weights from given old_logprobs): this one runs in two "
                         "phases")
    lp, ent = token_logprobs(logits, targets, config.temperature,
                             entropy=return_entropy or config.needs_entropy, mask=mask)
    return reference.policy_loss(lp, advantages, mask, entropy=ent, config=config, **kwargs)


def linear_grpo_loss(hidden: Tensor, weight: Tensor, targets: Tensor, advantages: Tensor, mask: Tensor, *,
                     bias: Optional[Tensor] = None, return_entropy: bool = False,
                     config: LossConfig = LossConfig(), **kwargs) -> LossOutput:
    return grpo_loss(reference.hidden_to_logits(hidden, weight, bias), targets, advantages, mask,
                     return_entropy=return_entropy, config=config, **kwargs)
