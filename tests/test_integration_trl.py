"""fastgrpo.integrations.trl inside the real trl.GRPOTrainer (TRL ≥ 1.16), on a tiny randomly initialized
Qwen2 built from a config and a character tokenizer built here (no downloads).

Two levels: (1) the patched ``_compute_loss`` against TRL's own on the same hand-made batch (every loss type,
KL, sequence-level ratios, off-policy data, vLLM IS ratios, entropy mask/bonus): loss, every parameter's
gradient and the logged metrics; (2) whole ``train()`` runs from the same seed, once with TRL's loss and once
patched: logged losses, metrics, gradient norms and the parameters after the steps."""

import copy
import math

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is installed by the test extra; see README")
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    FalconH1Config,
    FalconH1ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from fastgrpo.integrations.trl import patch_grpo_trainer  # noqa: E402

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 "


def make_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def make_model(vocab_size, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
        **extra,
    )
    return Qwen2ForCausalLM(cfg)


def make_falcon_h1(vocab_size, seed=0):
    """A Mamba/attention hybrid whose ``prepare_inputs_for_generation(input_ids, **kwargs)`` makes generate()
    check its model_kwargs against forward's signature (as NemotronH, Bamba, Zamba do); its LM head multiplies
    the logits (lm_head_multiplier), which the loss path must apply too."""
    torch.manual_seed(seed)
    cfg = FalconH1Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_chunk_size=16,
        lm_head_multiplier=0.5,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    return FalconH1ForCausalLM(cfg)


def count_a(completions, **_):
    return [float(c.count("a")) - 0.1 * len(c) for c in completions]


def make_trainer(tmp_path, *, model=None, max_steps=2, peft_config=None, reward_funcs=count_a, **overrides):
    tok = make_tokenizer()
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_generations=4,
        num_iterations=2,
        max_completion_length=8,
        max_steps=max_steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        use_cpu=True,
        learning_rate=0.5,
        optim="sgd",
        disable_tqdm=True,
        epsilon=0.1,
        bf16=False,
    )
    options.update(overrides)
    dataset = Dataset.from_dict({"prompt": ["abc", "hello", "xyz", "q"] * 8})
    if model is None:  # a saved model: a non-zero beta makes TRL load the reference model from its path
        model = str(tmp_path / "model")
        make_model(len(tok)).save_pretrained(model)
    return GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=GRPOConfig(**options),
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft_config,
    )


def batch(vocab_size, *, B=8, P=3, T=7, seed=1):
    """A batch as ``_generate_and_score_completions`` returns it, with off-policy old/ref/sampling log-probs."""
    g = torch.Generator().manual_seed(seed)
    completion_mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (B,), generator=g)[:, None]).long()
    completion_mask[0] = 1
    old = -3.5 + 0.4 * torch.randn(B, T, generator=g)
    return dict(
        prompt_ids=torch.randint(2, vocab_size, (B, P), generator=g),
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        completion_ids=torch.randint(2, vocab_size, (B, T), generator=g),
        completion_mask=completion_mask,
        advantages=torch.randn(B, generator=g),
        old_per_token_logps=old,
        ref_per_token_logps=old + 0.3 * torch.randn(B, T, generator=g),
        sampling_per_token_logps=old + 0.5 * torch.randn(B, T, generator=g),
        importance_sampling_ratio=torch.rand(B, T, generator=g) + 0.5,
        num_items_in_batch=3.0 * completion_mask.sum().float(),
    )


def loss_grads_metrics(trainer, compute, inputs):
    mode = "train" if trainer.model.training else "eval"
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics[mode].clear()
    loss = compute(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics[mode].items()}


def compute_loss_once(trainer, patched):
    """loss_grads_metrics of one training micro-batch (of a 2-step accumulation window) on the hand-made batch,
    with TRL's loss or, patched, fastgrpo's."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # set by train()
    if patched:
        patch_grpo_trainer(trainer)
    return loss_grads_metrics(trainer, trainer._compute_loss, batch(trainer.model.config.vocab_size))


CASES = [dict(loss_type=t) for t in LOSS_TYPES] + [
    dict(loss_type="grpo", beta=0.05, use_bias_correction_kl=True),
    dict(loss_type="dapo", beta=0.04, delta=1.5, epsilon_high=0.28),
    dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="bnpo", top_entropy_quantile=0.5),
    dict(loss_type="dapo", off_policy_mask_threshold=0.05),
    dict(loss_type="grpo", entropy_coef=0.01),
    dict(loss_type="dapo", entropy_coef=0.01),
    dict(loss_type="cispo", epsilon_high=1.2, vllm=True),
    dict(loss_type="grpo", temperature=0.7, vllm=True),
    dict(loss_type="dapo", beta=0.04, on_policy=True),  # no old log-probs: TRL uses ℓ.detach()
    dict(loss_type="bnpo", tool_mask=True),
    dict(loss_type="dapo", eval_mode=True),  # no accumulation scaling in eval
    dict(loss_type="dr_grpo", eval_mode=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_compute_loss_matches_trl(tmp_path, case):
    case = dict(case)
    vllm, on_policy = case.pop("vllm", False), case.pop("on_policy", False)
    tool_mask, eval_mode = case.pop("tool_mask", False), case.pop("eval_mode", False)
    trainer = make_trainer(tmp_path, **case)
    trainer.model.train(not eval_mode)
    trainer.current_gradient_accumulation_steps = 2  # set by train(): a micro-batch of a 2-step window
    if vllm:  # the IS-ratio path reads only these two attributes (a vLLM server cannot run here)
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    inputs = batch(trainer.model.config.vocab_size)
    if on_policy:
        del inputs["old_per_token_logps"]
    if tool_mask:  # tool-call tokens are excluded from the loss
        inputs["tool_mask"] = (torch.arange(7) % 3 != 1).long().expand(8, 7).clone()
    expected = loss_grads_metrics(trainer, trainer._compute_loss, inputs)
    patch_grpo_trainer(trainer)
    ours = loss_grads_metrics(trainer, trainer._compute_loss, inputs)
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == expected[1].keys()
    for name in expected[1]:
        torch.testing.assert_close(ours[1][name], expected[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert ours[2].keys() == expected[2].keys()
    for name, value in expected[2].items():
        assert math.isclose(ours[2][name], value, rel_tol=1e-5, abs_tol=1e-6), (name, ours[2][name], value)


def test_cast_lm_head_to_fp32_on_a_bf16_model(tmp_path):
    """TRL's cast_lm_head_to_fp32: a bf16 backbone, the head in fp32 outside autocast; both paths then take the
    same fp32 GEMM, so they agree to fp32 rounding (the bf16 parameters' gradients to one bf16 rounding)."""
    results = []
    for patched in (False, True):
        model = make_model(len(make_tokenizer())).to(torch.bfloat16)
        trainer = make_trainer(
            tmp_path / str(patched), model=model, bf16=True, cast_lm_head_to_fp32=True, loss_type="dapo"
        )
        assert trainer.model.lm_head.weight.dtype == torch.float32
        results.append(compute_loss_once(trainer, patched))
    (loss_trl, grads_trl, _), (loss_ours, grads_ours, _) = results
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_ours["lm_head.weight"], grads_trl["lm_head.weight"], rtol=1e-4, atol=1e-6)
    for name, g in grads_trl.items():
        torch.testing.assert_close(grads_ours[name].float(), g.float(), rtol=2e-2, atol=1e-5, msg=name)


def test_peft_lora_backbone(tmp_path):
    peft = pytest.importorskip("peft")
    results = []
    for patched in (False, True):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        trainer = make_trainer(
            tmp_path / str(patched),
            model=make_model(len(make_tokenizer())),
            peft_config=config,
            loss_type="grpo",
            beta=0.0,
        )
        results.append(compute_loss_once(trainer, patched))
    (loss_trl, grads_trl, metrics_trl), (loss_ours, grads_ours, metrics_ours) = results
    assert grads_trl and all("lora" in name for name in grads_trl)
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-5, atol=1e-6)
    for name, g in grads_trl.items():
        torch.testing.assert_close(grads_ours[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert metrics_ours.keys() == metrics_trl.keys()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_compute_loss_under_bf16_autocast(tmp_path, loss_type):
    """TRL's default bf16=True runs the LM head under autocast: both take bf16 GEMM operands (TRL also rounds
    the logits to bf16, fastgrpo keeps them fp32), so fastgrpo's gradients must be as close as TRL's to the
    fp32 run's; the scalar loss is judged against one bf16 rounding (a single value's error is mostly
    cancellation noise)."""
    results = {}
    for bf16, patched in ((False, False), (True, False), (True, True)):
        trainer = make_trainer(tmp_path / f"{bf16}{patched}", loss_type=loss_type, bf16=bf16, beta=0.04)
        results[bf16, patched] = compute_loss_once(trainer, patched)
    exact, trl_bf16, ours_bf16 = results[False, False], results[True, False], results[True, True]
    assert abs(ours_bf16[0] - exact[0]) <= 2**-8 * abs(exact[0])  # one bf16 rounding of the loss

    def error(result, names):  # over whole parameters, not noise (the key biases' gradients are ~0 exactly)
        return torch.stack([(result[1][n] - exact[1][n]).norm() for n in names]).norm()

    for names in (list(exact[1]), ["lm_head.weight"]):
        assert error(ours_bf16, names) <= 1.5 * error(trl_bf16, names), names


@pytest.mark.parametrize("loss_type", LOSS_TYPES + ["sequence"])
def test_training_matches_trl(tmp_path, loss_type):
    """Three optimizer steps (two generations, two iterations each, two accumulation steps) from one seed.
    Plain SGD: Adam would turn the rounding noise of gradients that are zero in exact arithmetic (the key
    biases') into full-size steps, in either run."""
    extra = (
        dict(loss_type="grpo", importance_sampling_level="sequence")
        if loss_type == "sequence"
        else dict(loss_type=loss_type)
    )
    extra["beta"] = 0.02 if loss_type in ("grpo", "dapo") else 0.0
    runs = []
    for patched in (False, True):
        trainer = make_trainer(tmp_path / str(patched), max_steps=3, **extra)
        if patched:
            patch_grpo_trainer(trainer)
        trainer.train()
        runs.append((trainer.state.log_history[:-1], dict(trainer.model.named_parameters())))
    (logs_trl, params_trl), (logs_ours, params_ours) = runs
    assert len(logs_trl) == len(logs_ours) == 3
    skip = {"step_time", "epoch", "step", "learning_rate"}
    for step_trl, step_ours in zip(logs_trl, logs_ours):
        assert step_trl.keys() == step_ours.keys()
        for key in step_trl.keys() - skip:
            assert math.isclose(step_ours[key], step_trl[key], rel_tol=1e-4, abs_tol=1e-5), (key, step_ours, step_trl)
    if loss_type != "sapo":  # the second step reuses the first generation after an update: tokens get clipped
        assert any(v > 0 for k, v in logs_trl[1].items() if k.startswith(("clip_ratio/", "cispo_clip")))
    for name, p in params_trl.items():
        torch.testing.assert_close(params_ours[name], p, rtol=1e-4, atol=1e-5, msg=name)


def test_patch_keeps_generation_and_rejects_unsupported(tmp_path):
    trainer = make_trainer(tmp_path)
    ids = torch.tensor([[2, 3, 4]])
    before = trainer.model(input_ids=ids).logits
    patch_grpo_trainer(trainer)
    torch.testing.assert_close(trainer.model(input_ids=ids).logits, before)  # plain forward unchanged
    for loss_type in ("dapo", "cispo"):  # the bonus's token count over the entropy mask is not a normalizer
        with pytest.raises(ValueError, match="top_entropy_quantile"):
            patch_grpo_trainer(
                make_trainer(tmp_path, loss_type=loss_type, use_adaptive_entropy=True, top_entropy_quantile=0.5)
            )
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):  # TRL checks it only with a vLLM server
        trainer = make_trainer(tmp_path, loss_type="vespo")
        trainer.args.use_vllm = True
        patch_grpo_trainer(trainer)


def test_import_patches_nothing():
    import fastgrpo.integrations.trl  # noqa: F401

    assert GRPOTrainer._compute_loss.__module__.startswith("trl")
    model = make_model(len(make_tokenizer()))
    assert "fastgrpo" not in type(model.forward).__name__ and not getattr(model, "_fastgrpo_forward", False)
    copy.deepcopy(model)


def test_patched_mamba_hybrid_generates_as_unpatched(tmp_path):
    """The patched forward keeps the original's parameter names visible: generate() on a model whose
    prepare_inputs_for_generation takes (input_ids, **kwargs) used to reject attention_mask."""
    trainer = make_trainer(tmp_path, model=make_falcon_h1(len(make_tokenizer())))
    ids = torch.tensor([[0, 0, 2, 3], [4, 5, 6, 7]])
    attention_mask = (ids != 0).long()  # left padding, as TRL generates
    kwargs = dict(input_ids=ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    expected = trainer.model.generate(**kwargs)
    patch_grpo_trainer(trainer)
    torch.testing.assert_close(trainer.model.generate(**kwargs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_compute_loss_matches_trl_on_a_mamba_hybrid(tmp_path, loss_type):
    """The loss path on Falcon-H1: backbone hidden states, then its lm_head_multiplier."""
    results = []
    for patched in (False, True):
        trainer = make_trainer(
            tmp_path / str(patched), model=make_falcon_h1(len(make_tokenizer())), loss_type=loss_type
        )
        results.append(compute_loss_once(trainer, patched))
    (loss_trl, grads_trl, metrics_trl), (loss_ours, grads_ours, metrics_ours) = results
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-5, atol=1e-6)
    assert grads_ours.keys() == grads_trl.keys()
    for name, g in grads_trl.items():
        torch.testing.assert_close(grads_ours[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert metrics_ours.keys() == metrics_trl.keys()
    for name, value in metrics_trl.items():
        assert math.isclose(metrics_ours[name], value, rel_tol=1e-5, abs_tol=1e-6), (name, metrics_ours[name], value)


def test_training_matches_trl_on_a_mamba_hybrid(tmp_path):
    """A whole patched train() on Falcon-H1 (TRL generates with the patched model) against TRL's own."""
    runs = []
    for patched in (False, True):
        trainer = make_trainer(
            tmp_path / str(patched), model=make_falcon_h1(len(make_tokenizer())), max_steps=2, loss_type="dapo"
        )
        if patched:
            patch_grpo_trainer(trainer)
        trainer.train()
        runs.append((trainer.state.log_history[:-1], dict(trainer.model.named_parameters())))
    (logs_trl, params_trl), (logs_ours, params_ours) = runs
    assert len(logs_trl) == len(logs_ours) == 2
    for step_trl, step_ours in zip(logs_trl, logs_ours):
        assert step_trl.keys() == step_ours.keys()
        for key in step_trl.keys() - {"step_time", "epoch", "step", "learning_rate"}:
            assert math.isclose(step_ours[key], step_trl[key], rel_tol=1e-4, abs_tol=1e-5), (key, step_ours, step_trl)
    for name, p in params_trl.items():
        torch.testing.assert_close(params_ours[name], p, rtol=1e-4, atol=1e-5, msg=name)
