"""The Ulysses pack/unpack ops on one process, against plain torch (slice, permute, contiguous, cat): each
op alone, and the whole exchange of P ranks simulated in memory (rank r's block for rank d handed over
directly), which must turn sequence shards into head shards over the whole sequence and back."""

from __future__ import annotations

import pytest
import torch
from conftest import randn

from cp_attention import ops

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _lens(S: int, P: int) -> list[int]:
    return [t.shape[0] for t in torch.tensor_split(torch.empty(S), P)]


def _kv_heads(H: int, Hkv: int, P: int, r: int) -> slice:
    """The kv heads of rank r under the documented rule (P divides Hkv, or Hkv divides P)."""
    if Hkv % P == 0:
        return slice(r * Hkv // P, (r + 1) * Hkv // P)
    kv = r // (P // Hkv)
    return slice(kv, kv + 1)


def _ref_pack_seq_to_head(q, k, v, P):
    H, Hkv = q.shape[2], k.shape[2]
    h = H // P
    parts = []
    for r in range(P):
        kv = _kv_heads(H, Hkv, P, r)
        parts += [q[:, :, r * h:(r + 1) * h], k[:, :, kv], v[:, :, kv]]
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
]


@pytest.mark.parametrize("B,S,H,Hkv,D,P,dtype", CASES)
def test_exchange_roundtrip_matches_torch(B, S, H, Hkv, D, P, dtype):
    gen = torch.Generator().manual_seed(S + 7 * P)
    q, k, v = (randn(B, S, n, D, dtype=dtype, gen=gen) for n in (H, Hkv, Hkv))
    lens = _lens(S, P)
    starts = [sum(lens[:r]) for r in range(P)]
    h, hk = ops.ulysses_head_split("test", H, Hkv, P)
    # Strided shards (a head-major copy viewed back as BSHD), as a caller's slices may be.
    shards = [tuple(x[:, a:a + n].transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
              for a, n in zip(starts, lens)]
    sends = []
    for r in range(P):
        send = ops.a2a_pack_seq_to_head(*shards[r], P)
        assert send.dim() == 1 and send.dtype == dtype
        assert torch.equal(send, _ref_pack_seq_to_head(*shards[r], P)), f"pack of rank {r}"
        sends.append(send.split(B * lens[r] * (h + 2 * hk) * D) if send.numel() else [send] * P)
    outs = []
    for d in range(P):
        recv = torch.cat([sends[s][d] for s in range(P)])
        qd, kd, vd = ops.a2a_unpack_seq_to_head(recv, lens, B, h, hk, D)
        for got, want in zip((qd, kd, vd), _ref_unpack_seq_to_head(recv, lens, B, h, hk, D)):
            assert got.is_contiguous() and torch.equal(got, want)
        kv = _kv_heads(H, Hkv, P, d)
        assert torch.equal(qd, q[:, :, d * h:(d + 1) * h]), f"rank {d}'s query heads"
        assert torch.equal(kd, k[:, :, kv]) and torch.equal(vd, v[:, :, kv]), f"rank {d}'s kv heads"
        # Query heads must all read the kv heads the rank holds (GQA mapping h // (H // Hkv)).
        first, last = d * h // (H // Hkv), ((d + 1) * h - 1) // (H // Hkv)
        assert kv.start <= first and last < kv.stop
        outs.append(qd)  # stands in for this rank's attention output [B, S, h, D]

    back_sends = []
    for d in range(P):
        out_h = outs[d][:, :, :]  # any strides
        send = ops.a2a_pack_head_to_seq(out_h, lens)
        ref = torch.cat([out_h[:, a:a + n].contiguous().reshape(-1) for a, n in zip(starts, lens)])
        assert torch.equal(send, ref), f"head_to_seq pack of rank {d}"
        back_sends.append(send.split([B * n * h * D for n in lens]))
    for r in range(P):
        recv = torch.cat([back_sends[d][r] for d in range(P)])
        out = ops.a2a_unpack_head_to_seq(recv, P, B, lens[r], h, D)
        ref = recv.view(P, B, lens[r], h, D).permute(1, 2, 0, 3, 4).reshape(B, lens[r], P * h, D)
        assert out.is_contiguous() and torch.equal(out, ref)
        assert torch.equal(out, q[:, starts[r]:starts[r] + lens[r]]), f"rank {r} got its q shard back"


def test_pack_head_to_seq_strided_heads():
    out = torch.randn(2, 7, 5, 8)[:, :, 1:4]  # heads not adjacent to S: stride(1) = 40
    send = ops.a2a_pack_head_to_seq(out, [3, 4])
    assert torch.equal(send, torch.cat([out[:, :3].reshape(-1), out[:, 3:].reshape(-1)]))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.a2a_pack_seq_to_head(*(torch.randn(1, 4, 6, 8),) * 3, 4), "H=6 must be divisible by"),
    (lambda: ops.a2a_pack_seq_to_head(torch.randn(1, 4, 12, 8), *(torch.randn(1, 4, 3, 8),) * 2, 2),
     "Hkv=3 must be a multiple or a divisor"),
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
    (lambda: ops.a2a_unpack_head_to_seq(torch.randn(7), 2, 1, 2, 1, 2), "recv must hold 8 elements"),
], ids=["heads", "kv-heads", "lengths", "world", "recv-size", "no-lens", "neg-len", "recv-dtype", "sum",
        "out-dim", "recv-size-back"])
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
