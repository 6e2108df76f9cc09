"""Token log-probs and entropy of the targets from logits: forward and backward Triton kernels + launchers.

Forward: a program streams a token row once in BLOCK_V chunks with an online log-sum-exp in fp32, then folds its
lanes. The reduction order depends on V, BLOCK_V and the row's own target only, never on the number of rows or on
which program takes the row, so a token's values are bitwise identical wherever it sits in any batch (batch
invariance). Writes ℓ, the row statistics of ``ROW_STATS`` (max M, log Σ e^(z/τ − M), and the sums over the
non-target entries Σ p², Σ p²·log p, Σ p²·(log p)² from which the loss reports its gradient norms) and
(HAS_ENTROPY) H per row, fp32.

Backward: a program reads the row once more and writes
    ∂/∂z_v = [g_ℓ·(1[v = y] − p_v) − g_H·p_v·(log p_v + H)] / τ,   log p_v = (z_v/τ − M) − log Σ.

Cost per element (what ``python -m fastgrpo static`` reads off the SASS). Each pass takes one exponential per
element: the logits are read as [BLOCK_V / R, R] tiles, R = 16 bytes of logits (one vector load per thread), and a
group of R shares one running offset, raised once per tile by the group's maximum (one exponential per group of R
to rescale its sums). Exponentials are exp2 with log2 e folded into the scale k = log2(e)/τ: each element is one
FADD, one FMUL and one MUFU.EX2, d = (x − m)·k with m the group's raw maximum. The difference comes first, on the
raw logits: exact near the maximum (0 at it) at any magnitude, where x·k − round(m·k) would carry the rounding
of m·k (2e-4 at 1e4, beyond 88, an overflow, at |x/τ| ≥ 2^31). The sums are kept in log2 units and turned into
natural logs once per row. The loop over full tiles carries no bounds mask and no per-element
target test: the target's tile and the last, partial tile are handled outside it, and the backward writes the
target's own entry (1[v = y]) once per row after its loop. No division runs per element.

Schedule (rows in flight). The gradient pass re-reads the row the statistics pass just read; that read comes from
L2 only if every row in flight still sits there. With one program per row, every resident program holds a row:
at V = 151936 bf16 (304 KB) about 400 rows, 120 MB, against H100's 50 MB of L2, and the second read goes to HBM.
So the kernels are persistent: for the fused loss with its gradient (the one kernel that reads a row twice;
the others get a program per row) ``row_programs`` launches P = ⌊L2/2 ÷ row bytes⌋ programs (at most one per row),
each looping over rows r = pid, pid + P, …, so at most P rows are in flight: H100/H200 (50 MB L2), bf16 V = 151936:
P = 86 programs, 25 MB; V = 256000: P = 51, 25 MB; fp32 V = 256000: P = 25. The other half of L2 holds the gradient
rows being written back and everything else. The price: below one program per SM (132 on H100), SMs idle,
and the static model charges the issue and MUFU bounds to the busy ones only. At V = 256000 (51 programs) it still
predicts less time for the fused loss than re-reading every row from HBM without the entropy (5.5 against 7.5 ms
at N = 16384), but more with it (9.3 against 8.6 ms: that variant is issue-bound either way). Splitting a row
across the CTAs of a thread-block cluster would keep every SM busy at any V; that needs a cross-CTA reduction that
the interpreter (which runs programs one after another) cannot execute, so it is left for a session with a GPU.

1/τ comes as a one-element fp32 tensor, loaded once per program (nothing per element): torch.compile specializes a
float argument, recompiling for every new temperature.

Rows with mask 0 (HAS_MASK) do no exp work: the forward writes zeros, the backward writes a zero row. Leading dims
are addressed through real strides (row r of a [B, T, V] view is (r // T, r % T)), so views such as
logits[:, :-1][:, -T:] are never copied; offsets are 64-bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import params as P

# Below this, lanes would idle on short vocabularies; above it registers spill. 4096 fp32 lanes over
# 8 warps is 16 values per thread: the usual sweet spot of row-streaming kernels (quack, Liger). Not yet
# tuned on a GPU.
MAX_BLOCK_V = 4096
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# The share of L2 that the rows in flight may fill (see the module docstring; bench/static.py models the same).
L2_ROW_FRACTION = 0.5
# The interpreter (CPU, tests) has no L2: a small nominal one makes it run several rows per program, as a GPU does
# at real vocabularies, so that the persistent loop is what the tests check.
INTERPRETER_L2_BYTES = 64 * 1024


# Columns of the row statistics (kernels/params.py: ROW_STATS), as the constexprs Triton reads from module globals
_STAT = {name: tl.constexpr(i) for i, name in enumerate(P.ROW_STATS)}
STAT_MAX, STAT_LOG_SUM = _STAT["max"], _STAT["log_sum"]
STAT_PROB_SQ, STAT_PROB_SQ_LOGP, STAT_PROB_SQ_LOGP_SQ = (
    _STAT[n] for n in ("prob_sq", "prob_sq_logp", "prob_sq_logp_sq")
)
NUM_STATS = tl.constexpr(len(P.ROW_STATS))


def block_v(vocab: int, max_block: int = MAX_BLOCK_V) -> int:
    """The tile: the vocabulary's next power of two, at least 16 and at most ``max_block`` (each op's table)."""
    return max(16, min(max_block, triton.next_power_of_2(vocab)))


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def group(element_bytes: int) -> int:
    """R: the logits of one 16-byte vector load, which share a running offset (one thread holds them)."""
    return 16 // element_bytes


def row_programs(rows: int, row_bytes: int, l2_bytes: int) -> int:
    """Programs of a persistent row kernel: as many rows in flight as fill L2_ROW_FRACTION of L2, at most one
    program per row, at least one."""
    return max(1, min(rows, int(L2_ROW_FRACTION * l2_bytes) // max(row_bytes, 1)))


@triton.jit
def _tile(base, start, V, R: tl.constexpr, BLOCK_V: tl.constexpr, MASKED: tl.constexpr):
    """Logits [BLOCK_V / R, R] from ``start`` (fp32, −inf past V when MASKED) and their column offsets."""
    cols = tl.reshape(tl.arange(0, BLOCK_V), (BLOCK_V // R, R))
    idx = start + cols
    if MASKED:
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
    else:
        x = tl.load(base + idx).to(tl.float32)
    return x, cols


@triton.jit
def _accumulate(x, cols, t_col, m, s, a, q, b, c, k, HAS_ENTROPY: tl.constexpr, HAS_TARGET: tl.constexpr):
    """Adds a tile x [G, R] of raw logits to the per-group sums, relative to the groups' running maxima m [G] of the
    raw logits, in log2 units: with d = (x − m)·k, k = log2(e)/τ, s = Σ 2^d, a = Σ 2^d·d and over the non-target
    entries q = Σ 2^(2d), b = Σ 2^(2d)·d, c = Σ 2^(2d)·d². HAS_TARGET: the tile holds the target at column ``t_col``,
    left out of q, b, c.

    The maximum rises to the tile's first (one exponential per group of R), and the sums move with it: with
    r = 2^δ, δ = (m − m')·k (rδ taken as 0 where r is: δ may be −inf), s ← r·s, a ← r·a + rδ·s, q ← r²·q,
    b ← r·(r·b + rδ·q), c ← r·(r·c + 2rδ·b) + (rδ)²·q. Then per element one FADD, one FMUL and one MUFU.EX2. The
    difference x − m is taken on the raw logits, before the scale: it is exact near the maximum (0 at it), where an
    FMA x·(1/τ) − round(m/τ) would leave the rounding of m/τ (up to ½ ulp, beyond 88 at |x/τ| ≥ 2^31). A banned
    (−inf) logit has 2^d = 0 and, in the entropy sums, d floored to a finite value (0·(−inf) would be NaN). A NaN
    or +inf logit makes d, hence s, NaN, so ℓ, H and the sums are NaN, as log_softmax gives."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    delta = (m - m_new) * k
    r = tl.exp2(delta)
    d = (x - m_new[:, None]) * k
    e = tl.exp2(d)
    e2 = e * e
    if HAS_TARGET:
        e2 = tl.where(cols == t_col, 0.0, e2)
    if HAS_ENTROPY:
        d = tl.maximum(d, -1e30)  # banned: e = 0, and 0·(−1e30) = 0 (fmax keeps no NaN, but e carries it)
        shift = tl.where(r > 0.0, r * delta, 0.0)
        e2d = e2 * d
        a = r * a + shift * s + tl.sum(e * d, axis=1)
        c = r * (r * c + 2.0 * shift * b) + shift * shift * q + tl.sum(e2d * d, axis=1)
        b = r * (r * b + shift * q) + tl.sum(e2d, axis=1)
    q = r * r * q + tl.sum(e2, axis=1)
    s = s * r + tl.sum(e, axis=1)
    return m_new, s, a, q, b, c


@triton.jit
def row_statistics(base, target, V, inv_temperature, HAS_ENTROPY: tl.constexpr, R: tl.constexpr, BLOCK_V: tl.constexpr):
    """One pass over a row of V logits at ``base`` (scaled by 1/τ): ℓ of ``target``, M, log Σ, H, and over v ≠ y
    the sums Σ p², Σ p²·log p, Σ p²·(log p)² of ``ROW_STATS`` (the last two with HAS_ENTROPY, else 0); for a
    gradient pass over the same row, the raw row maximum, log2 Σ and the raw target logit.

    Order: the full tiles before the target's, those after it, the target's tile, the partial last tile; then the
    groups fold in a fixed order. Everything stays relative to the maxima: at |logits| ~ 1e4, x − (m + log s) in
    fp32 would lose 4 digits to the rounding of m + log s. The finite empty maximum (−FLT_MAX) keeps 2^((m − m')·k)
    defined on groups that only ever see padding (−inf). M is stored as max·(1/τ), rounded as a consumer's
    x·(1/τ) − M rounds the max's own logit.

    The target logit is read before the row is streamed, so every read of the row happens here, before any
    write: the in-place loss kernel (gradient written over the logits) puts a CTA barrier between this
    function and its first store, and hands the target logit to the gradient pass.
    """
    k = inv_temperature * LOG2E
    valid = (target >= 0) & (target < V)
    x_target = tl.load(base + target, mask=valid, other=float("nan")).to(tl.float32)
    m = tl.full([BLOCK_V // R], -3.4028234663852886e38, tl.float32)
    s = tl.zeros([BLOCK_V // R], tl.float32)
    a = tl.zeros([BLOCK_V // R], tl.float32)
    q = tl.zeros([BLOCK_V // R], tl.float32)
    b = tl.zeros([BLOCK_V // R], tl.float32)
    c = tl.zeros([BLOCK_V // R], tl.float32)
    full = V // BLOCK_V
    # the target's full tile (−1: none; a target in the partial tile, or outside [0, V), is handled there)
    t_tile = tl.where(valid & (target < full * BLOCK_V), target // BLOCK_V, -1).to(tl.int32)
    t_col = (target - t_tile.to(tl.int64) * BLOCK_V).to(tl.int32)
    for tile in range(0, t_tile):
        x, cols = _tile(base, tile * BLOCK_V, V, R, BLOCK_V, False)
        m, s, a, q, b, c = _accumulate(x, cols, t_col, m, s, a, q, b, c, k, HAS_ENTROPY, False)
    for tile in range(t_tile + 1, full):
        x, cols = _tile(base, tile * BLOCK_V, V, R, BLOCK_V, False)
        m, s, a, q, b, c = _accumulate(x, cols, t_col, m, s, a, q, b, c, k, HAS_ENTROPY, False)
    if t_tile >= 0:
        x, cols = _tile(base, t_tile * BLOCK_V, V, R, BLOCK_V, False)
        m, s, a, q, b, c = _accumulate(x, cols, t_col, m, s, a, q, b, c, k, HAS_ENTROPY, True)
    if full * BLOCK_V < V:
        start = full * BLOCK_V
        x, cols = _tile(base, start, V, R, BLOCK_V, True)
        t_col = (target - start).to(tl.int32)
        m, s, a, q, b, c = _accumulate(x, cols, t_col, m, s, a, q, b, c, k, HAS_ENTROPY, True)
    m_row = tl.max(m, axis=0)
    delta = (m - m_row) * k
    lane = tl.exp2(delta)
    s_row = tl.sum(s * lane, axis=0)
    log2_s = tl.log2(s_row)
    inv_s2 = 1.0 / (s_row * s_row)
    q_row = tl.sum(lane * lane * q, axis=0)
    prob_sq = q_row * inv_s2
    ent = 0.0
    prob_sq_logp = 0.0
    prob_sq_logp_sq = 0.0
    if HAS_ENTROPY:  # H = −Σ p log p, log2 p = d − log2 s: H = ln2·(log2 s − Σ 2^d·d / s), groups re-centered on M
        shift = tl.where(lane > 0.0, lane * delta, 0.0)
        ent = (log2_s - tl.sum(lane * a + shift * s, axis=0) / s_row) * LN2
        b_row = tl.sum(lane * (lane * b + shift * q), axis=0)
        c_row = tl.sum(lane * (lane * c + 2.0 * shift * b) + shift * shift * q, axis=0)
        # Σ p²·log p = ln2·(b − log2 s·q) / s², Σ p²·(log p)² = ln2²·(c − 2 log2 s·b + log2² s·q) / s²
        prob_sq_logp = (b_row - log2_s * q_row) * inv_s2 * LN2
        prob_sq_logp_sq = (c_row - 2.0 * log2_s * b_row + log2_s * log2_s * q_row) * inv_s2 * (LN2 * LN2)
    lp = ((x_target - m_row) * k - log2_s) * LN2
    # The stored M = max/τ is rounded; log Σ absorbs that rounding (an exact FMA residual), so that a consumer's
    # x/τ − M − log Σ taken with an FMA (the log-prob backward, the CUDA kernels) is exact at the max.
    max_scaled = m_row * inv_temperature
    log_s = log2_s * LN2 + tl.fma(m_row, inv_temperature, -max_scaled)
    return lp, max_scaled, log_s, ent, prob_sq, prob_sq_logp, prob_sq_logp_sq, m_row, log2_s, x_target


@triton.jit
def _log2_prob(x, scale, offset, factor, log2_s):
    """log2 p of raw logits as (x·scale − offset)·factor − log2 Σ, two FMAs: the fused loss passes (1, raw max,
    log2(e)/τ), exact near the maximum (see _accumulate); the log-prob backward, which has the stored statistics,
    (1/τ, M, log2 e)."""
    return tl.fma(tl.fma(x, scale, -offset), factor, -log2_s)


@triton.jit
def _grad_tile(
    out,
    base,
    start,
    V,
    scale,
    offset,
    factor,
    log2_s,
    ent,
    g_lp,
    g_ent,
    HAS_GRAD_ENTROPY: tl.constexpr,
    SATURATED: tl.constexpr,
    MASKED: tl.constexpr,
    R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """The gradient of a tile without the target's 1[v = y] term: −g_ℓ·p_v − g_H·p_v·(log p_v + H) (g over τ)."""
    x, cols = _tile(base, start, V, R, BLOCK_V, MASKED)
    log2_p = _log2_prob(x, scale, offset, factor, log2_s)
    p = tl.exp2(log2_p)
    g = -g_lp * p
    if SATURATED:  # g_ℓ = ±inf: 0 where p underflowed, never 0·inf
        g = tl.where(p != 0.0, g, 0.0)
    if HAS_GRAD_ENTROPY:  # banned (−inf) logits: p = 0 and log p floored, 0·finite (p carries a NaN)
        g -= g_ent * p * (tl.maximum(log2_p, -1e30) * LN2 + ent)
    idx = start + cols
    if MASKED:
        tl.store(out + idx, g.to(out.dtype.element_ty), mask=idx < V)
    else:
        tl.store(out + idx, g.to(out.dtype.element_ty))


@triton.jit
def write_grad_row(
    out,
    base,
    target,
    x_target,
    V,
    scale,
    offset,
    factor,
    log2_s,
    ent,
    g_lp,
    g_ent,
    inv_temperature,
    HAS_GRAD_ENTROPY: tl.constexpr,
    R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """out[v] = [g_ℓ·(1[v = y] − p_v) − g_H·p_v·(log p_v + H)] / τ over a row (one more read of it), log2 p_v as
    ``_log2_prob``. The loops write every entry as if v ≠ y; after a CTA barrier (every thread's stores ordered
    before it) the target's entry is written once more with its 1[v = y], from ``x_target``, the raw target logit
    read before the row's first store (in place, the row is being overwritten: it must not be read here).

    When g_ℓ itself is beyond fp32 (the loss is ±inf, e.g. an unclipped ratio e^100 with A < 0), the row is
    ±inf where 1[v = y] − p_v is non-zero and 0 where it is (p_v underflowed), never 0·inf = NaN; a scalar
    branch per row, so the usual rows run the loop without the extra select."""
    valid = (target >= 0) & (target < V)
    saturated = (g_lp == float("inf")) | (g_lp == float("-inf"))  # of ∂L/∂ℓ itself, before the 1/τ
    g_lp = g_lp * inv_temperature  # 1/τ folded into the row's two coefficients
    g_ent = g_ent * inv_temperature
    if saturated:
        _grad_row(out, base, V, scale, offset, factor, log2_s, ent, g_lp, g_ent, HAS_GRAD_ENTROPY, True, R, BLOCK_V)
    else:
        _grad_row(out, base, V, scale, offset, factor, log2_s, ent, g_lp, g_ent, HAS_GRAD_ENTROPY, False, R, BLOCK_V)
    if valid:  # the target's own entry: (1 − p_y) in place of −p_y
        tl.debug_barrier()
        log2_p = _log2_prob(x_target, scale, offset, factor, log2_s)
        p = tl.exp2(log2_p)
        coef = 1.0 - p
        g = tl.where(saturated & (coef == 0.0), 0.0, g_lp * coef)
        if HAS_GRAD_ENTROPY:
            g -= g_ent * p * (tl.maximum(log2_p, -1e30) * LN2 + ent)
        tl.store(out + target, g.to(out.dtype.element_ty))


@triton.jit
def _grad_row(
    out,
    base,
    V,
    scale,
    offset,
    factor,
    log2_s,
    ent,
    g_lp,
    g_ent,
    HAS_GRAD_ENTROPY: tl.constexpr,
    SATURATED: tl.constexpr,
    R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    full = V // BLOCK_V
    for tile in range(0, full):
        _grad_tile(
            out,
            base,
            tile * BLOCK_V,
            V,
            scale,
            offset,
            factor,
            log2_s,
            ent,
            g_lp,
            g_ent,
            HAS_GRAD_ENTROPY,
            SATURATED,
            False,
            R,
            BLOCK_V,
        )
    if full * BLOCK_V < V:
        _grad_tile(
            out,
            base,
            full * BLOCK_V,
            V,
            scale,
            offset,
            factor,
            log2_s,
            ent,
            g_lp,
            g_ent,
            HAS_GRAD_ENTROPY,
            SATURATED,
            True,
            R,
            BLOCK_V,
        )


@triton.jit
def write_zero_row(out, V, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        tl.store(out + idx, tl.zeros([BLOCK_V], tl.float32).to(out.dtype.element_ty), mask=idx < V)


@triton.jit
def token_logprobs_fwd_kernel(
    # pointers (inv_temperature_ptr: 1/τ, one fp32 loaded per program)
    logits_ptr,
    targets_ptr,
    mask_ptr,
    inv_temperature_ptr,
    logprobs_ptr,
    stats_ptr,
    entropy_ptr,
    # shapes
    N,
    T,
    V,
    # strides (of logits' leading dims; the vocabulary dim is contiguous)
    stride_b,
    stride_t,
    # meta-parameters
    HAS_MASK: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    inv_temperature = tl.load(inv_temperature_ptr)
    for i in range(tl.program_id(0), N, tl.num_programs(0)):  # persistent: rows pid, pid + P, ...
        row = tl.cast(i, tl.int64)  # a new name: Triton 3.2 keeps a loop variable's type
        st = stats_ptr + NUM_STATS * row
        active = True
        if HAS_MASK:
            active = tl.load(mask_ptr + row) != 0
        if active:
            base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
            target = tl.load(targets_ptr + row).to(tl.int64)
            lp, m_row, log_s, ent, sq, sq_logp, sq_logp_sq, _m, _log2_s, _x = row_statistics(
                base, target, V, inv_temperature, HAS_ENTROPY, R, BLOCK_V
            )
            tl.store(logprobs_ptr + row, lp)
            tl.store(st + STAT_MAX, m_row)
            tl.store(st + STAT_LOG_SUM, log_s)
            tl.store(st + STAT_PROB_SQ, sq)
            tl.store(st + STAT_PROB_SQ_LOGP, sq_logp)
            tl.store(st + STAT_PROB_SQ_LOGP_SQ, sq_logp_sq)
            if HAS_ENTROPY:
                tl.store(entropy_ptr + row, ent)
        else:  # a masked row: zeros, no exp work
            tl.store(logprobs_ptr + row, 0.0)
            for j in tl.static_range(NUM_STATS):
                tl.store(st + j, 0.0)
            if HAS_ENTROPY:
                tl.store(entropy_ptr + row, 0.0)


@triton.jit
def token_logprobs_bwd_kernel(
    # pointers (inv_temperature_ptr: 1/τ, one fp32 loaded per program)
    grad_logits_ptr,
    logits_ptr,
    targets_ptr,
    mask_ptr,
    stats_ptr,
    entropy_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    inv_temperature_ptr,
    # shapes
    N,
    T,
    V,
    # strides (logits' leading dims; grad_logits is contiguous [rows, V])
    stride_b,
    stride_t,
    # meta-parameters
    HAS_MASK: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    inv_temperature = tl.load(inv_temperature_ptr)
    for i in range(tl.program_id(0), N, tl.num_programs(0)):  # persistent: rows pid, pid + P, ...
        row = tl.cast(i, tl.int64)  # a new name: Triton 3.2 keeps a loop variable's type
        out = grad_logits_ptr + row * V
        g_lp = tl.load(grad_logprobs_ptr + row).to(tl.float32)
        g_ent = 0.0
        ent = 0.0
        if HAS_GRAD_ENTROPY:
            g_ent = tl.load(grad_entropy_ptr + row).to(tl.float32)
            ent = tl.load(entropy_ptr + row)
        inactive = g_lp == 0.0
        if HAS_GRAD_ENTROPY:
            inactive = inactive & (g_ent == 0.0)
        if HAS_MASK:  # a masked row's outputs are constants: its gradient is zero whatever flows in
            inactive = inactive | (tl.load(mask_ptr + row) == 0)
        if inactive:  # masked or clipped token: a zero row, no exp work
            write_zero_row(out, V, BLOCK_V)
        else:
            base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
            target = tl.load(targets_ptr + row).to(tl.int64)
            valid = (target >= 0) & (target < V)
            # a separate gradient buffer: the target logit may be read here; the forward's natural statistics
            write_grad_row(
                out,
                base,
                target,
                tl.load(base + target, mask=valid, other=0.0).to(tl.float32),
                V,
                inv_temperature,
                tl.load(stats_ptr + NUM_STATS * row + STAT_MAX),
                LOG2E,
                tl.load(stats_ptr + NUM_STATS * row + STAT_LOG_SUM) * LOG2E,
                ent,
                g_lp,
                g_ent,
                inv_temperature,
                HAS_GRAD_ENTROPY,
                R,
                BLOCK_V,
            )


def aot_specializations():
    """Every (kernel, signature, constexprs, num_warps) the launchers can produce, for the ahead-of-time
    compile gate: all flag combinations and logits dtypes at the smallest and largest block (pointer
    dtypes of the small per-row tensors are those the launchers pass: int64 ids, fp32/uint8 masks)."""
    for dtype in ("fp32", "bf16", "fp16"):
        r = group(4 if dtype == "fp32" else 2)
        for block in (16, MAX_BLOCK_V):
            for has_mask in (False, True):
                for has_entropy in (False, True):
                    types = dict(
                        logits_ptr=f"*{dtype}",
                        grad_logits_ptr=f"*{dtype}",
                        targets_ptr="*i64",
                        mask_ptr="*u8" if has_mask else "*fp32",
                    )
                    for kernel, flag in (
                        (token_logprobs_fwd_kernel, "HAS_ENTROPY"),
                        (token_logprobs_bwd_kernel, "HAS_GRAD_ENTROPY"),
                    ):
                        sig = P.aot_signature(kernel.arg_names, **types)
                        yield (
                            kernel,
                            sig,
                            {"HAS_MASK": has_mask, flag: has_entropy, "R": r, "BLOCK_V": block},
                            num_warps(block),
                        )
