"""The CUDA kernels of csrc/cuda, called as raw ops: flash_attn_fwd and the fused ring step
flash_attn_fwd_acc_ against the float64 reference (every head dim path, tails, causal, masks, GQA, strided and
unaligned inputs, strided accumulators), and the Ulysses pack/unpack ops bit for bit against their CPU
implementations. Needs a CUDA device: every test carries the `gpu` marker and is skipped without one."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, NO_CUDA, make_kv_mask, randn
from reference import assert_close_to_ref, attention_ref, check_attention, merge_ref, same_dtype_math_path

from cp_attention.distributed._step import plan_chunk

OPS = torch.ops.cp_attention
DEV = "cuda"
NEG_INF = float("-inf")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)]


def _qkv(B, Sq, Sk, H, Hkv, D, dtype, seed, layout="bshd"):
    """q, k, v on the GPU. layout: "bshd" (contiguous), "bhsd" (head-major memory viewed as BSHD) or
    "offset" (rows one element off 16-byte alignment: the kernels' element-load path)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for S, n in ((Sq, H), (Sk, Hkv), (Sk, Hkv)):
        x = randn(B, S, n, D, dtype=dtype, gen=gen)
        if layout == "bhsd":
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        elif layout == "offset":
            wide = torch.zeros(B, S, n, D + 1, dtype=dtype)
            wide[..., 1:] = x
            x = wide[..., 1:]
        out.append(x.to(DEV))
    return (*out, gen)


# ---------------------------------------------------------------------------------------------------------
# flash_attn_fwd

# The ops' `variant` argument: "default" (the mma.sync kernel) everywhere; on sm_90 also "auto" (the TMA wgmma
# kernel where the tensors allow it, else the cp.async one) and "sm90" (the cp.async one).
IS_SM90 = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9
FWD_KERNELS = ["default", "auto", "sm90"] if IS_SM90 else ["default"]


@pytest.fixture(params=FWD_KERNELS)
def fwd_kernel(request):
    return request.param


def _at(kernel: str, D: int) -> str:
    """The variant argument for a call at head dim D: "sm90" names a kernel compiled for D <= 64 and
    96 < D <= 128 only (an error elsewhere), so at other D such a test asks for "auto", which runs mma.sync
    there."""
    return "auto" if kernel == "sm90" and not (D <= 64 or 96 < D <= 128) else kernel


# Every compiled head dim (32, 64, 96, 128, 256) and the padding between them.
HEAD_DIMS = [1, 8, 33, 40, 64, 72, 96, 100, 128, 160, 256]
SEQ_PAIRS = [(1, 1), (5, 0), (37, 53), (130, 70), (70, 130), (64, 64), (200, 257)]


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_fwd_head_dims(D, dtype, fwd_kernel):
    q, k, v, _ = _qkv(2, 77, 91, 2, 1, D, dtype, seed=D)
    out, lse = OPS.flash_attn_fwd(q, k, v, None, False, None, _at(fwd_kernel, D))
    check_attention(out, lse, q, k, v)


@pytest.mark.parametrize("Sq,Sk", SEQ_PAIRS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype,D", [(F16, 64), (BF16, 128), (F16, 256), (F32, 72)], ids=str)
def test_fwd_lengths_causal_mask(Sq, Sk, causal, masked, dtype, D, fwd_kernel):
    B, H, Hkv = 3, 4, 2
    q, k, v, gen = _qkv(B, Sq, Sk, H, Hkv, D, dtype, seed=Sq * 1000 + Sk)
    kv_mask = make_kv_mask(B, Sk, gen, device=DEV) if masked else None
    out, lse = OPS.flash_attn_fwd(q, k, v, None, causal, kv_mask, _at(fwd_kernel, D))
    check_attention(out, lse, q, k, v, causal=causal, kv_mask=kv_mask)


@pytest.mark.parametrize("layout", ["bhsd", "offset"])
@pytest.mark.parametrize("dtype,D", [(F16, 64), (BF16, 128), (F16, 40), (F32, 64)], ids=str)
def test_fwd_strided_inputs(layout, dtype, D, fwd_kernel):
    B, Sq, Sk, H, Hkv = 2, 67, 150, 6, 3
    q, k, v, gen = _qkv(B, Sq, Sk, H, Hkv, D, dtype, seed=7, layout=layout)
    kv_mask = make_kv_mask(B, 2 * Sk, gen, device=DEV)[:, ::2]  # a strided mask
    for causal in (False, True):
        out, lse = OPS.flash_attn_fwd(q, k, v, 0.3, causal, kv_mask, _at(fwd_kernel, D))
        check_attention(out, lse, q, k, v, 0.3, causal, kv_mask)


@pytest.mark.parametrize("scale", [-0.2, 0.0, 2.5])
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=str)
def test_fwd_scale_sign_and_zero(scale, dtype, fwd_kernel):
    # The tensor-core kernel needs a positive scale internally; negative and zero scales go other ways.
    q, k, v, gen = _qkv(2, 45, 80, 2, 2, 64, dtype, seed=3)
    kv_mask = make_kv_mask(2, 80, gen, device=DEV)
    out, lse = OPS.flash_attn_fwd(q, k, v, scale, True, kv_mask, fwd_kernel)
    check_attention(out, lse, q, k, v, scale, True, kv_mask)


def test_fwd_variant_argument_errors():
    q, k, v, _ = _qkv(1, 8, 8, 1, 1, 72, F16, seed=3)
    allowed = "default, mma, sm90, sm90_tma, sm90_tma_no_pingpong or auto"
    for op in (lambda kernel: OPS.flash_attn_fwd(q, k, v, None, False, None, kernel),
               lambda kernel: OPS.flash_attn_fwd_acc_(q, k, v, torch.zeros_like(q), torch.zeros(1, 1, 8,
                                                      device=DEV), None, False, None, kernel)):
        with pytest.raises(ValueError, match=f"variant must be {allowed}, got 'fastest'"):
            op("fastest")
        with pytest.raises(ValueError, match="D <= 64 or 96 < D <= 128"):  # D = 72: no wgmma kernel anywhere
            op("sm90")


@pytest.mark.parametrize("kernel", ["sm90", "sm90_tma", "sm90_tma_no_pingpong"])
@pytest.mark.parametrize("D", [64, 128])
def test_fwd_sm90_kernel_named(D, kernel):
    # On sm_90 each wgmma kernel must be built and run when named (so "auto" cannot have quietly fallen back
    # to another), the TMA one with and without its warpgroups' turn-taking; on other devices naming it is an
    # error that says what it needs.
    q, k, v, gen = _qkv(2, 300, 600, 4, 2, D, BF16, seed=D)
    kv_mask = make_kv_mask(2, 600, gen, device=DEV)
    if not IS_SM90:
        with pytest.raises(ValueError, match=f"variant='{kernel}' needs"):
            OPS.flash_attn_fwd(q, k, v, None, True, kv_mask, kernel)
        return
    _check_causal_and_chunked(q, k, v, kv_mask, split=250, kernel=kernel)


def _check_causal_and_chunked(q, k, v, kv_mask, split, kernel):
    """The causal forward, then the fused ring step: keys [0, split) and [split, Sk) accumulated into a
    NaN-poisoned float32 state equal attention over all of them."""
    out, lse = OPS.flash_attn_fwd(q, k, v, None, True, kv_mask, kernel)
    check_attention(out, lse, q, k, v, None, True, kv_mask)
    acc = torch.full(q.shape, float("nan"), dtype=torch.float32, device=DEV)
    acc_lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=DEV)
    for s, e in ((0, split), (split, k.shape[1])):
        OPS.flash_attn_fwd_acc_(q, k[:, s:e], v[:, s:e], acc, acc_lse, None, False, kv_mask[:, s:e], kernel)
    check_attention(acc.to(q.dtype), acc_lse, q, k, v, None, False, kv_mask)


@pytest.mark.skipif(not IS_SM90, reason="the TMA kernel's layout rules apply on sm_90 devices")
def test_fwd_sm90_tma_refuses_what_tma_cannot_address():
    # Rows one element off 16-byte alignment have no tensor map: naming the TMA kernel is an error that says
    # what it needs, while "auto" takes the cp.async wgmma kernel and gets the right answer.
    q, k, v, _ = _qkv(1, 70, 90, 2, 1, 64, F16, seed=11, layout="offset")
    with pytest.raises(ValueError, match="variant='sm90_tma' needs q, k and v that TMA can address"):
        OPS.flash_attn_fwd(q, k, v, None, False, None, "sm90_tma")
    check_attention(*OPS.flash_attn_fwd(q, k, v, None, False, None, "auto"), q, k, v)


@pytest.mark.skipif(not IS_SM90, reason="the TMA kernel runs on sm_90 devices")
@pytest.mark.parametrize("kv_layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("D", [64, 128])
def test_fwd_sm90_tma_takes_head_major_memory(D, kv_layout):
    # [B, H, S, D] memory seen as BSHD (the SDPA layout) gets tensor maps with S inside H: q always, k and v
    # too or in BSHD memory; GQA, a mask, causal, and the fused step into a float32 state.
    q, _, _, gen = _qkv(2, 300, 600, 4, 2, D, BF16, seed=D + 5, layout="bhsd")
    _, k, v, _ = _qkv(2, 300, 600, 4, 2, D, BF16, seed=D + 6, layout=kv_layout)
    kv_mask = make_kv_mask(2, 600, gen, device=DEV)
    _check_causal_and_chunked(q, k, v, kv_mask, split=350, kernel="sm90_tma")


def test_fwd_long_sequence_many_blocks(fwd_kernel):
    # Many key blocks (online rescaling over dozens of steps) and many query blocks, causal.
    q, k, v, _ = _qkv(1, 1100, 1300, 2, 1, 128, BF16, seed=11)
    out, lse = OPS.flash_attn_fwd(q, k, v, None, True, None, fwd_kernel)
    check_attention(out, lse, q, k, v, causal=True)


# ---------------------------------------------------------------------------------------------------------
# flash_attn_fwd_acc_

def _old_state(B, Sq, H, D, out_dtype, gen, strided):
    """A running state with some empty (-inf) rows, out optionally a row slice of a bigger accumulator and
    lse a transposed view."""
    out = randn(B, Sq, H, D, gen=gen).to(out_dtype)
    lse = torch.randn(B, H, Sq, generator=gen) * 2
    lse[:, :, ::4] = NEG_INF
    out[lse.isneginf().transpose(1, 2)] = float("nan")  # an empty row's out must never be read
    if strided:
        big = torch.zeros(B, Sq + 5, H, D, dtype=out_dtype)
        big[:, 3:3 + Sq] = out
        out = big.to(DEV)[:, 3:3 + Sq]
        lse = lse.transpose(1, 2).contiguous().to(DEV).transpose(1, 2)
    else:
        out, lse = out.to(DEV), lse.to(DEV)
    return out, lse


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
@pytest.mark.parametrize("dtype,D,acc_dtype", [(F16, 64, F32), (BF16, 128, F32), (F16, 72, F16),
                                               (BF16, 256, BF16), (F32, 48, F32)], ids=str)
def test_acc_merges_into_state(causal, strided, dtype, D, acc_dtype, fwd_kernel):
    B, Sq, Sk, H, Hkv = 2, 90, 60, 4, 2  # causal with Sq > Sk: the first 30 rows see no key
    q, k, v, gen = _qkv(B, Sq, Sk, H, Hkv, D, dtype, seed=D)
    kv_mask = make_kv_mask(B, Sk, gen, device=DEV)  # the last batch sees no key
    out, lse = _old_state(B, Sq, H, D, acc_dtype, gen, strided)
    old_out, old_lse = out.clone(), lse.clone()
    OPS.flash_attn_fwd_acc_(q, k, v, out, lse, None, causal, kv_mask, _at(fwd_kernel, D))

    new_out, new_lse = attention_ref(q, k, v, None, causal, kv_mask)
    ref_out, ref_lse = merge_ref(old_out, old_lse, new_out, new_lse)
    base_new = same_dtype_math_path(q, k, v, None, causal, kv_mask)
    base_out, base_lse = merge_ref(old_out, old_lse, *base_new)
    out_c, lse_c = out.cpu(), lse.cpu()

    new_empty = new_lse.isneginf()
    old_empty = old_lse.cpu().isneginf()
    # Rows this chunk cannot see: untouched (bit for bit), or set to out 0 when the state was empty too.
    keep = (new_empty & ~old_empty).transpose(1, 2)
    assert torch.equal(out_c[keep], old_out.cpu()[keep]), "rows without visible keys must be left as they are"
    assert torch.equal(lse_c[new_empty & ~old_empty], old_lse.cpu()[new_empty & ~old_empty])
    both = (new_empty & old_empty)
    assert (out_c[both.transpose(1, 2)] == 0).all() and lse_c[both].isneginf().all()
    assert not out_c.isnan().any() and not lse_c.isnan().any()
    valid = ~ref_lse.isneginf()
    assert_close_to_ref("lse", lse_c, ref_lse, base_lse, dtype, valid)
    assert_close_to_ref("out", out_c, ref_out, base_out.to(acc_dtype), dtype,
                        valid.transpose(1, 2)[..., None])


@pytest.mark.parametrize("dtype,D", [(F16, 64), (BF16, 128), (F32, 32)], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_acc_chunks_equal_whole(dtype, D, causal, fwd_kernel):
    # Accumulating every K/V chunk (empty ones too) from the empty state equals attention over all keys.
    # Under causal masking each chunk is cut into the kernel calls of the ring's plan (plan_chunk): band rows
    # with the kernel's bottom-right rule and the rows that see the whole chunk.
    B, Sq, Sk, H, Hkv = 2, 100, 230, 4, 1
    q, k, v, gen = _qkv(B, Sq, Sk, H, Hkv, D, dtype, seed=5)
    kv_mask = make_kv_mask(B, Sk, gen, device=DEV, empty_batch=False)
    acc = torch.zeros((B, Sq, H, D), device=DEV)  # the ring's empty state (rows no call reaches keep it)
    acc_lse = torch.full((B, H, Sq), NEG_INF, device=DEV)
    bounds = [0, 0, 64, 65, 150, 150, Sk]
    for a, b in zip(bounds, bounds[1:]):
        offset = (Sk - Sq) - a if causal else None  # local query i sees local key j iff j <= i + offset
        for r0, r1, k1, c in plan_chunk(Sq, b - a, offset):
            OPS.flash_attn_fwd_acc_(q[:, r0:r1], k[:, a:a + k1], v[:, a:a + k1], acc[:, r0:r1],
                                    acc_lse[:, :, r0:r1], None, c, kv_mask[:, a:a + k1],
                                    _at(fwd_kernel, D))
    check_attention(acc.to(dtype), acc_lse, q, k, v, causal=causal, kv_mask=kv_mask)


# ---------------------------------------------------------------------------------------------------------
# Ulysses pack/unpack: the CUDA ops must give exactly the CPU ops' buffers and tensors.

def _variants(x):
    """x (CPU, contiguous BSHD) as contiguous, head-major and misaligned (one element off) GPU views."""
    hm = x.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(*x.shape[:-1], x.shape[-1] + 1, dtype=x.dtype)
    wide[..., 1:] = x
    return {"contiguous": x.to(DEV), "head_major": hm.to(DEV), "misaligned": wide.to(DEV)[..., 1:]}


A2A_CASES = [  # (B, S, H, Hkv, D, P, dtype)
    (2, 11, 4, 4, 8, 2, F32),
    (1, 101, 6, 3, 16, 3, F16),
    (2, 10, 8, 2, 4, 4, BF16),   # Hkv divides P: ranks share kv heads
    (1, 3, 4, 1, 8, 4, F32),     # MQA, a rank with no position
    (2, 9, 6, 6, 1, 3, F16),     # D = 1
    (1, 33, 8, 8, 72, 2, BF16),
    (2, 17, 4, 2, 128, 2, F16),
    (1, 0, 2, 2, 8, 2, F32),     # empty sequence
]


@pytest.mark.parametrize("B,S,H,Hkv,D,P,dtype", A2A_CASES)
def test_a2a_ops_match_cpu(B, S, H, Hkv, D, P, dtype):
    gen = torch.Generator().manual_seed(S + 13 * D)
    q, k, v = (randn(B, S, n, D, dtype=dtype, gen=gen) for n in (H, Hkv, Hkv))
    want = OPS.a2a_pack_seq_to_head(q, k, v, P)
    for name, (qg, kg, vg) in zip(_variants(q), zip(*(_variants(t).values() for t in (q, k, v)))):
        got = OPS.a2a_pack_seq_to_head(qg, kg, vg, P)
        assert got.is_cuda and torch.equal(got.cpu(), want), f"a2a_pack_seq_to_head ({name})"

    h = H // P
    hk = Hkv // P if Hkv % P == 0 else 1
    seq_lens = [t.shape[0] for t in torch.tensor_split(torch.empty(S + 5), P)]
    seq_lens[0] = 0  # an empty chunk first
    n = B * sum(seq_lens) * (h + 2 * hk) * D
    recv = randn(n + 1, dtype=dtype, gen=gen)
    for r in (recv[:n], recv[1:]):  # aligned and one element off
        want = OPS.a2a_unpack_seq_to_head(r, seq_lens, B, h, hk, D)
        got = OPS.a2a_unpack_seq_to_head(r.to(DEV), seq_lens, B, h, hk, D)
        for g, w in zip(got, want):
            assert g.is_cuda and g.is_contiguous() and torch.equal(g.cpu(), w), "a2a_unpack_seq_to_head"

    out = randn(B, sum(seq_lens), h + 1, D, dtype=dtype, gen=gen)[:, :, 1:]  # a head slice: strided
    want = OPS.a2a_pack_head_to_seq(out, seq_lens)
    got = OPS.a2a_pack_head_to_seq(out.to(DEV), seq_lens)
    assert torch.equal(got.cpu(), want), "a2a_pack_head_to_seq (contiguous copy)"
    big = torch.zeros(B, sum(seq_lens), h + 1, D, dtype=dtype, device=DEV)
    big[:, :, 1:] = out.to(DEV)
    got = OPS.a2a_pack_head_to_seq(big[:, :, 1:], seq_lens)
    assert torch.equal(got.cpu(), want), "a2a_pack_head_to_seq (strided)"

    m = P * B * S * h * D
    recv = randn(m + 1, dtype=dtype, gen=gen)
    for r in (recv[:m], recv[1:]):
        want = OPS.a2a_unpack_head_to_seq(r, [h] * P, B, S, D)
        got = OPS.a2a_unpack_head_to_seq(r.to(DEV), [h] * P, B, S, D)
        assert got.is_cuda and torch.equal(got.cpu(), want), "a2a_unpack_head_to_seq"


def test_a2a_errors_match_cpu():
    q = torch.randn(1, 4, 6, 8)
    for args in ((q, q[:, :, :2], q[:, :, :2], 7), (q, q[:, :, :4], q[:, :, :4], 3)):
        with pytest.raises(ValueError) as cpu_err:
            OPS.a2a_pack_seq_to_head(*args)
        with pytest.raises(ValueError) as cuda_err:
            OPS.a2a_pack_seq_to_head(*(a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args))
        assert str(cuda_err.value).splitlines()[0] == str(cpu_err.value).splitlines()[0]


@pytest.mark.parametrize("H,Hkv,P", [(6, 2, 4), (24, 24, 16), (12, 3, 4)])
def test_a2a_uneven_splits_go_through_torch_ops(H, Hkv, P):
    """The CUDA kernels take even head splits only and refuse the others; the collectives route those
    through torch ops, which must fill the CPU ops' layouts."""
    from cp_attention import ops

    gen = torch.Generator().manual_seed(H * P)
    q, k, v = (randn(2, 7, n, 8, dtype=F16, gen=gen) for n in (H, Hkv, Hkv))
    split = ops.ulysses_head_split("test", H, Hkv, P)
    with pytest.raises(ValueError, match="CUDA kernel splits heads evenly"):
        OPS.a2a_pack_seq_to_head(q.to(DEV), k.to(DEV), v.to(DEV), P)
    got = ops.pack_seq_to_head_torch(q.to(DEV), k.to(DEV), v.to(DEV), split)
    assert got.is_cuda and torch.equal(got.cpu(), OPS.a2a_pack_seq_to_head(q, k, v, P))
    heads = [r.nq for r in split]
    recv = randn(2 * 7 * H * 8, dtype=F16, gen=gen)
    if len(set(heads)) > 1:
        with pytest.raises(ValueError, match="same head count from every source"):
            OPS.a2a_unpack_head_to_seq(recv.to(DEV), heads, 2, 7, 8)
    got = ops.unpack_head_to_seq_torch(recv.to(DEV), heads, 2, 7, 8)
    assert got.is_cuda and torch.equal(got.cpu(), OPS.a2a_unpack_head_to_seq(recv, heads, 2, 7, 8))
