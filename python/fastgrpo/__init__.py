"""fastgrpo: fused GRPO-family losses (log-probs, advantages, clipped ratios, KL) for RL on LLMs.

The reward side (rewards → advantages) lives in ``fastgrpo.reward``, the trajectory side (log-probs, ratios,
clipping, KL, aggregation) in ``fastgrpo.trajectory``; ``fastgrpo.reference`` states the math as a plain PyTorch
oracle (docs/MATH.md), and ``docs/ARCHITECTURE.md`` walks through the layers.

Importing fastgrpo has no side effects: nothing is compiled, loaded or patched until a function is called.
"""

from . import presets, reference
from ._checks import set_check_values
from .config import AdvantageConfig, LossConfig, LossOutput
from .reward.advantages import advantages
from .trajectory.distillation import forward_kl_topk, linear_forward_kl_topk
from .trajectory.grpo_loss import GRPOLoss, grpo_loss, policy_loss
from .trajectory.linear_grpo_loss import linear_grpo_loss
from .trajectory.token_logprobs import linear_token_logprobs, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "AdvantageConfig",
    "GRPOLoss",
    "LossConfig",
    "LossOutput",
    "advantages",
    "forward_kl_topk",
    "grpo_loss",
    "linear_forward_kl_topk",
    "linear_grpo_loss",
    "linear_token_logprobs",
    "policy_loss",
    "presets",
    "reference",
    "set_check_values",
    "token_logprobs",
]
