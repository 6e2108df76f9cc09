"""fastgrpo: fused GRPO-family losses (log-probs, advantages, clipped ratios, KL) for RL on LLMs.

Importing fastgrpo has no side effects: nothing is compiled, loaded or patched until a function is called.
"""

from . import presets, reference
from ._checks import set_check_values
from .advantages import advantages
from .config import AdvantageConfig, LossConfig, LossOutput
from .logprobs import linear_token_logprobs, token_logprobs
from .loss import GRPOLoss, grpo_loss, linear_grpo_loss, policy_loss

__version__ = "0.1.0"

__all__ = [
    "AdvantageConfig", "GRPOLoss", "LossConfig", "LossOutput", "advantages", "grpo_loss", "linear_grpo_loss",
    "linear_token_logprobs", "policy_loss", "presets", "reference", "set_check_values", "token_logprobs",
]
