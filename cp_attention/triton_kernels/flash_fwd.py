"""Triton flash-attention forward with LSE, and its fused variant that merges into a running state.

Layouts (docs/design.md, "Tensors and layout"): q [B, Sq, H, D], k/v [B, Sk, Hkv, D] (BSHD, any strides;
the last one is passed too, so D == 1 with any last stride works), query head h reads kv head
h // (H // Hkv). out [B, Sq, H, D], lse [B, H, Sq] float32 with lse = log sum_j exp(scale * <q_i, k_j>)
over the visible keys (natural log). Causal is bottom-right: query i sees key j iff j <= i + Sk - Sq.
kv_mask bool [B, Sk], True = attend. A row that sees no key gets out 0, lse -inf.

One program per (query block, batch * head). Scores live in base-2 units, s2 = (scale * log2 e) * q.k, so
the softmax is exp2 (one MUFU op) and the LSE is converted back to natural log once per row at the end.
The key loop runs in two phases: key blocks that every row of the query block sees in full (no bounds, no
causal masking: the bulk of the work), then the causal diagonal and the ragged last block, masked. Key blocks
past the diagonal are never visited.

Q, K and V tiles move in one of two ways, chosen per launch config: through pointer loads with masks (any
GPU, the interpreter, any strides), or through TMA tensor descriptors (sm_90+, and the interpreter on
request), where the copy engine moves whole tiles into shared memory and fills what lies past Sq, Sk or D
with zeros, which frees the registers and instructions of the address and mask arithmetic. The descriptors
need 16-byte aligned bases and strides (_tma_descriptors). The caller chooses (flash_fwd's tma argument,
which the ops set from their `variant` argument): pointer tiles (the default, proven on an H200), the TMA
variant, or the autotuner's pick among both (cp_attention.kernel_variants records which have run on a GPU).

With ACCUMULATE the epilogue merges the block's result (o_b, lse_b) into the running (out, lse) it reads
from the destination: m = max(lse_a, lse_b), lse = m + log(exp(lse_a - m) + exp(lse_b - m)),
out = out_a * exp(lse_a - lse) + o_b * exp(lse_b - lse); rows of out whose lse is -inf are never loaded
(they may hold NaN), both sides -inf give out 0 and lse -inf, and one -inf side passes the other through
exactly (its weight is exp(0) / 1).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import configs as cfg
from . import interpret_requested

# Decided when this module is imported, as triton decides it for the kernels below.
INTERPRETED = interpret_requested()

LOG2E = 1.4426950408889634

@triton.jit
def _attend_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, desc_k, desc_v, kv_b, kv_h, mask_ptrs, offs_m, offs_n,
                   d_ok, lo, hi, Sk, causal_shift, qk_scale, stride_ks, stride_vs, stride_ms,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                   MASK_KEYS: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Online softmax over key blocks [lo, hi) (lo a multiple of BLOCK_N; k_ptrs, v_ptrs, mask_ptrs point at
    key lo). acc [BLOCK_M, BLOCK_D] float32 (unnormalized output), l_i [BLOCK_M] (sum of exp2(s2 - m_i)),
    m_i [BLOCK_M] (running max of s2, -inf before any visible key). MASK_KEYS: blocks may hold keys past Sk
    or past the causal diagonal, so they are masked. TMA: K and V tiles come through the tensor descriptors
    desc_k/desc_v ([B, Sk, Hkv, D], coordinates (kv_b, key, kv_h, 0)) instead of the pointers; the copy
    engine fills keys past Sk and columns past D with zeros, so only the scores need masking."""
    # A row may have seen no visible key yet (its max still -inf) only where something masks keys; only
    # then does the exp2 need the guard that keeps exp2(-inf - -inf) from making NaN.
    GUARD: tl.constexpr = MASK_KEYS or HAS_MASK
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK_KEYS:
            key_ok = cols < Sk
        if TMA:
            k = desc_k.load([kv_b, start_n, kv_h, 0]).reshape(BLOCK_N, BLOCK_D)
        elif MASK_KEYS:
            k = tl.load(k_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter multiplies bfloat16 wrongly: do its dots in float32
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if GUARD:
            if MASK_KEYS:
                vis = key_ok[None, :]
                if CAUSAL:
                    vis = vis & (cols[None, :] <= offs_m[:, None] + causal_shift)
                if HAS_MASK:
                    km = tl.load(mask_ptrs, mask=key_ok, other=0) != 0
                    vis = vis & km[None, :]
            else:
                vis = (tl.load(mask_ptrs) != 0)[None, :]
            s = tl.where(vis, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
        else:
            # Nothing masked: every score is finite, so is m_new. qk_scale >= 0 (the launcher makes it so)
            # lets max(s) * qk_scale stand for max(s * qk_scale) and the scaling fuse into one FMA.
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if TMA:
            v = desc_v.load([kv_b, start_n, kv_h, 0]).reshape(BLOCK_N, BLOCK_D)
        elif MASK_KEYS:
            v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        p = p.to(v.dtype)  # P @ V in the input precision (half inputs: half operands, float32 accumulator)
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
        if not TMA:
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs
        if HAS_MASK:
            mask_ptrs += BLOCK_N * stride_ms
    return acc, l_i, m_i


# Lengths, head counts and D are not specialized (their being 1 or a multiple of 16 buys nothing here), nor
# are the LSE and mask pointers and strides (a few scalars per row or key block, where wide access buys
# nothing): a ring step's slices of the running lse and of the mask start at any element, and each new
# alignment would otherwise compile a new variant. Q/K/V/OUT pointers and strides are specialized, so
# aligned rows load with wide vectors.
NOT_SPECIALIZED = ("Sq", "Sk", "H", "GROUP", "D", "LSE", "KV_MASK", "stride_lb", "stride_lh", "stride_ls",
                   "stride_mb", "stride_ms", "LENGTH_BUCKET")


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _flash_fwd_kernel(
    Q, K, V, OUT, LSE, KV_MASK, DESC_Q, DESC_K, DESC_V, DESC_O,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_mb, stride_ms,
    Sq, Sk, H, GROUP, D, qk_scale, LENGTH_BUCKET,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA_OK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr,
):
    """Grid: (cdiv(Sq, BLOCK_M) * B * H,). qk_scale = scale * log2(e) >= 0. GROUP = H // Hkv.
    OUT/LSE: the outputs, or with ACCUMULATE the running state merged into in place.
    TMA (Hopper and newer, and the interpreter): Q, K and V tiles are loaded, and OUT is stored unless
    ACCUMULATE, through the tensor descriptors DESC_* (each over its whole BSHD tensor, block [1, rows, 1,
    BLOCK_D]) by the copy engine, which bounds-checks every dimension itself; they are None where the
    launcher found the tensors unfit for TMA, and then TMA_OK is False (it only keys the autotuner).
    LENGTH_BUCKET (configs.length_bucket) is not read either: it keys the autotuner by the launch's size."""
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    start_m = pid % num_m
    if CAUSAL:
        # Later query blocks see more keys: launch them first so the short ones fill the tail.
        start_m = num_m - 1 - start_m
    b32 = bh // H
    h32 = bh % H
    hk32 = h32 // GROUP
    b = b32.to(tl.int64)
    hk = hk32.to(tl.int64)
    h = h32.to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Sq
    if EVEN_D:  # a mask constant along D keeps loads and stores wide (D itself is not specialized)
        d_ok = offs_d < BLOCK_D
    else:
        d_ok = offs_d < D
    rows64 = offs_m.to(tl.int64)

    if TMA:
        q = DESC_Q.load([b32, start_m * BLOCK_M, h32, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q_ptrs = Q + b * stride_qb + h * stride_qh + rows64[:, None] * stride_qs + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    mask_ptrs = KV_MASK + b * stride_mb + offs_n * stride_ms

    # Key ranges of this query block (rows [m_lo, m_hi)). Query i sees key j iff j <= i + causal_shift.
    causal_shift = Sk - Sq
    m_lo = start_m * BLOCK_M
    if CAUSAL:
        m_hi = tl.minimum(m_lo + BLOCK_M, Sq)
        hi = tl.maximum(tl.minimum(Sk, m_hi + causal_shift), 0)  # keys past the last row's diagonal: skipped
        full = tl.maximum(tl.minimum(Sk, m_lo + causal_shift + 1), 0)  # keys every row of the block sees
    else:
        hi = Sk
        full = Sk
    full_hi = (full // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, DESC_K, DESC_V, b32, hk32, mask_ptrs,
                                   offs_m, offs_n, d_ok, 0, full_hi, Sk, causal_shift, qk_scale, stride_ks,
                                   stride_vs, stride_ms, BLOCK_N, BLOCK_D, EVEN_D, False, CAUSAL, HAS_MASK,
                                   DOT_PRECISION, UPCAST, TMA)
    # The masked phase: at most a few blocks (the causal diagonal, the ragged end); often none.
    start = tl.cast(full_hi, tl.int64)  # 64-bit: full_hi * stride may pass 2**31
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_ptrs + start * stride_ks, v_ptrs + start * stride_vs,
                                   DESC_K, DESC_V, b32, hk32, mask_ptrs + start * stride_ms, offs_m, offs_n,
                                   d_ok, full_hi, hi, Sk, causal_shift, qk_scale, stride_ks, stride_vs,
                                   stride_ms, BLOCK_N, BLOCK_D, EVEN_D, True, CAUSAL, HAS_MASK, DOT_PRECISION,
                                   UPCAST, TMA)

    # l_i >= 1 once a row saw a key (its max term is exp2(0)), so l_i == 0 marks the rows that saw none.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse_b = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # * ln 2

    o_ptrs = OUT + b * stride_ob + h * stride_oh + rows64[:, None] * stride_os + offs_d[None, :] * stride_od
    lse_ptrs = LSE + b * stride_lb + h * stride_lh + rows64 * stride_ls
    o_mask = row_ok[:, None] & d_ok[None, :]
    if ACCUMULATE:
        lse_a = tl.load(lse_ptrs, mask=row_ok, other=float("-inf"))
        m = tl.maximum(lse_a, lse_b)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        e_a = tl.exp(lse_a - m_use)
        e_b = tl.exp(lse_b - m_use)
        total = e_a + e_b  # 0 only when both sides are -inf
        t_safe = tl.where(total == 0.0, 1.0, total)
        lse_out = tl.where(total == 0.0, float("-inf"), m_use + tl.log(t_safe))
        w_a = e_a / t_safe
        w_b = e_b / t_safe / l_safe
        # The running out is read only where its lse is finite: rows with lse -inf may hold anything.
        live_a = lse_a != float("-inf")
        o_a = tl.load(o_ptrs, mask=o_mask & live_a[:, None], other=0.0).to(tl.float32)
        out = o_a * w_a[:, None] + acc * w_b[:, None]
    else:
        lse_out = lse_b
        out = acc / l_safe[:, None]
    if TMA and not ACCUMULATE:
        tile = out.to(OUT.dtype.element_ty).reshape(1, BLOCK_M, 1, BLOCK_D)
        DESC_O.store([b32, start_m * BLOCK_M, h32, 0], tile)
    else:
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=o_mask)
    tl.store(lse_ptrs, lse_out, mask=row_ok)


# -----------------------------------------------------------------------------------------------------------
def _tma_descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, accumulate: bool):
    """Tensor descriptors of q, k, v (and out, unless accumulating: then out is read and written through
    pointers) for the TMA variant, or None where the copy engine cannot address these tensors. TMA needs
    a 16-byte aligned base, a unit last stride and every other stride a multiple of 16 bytes; on top of that
    only layouts in BSHD order without overlap are taken (each stride at least the extent of the dimension
    inside it: the layout the driver's documentation describes), so permuted or broadcast views, which no
    launch has shown the driver to accept, keep the pointer tiles. A dimension of size 1 is only ever at
    coordinate 0, so its stride is free and set to that minimum (rounded up to 16 bytes). float32 and empty
    tensors take no descriptors either. Block shapes are placeholders until a launch config sets them
    (_set_block_shapes)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # a triton without host-side descriptors: the pointer variant serves
        return None
    if q.dtype == torch.float32:  # float32 runs IEEE dots on the CUDA cores, where TMA buys nothing
        return None
    tensors = (q, k, v) if accumulate else (q, k, v, out)
    descs = []
    for t in tensors:
        if t.numel() == 0 or t.stride(-1) != 1 or t.data_ptr() % 16:
            return None
        align = 16 // t.element_size()  # 16 bytes, in elements
        strides = [1]
        for n, st in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1])):
            inner = t.shape[len(t.shape) - len(strides)] * strides[0]  # extent of the dimension inside
            if n == 1:
                st = -(-inner // align) * align
            elif st < inner or st % align:
                return None
            strides.insert(0, st)
        descs.append(TensorDescriptor(t, list(t.shape), strides, _PLACEHOLDER_BLOCK))
    return descs + [None] * (4 - len(descs))


_PLACEHOLDER_BLOCK = [1, 1, 1, 16]


def _set_block_shapes(nargs: dict) -> None:
    """Gives the descriptors of a launch their tiles: [1, BLOCK_M, 1, BLOCK_D] for q and out, [1, BLOCK_N,
    1, BLOCK_D] for k and v (a pre_hook of every autotuner config). The block shape is part of a
    descriptor's type, so a pointer config, which passes but never reads the descriptors, resets them to
    one placeholder instead of compiling a variant per shape the last TMA trial left there."""
    rows = {"DESC_Q": nargs["BLOCK_M"], "DESC_O": nargs["BLOCK_M"], "DESC_K": nargs["BLOCK_N"],
            "DESC_V": nargs["BLOCK_N"]}
    for name, n in rows.items():
        if nargs[name] is not None:
            nargs[name].block_shape = [1, n, 1, nargs["BLOCK_D"]] if nargs["TMA"] else _PLACEHOLDER_BLOCK


def _prune(configs, named_args, **kwargs):
    """Keeps the candidates of this call's dtype class and BLOCK_D (configs.fwd_candidates), and the TMA ones
    only when the call has descriptors (TMA_OK)."""
    args = {**named_args, **kwargs}
    q = args["Q"]
    wanted = cfg.fwd_candidates(torch.cuda.get_device_capability(q.device), q.dtype == torch.float32,
                                args["BLOCK_D"])
    kept = [c for c in configs
            if cfg.FwdConfig(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                             c.kwargs["TMA"]) in wanted and (args["TMA_OK"] or not c.kwargs["TMA"])]
    return kept or [c for c in configs if not c.kwargs["TMA"]][-1:]


@functools.cache
def _autotuned(capability: tuple[int, int]):
    """The kernel behind an autotuner with this GPU generation's candidates. Keyed by BLOCK_D, causal, the
    mask, accumulation and whether descriptors were given (plus, automatically, every tensor argument's
    dtype): each changes the kernel's code, so each may want another tile; and by the launch's size class
    (LENGTH_BUCKET), since a tile tuned on short sequences need not be the best on long ones. OUT and LSE
    are restored after each trial because the accumulating variant updates them in place."""
    configs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "TMA": c.tma},
                             num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_block_shapes)
               for c in cfg.all_fwd_candidates(capability)]
    key = ["BLOCK_D", "CAUSAL", "HAS_MASK", "ACCUMULATE", "TMA_OK", "LENGTH_BUCKET"]
    tuner = triton.autotune(configs, key=key,
                            prune_configs_by={"early_config_prune": _prune},
                            restore_value=["OUT", "LSE"])(_flash_fwd_kernel)
    _TUNERS[capability] = tuner
    return tuner


_TUNERS: dict = {}  # capability -> the autotuner _autotuned made for it
_TRIALS: dict = {}  # capability -> {tuning key: {config: median ms of its trial}}


def _record_trials(capability: tuple[int, int], tuner) -> None:
    """Keeps the timings of a tuning that just ran (the autotuner holds only its latest)."""
    trials = _TRIALS.setdefault(capability, {})
    for key in tuner.cache:
        if key not in trials:
            trials[key] = {str(c): round(t[0], 5) for c, t in getattr(tuner, "configs_timings", {}).items()}


def tuned_configs() -> dict[str, dict]:
    """What the autotuner has chosen in this process, per GPU generation and tuning key (BLOCK_D, causal,
    mask, accumulation, TMA_OK, the size class and the arguments' dtypes), with the median milliseconds of
    every candidate it tried: benchmark reports record it, so a figure can be traced to the tile (and load
    path, TMA or pointers) behind it."""
    return {f"sm_{major}{minor} {key}": {"chosen": str(config),
                                         "trials_ms": _TRIALS.get((major, minor), {}).get(key, {})}
            for (major, minor), tuner in _TUNERS.items()
            for key, config in getattr(tuner, "cache", {}).items()}


def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool,
              kv_mask: torch.Tensor | None, out: torch.Tensor | None = None,
              lse: torch.Tensor | None = None, tma: bool | None = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward kernel on checked inputs (cp_attention._checks).

    Without out/lse: returns a fresh contiguous out [B, Sq, H, D] (q.dtype) and lse [B, H, Sq] float32.
    With out [B, Sq, H, D] (q.dtype or float32, any strides) and lse [B, H, Sq] float32 (any strides): merges
    attention over this K/V into them in place and returns them.

    tma: False (the default) uses pointer tiles only (autotuned among them on problems big enough); None lets
    the autotuner choose between TMA and pointer tiles on GPUs that have TMA (Hopper and newer) where the
    tensors allow it, and uses pointers elsewhere;
    True runs the TMA variant with the first TMA candidate, untuned (on the interpreter too; ValueError
    where the tensors or the GPU do not allow it)."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    accumulate = out is not None
    if not accumulate:
        out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if B * H * Sq == 0:
        return out, lse
    if q.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("cp_attention: Triton kernels run on CPU tensors only under Triton's interpreter; "
                           "set TRITON_INTERPRET=1 before cp_attention's Triton kernels are first used")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if scale < 0:
        # The kernel's unmasked path needs a non-negative scale (see _attend_blocks); the sign flip of q is
        # exact. Negative scales are rare enough for the copy.
        q, scale = -q, -scale
    if Sk == 0:
        k = v = q  # no key is read; any valid pointer will do
    has_mask = kv_mask is not None and Sk > 0
    mask = kv_mask.view(torch.uint8) if has_mask else q  # a dummy pointer when there is no mask
    mask_strides = (mask.stride(0), mask.stride(1)) if has_mask else (0, 0)
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs a reduction dim of at least 16
    is_fp32 = q.dtype == torch.float32
    capability = torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else None
    # The interpreter takes the TMA path only when asked; with tma=None a GPU with TMA offers it to the
    # autotuner, which small problems skip (they run the first pointer tile), so they need no descriptors.
    tuned = Sq * Sk >= cfg.AUTOTUNE_MIN_WORK
    want = tma if INTERPRETED else capability[0] >= 9 and (tma or tma is None and tuned)
    descs = _tma_descriptors(q, k, v, out, accumulate) if want and Sk > 0 else None
    if tma and descs is None:
        raise ValueError("cp_attention: the TMA variant needs a GPU with TMA (sm_90+) or the interpreter, "
                         "half-precision inputs with 16-byte aligned bases and strides, unit last strides "
                         "and a non-empty K/V")
    args = (q, k, v, out, lse, mask, *(descs or [None] * 4), *q.stride(), *k.stride(), *v.stride(),
            *out.stride(), *lse.stride(), *mask_strides, Sq, Sk, H, H // Hkv, D, scale * LOG2E,
            cfg.length_bucket(B * H * Sq, Sk))
    meta = dict(BLOCK_D=block_d, EVEN_D=block_d == D, CAUSAL=bool(causal), HAS_MASK=has_mask,
                ACCUMULATE=accumulate, DOT_PRECISION="ieee" if is_fp32 else "tf32",
                UPCAST=INTERPRETED and q.dtype == torch.bfloat16, TMA_OK=descs is not None)

    def grid(m):
        return (triton.cdiv(Sq, m["BLOCK_M"]) * B * H,)

    def launch(c: cfg.FwdConfig):
        tile = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, TMA=c.tma)
        named = dict(zip(("DESC_Q", "DESC_K", "DESC_V", "DESC_O"), args[6:10]), BLOCK_D=block_d, **tile)
        _set_block_shapes(named)
        extra = {} if INTERPRETED else dict(num_warps=c.num_warps, num_stages=c.num_stages)
        _flash_fwd_kernel[grid](*args, **meta, **tile, **extra)

    if INTERPRETED:
        launch(cfg.INTERPRETER_FWD._replace(tma=bool(tma)))
        return out, lse
    with torch.cuda.device(q.device):
        candidates = cfg.fwd_candidates(capability, is_fp32, block_d)
        if tma:
            launch(next(c for c in candidates if c.tma))
        elif not tuned:
            # A small problem (or an empty chunk, where only the epilogue runs) is not worth tuning.
            launch(next(c for c in candidates if not c.tma))
        else:
            # Without descriptors (tma=False, or tensors TMA cannot address) TMA_OK is False and the pruning
            # keeps the pointer tiles only.
            tuner = _autotuned(capability)
            tuner[grid](*args, **meta)
            if len(tuner.cache) != len(_TRIALS.get(capability, ())):
                _record_trials(capability, tuner)
    return out, lse
