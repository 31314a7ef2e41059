"""The registered ops as torch sees them: schemas and fake kernels (opcheck), FakeTensor/meta shape
inference, torch.compile, and autograd (forward-only ops must refuse backward loudly; the attention,
merge, all-to-all and ring ops backpropagate on CPU tensors)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import randn
from torch._subclasses.fake_tensor import FakeTensorMode

import cp_attention
from cp_attention import ops
from cp_attention.ops import TRITON_OPS

OPS = torch.ops.cp_attention
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------------
# Sample inputs, per op. Each builder takes (device, gen) and returns (args, kwargs).
def _qkv(B, Sq, Sk, H, Hkv, D, dtype, device, gen):
    return (randn(B, Sq, H, D, dtype=dtype, device=device, gen=gen),
            randn(B, Sk, Hkv, D, dtype=dtype, device=device, gen=gen),
            randn(B, Sk, Hkv, D, dtype=dtype, device=device, gen=gen))


def _fwd_plain(device, gen):
    return _qkv(2, 9, 9, 2, 2, 16, torch.float32, device, gen) + (None, False, None), {}


def _fwd_gqa_causal_fp16(device, gen):
    return _qkv(1, 12, 7, 6, 2, 40, torch.float16, device, gen) + (0.2, True, None), {}


def _fwd_mask_bf16(device, gen):
    q, k, v = _qkv(2, 5, 11, 4, 1, 72, torch.bfloat16, device, gen)
    mask = torch.rand(2, 11, generator=gen) < 0.5
    mask[1] = False  # a batch with no visible key
    return (q, k, v), {"scale": None, "causal": True, "kv_mask": mask.to(device)}


def _fwd_empty_keys(device, gen):
    return _qkv(1, 4, 0, 2, 2, 8, torch.float32, device, gen) + (None, True, None), {}


def _state(B, S, H, D, dtype, device, gen, dead=False):
    out = randn(B, S, H, D, dtype=dtype, device=device, gen=gen)
    lse = torch.randn(B, H, S, generator=gen) * 3
    if dead:
        lse[:, :, ::3] = NEG_INF
    return out, lse.to(device)


def _merge_fp32(device, gen):
    return (_state(2, 7, 3, 16, torch.float32, device, gen)
            + _state(2, 7, 3, 16, torch.float32, device, gen)), {}


def _merge_mixed_dead(device, gen):
    return (_state(1, 10, 2, 8, torch.float16, device, gen, dead=True)
            + _state(1, 10, 2, 8, torch.float32, device, gen)), {}


def _merge_strided_bf16(device, gen):
    out_a, lse_a = _state(2, 6, 4, 8, torch.bfloat16, device, gen)
    out_b, lse_b = _state(2, 6, 4, 8, torch.bfloat16, device, gen, dead=True)
    lse_a = lse_a.transpose(1, 2).contiguous().transpose(1, 2)
    return (out_a.transpose(1, 2).contiguous().transpose(1, 2), lse_a, out_b, lse_b), {}


def _merge_inplace_acc(device, gen):
    return _state(2, 9, 2, 32, torch.float32, device, gen, dead=True) + _state(2, 9, 2, 32, torch.float16,
                                                                               device, gen), {}


def _merge_inplace_same(device, gen):
    return _state(1, 5, 3, 4, torch.bfloat16, device, gen) + _state(1, 5, 3, 4, torch.bfloat16, device, gen,
                                                                     dead=True), {}


# Ulysses pack/unpack. The receive buffers are read in memory order whatever their shape; the samples pass
# them as [1, 1, 1, n] views so that the autograd checks (which mark 4-D float inputs) cover these ops too.
def _a2a_pack_seq_fp32(device, gen):
    return _qkv(2, 5, 5, 4, 2, 8, torch.float32, device, gen) + (2,), {}


def _a2a_pack_seq_mqa_strided_fp16(device, gen):
    q, k, v = _qkv(1, 6, 6, 6, 1, 16, torch.float16, device, gen)
    return (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, 3), {}


def _a2a_unpack_seq_bf16(device, gen):
    seq_lens, B, h, hk, D = [3, 0, 4], 2, 2, 1, 8
    recv = randn(1, 1, 1, B * sum(seq_lens) * (h + 2 * hk) * D, dtype=torch.bfloat16, device=device, gen=gen)
    return (recv, seq_lens, B, h, hk, D), {}


def _a2a_pack_head_fp16(device, gen):
    out = randn(2, 9, 3, 16, dtype=torch.float16, device=device, gen=gen)
    return (out[:, :, :2], [4, 0, 5]), {}  # a head slice: strided along S


def _a2a_unpack_head_fp32(device, gen):
    P, B, S, h, D = 3, 2, 4, 2, 8
    return (randn(1, 1, 1, P * B * S * h * D, dtype=torch.float32, device=device, gen=gen), P, B, S, h, D), {}


@functools.cache
def _single_rank_group():
    """A one-rank gloo group registered by name (without init_process_group, so the in-process tests that
    expect torch.distributed to be uninitialised are unaffected), for the collective ops. Cached: the
    registry holds groups weakly, so the group must stay referenced."""
    import torch.distributed as dist

    store = dist.HashStore()
    pg = dist.ProcessGroup(store, 0, 1)
    pg._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    pg._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO,
                         dist.ProcessGroupGloo(store, 0, 1))
    pg._set_group_name("cp_attention_tests_single_rank")
    torch._C._distributed_c10d._register_process_group(pg.group_name, pg)
    return pg


def _single_rank_group_name() -> str:
    return _single_rank_group().group_name


def _a2a_seq_to_head_mask(device, gen):
    if device != "cpu":
        pytest.skip("the one-rank test group is gloo (CPU)")
    q, k, v = _qkv(2, 7, 7, 4, 2, 8, torch.float16, device, gen)
    mask = torch.rand(2, 7, generator=gen) < 0.5
    return (q, k, v, mask, [7], _single_rank_group_name()), {}


def _a2a_head_to_seq_lse(device, gen):
    if device != "cpu":
        pytest.skip("the one-rank test group is gloo (CPU)")
    out, lse = _state(2, 6, 3, 8, torch.float32, device, gen, dead=True)
    return (out, lse, [6], _single_rank_group_name()), {}


def _a2a_head_to_seq_no_lse(device, gen):
    if device != "cpu":
        pytest.skip("the one-rank test group is gloo (CPU)")
    out, _ = _state(1, 5, 2, 16, torch.bfloat16, device, gen)
    return (out, None, [5], _single_rank_group_name()), {}


def _ring_single_rank_causal_mask(device, gen):
    if device != "cpu":
        pytest.skip("the one-rank test group is gloo (CPU)")
    q, k, v = _qkv(2, 6, 9, 4, 2, 8, torch.float16, device, gen)
    mask = torch.rand(2, 9, generator=gen) < 0.6
    return (q, k, v, mask, [6], [9], _single_rank_group_name(), 0.35, True, "auto", False), {}


def _ring_single_rank_fp32(device, gen):
    if device != "cpu":
        pytest.skip("the one-rank test group is gloo (CPU)")
    q, k, v = _qkv(1, 5, 5, 2, 2, 16, torch.float32, device, gen)
    return (q, k, v, None, [5], [5], _single_rank_group_name(), 0.25, False, "cpu", False), {}


def _ring_bwd_single_rank(device, gen):
    if device != "cpu":
        pytest.skip("the one-rank test group is gloo (CPU)")
    (q, k, v, mask, q_lens, k_lens, group, scale, causal, backend, check), _ = _ring_single_rank_causal_mask(
        device, gen)
    out, lse = OPS.ring_attn_fwd(q, k, v, mask, q_lens, k_lens, group, scale, causal, backend, check)
    dout = randn(*out.shape, dtype=out.dtype, device=device, gen=gen)
    dlse = torch.randn(*lse.shape, generator=gen)
    return (dout, q, k, v, out, lse, dlse, mask, q_lens, k_lens, group, scale, causal, backend, check), {}


def _on_triton(build):
    """The sample builder `build` for a Triton op: skipped where Triton does not run on the device (on the
    CPU it runs only under TRITON_INTERPRET=1; tests/test_triton.py runs these cases that way)."""
    def builder(device, gen):
        if "triton" not in cp_attention.available_backends(device):
            pytest.skip(f"Triton does not run on {device} here (the CPU needs TRITON_INTERPRET=1)")
        return build(device, gen)

    builder.__name__ = build.__name__
    return builder


def _acc_state(q, gen, dtype=torch.float32, dead_every=3):
    """A running state for q [B, Sq, H, D]: out (dtype) and lse [B, H, Sq]; every `dead_every`-th row is
    dead (lse -inf, out NaN: never to be read)."""
    B, Sq, H, D = q.shape
    lse = torch.randn(B, H, Sq, generator=gen) * 2
    lse[:, :, ::dead_every] = NEG_INF
    out = torch.randn(B, Sq, H, D, generator=gen)
    out = out.masked_fill(torch.isneginf(lse).transpose(1, 2)[..., None], float("nan"))
    return out.to(device=q.device, dtype=dtype), lse.to(q.device)


def _acc_fp32_causal_mask(device, gen):
    q, k, v = _qkv(2, 9, 13, 4, 2, 32, torch.float16, device, gen)
    out, lse = _acc_state(q, gen)
    mask = torch.rand(2, 13, generator=gen) < 0.6
    mask[1] = False
    return (q, k, v, out, lse, None, True, mask.to(device)), {}


def _acc_q_dtype_row_slice(device, gen):
    # The state is a row slice of a larger accumulator (strided views), in q's dtype.
    q, k, v = _qkv(1, 11, 10, 2, 2, 24, torch.float16, device, gen)
    big_out, big_lse = _acc_state(q, gen, dtype=torch.float16)
    return (q[:, 3:9], k, v, big_out[:, 3:9], big_lse[:, :, 3:9], 0.3, False, None), {}


def _acc_empty_chunk(device, gen):
    q, k, v = _qkv(1, 5, 0, 2, 1, 8, torch.float32, device, gen)
    out, lse = _acc_state(q, gen, dead_every=2)
    return (q, k, v, out, lse, None, False, None), {}


def _bwd_sample(fwd_build, dtype=None, with_dlse=True):
    """A flash_attn_bwd sample from a flash_attn_fwd one: its inputs, the forward's (out, lse) and random
    dout (and dlse). The backward kernel is CPU-only: skipped on other devices. dtype: cast q, k, v first."""
    def builder(device, gen):
        if torch.device(device).type != "cpu":
            pytest.skip("flash_attn_bwd runs on the CPU only")
        (q, k, v, *rest), kwargs = fwd_build(device, gen)
        fwd_args = dict(zip(("scale", "causal", "kv_mask"), rest), **kwargs)
        fwd_args.setdefault("scale", None)
        fwd_args.setdefault("causal", False)
        fwd_args.setdefault("kv_mask", None)
        out, lse = OPS.flash_attn_fwd(q, k, v, fwd_args["scale"], fwd_args["causal"], fwd_args["kv_mask"])
        dout = randn(*out.shape, dtype=out.dtype, device=device, gen=gen)
        dlse = torch.randn(*lse.shape, generator=gen).to(device) if with_dlse else None
        if dtype is not None:
            q, k, v, out, dout = (t.to(dtype) for t in (q, k, v, out, dout))
        return ((dout, q, k, v, out, lse, fwd_args["scale"], fwd_args["causal"], fwd_args["kv_mask"], dlse),
                {})

    builder.__name__ = f"_bwd_of{fwd_build.__name__}" + ("" if with_dlse else "_no_dlse") + (
        "" if dtype is None else f"_{str(dtype).split('.')[1]}")
    return builder


SAMPLES = {
    OPS.flash_attn_fwd.default: [_fwd_plain, _fwd_gqa_causal_fp16, _fwd_mask_bf16, _fwd_empty_keys],
    OPS.flash_attn_bwd.default: [_bwd_sample(_fwd_plain), _bwd_sample(_fwd_gqa_causal_fp16, with_dlse=False),
                                 _bwd_sample(_fwd_mask_bf16), _bwd_sample(_fwd_empty_keys),
                                 _bwd_sample(_fwd_mask_bf16, dtype=torch.float64)],
    OPS.flash_attn_fwd_acc_.default: [_acc_fp32_causal_mask, _acc_q_dtype_row_slice, _acc_empty_chunk],
    OPS.merge_attn_states.default: [_merge_fp32, _merge_mixed_dead, _merge_strided_bf16],
    OPS.merge_attn_states_.default: [_merge_inplace_acc, _merge_inplace_same],
    OPS.a2a_pack_seq_to_head.default: [_a2a_pack_seq_fp32, _a2a_pack_seq_mqa_strided_fp16],
    OPS.a2a_unpack_seq_to_head.default: [_a2a_unpack_seq_bf16],
    OPS.a2a_pack_head_to_seq.default: [_a2a_pack_head_fp16],
    OPS.a2a_unpack_head_to_seq.default: [_a2a_unpack_head_fp32],
    OPS.a2a_seq_to_head.default: [_a2a_seq_to_head_mask],
    OPS.a2a_head_to_seq.default: [_a2a_head_to_seq_lse, _a2a_head_to_seq_no_lse],
    OPS.ring_attn_fwd.default: [_ring_single_rank_causal_mask, _ring_single_rank_fp32],
    OPS.ring_attn_bwd.default: [_ring_bwd_single_rank],
    OPS.triton_flash_attn_fwd.default: [
        _on_triton(b) for b in (_fwd_plain, _fwd_gqa_causal_fp16, _fwd_mask_bf16, _fwd_empty_keys)],
    OPS.triton_flash_attn_fwd_acc_.default: [
        _on_triton(b) for b in (_acc_fp32_causal_mask, _acc_q_dtype_row_slice, _acc_empty_chunk)],
    OPS.triton_merge_attn_states.default: [
        _on_triton(b) for b in (_merge_fp32, _merge_mixed_dead, _merge_strided_bf16)],
    OPS.triton_merge_attn_states_.default: [_on_triton(b) for b in (_merge_inplace_acc, _merge_inplace_same)],
}
# Ops that update their inputs in place and return nothing.
IN_PLACE = {OPS.merge_attn_states_.default, OPS.triton_merge_attn_states_.default,
            OPS.flash_attn_fwd_acc_.default, OPS.triton_flash_attn_fwd_acc_.default}
SAMPLE_CASES = [pytest.param(op, b, id=f"{op.name().split('::')[1]}-{b.__name__.lstrip('_')}")
                for op, builders in SAMPLES.items() for b in builders]
# The inputs that an autograd test marks requires_grad (the float tensors an op only reads).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The ops with a backward (on CPU tensors): every other op is forward-only and must refuse backward.
BACKPROP = {OPS.flash_attn_fwd.default, OPS.merge_attn_states.default, OPS.triton_merge_attn_states.default,
            OPS.a2a_seq_to_head.default, OPS.a2a_head_to_seq.default, OPS.ring_attn_fwd.default}


def test_samples_cover_every_op():
    assert set(SAMPLES) == set(ops.ALL_OPS), (
        f"ops without samples: {set(ops.ALL_OPS) - set(SAMPLES)}; unknown: {set(SAMPLES) - set(ops.ALL_OPS)}")
    # ...and ALL_OPS must list every op the library registers.
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("cp_attention::")}
    assert registered == {op.name() for op in ops.ALL_OPS}, f"registered ops: {sorted(registered)}"


@pytest.mark.parametrize("op,build", SAMPLE_CASES)
def test_opcheck(device, op, build):
    args, kwargs = build(device, torch.Generator().manual_seed(0))
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("op,build", SAMPLE_CASES)
def test_opcheck_autograd_registration(device, op, build):
    # With inputs that require grad, the op must have an autograd kernel (a forward-only op's raises on
    # backward). The aot_dispatch checks would run that backward, so only the registration-level checks run
    # here (tests/test_flash_attn_bwd.py runs the full opcheck of flash_attn_fwd with grad inputs).
    args, kwargs = build(device, torch.Generator().manual_seed(1))
    args = list(args)
    if op in IN_PLACE:
        # A mutating op cannot carry an autograd formula: its Autograd kernel refuses to run when a graph
        # would be recorded (test_backward_raises checks the message), so opcheck sees no grad inputs here.
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Autograd")
        torch.library.opcheck(op, tuple(args), kwargs, test_utils=("test_schema", "test_faketensor"))
        return
    for i in range(len(args)):
        if isinstance(args[i], torch.Tensor) and args[i].dtype in FLOAT_DTYPES and args[i].dim() == 4:
            args[i] = args[i].detach().requires_grad_()
    torch.library.opcheck(op, tuple(args), kwargs,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("op,build", SAMPLE_CASES)
def test_fake_and_meta_match_real(op, build):
    # FakeTensorMode and the meta device must predict shapes, dtypes and strides-free layout of the real run.
    args, kwargs = build("cpu", torch.Generator().manual_seed(2))
    real_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    real = op(*real_args, **kwargs)
    mode = FakeTensorMode()
    with mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake_kwargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                       for k, v in kwargs.items()}
        fake = op(*fake_args, **fake_kwargs)
    meta_args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    meta_kwargs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    meta = op(*meta_args, **meta_kwargs)
    if op in IN_PLACE:
        assert real is None and fake is None and meta is None
        return
    for r, f, m in zip(real, fake, meta):
        assert f.shape == r.shape and f.dtype == r.dtype, f"fake {f.shape} {f.dtype}, real {r.shape}"
        assert m.shape == r.shape and m.dtype == r.dtype and m.device.type == "meta"


def test_fake_rejects_bad_input():
    # Under FakeTensorMode (what torch.compile traces with), bad input is reported as it is in eager.
    mode = FakeTensorMode()
    with mode:
        q = torch.empty(1, 4, 3, 8)
        k = torch.empty(1, 4, 2, 8)
        with pytest.raises(ValueError, match="heads"):
            OPS.flash_attn_fwd(q, k, k, None, False, None)
        with pytest.raises(ValueError, match="lse_b"):
            OPS.merge_attn_states(q, torch.empty(1, 3, 4), q, torch.empty(1, 4, 3))


# ---------------------------------------------------------------------------------------------------------
def _ring_two_chunks(q, k, v, kv_mask, split):
    """Attention over two K/V chunks merged three ways (functional, in place into a float32 state, and the
    fused attend-and-merge op): the patterns a ring step compiles to."""
    o1, l1 = OPS.flash_attn_fwd(q, k[:, :split], v[:, :split], None, False, kv_mask[:, :split])
    o2, l2 = OPS.flash_attn_fwd(q, k[:, split:], v[:, split:], None, False, kv_mask[:, split:])
    out, lse = OPS.merge_attn_states(o1, l1, o2, l2)
    acc, acc_lse = o1.float(), l1.clone()
    OPS.merge_attn_states_(acc, acc_lse, o2, l2)
    # The fused ring step, from the empty state.
    facc = torch.zeros(q.shape, dtype=torch.float32)
    facc_lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"))
    OPS.flash_attn_fwd_acc_(q, k[:, :split], v[:, :split], facc, facc_lse, None, False, kv_mask[:, :split])
    OPS.flash_attn_fwd_acc_(q, k[:, split:], v[:, split:], facc, facc_lse, None, False, kv_mask[:, split:])
    return out, lse, acc * 2.0, acc_lse, facc, facc_lse


def _ring_inputs(Sq, Sk, dtype, gen):
    q = randn(2, Sq, 4, 32, dtype=dtype, gen=gen)
    k = randn(2, Sk, 2, 32, dtype=dtype, gen=gen)
    v = randn(2, Sk, 2, 32, dtype=dtype, gen=gen)
    mask = torch.rand(2, Sk, generator=gen) < 0.7
    mask[1] = False
    return q, k, v, mask


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_compile_fullgraph_aot_eager(dtype, dynamic):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    compiled = torch.compile(_ring_two_chunks, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    # Two sizes: with dynamic=True the second call reuses the symbolic graph (fake kernels on SymInts).
    for Sq, Sk, split in ((13, 29, 11), (21, 40, 17)):
        args = _ring_inputs(Sq, Sk, dtype, gen)
        want = _ring_two_chunks(*args, split)
        got = compiled(*args, split)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    args = _ring_inputs(17, 33, torch.float32, torch.Generator().manual_seed(4))
    compiled = torch.compile(_ring_two_chunks, backend="inductor", fullgraph=True)
    want = _ring_two_chunks(*args, 14)
    # Inductor's on-disk graph cache does not key on our ops' schemas: an entry left by an older build of
    # the library (other argument names) would be replayed. Compile afresh.
    with torch._inductor.config.patch(fx_graph_cache=False):
        got = compiled(*args, 14)
    for g, w in zip(got, want):
        # Inductor may fuse the surrounding elementwise ops (acc * 2.0) differently, not our kernels.
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,build", [c for c in SAMPLE_CASES if c.values[0] not in BACKPROP])
def test_backward_raises(op, build):
    # Forward-only ops: asking for gradients through any of them must fail loudly, not return wrong
    # (missing) gradients. The error may come at the call (in-place ops) or at backward; it must say why.
    args, kwargs = build("cpu", torch.Generator().manual_seed(5))
    args = list(args)
    leaves = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dtype in FLOAT_DTYPES and a.dim() == 4:
            leaf = a.detach().float().requires_grad_()
            leaves.append(leaf)
            args[i] = leaf.to(a.dtype).clone()  # a non-leaf, so in-place ops may write into it
    with pytest.raises(RuntimeError, match="backward"):
        res = op(*args, **kwargs)
        res = args[0] if res is None else res[0]
        res.float().sum().backward()


def _grad_inputs(args):
    """args with every floating tensor (4-D inputs, and 3-D lse inputs of a merge or all-to-all) marked
    requires_grad; and the list of them."""
    args, leaves = list(args), []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dtype in FLOAT_DTYPES and a.dim() in (3, 4):
            args[i] = a.detach().requires_grad_()
            leaves.append(args[i])
    return args, leaves


@pytest.mark.parametrize("op,build", [c for c in SAMPLE_CASES if c.values[0] in BACKPROP])
def test_backward_runs_on_cpu(op, build):
    # These ops backpropagate on CPU tensors (tests/test_flash_attn_bwd.py, test_merge.py, test_a2a_ops.py
    # and the context-parallel tests check the values): every float input gets a finite gradient of its
    # own shape and dtype, through every float output.
    if "triton" not in cp_attention.available_backends("cpu") and op in TRITON_OPS:
        pytest.skip("Triton does not run on the CPU here (TRITON_INTERPRET=1 needed)")
    args, kwargs = build("cpu", torch.Generator().manual_seed(6))
    args, leaves = _grad_inputs(args)
    res = op(*args, **kwargs)
    loss = sum(torch.where(torch.isfinite(r), r, 0.0).float().sum() for r in res if r.is_floating_point())
    loss.backward()
    for a in leaves:
        assert a.grad is not None and a.grad.shape == a.shape and a.grad.dtype == a.dtype
        assert torch.isfinite(a.grad).all()


@pytest.mark.parametrize("op,build", [c for c in SAMPLE_CASES if c.values[0] in BACKPROP])
def test_opcheck_with_grad(op, build):
    # The full opcheck, test_aot_dispatch_dynamic included (it runs the backward under AOT autograd), with
    # every float input requiring grad.
    args, kwargs = build("cpu", torch.Generator().manual_seed(7))
    if op in TRITON_OPS and "triton" not in cp_attention.available_backends("cpu"):
        pytest.skip("Triton does not run on the CPU here (TRITON_INTERPRET=1 needed)")
    args, _ = _grad_inputs(args)
    torch.library.opcheck(op, tuple(args), kwargs)
