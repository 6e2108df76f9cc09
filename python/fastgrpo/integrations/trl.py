"""TRL drop-in: ``patch_grpo_trainer(trainer)`` makes a ``trl.GRPOTrainer`` (TRL ≥ 1.16, read at 1.16.0:
trl/trainer/grpo_trainer.py ``_compute_loss``) compute its training loss with :func:`fastgrpo.linear_grpo_loss`
from the backbone's hidden states and the LM-head weight, so the [B, T, V] logits are never materialized and the
loss gradient is computed in the same pass as the log-probs.

    trainer = GRPOTrainer(model=..., args=GRPOConfig(...), ...)
    fastgrpo.integrations.trl.patch_grpo_trainer(trainer)   # the one added line
    trainer.train()

What it reads from the trainer on every call: ``loss_type`` (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo,
vespo), ``epsilon`` / ``epsilon_high``, ``delta``, ``beta`` (+ ``use_bias_correction_kl``),
``importance_sampling_level``, ``temperature``, ``sapo_temperature_*``, ``vespo_k_*`` / ``vespo_lambda_*``,
``top_entropy_quantile``, ``off_policy_mask_threshold``, the vLLM importance-sampling ratio TRL computed,
``num_items_in_batch``, gradient accumulation, the entropy bonus (``entropy_coef``, or TRL's adaptive controller
with ``use_adaptive_entropy``, whose state stays on the trainer's own attributes so that TRL's checkpoints save and
restore it) and the MoE router load-balancing loss (``router_aux_loss_coef``, as TRL: requested from the backbone
and added to the loss); it logs TRL's metric names (kl, entropy, clip_ratio/*, cispo_clip_ratio,
vespo/phi_seq_mean, policy_loss, entropy_coef, aux_loss). The rollout's log-probs (old, reference) are still
computed by TRL's own fused LM head, which also never materializes logits. Options TRL applies before the loss
(``mask_truncated_completions``, ``multi_objective_aggregation``, ``scale_rewards``) arrive in the batch's mask and
advantages.

Also: ``cast_lm_head_to_fp32`` (the head in fp32 outside autocast, as TRL), PEFT adapters on the backbone, an
FSDP2-sharded head (gathered, as TRL does; not tested here).

Not supported (a ``ValueError`` at patch time or a ``NotImplementedError`` on the first step, naming the option):
vision inputs, a PEFT adapter on the LM head, and the entropy bonus (static or adaptive) together with
``top_entropy_quantile < 1`` for dapo/cispo/vespo (their bonus divides by the count of the tokens the entropy
mask keeps, which only the loss call knows, while their policy term divides by ``num_items_in_batch``).
With several processes, the ``top_entropy_quantile`` threshold is computed per process (TRL gathers the
entropies of every process first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
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
_GLOBAL_COUNT = ("dapo", "cispo", "vespo")  # TRL's token sums over num_items_in_batch


def patch_grpo_trainer(trainer: Any, *, backend: str = "auto", chunk_tokens: Optional[int] = None) -> Any:
    """Switches ``trainer`` (a ``trl.GRPOTrainer``) to fastgrpo's fused linear loss; returns the trainer.

    Patches this trainer instance and its model's ``forward`` (which keeps its behaviour unless called with
    ``fastgrpo_loss=``); nothing else. Call it after constructing the trainer, before ``train()``.
    """
    args = trainer.args
    presets.trl(  # validates
        loss_type=args.loss_type,
        importance_sampling_level=args.importance_sampling_level,
        beta=args.beta,
        use_bias_correction_kl=args.use_bias_correction_kl,
        use_vllm=args.use_vllm,
        vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        vllm_importance_sampling_mode=args.vllm_importance_sampling_mode,
    )
    if trainer._entropy_bonus_enabled and args.top_entropy_quantile < 1.0 and args.loss_type in _GLOBAL_COUNT:
        raise ValueError(
            "an entropy bonus (entropy_coef != 0 or use_adaptive_entropy) with top_entropy_quantile < 1 is not "
            f"supported for loss_type {args.loss_type!r} by fastgrpo's TRL integration"
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
    """Wraps ``model.forward``: with ``fastgrpo_loss=fn`` it runs the backbone and returns ``(fn(hidden, lm_head,
    logit_scale, logit_softcap), aux_loss)``, where ``aux_loss`` is the MoE load-balancing loss of the router
    logits when the call passes ``output_router_logits=True`` (else None). Going through the model's own forward
    keeps DDP/FSDP wrappers in the loop."""
    if getattr(model, "_fastgrpo_forward", False):
        return
    original = model.forward
    scale, softcap = _logit_transform(model.config)

    @functools.wraps(original)
    def forward(self, *args, fastgrpo_loss=None, **kwargs):
        if fastgrpo_loss is None:
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        backbone = self.base_model(*args, **kwargs)
        result = fastgrpo_loss(backbone.last_hidden_state, self.get_output_embeddings(), scale, softcap)
        aux = None
        if kwargs.get("output_router_logits"):
            aux = _router_aux_loss(self, backbone.router_logits, kwargs.get("attention_mask"))
        return result, aux

    # transformers reads forward's parameter names (generate() checks model_kwargs such as attention_mask
    # against them when prepare_inputs_for_generation takes **kwargs, as the Mamba hybrids' do; it also looks
    # for logits_to_keep): the wrapper shows the original's parameters plus its own keyword
    signature = _signature_with_loss(inspect.signature(original))
    forward.__signature__ = signature  # type: ignore[attr-defined]  # read by inspect; typeshed does not declare it
    model.forward = types.MethodType(forward, model)
    model._fastgrpo_forward = True


def _router_aux_loss(model: Any, router_logits: Any, attention_mask: Optional[Tensor]) -> Tensor:
    """The Switch-Transformer load-balancing loss of every layer's router logits over the attended tokens: the
    function and arguments TRL's fused LM head uses for every MoE family (transformers' Mixtral
    ``load_balancing_loss_func``, which the other families copy), without its coefficient."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text = model.config.get_text_config()
    num_experts = getattr(text, "num_experts", None) or model.num_experts  # GptOss configs before transformers 5.6
    aux = load_balancing_loss_func(router_logits, num_experts, text.num_experts_per_tok, attention_mask)
    return aux if isinstance(aux, Tensor) else torch.tensor(float(aux))  # 0 without router logits


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
    coef = 0.0  # the entropy coefficient this step applies
    if self._entropy_bonus_enabled:  # adaptive: the controller's, gated by the last optimizer step's entropy
        gated = self.use_adaptive_entropy and self._last_world_entropy > args.entropy_target
        coef = 0.0 if gated else self.entropy_coef
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
        vespo_k_pos=args.vespo_k_pos,
        vespo_lambda_pos=args.vespo_lambda_pos,
        vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg,
        top_entropy_quantile=self.top_entropy_quantile,
        off_policy_mask_threshold=self.off_policy_mask_threshold,
        entropy_coef=coef,
        gradient_accumulation_steps=accumulation,
    )
    normalizer = None
    if self.loss_type in _GLOBAL_COUNT:  # num_items_in_batch spans the generation batch
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
    if self.loss_type == "vespo":  # TRL folds whatever ratio the batch carries into the sequence weight
        is_weights = inputs.get("importance_sampling_ratio")
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
    router = dict(output_router_logits=True) if self.aux_loss_enabled else {}  # TRL asks for them then only
    with self.accelerator.autocast():
        out, aux = model(input_ids=input_ids, attention_mask=attention_mask, fastgrpo_loss=loss_head, **router)
    if self._entropy_bonus_enabled:
        _entropy_bonus(self, mode, out, mask, coef, accumulation)
    loss = out.loss
    if aux is not None:  # TRL: coef·aux scaled for gradient accumulation like the policy loss
        loss = loss + self.router_aux_loss_coef * aux / accumulation
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()).mean().item())
    _log_metrics(self, mode, out, inputs, mask, old, ref, config)
    return loss


def _entropy_bonus(self: Any, mode: str, out: LossOutput, mask: Tensor, coef: float, accumulation: int) -> None:
    """The entropy-bonus bookkeeping of TRL's ``_compute_loss``: the ``policy_loss`` metric (the loss without the
    bonus, before the accumulation scaling), the adaptive controller's update and the ``entropy_coef`` metric.

    The controller (``use_adaptive_entropy``) keeps TRL's state on the trainer (``entropy_coef``,
    ``_last_world_entropy``, ``_entropy_window_stats``), so TRL's own checkpointing saves and restores it: the
    token-weighted entropy of the accumulation window, summed over ranks at the optimizer-step boundary, moves the
    coefficient by ``entropy_coef_delta`` within [``entropy_coef_min``, ``entropy_coef_max``] (up when at or below
    ``entropy_target``), and the next window applies it only if that entropy was at or below the target."""
    args, metrics = self.args, self._metrics[mode]
    entropy = out.entropy
    assert entropy is not None  # the loss ran with return_entropy=True
    effective = mask.float()
    if self.top_entropy_quantile < 1.0:
        effective = effective * self.get_high_entropy_mask(entropy, mask, 1 - self.top_entropy_quantile)
    bonus = (entropy * effective).sum() / effective.sum().clamp(min=1.0) / accumulation
    policy = out.loss.detach() + coef * bonus
    if self.loss_type not in _GLOBAL_COUNT:
        policy = policy * accumulation
    metrics["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
    if self.use_adaptive_entropy and mode == "train":
        stats = torch.stack([(entropy * effective).sum(), effective.sum()])
        window = self._entropy_window_stats
        self._entropy_window_stats = stats if window is None else window + stats
        if self.accelerator.sync_gradients:  # the last micro-batch of the window
            total = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
            world_entropy = (total[0] / total[1].clamp(min=1.0)).item()
            if world_entropy <= args.entropy_target:
                self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
            else:
                self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
            self._last_world_entropy = world_entropy
            self._entropy_window_stats = None
    if mode == "train" and self.accelerator.sync_gradients:
        metrics["entropy_coef"].append(self.entropy_coef)


def _vespo_weight(
    args: Any, lp: Tensor, old: Optional[Tensor], mask: Tensor, advantages: Tensor, is_ratio: Optional[Tensor]
) -> Tensor:
    """φ(w) per sequence, [B, 1], for TRL's ``vespo/phi_seq_mean`` metric: w = e^(Σ_t m·clamp(log r, ±20)
    [+ Σ_t clamp(log IS, log 1e-8, 20)]) with log w clamped to [log 1e-8, 20], φ(w) = e^(λ + k·log w − λ·w)."""
    floor = math.log(1e-8)
    log_r = torch.zeros_like(lp) if old is None else (lp - old).clamp(-20.0, 20.0)
    log_w = (log_r * mask).sum(-1, keepdim=True)
    if is_ratio is not None:  # every position, as TRL (its ratio is 1 at masked tokens)
        log_w = log_w + torch.log(is_ratio).clamp(floor, 20.0).sum(-1, keepdim=True)
    log_w = log_w.clamp(floor, 20.0)
    positive = advantages >= 0
    k = torch.where(positive, args.vespo_k_pos, args.vespo_k_neg)
    lam = torch.where(positive, args.vespo_lambda_pos, args.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _log_metrics(
    self: Any,
    mode: str,
    out: LossOutput,
    inputs: dict,
    mask: Tensor,
    old: Optional[Tensor],
    ref: Optional[Tensor],
    config: Any,
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

    if ref is not None:
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        metrics["kl"].append(global_masked_mean(kl * ratio if config.kl_ratio_weighted else kl))
    metrics["entropy"].append(global_masked_mean(entropy))
    if self.loss_type == "cispo":
        metrics["cispo_clip_ratio"].append(global_masked_mean(((ratio > self.epsilon_high) & (advantages > 0)).float()))
    elif self.loss_type == "vespo":
        phi = _vespo_weight(self.args, lp, old, mask, advantages, inputs.get("importance_sampling_ratio"))
        metrics["vespo/phi_seq_mean"].append(global_masked_mean(phi))
    elif self.loss_type != "sapo":
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
