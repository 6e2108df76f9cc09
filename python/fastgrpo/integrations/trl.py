"""TRL drop-in: ``patch_grpo_trainer(trainer)`` makes a ``trl.GRPOTrainer`` (TRL ≥ 1.16, read at 1.16.0:
trl/trainer/grpo_trainer.py ``_compute_loss``) compute its training loss with :func:`fastgrpo.linear_grpo_loss`
from the backbone's hidden states and the LM-head weight, so the [B, T, V] logits are never materialized and the
loss gradient is computed in the same pass as the log-probs.

    trainer = GRPOTrainer(model=..., args=GRPOConfig(...), ...)
    fastgrpo.integrations.trl.patch_grpo_trainer(trainer)   # the one added line
    trainer.train()

What it reads from the trainer on every call: ``loss_type`` (grpo, bnpo, dr_grpo, dapo, cispo, sapo), ``epsilon`` /
``epsilon_high``, ``delta``, ``beta`` (+ ``use_bias_correction_kl``), ``importance_sampling_level``,
``temperature``, ``top_entropy_quantile``, ``off_policy_mask_threshold``, the vLLM importance-sampling ratio TRL
computed, ``num_items_in_batch``, gradient accumulation and the entropy bonus; it logs TRL's metric names (kl,
entropy, clip_ratio/*, cispo_clip_ratio, policy_loss, entropy_coef). The rollout's log-probs (old, reference) are
still computed by TRL's own fused LM head, which also never materializes logits.

Also: ``cast_lm_head_to_fp32`` (the head in fp32 outside autocast, as TRL), PEFT adapters on the backbone, an
FSDP2-sharded head (gathered, as TRL does; not tested here).

Not supported (a ``ValueError`` at patch time or a ``NotImplementedError`` on the first step, naming the option):
TRL's vespo/luspo losses, the adaptive entropy controller, MoE router auxiliary losses, vision inputs, a PEFT
adapter on the LM head, and the entropy bonus together with ``top_entropy_quantile < 1`` for dapo/cispo.
With several processes, the ``top_entropy_quantile`` threshold is computed per process (TRL gathers the
entropies of every process first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
from typing import Any, Optional

import torch
from torch import Tensor

from .. import presets
from ..config import LossOutput
from ..trajectory.linear_grpo_loss import linear_grpo_loss

try:
    from torch.distributed.tensor import DTensor

    _DTENSOR: tuple[type[Any], ...] = (DTensor,)  # a tuple: isinstance(x, ()) is False
except ImportError:  # a torch build without distributed
    _DTENSOR = ()

_VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "num_images")


def patch_grpo_trainer(trainer: Any, *, backend: str = "auto", chunk_tokens: Optional[int] = None) -> Any:
    """Switches ``trainer`` (a ``trl.GRPOTrainer``) to fastgrpo's fused linear loss; returns the trainer.

    Patches this trainer instance and its model's ``forward`` (which keeps its behaviour unless called with
    ``fastgrpo_loss=``); nothing else. Call it after constructing the trainer, before ``train()``.
    """
    args = trainer.args
    presets.trl(loss_type=args.loss_type, importance_sampling_level=args.importance_sampling_level)  # validates
    if trainer.use_adaptive_entropy:
        raise ValueError("use_adaptive_entropy=True is not supported by fastgrpo's TRL integration")
    if trainer.aux_loss_enabled:
        raise ValueError(
            "MoE router auxiliary losses (router_aux_loss_coef != 0) are not supported by fastgrpo's TRL integration"
        )
    if trainer._entropy_bonus_enabled and args.top_entropy_quantile < 1.0 and args.loss_type in ("dapo", "cispo"):
        raise ValueError(
            "entropy_coef != 0 with top_entropy_quantile < 1 is not supported for loss_type "
            f"{args.loss_type!r} by fastgrpo's TRL integration"
        )
    model = trainer.model
    if hasattr(model, "get_base_model"):  # PEFT: the head sits on the base model, as TRL's fused head does
        model = model.get_base_model()
    _add_loss_forward(model)
    trainer._fastgrpo = dict(backend=backend, chunk_tokens=chunk_tokens)
    trainer._compute_loss = types.MethodType(_compute_loss, trainer)
    return trainer


def _logit_transform(config: Any) -> tuple[float, Optional[float]]:
    """(logit_scale, logit_softcap) the way the model's own head applies them (the multipliers TRL's fused LM
    head knows: Cohere/Command-R, MPT-style None, Falcon-H1, Granite/MiniCPM3, HyperCLOVA X, Gemma's soft-cap)."""
    text = config.get_text_config()
    scale = getattr(text, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None) if scale is None else scale
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1.0 / text.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(text, "final_logit_softcapping", None)


def _add_loss_forward(model: Any) -> None:
    """Wraps ``model.forward``: with ``fastgrpo_loss=fn`` it runs the backbone and returns ``fn(hidden, lm_head,
    logit_scale, logit_softcap)``. Going through the model's own forward keeps DDP/FSDP wrappers in the loop."""
    if getattr(model, "_fastgrpo_forward", False):
        return
    original = model.forward
    scale, softcap = _logit_transform(model.config)

    @functools.wraps(original)
    def forward(self, *args, fastgrpo_loss=None, **kwargs):
        if fastgrpo_loss is None:
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        return fastgrpo_loss(hidden, self.get_output_embeddings(), scale, softcap)

    # transformers reads forward's parameter names (generate() checks model_kwargs such as attention_mask
    # against them when prepare_inputs_for_generation takes **kwargs, as the Mamba hybrids' do; it also looks
    # for logits_to_keep): the wrapper shows the original's parameters plus its own keyword
    signature = _signature_with_loss(inspect.signature(original))
    forward.__signature__ = signature  # type: ignore[attr-defined]  # read by inspect; typeshed does not declare it
    model.forward = types.MethodType(forward, model)
    model._fastgrpo_forward = True


def _signature_with_loss(bound: inspect.Signature) -> inspect.Signature:
    """The unbound signature of the wrapper of a bound ``forward`` with signature ``bound``: ``self``, its
    parameters and a keyword-only ``fastgrpo_loss=None`` (before ``**kwargs``, where keyword-only ones go)."""
    params = list(bound.parameters.values())
    loss = inspect.Parameter("fastgrpo_loss", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = len(params) - (bool(params) and params[-1].kind is inspect.Parameter.VAR_KEYWORD)
    self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return bound.replace(
        parameters=[self, *params[:at], loss, *params[at:]], return_annotation=inspect.Signature.empty
    )  # it returns the loss function's result too


def _compute_loss(self: Any, model: Any, inputs: dict) -> Tensor:
    """``GRPOTrainer._compute_loss`` with the loss and its gradients from fastgrpo (same value, metrics)."""
    if any(inputs.get(k) is not None for k in _VISION_INPUTS):
        raise NotImplementedError("vision inputs are not supported by fastgrpo's TRL integration")
    args, mode = self.args, ("train" if self.model.training else "eval")
    completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    num_completion = completion_ids.size(1)
    advantages = inputs["advantages"]
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
    config = presets.trl(
        loss_type=self.loss_type,
        epsilon=self.epsilon_low,
        epsilon_high=self.epsilon_high,
        delta=args.delta,
        beta=self.beta,
        importance_sampling_level=self.importance_sampling_level,
        temperature=self.temperature,
        max_completion_length=self.max_completion_length,
        use_bias_correction_kl=args.use_bias_correction_kl,
        sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg,
        top_entropy_quantile=self.top_entropy_quantile,
        off_policy_mask_threshold=self.off_policy_mask_threshold,
        entropy_coef=self.entropy_coef if self._entropy_bonus_enabled else 0.0,
        gradient_accumulation_steps=accumulation,
    )
    normalizer = None
    if self.loss_type in ("dapo", "cispo"):  # num_items_in_batch spans the generation batch
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * accumulation / args.steps_per_generation
        if config.entropy_coef != 0.0:  # TRL ≥ 1.16: the entropy bonus is a token mean / accumulation steps
            count = mask.sum().clamp(min=1.0)
            scaled = float(config.entropy_coef * normalizer / (count * accumulation))
            config = dataclasses.replace(config, entropy_coef=scaled)
    is_weights = None
    if self.use_vllm and self.vllm_importance_sampling_correction:  # TRL's ratio: (B, T), or (B, 1) per sequence
        is_weights = inputs["importance_sampling_ratio"].expand_as(mask)
    old = inputs.get("old_per_token_logps")  # None: on-policy, ratio 1 with the gradient of ℓ
    sampling = None
    if self.off_policy_mask_threshold is not None:
        sampling = inputs.get("sampling_per_token_logps", old)
    ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None

    def loss_head(hidden: Tensor, head: Any, scale: float, softcap: Optional[float]) -> LossOutput:
        if hasattr(head, "base_layer"):
            raise NotImplementedError("a PEFT adapter on the LM head is not supported by fastgrpo's TRL integration")
        hidden = hidden[:, -num_completion - 1 : -1].to(head.weight.device)  # position t predicts token t + 1
        weight, bias = head.weight, head.bias
        if isinstance(weight, _DTENSOR):  # FSDP2 shards the head: gather it, as TRL's fused head does
            weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
        fp32_head = args.cast_lm_head_to_fp32  # TRL runs the head in fp32, outside autocast
        with torch.autocast(hidden.device.type, enabled=False) if fp32_head else contextlib.nullcontext():
            return linear_grpo_loss(
                hidden.float() if fp32_head else hidden,
                weight,
                completion_ids,
                advantages,
                mask,
                bias=bias,
                old_logprobs=old,
                ref_logprobs=ref,
                sampling_logprobs=sampling,
                is_weights=is_weights,
                normalizer=normalizer,
                return_entropy=True,
                chunk_tokens=self._fastgrpo["chunk_tokens"],
                logit_scale=scale,
                logit_softcap=softcap,
                config=config,
                backend=self._fastgrpo["backend"],
            )

    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with self.accelerator.autocast():
        out = model(input_ids=input_ids, attention_mask=attention_mask, fastgrpo_loss=loss_head)
    _log_metrics(self, mode, out, inputs, mask, old, ref, config, accumulation)
    return out.loss


def _log_metrics(
    self: Any,
    mode: str,
    out: LossOutput,
    inputs: dict,
    mask: Tensor,
    old: Optional[Tensor],
    ref: Optional[Tensor],
    config: Any,
    accumulation: int,
) -> None:
    """TRL's metrics, under TRL's names and reductions, from fastgrpo's detached per-token outputs."""
    from trl.trainer.utils import nanmax, nanmin

    metrics = self._metrics[mode]
    mask = mask.float()
    lp, entropy = out.logprobs, out.entropy
    assert entropy is not None  # the loss ran with return_entropy=True
    advantages = inputs["advantages"]
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    log_ratio = lp - (lp if old is None else old)
    if self.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)

    def global_masked_mean(x: Tensor) -> float:
        if x.shape[1] == 1:  # one value per sequence
            local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
        else:
            local = torch.stack([(x * mask).sum(), mask.sum()])
        total = self.accelerator.reduce(local, reduction="sum")
        return (total[0] / total[1].clamp(min=1.0)).item()

    def masked_seq_mean(x: Tensor) -> Tensor:
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    if self._entropy_bonus_enabled:  # the policy loss alone, before the accumulation scaling
        effective = mask
        if self.top_entropy_quantile < 1.0:
            effective = mask * self.get_high_entropy_mask(entropy, mask, 1 - self.top_entropy_quantile)
        bonus = (entropy * effective).sum() / effective.sum().clamp(min=1.0) / accumulation
        policy = out.loss.detach() + self.entropy_coef * bonus
        if self.loss_type not in ("dapo", "cispo"):
            policy = policy * accumulation
        metrics["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
        if mode == "train" and self.accelerator.sync_gradients:
            metrics["entropy_coef"].append(self.entropy_coef)
    if ref is not None:
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        metrics["kl"].append(global_masked_mean(kl * ratio if config.kl_ratio_weighted else kl))
    metrics["entropy"].append(global_masked_mean(entropy))
    if self.loss_type == "cispo":
        metrics["cispo_clip_ratio"].append(global_masked_mean(((ratio > self.epsilon_high) & (advantages > 0)).float()))
    elif self.loss_type != "sapo":
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
