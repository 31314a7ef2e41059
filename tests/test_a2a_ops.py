"""The Ulysses pack/unpack ops on one process, against plain torch (slice, permute, contiguous, cat): each
op alone, and the whole exchange of P ranks simulated in memory (rank r's block for rank d handed over
directly), which must turn sequence shards into head shards over the whole sequence and back."""

from __future__ import annotations

import pytest
import torch
from conftest import randn
from reference import (
    assert_close_to_ref,
    attention_bwd_ref,
    attention_ref,
    same_dtype_math_path,
    same_dtype_math_path_bwd,
)

import cp_attention
from cp_attention import ops

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _lens(S: int, P: int) -> list[int]:
    return [t.shape[0] for t in torch.tensor_split(torch.empty(S), P)]


def _heads(H: int, Hkv: int, P: int, r: int) -> tuple[slice, slice]:
    """Rank r's (query heads, kv heads) under the documented rule, derived here independently: query heads
    in torch.tensor_split order, kv heads exactly those the query heads read (query head g reads kv head
    g // (H // Hkv)), which must be a contiguous range."""
    q = torch.tensor_split(torch.arange(H), P)[r].tolist()
    kv = sorted({g // (H // Hkv) for g in q})
    assert kv == list(range(kv[0], kv[-1] + 1)), "kv heads of a rank must be contiguous"
    return slice(q[0], q[-1] + 1), slice(kv[0], kv[-1] + 1)


def _ref_pack_seq_to_head(q, k, v, P):
    H, Hkv = q.shape[2], k.shape[2]
    parts = []
    for r in range(P):
        qs, kv = _heads(H, Hkv, P, r)
        parts += [q[:, :, qs], k[:, :, kv], v[:, :, kv]]
    return torch.cat([p.contiguous().reshape(-1) for p in parts])


def _ref_unpack_seq_to_head(recv, seq_lens, B, h, hk, D):
    sizes = [B * s * (h + 2 * hk) * D for s in seq_lens]
    qs, ks, vs = [], [], []
    for blk, s in zip(recv.reshape(-1).split(sizes), seq_lens):
        a, b, c = blk.split([B * s * h * D, B * s * hk * D, B * s * hk * D])
        qs.append(a.view(B, s, h, D))
        ks.append(b.view(B, s, hk, D))
        vs.append(c.view(B, s, hk, D))
    return torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1)


CASES = [  # (B, S, H, Hkv, D, P, dtype)
    (2, 11, 4, 4, 8, 2, F32),
    (1, 1001, 6, 3, 16, 3, F16),
    (2, 10, 8, 2, 4, 4, BF16),   # Hkv = 2 divides P = 4: pairs of ranks share one kv head
    (1, 3, 4, 1, 8, 4, F32),     # MQA on 4 ranks, one rank holding no position
    (2, 9, 6, 6, 1, 3, F16),     # D = 1
    (1, 0, 2, 2, 8, 2, F32),     # empty sequence
    # Uneven head splits (the first H % P ranks one query head more):
    (1, 19, 24, 24, 4, 16, F32),  # FLUX's 24 heads at Ulysses degree 16: ranks 0-7 get 2 heads, 8-15 one
    (1, 21, 40, 40, 2, 16, BF16),  # Wan's 40 heads on 16 ranks: 3 and 2
    (1, 7, 8, 8, 4, 5, F16),     # 8 heads on 5 ranks
    (2, 9, 30, 30, 4, 4, F32),   # 30 heads on 4: 8, 8, 7, 7
    (1, 10, 6, 2, 8, 4, F16),    # 6 query heads, 2 kv heads, 4 ranks: rank 1 reads both kv heads
    (1, 5, 24, 8, 4, 16, F32),   # GQA at degree 16: groups of 3 cut by ranks of 2 or 1 heads
    (1, 9, 12, 3, 4, 4, BF16),   # even query split (3 each), groups of 4 cut: kv heads copied to 2 ranks
    (1, 6, 8, 1, 4, 5, F32),     # MQA, uneven
    (1, 4, 5, 5, 8, 5, F16),     # P = H: one head each
]


@pytest.mark.parametrize("B,S,H,Hkv,D,P,dtype", CASES)
def test_exchange_roundtrip_matches_torch(B, S, H, Hkv, D, P, dtype):
    gen = torch.Generator().manual_seed(S + 7 * P)
    q, k, v = (randn(B, S, n, D, dtype=dtype, gen=gen) for n in (H, Hkv, Hkv))
    lens = _lens(S, P)
    starts = [sum(lens[:r]) for r in range(P)]
    split = ops.ulysses_head_split("test", H, Hkv, P)
    for r, rh in enumerate(split):
        qs, kv = _heads(H, Hkv, P, r)
        assert (rh.q0, rh.nq, rh.kv0, rh.nkv) == (qs.start, qs.stop - qs.start, kv.start, kv.stop - kv.start)
    # Strided shards (a head-major copy viewed back as BSHD), as a caller's slices may be.
    shards = [tuple(x[:, a:a + n].transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
              for a, n in zip(starts, lens)]
    sends = []
    for r in range(P):
        send = ops.a2a_pack_seq_to_head(*shards[r], P)
        assert send.dim() == 1 and send.dtype == dtype
        assert torch.equal(send, _ref_pack_seq_to_head(*shards[r], P)), f"pack of rank {r}"
        assert torch.equal(ops.pack_seq_to_head_torch(*shards[r], split), send), f"torch pack of rank {r}"
        # Destination d's block: this rank's positions of d's heads only (no padding heads).
        sends.append(send.split([B * lens[r] * (d.nq + 2 * d.nkv) * D for d in split]))
    outs = []
    for d in range(P):
        h, hk = split[d].nq, split[d].nkv
        recv = torch.cat([sends[s][d] for s in range(P)])
        qd, kd, vd = ops.a2a_unpack_seq_to_head(recv, lens, B, h, hk, D)
        for got, want in zip((qd, kd, vd), _ref_unpack_seq_to_head(recv, lens, B, h, hk, D)):
            assert got.is_contiguous() and torch.equal(got, want)
        qs, kv = _heads(H, Hkv, P, d)
        assert torch.equal(qd, q[:, :, qs]), f"rank {d}'s query heads"
        assert torch.equal(kd, k[:, :, kv]) and torch.equal(vd, v[:, :, kv]), f"rank {d}'s kv heads"
        # The local kv head of each local query head, as the attention will read it.
        index = ops.local_kv_index(split[d], H, Hkv)
        index = [i // (h // hk) for i in range(h)] if index is None else index
        for i in range(h):
            want = k[:, :, (qs.start + i) // (H // Hkv)]
            assert torch.equal(kd[:, :, index[i]], want), f"rank {d}'s query head {i}: wrong kv head"
        outs.append(qd)  # stands in for this rank's attention output [B, S, h, D]

    heads = [rh.nq for rh in split]
    back_sends = []
    for d in range(P):
        out_h = outs[d][:, :, :]  # any strides
        send = ops.a2a_pack_head_to_seq(out_h, lens)
        ref = torch.cat([out_h[:, a:a + n].contiguous().reshape(-1) for a, n in zip(starts, lens)])
        assert torch.equal(send, ref), f"head_to_seq pack of rank {d}"
        back_sends.append(send.split([B * n * heads[d] * D for n in lens]))
    for r in range(P):
        recv = torch.cat([back_sends[d][r] for d in range(P)])
        out = ops.a2a_unpack_head_to_seq(recv, heads, B, lens[r], D)
        blocks = recv.split([B * lens[r] * n * D for n in heads])
        ref = torch.cat([b.view(B, lens[r], n, D) for b, n in zip(blocks, heads)], dim=2)
        assert out.is_contiguous() and torch.equal(out, ref)
        assert torch.equal(ops.unpack_head_to_seq_torch(recv, heads, B, lens[r], D), out)
        assert torch.equal(out, q[:, starts[r]:starts[r] + lens[r]]), f"rank {r} got its q shard back"


@pytest.mark.parametrize("H,Hkv,P", [(24, 24, 16), (40, 40, 16), (8, 8, 5), (30, 30, 4), (6, 2, 4),
                                     (24, 8, 16), (12, 3, 4), (8, 2, 3), (9, 3, 2), (16, 4, 8), (4, 1, 4)])
def test_head_split_rule(H, Hkv, P):
    """The split's arithmetic: every query head on exactly one rank, in order, counts differing by at most
    one; every rank's kv heads exactly the ones its query heads read; on even splits the rule the CUDA
    kernel implements (H / P query heads; Hkv / P kv heads or kv head r // (P // Hkv))."""
    split = ops.ulysses_head_split("test", H, Hkv, P)
    assert [rh.q0 for rh in split] == [sum(x.nq for x in split[:r]) for r in range(P)]
    assert sum(rh.nq for rh in split) == H and max(rh.nq for rh in split) - min(rh.nq for rh in split) <= 1
    assert [rh.nq for rh in split] == sorted((rh.nq for rh in split), reverse=True)  # the longer ones first
    G = H // Hkv
    for rh in split:
        assert list(range(rh.kv0, rh.kv0 + rh.nkv)) == sorted({g // G for g in range(rh.q0, rh.q0 + rh.nq)})
    if H % P == 0 and (Hkv % P == 0 or P % Hkv == 0):
        for r, rh in enumerate(split):
            kv0 = r * Hkv // P if Hkv % P == 0 else r // (P // Hkv)
            assert (rh.q0, rh.nq, rh.kv0, rh.nkv) == (r * H // P, H // P, kv0, max(1, Hkv // P))


def test_pack_head_to_seq_strided_heads():
    out = torch.randn(2, 7, 5, 8)[:, :, 1:4]  # heads not adjacent to S: stride(1) = 40
    send = ops.a2a_pack_head_to_seq(out, [3, 4])
    assert torch.equal(send, torch.cat([out[:, :3].reshape(-1), out[:, 3:].reshape(-1)]))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.a2a_pack_seq_to_head(*(torch.randn(1, 4, 3, 8),) * 3, 4),
     "world_size=4 exceeds the number of query heads H=3"),
    (lambda: ops.a2a_pack_seq_to_head(torch.randn(1, 4, 4, 8), *(torch.randn(1, 5, 4, 8),) * 2, 2),
     "same length"),
    (lambda: ops.a2a_pack_seq_to_head(*(torch.randn(1, 4, 4, 8),) * 3, 0), "world_size must be >= 1"),
    (lambda: ops.a2a_unpack_seq_to_head(torch.randn(10), [2, 3], 1, 1, 1, 2), "recv must hold 30 elements"),
    (lambda: ops.a2a_unpack_seq_to_head(torch.randn(0), [], 1, 1, 1, 2), "seq_lens must list"),
    (lambda: ops.a2a_unpack_seq_to_head(torch.randn(10), [2, -1], 1, 1, 1, 2), "seq_lens must be >= 0"),
    (lambda: ops.a2a_unpack_seq_to_head(torch.zeros(12, dtype=torch.int32), [2], 1, 1, 1, 2), "recv must be"),
    (lambda: ops.a2a_pack_head_to_seq(torch.randn(1, 5, 2, 4), [2, 2]),
     "must sum to out's sequence length 5"),
    (lambda: ops.a2a_pack_head_to_seq(torch.randn(5, 2, 4), [5]), "out must be a 4-D tensor"),
    (lambda: ops.a2a_unpack_head_to_seq(torch.randn(7), [1, 1], 1, 2, 2), "recv must hold 8 elements"),
    (lambda: ops.a2a_unpack_head_to_seq(torch.randn(8), [], 1, 2, 2), "heads must list one head count"),
    (lambda: ops.a2a_unpack_head_to_seq(torch.randn(8), [2, 0], 1, 2, 2), "heads must be >= 1"),
], ids=["heads", "lengths", "world", "recv-size", "no-lens", "neg-len", "recv-dtype", "sum", "out-dim",
        "recv-size-back", "no-heads", "zero-heads"])
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("H,Hkv,P,S,causal,dtype", [
    (24, 24, 16, 21, True, F32),   # FLUX's heads at degree 16
    (40, 40, 16, 18, False, F16),  # Wan's heads at degree 16
    (24, 8, 16, 17, True, F32),    # GQA groups cut at degree 16: kv heads copied, their gradients summed
    (12, 3, 4, 13, True, BF16),    # a rank reads kv heads with runs of 1 and 2 query heads: repeated locally
    (8, 8, 5, 11, False, F32),
    (20, 1, 16, 9, False, F16),    # MQA at degree 16: 16 copies of the kv head, gradients summed in float32
])
def test_simulated_ulysses_forward_backward(H, Hkv, P, S, causal, dtype):
    """Ulysses on P simulated ranks in one process, for degrees too large to spawn here: every rank packs,
    the buffers are routed as all_to_all_single routes them, every rank unpacks and attends to its heads
    (cp_attention.flash_attn, with the library's local kv index), and the output goes back the same way.
    The backward runs the exchange the op's autograd runs: the gradients of each rank's heads, stacked,
    packed and routed back, then assembled (assemble_seq_to_head_grads). out, lse, dq, dk, dv against the
    float64 reference under the tolerance rule."""
    B, D = 1, 8
    gen = torch.Generator().manual_seed(H + 100 * P)
    q, k, v = (randn(B, S, n, D, dtype=dtype, gen=gen) for n in (H, Hkv, Hkv))
    dout = randn(B, S, H, D, dtype=dtype, gen=gen)
    lens = _lens(S, P)
    starts = [sum(lens[:r]) for r in range(P)]
    split = ops.ulysses_head_split("test", H, Hkv, P)

    def route(sends):  # sends[s][d]: rank s's block for rank d -> rank d's receive buffer, sources in order
        return [torch.cat([sends[s][d] for s in range(P)]) for d in range(P)]

    def head_to_seq(per_rank, widths):  # per_rank[d]: [B, S, widths[d], D] -> [B, S_r, sum(widths), D] on r
        sends = [ops.a2a_pack_head_to_seq(x, lens).split([B * n * widths[d] * D for n in lens])
                 for d, x in enumerate(per_rank)]
        return [ops.a2a_unpack_head_to_seq(recv, widths, B, lens[r], D)
                for r, recv in enumerate(route(sends))]

    sends = []
    for r in range(P):
        shard = [t[:, starts[r]:starts[r] + lens[r]] for t in (q, k, v)]
        sends.append(ops.a2a_pack_seq_to_head(*shard, P).split(
            [B * lens[r] * (d.nq + 2 * d.nkv) * D for d in split]))
    outs, lses, grads = [], [], []
    for d, recv in enumerate(route(sends)):
        rh = split[d]
        leaves = [t.requires_grad_() for t in ops.a2a_unpack_seq_to_head(recv, lens, B, rh.nq, rh.nkv, D)]
        q_h, k_h, v_h = leaves
        index = ops.local_kv_index(rh, H, Hkv)
        if index is not None:
            k_h, v_h = k_h[:, :, index], v_h[:, :, index]
        out_h, lse_h = cp_attention.flash_attn(q_h, k_h, v_h, causal=causal, return_lse=True, backend="cpu")
        # The gradient of rank d's heads over the whole sequence is what the head -> seq transpose brings it.
        grads.append(torch.autograd.grad(out_h, leaves, dout[:, :, rh.q0:rh.q0 + rh.nq]))
        outs.append(out_h.detach())
        lses.append(lse_h.detach())
    out = torch.cat(head_to_seq(outs, [rh.nq for rh in split]), dim=1)
    lse = torch.cat(lses, dim=1)  # [B, H, S]: rank d's rows are heads [q0, q0 + nq)

    ref_out, ref_lse = attention_ref(q, k, v, None, causal)
    base_out, base_lse = same_dtype_math_path(q, k, v, None, causal)
    assert_close_to_ref("out", out, ref_out, base_out, dtype)
    assert_close_to_ref("lse", lse, ref_lse, base_lse, dtype)

    backs = head_to_seq([torch.cat(g, dim=2) for g in grads], [rh.nq + 2 * rh.nkv for rh in split])
    got = [torch.cat(parts, dim=1) for parts in zip(*(ops.assemble_seq_to_head_grads(b, split, Hkv)
                                                      for b in backs))]
    ref = attention_bwd_ref(q, k, v, dout, None, None, causal)
    base = same_dtype_math_path_bwd(q, k, v, dout, None, None, causal)
    for name, g, r, b in zip(("dq", "dk", "dv"), got, ref, base):
        assert_close_to_ref(name, g, r, b, dtype)
