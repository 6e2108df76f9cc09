"""Fused GRPO-family loss on logits for token-local variants: loss and logit gradient in one launch.

Persistent programs over token rows (kernels/token_logprobs.py: ``row_programs``, as many rows in flight as fill
half of L2), each row:
  1. streamed once (online log-sum-exp in fp32, one exponential per element, as ``token_logprobs``) → ℓ_t, H_t;
  2. evaluates the per-token objective of MATH §2 on scalars: ratio, policy term (ppo with ratio cap and
     dual clip, cispo, sapo, reinforce, dppo_tv, dppo_kl, dro), KL estimator with clamps / straight-through /
     ratio weighting, the teacher's KL (on-policy distillation), and their derivatives c_t = ∂L/∂ℓ_t and
     d_t = ∂L/∂H_t;
  3. (WRITE_GRAD) streamed again, from L2 since the rows in flight fit there, and writes
        ∂L/∂z_v = [c_t·(1[v = y] − p_v) − d_t·p_v·(log p_v + H_t)] / τ.
So the logits should make one trip from HBM and the gradient one trip back. "Token-local" means every quantity
of step 2 depends on this token alone: sequence ratios (GSPO, GMPO), the entropy quantile mask and the
off-policy mask need a statistic over other tokens first and take the two-phase path instead.

The advantage comes per token, or (``adv_from_rewards``) from the raw rewards of the token's group, normalized
in the kernel by ``group_advantage`` (MATH §3). Aggregation, rollout importance weights, β, the entropy
coefficient, the teacher coefficient and ``loss_scale`` arrive folded into four per-token weights (w_policy, w_kl,
w_entropy, w_teacher) computed from the mask beforehand, so the loss is
Σ_t w_policy·P_t + w_kl·K_t − w_entropy·H_t + w_teacher·K^teacher_t (MATH §2.9). Variant choices are runtime
integers: they steer scalar code executed once per row, so they cost nothing and need no recompilation. The float
hyper-parameters (1/τ, clip bounds, clamps, taus, eps) come in device memory (``params_ptr``, laid out as
``SCALARS``), loaded once per program: a few scalar loads of the same cached words, nothing per element, and
torch.compile sees a tensor where a float argument would be specialized (a recompile per value). Unused bounds
are ±inf.
Masked tokens (w_policy = w_kl = w_entropy = w_teacher = 0 and mask 0) do no exp work and get a zero gradient row.
``python -m fastgrpo static`` reads the cost of each specialization off the SASS (bench/results/static_*.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import params as P
from .advantages import GROUP_BLOCK_CONSTEXPR, group_advantage
from .token_logprobs import LOG2E, group, row_statistics, write_grad_row, write_zero_row
from .token_logprobs import block_v as token_logprobs_block_v
from .token_logprobs import num_warps as token_logprobs_num_warps

# The ops' named parameters (kernels/params.py) as the constexprs Triton reads from module globals: rows of
# `tokens`, entries of `params`, values of the `policy` and `kl` codes. Looked up by name, so an order changed
# there is followed here; tests/test_op_params.py pins them.
_ROW = {name: tl.constexpr(i) for i, name in enumerate(P.TOKEN_INPUTS)}
MASK, ADVANTAGES, OLD_LOGPROBS, REF_LOGPROBS = (
    _ROW["mask"],
    _ROW["advantages"],
    _ROW["old_logprobs"],
    _ROW["ref_logprobs"],
)
W_POLICY, W_KL, W_ENTROPY = _ROW["w_policy"], _ROW["w_kl"], _ROW["w_entropy"]
TEACHER_LOGPROBS, W_TEACHER = _ROW["teacher_logprobs"], _ROW["w_teacher"]
_OUT = {name: tl.constexpr(i) for i, name in enumerate(P.TOKEN_OUTPUTS)}
OUT_LOGPROBS, OUT_ENTROPY, OUT_LOSS_TERMS, OUT_RATIO = (
    _OUT["logprobs"],
    _OUT["entropy"],
    _OUT["loss_terms"],
    _OUT["ratio"],
)
OUT_GRAD_LOGPROBS, OUT_ADVANTAGES_USED = _OUT["grad_logprobs"], _OUT["advantages_used"]
OUT_PROB_SQ, OUT_PROB_SQ_LOGP, OUT_PROB_SQ_LOGP_SQ = _OUT["prob_sq"], _OUT["prob_sq_logp"], _OUT["prob_sq_logp_sq"]
NUM_OUTPUTS = tl.constexpr(len(P.TOKEN_OUTPUTS))
_PARAM = {name: tl.constexpr(i) for i, name in enumerate(P.SCALARS)}
INV_TEMPERATURE, EPS_LOW, EPS_HIGH, RATIO_CAP = (
    _PARAM[n] for n in ("inv_temperature", "eps_low", "eps_high", "ratio_cap")
)
DUAL_CLIP, LOG_RATIO_CLAMP, CISPO_LOW, CISPO_HIGH = (
    _PARAM[n] for n in ("dual_clip", "log_ratio_clamp", "cispo_low", "cispo_high")
)
SAPO_TAU_POS, SAPO_TAU_NEG, KL_INPUT_CLAMP, KL_OUTPUT_CLAMP = (
    _PARAM[n] for n in ("sapo_tau_pos", "sapo_tau_neg", "kl_input_clamp", "kl_output_clamp")
)
KL_IS_CAP, DRO_BETA, TEACHER_COEF, TEACHER_INPUT_CLAMP, TEACHER_OUTPUT_CLAMP = (
    _PARAM[n] for n in ("kl_is_cap", "dro_beta", "teacher_coef", "teacher_input_clamp", "teacher_output_clamp")
)
ADV_EPS, BATCH_STD = _PARAM["adv_eps"], _PARAM["batch_std"]
PPO, CISPO, SAPO, REINFORCE = (tl.constexpr(P.POLICY[n]) for n in ("ppo", "cispo", "sapo", "reinforce"))
DPPO_TV, DPPO_KL, DRO = (tl.constexpr(P.POLICY[n]) for n in ("dppo_tv", "dppo_kl", "dro"))
KL_GRAD_K2, KL_GRAD_K2_IS = (tl.constexpr(P.KL_GRADIENT[n]) for n in ("k2", "k2_importance_weighted"))
KL_NONE, KL_K1, KL_ABS, KL_K2, KL_K3 = (tl.constexpr(P.KL[n]) for n in ("none", "k1", "abs", "k2", "k3"))


# The launch table. The fused loss runs few programs (row_programs: its rows in flight fit in half of L2, 86 at
# bf16 V = 151936 on an H100), so each must keep enough loads in flight by itself: HBM needs about bandwidth ×
# loaded latency in flight (3.35 TB/s × ~1 µs ≈ 3.4 MB on an H100). A tile of 16384 logits over 32 warps is
# 32 bytes per thread per load round, 32 KB per program, 2.8 MB over 86 programs (a 4096 tile over 8 warps: 8 KB,
# 0.7 MB). 1024 threads leave 64 registers each: the SASS shows 52 (62 with the entropy), no spills.
MAX_BLOCK_V = 16384


def block_v(vocab: int) -> int:
    return token_logprobs_block_v(vocab, MAX_BLOCK_V)


def num_warps(block: int) -> int:
    """token_logprobs' table up to its largest tile, then 16 logits per thread (32 warps at 16384)."""
    return max(token_logprobs_num_warps(block), min(32, block // 512))


@triton.jit
def _half_where_tied(a, b, da, db):
    """Derivative of min(a, b) as torch.minimum defines it: the smaller side's, half of each on a tie."""
    return tl.where(a < b, da, tl.where(b < a, db, 0.5 * (da + db)))


# tl.minimum / tl.maximum return the other operand for a NaN (fmin/fmax), which would turn a NaN log-prob or
# advantage into a finite loss. These selects keep a NaN (as torch.minimum / torch.clamp do), and a clamp to ±inf
# stays the identity.
@triton.jit
def _min(a, b):
    return tl.where((a < b) | (a != a), a, b)


@triton.jit
def _clamp(x, lo, hi):
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _expm1(x):
    """e^x − 1 to fp32 accuracy near 0, where exp(x) − 1 cancels (Triton has no portable expm1): Taylor to x⁹
    for |x| < 0.5 (truncation < 1e-9 relative), exp(x) − 1 beyond (error ≤ 2.5× that of exp)."""
    p = 1.0 / 362880.0
    p = p * x + 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    p = p * x + 1.0
    return tl.where(tl.abs(x) < 0.5, p * x, tl.exp(x) - 1.0)


@triton.jit
def _kl_estimate(d, kind, input_clamp, output_clamp):
    """A per-token KL estimate of D and its derivative: k1, |D|, D²/2 or k3 = e^(−D) − 1 + D as expm1(−D) + D (the
    order that loses the least to cancellation), D clamped to ±input_clamp before and the estimate to
    ±output_clamp after. A clamped input or a saturated estimate has derivative 0, selected, not multiplied: k3 and
    its derivative are inf at D < −88 (no output clamp, or an input clamp above 88), and 0·inf would be NaN.
    ``kind`` KL_NONE gives NaN: callers select it away; another unknown code gives a NaN loss."""
    dc = _clamp(d, -input_clamp, input_clamp)
    em1 = _expm1(-dc)
    k3 = kind == KL_K3
    k = tl.where(
        kind == KL_K1,
        dc,
        tl.where(
            kind == KL_ABS, tl.abs(dc), tl.where(kind == KL_K2, 0.5 * dc * dc, tl.where(k3, em1 + dc, float("nan")))
        ),
    )
    dk = tl.where(
        kind == KL_K1,
        1.0,
        tl.where(
            kind == KL_ABS,
            tl.where(dc > 0.0, 1.0, tl.where(dc < 0.0, -1.0, 0.0)),
            tl.where(kind == KL_K2, dc, tl.where(k3, -em1, float("nan"))),
        ),
    )
    dk = tl.where((tl.abs(d) <= input_clamp) & (tl.abs(k) <= output_clamp), dk, 0.0)
    return _clamp(k, -output_clamp, output_clamp), dk


@triton.jit
def grpo_loss_fwd_kernel(
    # pointers: inputs. tokens_ptr: [TOKEN_INPUTS, N] fp32 rows; params_ptr: the float hyper-parameters (SCALARS)
    logits_ptr,
    targets_ptr,
    tokens_ptr,
    rewards_ptr,
    seq_ptr,
    params_ptr,
    # pointers: outputs. outputs_ptr: [TOKEN_OUTPUTS, N] fp32 rows; grad_logits_ptr may be the logits buffer
    # itself (inplace_grad): each element is read before the same program overwrites it
    outputs_ptr,
    grad_logits_ptr,
    # shapes and the strides of the leading dims (the vocabulary dims are contiguous)
    N,
    T,
    V,
    stride_b,
    stride_t,
    grad_stride_b,
    grad_stride_t,
    # variant codes (CODES)
    policy,
    kl,
    kl_straight,
    kl_ratio_weighted,
    has_old,
    teacher_kl,
    teacher_in_advantage,
    teacher_at_old,
    adv_from_rewards,
    group_size,
    adv_estimator,
    adv_divide,
    adv_use_batch_std,
    adv_singleton_raw,
    # meta-parameters
    HAS_ENTROPY: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    inv_temperature = tl.load(params_ptr + INV_TEMPERATURE)
    for i in range(tl.program_id(0), N, tl.num_programs(0)):  # persistent: rows pid, pid + P, ...
        row = tl.cast(i, tl.int64)  # a new name: Triton 3.2 keeps a loop variable's type
        out = grad_logits_ptr + (row // T) * grad_stride_b + (row % T) * grad_stride_t
        if tl.load(tokens_ptr + MASK * tl.cast(N, tl.int64) + row) == 0:  # masked: zeros, no exp work
            for j in tl.static_range(NUM_OUTPUTS):
                tl.store(outputs_ptr + j * tl.cast(N, tl.int64) + row, 0.0)
            if WRITE_GRAD:
                write_zero_row(out, V, BLOCK_V)
        else:
            base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
            _token_loss(
                base,
                out,
                row,
                targets_ptr,
                tokens_ptr,
                rewards_ptr,
                seq_ptr,
                params_ptr,
                outputs_ptr,
                N,
                V,
                inv_temperature,
                policy,
                kl,
                kl_straight,
                kl_ratio_weighted,
                has_old,
                teacher_kl,
                teacher_in_advantage,
                teacher_at_old,
                adv_from_rewards,
                group_size,
                adv_estimator,
                adv_divide,
                adv_use_batch_std,
                adv_singleton_raw,
                HAS_ENTROPY,
                WRITE_GRAD,
                R,
                BLOCK_V,
            )


@triton.jit
def _token_loss(
    base,
    out,
    row,
    targets_ptr,
    tokens_ptr,
    rewards_ptr,
    seq_ptr,
    params_ptr,
    outputs_ptr,
    N,
    V,
    inv_temperature,
    policy,
    kl,
    kl_straight,
    kl_ratio_weighted,
    has_old,
    teacher_kl,
    teacher_in_advantage,
    teacher_at_old,
    adv_from_rewards,
    group_size,
    adv_estimator,
    adv_divide,
    adv_use_batch_std,
    adv_singleton_raw,
    HAS_ENTROPY: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One unmasked token row: its statistics, its objective, its gradient row."""
    N = tl.cast(N, tl.int64)  # k·N + row, 64-bit (k·N in i32 would overflow past ~300M tokens)

    # 1. one pass over the row
    target = tl.load(targets_ptr + row).to(tl.int64)
    lp, _max, _log_sum, ent, sq, sq_logp, sq_logp_sq, m_raw, log2_s, x_target = row_statistics(
        base, target, V, inv_temperature, HAS_ENTROPY, R, BLOCK_V
    )

    # 2. the per-token objective and its derivative w.r.t. ℓ (scalars); the advantage as given, or from the
    #    raw rewards of this token's group (the reward side fused into the same launch)
    A = tl.load(tokens_ptr + ADVANTAGES * N + row)
    if adv_from_rewards != 0:
        A, _group_mean, _group_std = group_advantage(
            rewards_ptr,
            tl.load(seq_ptr + row),
            group_size,
            adv_estimator,
            adv_divide,
            adv_use_batch_std,
            adv_singleton_raw,
            tl.load(params_ptr + ADV_EPS),
            tl.load(params_ptr + BATCH_STD),
            GROUP_BLOCK_CONSTEXPR,
        )
    old = tl.where(has_old != 0, tl.load(tokens_ptr + OLD_LOGPROBS * N + row), lp)
    # on-policy distillation, policy-gradient form: the reverse KL to the teacher as a token reward
    teacher = tl.load(tokens_ptr + TEACHER_LOGPROBS * N + row)
    teacher_input_clamp = tl.load(params_ptr + TEACHER_INPUT_CLAMP)
    teacher_output_clamp = tl.load(params_ptr + TEACHER_OUTPUT_CLAMP)
    if (teacher_kl != KL_NONE) & (teacher_in_advantage != 0):
        student = tl.where(teacher_at_old != 0, old, lp)
        k_reward, _dk_reward = _kl_estimate(student - teacher, teacher_kl, teacher_input_clamp, teacher_output_clamp)
        A = A - tl.load(params_ptr + TEACHER_COEF) * k_reward
    log_r_raw = lp - old
    log_ratio_clamp = tl.load(params_ptr + LOG_RATIO_CLAMP)
    log_r = _clamp(log_r_raw, -log_ratio_clamp, log_ratio_clamp)
    rho = tl.exp(log_r)
    d_rho = tl.where(tl.abs(log_r_raw) <= log_ratio_clamp, rho, 0.0)  # ∂ρ/∂ℓ

    # ppo: −min(min(ρ, δ)·A, clip(ρ)·A), then dual clip where A < 0. At ρ = inf the clipped branch's
    # derivative is a plain 0 (selected, never multiplied by ρ).
    ratio_cap = tl.load(params_ptr + RATIO_CAP)
    eps_low = tl.load(params_ptr + EPS_LOW)
    eps_high = tl.load(params_ptr + EPS_HIGH)
    capped = _min(rho, ratio_cap)
    d_capped = tl.where(rho <= ratio_cap, d_rho, 0.0)
    clipped = _clamp(rho, 1.0 - eps_low, 1.0 + eps_high)
    d_clipped = tl.where((rho >= 1.0 - eps_low) & (rho <= 1.0 + eps_high), d_rho, 0.0)
    p_ppo = -_min(capped * A, clipped * A)
    dp_ppo = -_half_where_tied(capped * A, clipped * A, d_capped * A, d_clipped * A)
    floor = -tl.load(params_ptr + DUAL_CLIP) * A
    dp_ppo = tl.where(A < 0.0, _half_where_tied(p_ppo, floor, dp_ppo, 0.0), dp_ppo)
    p_ppo = tl.where(A < 0.0, _min(p_ppo, floor), p_ppo)
    # cispo: −sg[clamp(ρ, lo, hi)]·A·ℓ
    w_cispo = _clamp(rho, tl.load(params_ptr + CISPO_LOW), tl.load(params_ptr + CISPO_HIGH))
    # sapo: −(4/τ)·σ(τ(ρ − 1))·A; where σ' underflows to 0 the derivative σ'·ρ is 0 (e^(−τρ)·ρ → 0), not 0·inf
    tau = tl.where(A > 0.0, tl.load(params_ptr + SAPO_TAU_POS), tl.load(params_ptr + SAPO_TAU_NEG))
    gate = tl.sigmoid(tau * (rho - 1.0))
    d_gate = gate * (1.0 - gate)
    dp_sapo = tl.where(d_gate == 0.0, 0.0, -4.0 * d_gate * A * d_rho)

    # dppo_tv / dppo_kl: −sg[min(ρ, cap)]·A·ℓ inside the trust region of the sampled token's probability
    prob = tl.exp(lp)
    old_prob = tl.exp(old)
    binary_kl = old_prob * (old - lp) + (1.0 - old_prob) * tl.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
    valid = tl.where(
        policy == DPPO_TV,
        tl.where(A > 0.0, prob - old_prob <= eps_high, prob - old_prob >= -eps_low),
        tl.where(A > 0.0, (binary_kl <= eps_high) | (prob <= old_prob), (binary_kl <= eps_low) | (prob >= old_prob)),
    )
    w_dppo = tl.where(valid, capped, 0.0)
    # dro: −(ℓ·A − ½β·(log r)²)
    dro_beta = tl.load(params_ptr + DRO_BETA)
    dp_dro = -(A - tl.where(tl.abs(log_r_raw) <= log_ratio_clamp, dro_beta * log_r, 0.0))

    # a code this build does not know gives a NaN loss, never another variant's value
    reinforce = policy == REINFORCE
    dppo = (policy == DPPO_TV) | (policy == DPPO_KL)
    p_term = tl.where(
        policy == PPO,
        p_ppo,
        tl.where(
            policy == CISPO,
            -w_cispo * A * lp,
            tl.where(
                policy == SAPO,
                -(4.0 / tau) * gate * A,
                tl.where(
                    reinforce,
                    -A * lp,
                    tl.where(
                        dppo,
                        -A * w_dppo * lp,
                        tl.where(policy == DRO, -(lp * A - 0.5 * dro_beta * log_r * log_r), float("nan")),
                    ),
                ),
            ),
        ),
    )
    dp_term = tl.where(
        policy == PPO,
        dp_ppo,
        tl.where(
            policy == CISPO,
            -w_cispo * A,
            tl.where(
                policy == SAPO,
                dp_sapo,
                tl.where(reinforce, -A, tl.where(dppo, -A * w_dppo, tl.where(policy == DRO, dp_dro, float("nan")))),
            ),
        ),
    )

    # KL estimate of D = ℓ − ℓ^ref
    d = lp - tl.load(tokens_ptr + REF_LOGPROBS * N + row)
    k, dk = _kl_estimate(d, kl, tl.load(params_ptr + KL_INPUT_CLAMP), tl.load(params_ptr + KL_OUTPUT_CLAMP))
    # straight-through: the gradient of k2 of the raw D, importance-weighted by sg[min(ρ, cap)] to the old policy
    dk = tl.where(kl_straight == KL_GRAD_K2, d, dk)
    dk = tl.where(kl_straight == KL_GRAD_K2_IS, _min(tl.exp(lp - old), tl.load(params_ptr + KL_IS_CAP)) * d, dk)
    dk = tl.where(
        kl_ratio_weighted != 0,  # ρ or k may be inf: each product only where its factor is non-zero
        tl.where(dk == 0.0, 0.0, dk * rho) + tl.where(d_rho == 0.0, 0.0, k * d_rho),
        dk,
    )
    k = tl.where(kl_ratio_weighted != 0, k * rho, k)
    k = tl.where(kl == KL_NONE, 0.0, k)
    dk = tl.where(kl == KL_NONE, 0.0, dk)

    w_policy = tl.load(tokens_ptr + W_POLICY * N + row)
    w_kl = tl.load(tokens_ptr + W_KL * N + row)
    w_entropy = tl.load(tokens_ptr + W_ENTROPY * N + row)
    # the reverse KL to the teacher as a loss term (teacher_in_advantage = 0)
    k_teacher, dk_teacher = _kl_estimate(lp - teacher, teacher_kl, teacher_input_clamp, teacher_output_clamp)
    teacher_term = (teacher_kl != KL_NONE) & (teacher_in_advantage == 0)
    k_teacher = tl.where(teacher_term, k_teacher, 0.0)
    dk_teacher = tl.where(teacher_term, dk_teacher, 0.0)
    w_teacher = tl.load(tokens_ptr + W_TEACHER * N + row)
    c = w_policy * dp_term + w_kl * dk + w_teacher * dk_teacher
    tl.store(outputs_ptr + OUT_LOGPROBS * N + row, lp)
    tl.store(outputs_ptr + OUT_ENTROPY * N + row, ent)
    tl.store(
        outputs_ptr + OUT_LOSS_TERMS * N + row, w_policy * p_term + w_kl * k + w_teacher * k_teacher - w_entropy * ent
    )
    tl.store(outputs_ptr + OUT_RATIO * N + row, rho)
    tl.store(outputs_ptr + OUT_GRAD_LOGPROBS * N + row, c)
    tl.store(outputs_ptr + OUT_ADVANTAGES_USED * N + row, A)
    tl.store(outputs_ptr + OUT_PROB_SQ * N + row, sq)
    tl.store(outputs_ptr + OUT_PROB_SQ_LOGP * N + row, sq_logp)
    tl.store(outputs_ptr + OUT_PROB_SQ_LOGP_SQ * N + row, sq_logp_sq)

    # 3. the gradient row: c·(onehot − p) − w_H·(−p(log p + H)), over τ. In place (the logits, or the linear
    #    path's z chunk), the row being overwritten is the row step 1 read, the target logit included: the
    #    barrier makes every warp finish its reads before any warp writes. The reductions of step 1 are not
    #    relied on for that: a reduction over data that one warp holds may be lowered without a CTA barrier.
    if WRITE_GRAD:
        tl.debug_barrier()
        write_grad_row(
            out,
            base,
            target,
            x_target,
            V,
            1.0,
            m_raw,
            inv_temperature * LOG2E,
            log2_s,
            ent,
            c,
            -w_entropy,
            inv_temperature,
            HAS_ENTROPY,
            R,
            BLOCK_V,
        )


@triton.jit
def scale_grad_kernel(
    # pointers
    grad_ptr,
    scale_ptr,
    # shapes
    T,
    V,
    # strides of the leading dims (the last dim is contiguous)
    stride_b,
    stride_t,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    """grad *= scale in place over BLOCK elements of one row, skipped on the device when scale == 1 (the usual
    loss.backward()). Rows are addressed as the loss kernel addresses them, so a view such as logits[:, :-1]
    (the in-place gradient) is scaled where it lies and nothing around it is touched."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ptr = grad_ptr + (row // T) * stride_b + (row % T) * stride_t + cols
        g = tl.load(ptr, mask=cols < V).to(tl.float32)
        tl.store(ptr, (g * scale).to(grad_ptr.dtype.element_ty), mask=cols < V)


SCALE_BLOCK = 4096


def aot_specializations():
    """Every (kernel, signature, constexprs, num_warps) the launchers can produce (see tests/aot_compile.py). The
    smallest block also compiles with the arguments a GPU launch specializes to constants when they are 1: T
    (packed [N, V] logits) and N (one token)."""
    for dtype in ("fp32", "bf16", "fp16"):
        r = group(4 if dtype == "fp32" else 2)
        for block in (16, MAX_BLOCK_V):
            for has_entropy in (False, True):
                for write_grad in (False, True):
                    sig = P.aot_signature(
                        grpo_loss_fwd_kernel.arg_names,
                        logits_ptr=f"*{dtype}",
                        targets_ptr="*i64",
                        seq_ptr="*i64",
                        grad_logits_ptr=f"*{dtype}",
                    )
                    yield (
                        grpo_loss_fwd_kernel,
                        sig,
                        {"HAS_ENTROPY": has_entropy, "WRITE_GRAD": write_grad, "R": r, "BLOCK_V": block}
                        | ({"T": 1, "N": 1} if block == 16 else {}),
                        num_warps(block),
                    )
        yield (
            scale_grad_kernel,
            P.aot_signature(scale_grad_kernel.arg_names, grad_ptr=f"*{dtype}"),
            {"BLOCK": SCALE_BLOCK},
            4,
        )
