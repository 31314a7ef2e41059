"""Ring attention: exact attention over a sequence sharded across the ranks of a process group, with K/V
chunks passed peer to peer around the ring (docs/design.md, "Ring").

Each rank holds chunk r of the global sequence (torch.tensor_split order, lengths may differ and may be 0).
At step t rank r attends its queries to the K/V chunk that started on rank (r - t) mod P and merges the
partial result into a float32 accumulator; meanwhile that chunk travels on to rank r + 1 and the chunk for
step t + 1 arrives from rank r - 1. The transfer for step t + 1 is posted before step t computes and waited
on after it, so at most two foreign chunks are alive: the one being attended to and the one arriving.

Receivers size each incoming chunk from the ranks' lengths, stated by the caller (`seq_lens`) or exchanged
(see _agreement). The loop itself is the op `cp_attention::ring_attn_fwd`, opaque to torch.compile, so a
compiled model traces through a ring call whole.

A failure inside a step (a kernel error, an allocation failure) does not leave transfers in flight: the
rank stops computing but keeps its part of the schedule, forwarding and receiving every remaining chunk,
and raises at the end. The other ranks' results do not depend on its computation and stay exact; with
check="always" every rank learns of the failure and raises too.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from cp_attention import ops
from cp_attention._checks import check_attn_inputs

from ._agreement import (
    DEVICE_CODES,
    DTYPE_CODES,
    check_group_device,
    check_mode,
    check_scale,
    check_stated_lengths,
    normalize_kv_mask,
    raise_if_any_failed,
    resolve_seq_lens,
    scale_bits,
    settle,
)
from ._step import attend_chunk, attend_chunk_bwd, new_accumulator

_OP = "cp_attention.distributed.ring_attention"


# The agreement row: one int64 per field. "status" is 0 when the rank's own checks passed.
_FIELDS = ("status", "B", "Sq", "Sk", "H", "Hkv", "D", "dtype", "device", "causal", "has_mask", "scale")


def _new_recv_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """Allocates the byte buffer that one incoming K/V chunk lands in. Every foreign chunk is allocated
    here and nowhere else (tests wrap this to count how many are alive at once)."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def require_process_group(op: str, group):
    """The group to use (None: the default one) after checking that torch.distributed is up and that this
    process is a member."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: torch.distributed is not initialised; call "
                           f"torch.distributed.init_process_group first")
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise ValueError(f"{op}: this process (global rank {dist.get_rank()}) is not a member of `group`")
    return group


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   group: dist.ProcessGroup | None = None, scale: float | None = None, causal: bool = False,
                   kv_mask: torch.Tensor | None = None, return_lse: bool = False, backend: str = "auto",
                   seq_lens=None, kv_seq_lens=None, check: str = "once"):
    """Exact attention over sequence-sharded q, k, v, K/V passed around a ring of the group's ranks.

    Every rank of `group` must call this with its shards (a collective).

    Args:
        q: [B, Sq_r, H, D], this rank's chunk of the global queries; chunk r of the global sequence lives on
            group rank r, in torch.tensor_split order (lengths may differ, even be 0). dtype float32,
            float16 or bfloat16; last dimension contiguous.
        k, v: [B, Sk_r, Hkv, D], this rank's chunk of the global keys/values, same rules as q (Sk_r may
            differ from Sq_r, e.g. for cross-attention). q's dtype and device.
        group: the process group of the ring (None: the default group). Ring neighbours are group ranks
            r - 1 and r + 1, mapped to global ranks for the transfers.
        scale: multiplies q.k; defaults to 1 / sqrt(D). Must be the same on every rank.
        causal: bottom-right causal over the global sequences (global query i sees global key j iff
            j <= i + Sk - Sq; for self-attention j <= i).
        kv_mask: bool [B, Sk_r] or [B, 1, 1, Sk_r], True = attend: this rank's slice of the key-padding
            mask. It travels with its K/V chunk. Given on every rank or on none.
        return_lse: also return the LSE.
        backend: the flash_attn backend for the local attention ("auto": the fastest measured one, and
            the fused attend-and-merge kernel where the library has one).
        seq_lens: the ranks' query lengths, the same on every rank: the global length (an int, split as
            torch.tensor_split splits it) or a list of per-rank lengths. Stated, it spares the exchange
            of lengths, so a call with a signature agreed before moves only K/V, and torch.compile traces
            the call whole. None: the lengths are exchanged on every call.
        kv_seq_lens: the same for k/v; defaults to seq_lens (self-attention).
        check: "once" (agreement checked once per signature) or "always" (on every call, and a failure
            on any rank raises on every rank).

    Returns:
        out [B, Sq_r, H, D] in q's dtype (contiguous); with return_lse also lse [B, H, Sq_r] float32 over the
        whole global key sequence. Rows that see no key: out 0, lse -inf. The result does not depend on
        timing: partial results are merged in step order.

    Raises:
        ValueError on every rank of the group when any rank's inputs are invalid or the ranks disagree on
        B, H, Hkv, D, dtype, device type, causal, the presence of kv_mask, scale or the stated lengths
        (once per signature unless check="always").
    """
    group = require_process_group(_OP, group)
    P, r = dist.get_world_size(group), dist.get_rank(group)
    check = check_mode(_OP, check)
    q_stated = resolve_seq_lens(_OP, "seq_lens", seq_lens, P)
    k_stated = resolve_seq_lens(_OP, "kv_seq_lens", kv_seq_lens, P) if kv_seq_lens is not None else q_stated

    # Local checks first, but their failure is only raised after the exchange: the other ranks are waiting
    # in it, and they must learn that this rank will not take part in the ring.
    error, row, key = None, [1] + [0] * (len(_FIELDS) - 1), None
    try:
        kv_mask = normalize_kv_mask(_OP, kv_mask)
        B, Sq, Sk, H, Hkv, D = check_attn_inputs(_OP, q, k, v, kv_mask)
        scale = check_scale(_OP, scale, D)
        check_group_device(_OP, group, q)
        _check_own_lengths(q_stated, k_stated, r, Sq, Sk, kv_seq_lens is None)
        row = [0, B, Sq, Sk, H, Hkv, D, DTYPE_CODES[q.dtype], DEVICE_CODES.get(q.device.type, 99),
               int(bool(causal)), int(kv_mask is not None), scale_bits(scale)]
        if q_stated is not None:
            key = ("ring", q_stated, k_stated, *row[1:2], *row[4:])
    except (ValueError, TypeError) as e:
        error = e

    def stated_match(metas):
        check_stated_lengths(_OP, "seq_lens", q_stated, "Sq", metas)
        check_stated_lengths(_OP, "kv_seq_lens" if kv_seq_lens is not None else "seq_lens", k_stated, "Sk",
                             metas)

    metas = settle(_OP, group, _FIELDS, row, error, key, check, stated_match)
    q_lens = list(q_stated) if metas is None else [m["Sq"] for m in metas]
    k_lens = list(k_stated) if metas is None else [m["Sk"] for m in metas]
    out, lse = ops.ring_attn_fwd(q, k, v, kv_mask, q_lens, k_lens, group.group_name, scale, bool(causal),
                                 backend, check == "always")
    out = out.to(q.dtype)  # the op's out is the float32 accumulator: the backward reads it
    return (out, lse) if return_lse else out


def _check_own_lengths(q_stated, k_stated, r: int, Sq: int, Sk: int, kv_defaulted: bool):
    if q_stated is not None and Sq != q_stated[r]:
        raise ValueError(f"{_OP}: seq_lens gives this rank (group rank {r}) {q_stated[r]} queries, but q "
                         f"has {Sq}")
    if k_stated is not None and Sk != k_stated[r]:
        name = "seq_lens (kv_seq_lens defaults to it)" if kv_defaulted else "kv_seq_lens"
        raise ValueError(f"{_OP}: {name} gives this rank (group rank {r}) {k_stated[r]} keys, but k has {Sk}")


def _pack(k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
    """K, V and the mask chunk in one contiguous byte buffer, so that each hop is one message."""
    nk = k.numel() * k.element_size()
    nm = 0 if kv_mask is None else kv_mask.numel()
    buf = torch.empty(2 * nk + nm, dtype=torch.uint8, device=k.device)
    _unpack(buf, tuple(k.shape), k.dtype, kv_mask is not None, into=(k, v, kv_mask))
    return buf


def _unpack(buf: torch.Tensor, kv_shape: tuple[int, ...], dtype: torch.dtype, has_mask: bool, into=None):
    """Views (k, v, kv_mask or None) into a packed buffer; with `into`, copies those tensors in first."""
    n = math.prod(kv_shape)
    nk = n * torch.empty((), dtype=dtype).element_size()
    k = buf[:nk].view(dtype).view(kv_shape)
    v = buf[nk:2 * nk].view(dtype).view(kv_shape)
    m = buf[2 * nk:].view(torch.bool).view(kv_shape[0], kv_shape[1]) if has_mask else None
    if into is not None:
        k.copy_(into[0])
        v.copy_(into[1])
        if m is not None:
            m.copy_(into[2])
    return k, v, m


def run_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None,
             q_lens: list[int], k_lens: list[int], group_name: str, scale: float, causal: bool, backend: str,
             check_always: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ring loop behind `cp_attention::ring_attn_fwd` (inputs checked and agreed by ring_attention)."""
    group = dist.distributed_c10d._resolve_process_group(group_name)
    P, r = group.size(), group.rank()
    B, _, H, D = q.shape
    Hkv = k.shape[2]
    q_start = sum(q_lens[:r])
    k_starts = [sum(k_lens[:i]) for i in range(P)]
    shift = sum(k_lens) - sum(q_lens)  # bottom-right alignment of the global sequences
    has_mask = kv_mask is not None
    dtype, device = q.dtype, q.device
    elem = q.element_size()

    def chunk_bytes(i: int) -> int:
        return 2 * B * k_lens[i] * Hkv * D * elem + (B * k_lens[i] if has_mask else 0)

    # One rank has no hop to make (and a group made outside torch.distributed's registry has no global ranks).
    send_to = dist.get_global_rank(group, (r + 1) % P) if P > 1 else None
    recv_from = dist.get_global_rank(group, (r - 1) % P) if P > 1 else None

    # On CUDA the transfers run on a side stream that waits only for the data it sends (an event after the
    # packing at step 0; later chunks arrive on this stream anyway), not for the attention kernels queued on
    # the compute stream, so a transfer can start while the previous step still computes. Receive buffers
    # are allocated on the side stream and marked with record_stream when the compute stream reads them, so
    # the caching allocator does not hand their memory out again before those reads are done.
    compute_stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    comm_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    acc_out, acc_lse = new_accumulator(q)
    failure = None  # the first exception of a step; the rank then only forwards and receives
    # Packed bytes of the chunk attended at this step: at step 0 the local chunk, packed only to be sent on
    # (the step itself reads k, v directly); None for an empty chunk, which is never sent.
    held = None
    for t in range(P):
        src = (r - t) % P  # the chunk attended to at step t started on group rank src
        works, incoming = [], None
        if t + 1 < P:
            # Post the hop for step t + 1: the chunk attended now goes on to r + 1 and chunk (src - 1)
            # comes in from r - 1. Both ends know a chunk's size from the lengths, so an empty chunk is
            # simply not sent (nor expected).
            if t == 0 and chunk_bytes(src) > 0:
                held = _pack(k, v, kv_mask)
            works, incoming = _post_hop(held, chunk_bytes(src), chunk_bytes((src - 1) % P), send_to,
                                        recv_from, group, device, compute_stream, comm_stream, first=t == 0)

        if failure is None:
            try:
                if t == 0:
                    k_t, v_t, m_t = k, v, kv_mask
                elif held is None:  # an empty chunk (nothing was sent): attend_chunk skips it
                    k_t = v_t = q.new_empty((B, k_lens[src], Hkv, D))
                    m_t = None
                else:
                    k_t, v_t, m_t = _unpack(held, (B, k_lens[src], Hkv, D), dtype, has_mask)
                offset = q_start - k_starts[src] + shift if causal else None
                attend_chunk(q, k_t, v_t, acc_out, acc_lse, scale=scale, causal_offset=offset,
                             kv_mask_chunk=m_t, backend=backend)
            except Exception as e:  # noqa: BLE001 (kept, the schedule finished, then raised)
                failure = e
            k_t = v_t = m_t = None  # views keep their buffer alive: drop them before the buffer is replaced

        if t + 1 < P:
            _wait_hop(works, compute_stream, comm_stream)
            if incoming is not None and compute_stream is not None:
                incoming.record_stream(compute_stream)
            held = incoming  # the chunk attended at step t is released here
            del works, incoming

    if check_always:
        raise_if_any_failed(_OP, [group], failure)
    elif failure is not None:
        raise failure
    return acc_out, acc_lse


def run_ring_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, dlse: torch.Tensor | None, kv_mask: torch.Tensor | None,
                 q_lens: list[int], k_lens: list[int], group_name: str, scale: float, causal: bool,
                 backend: str, check_always: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ring backward behind `cp_attention::ring_attn_bwd` (docs/design.md, "Ring"): the gradients
    (dq like q; dk, dv like k) of run_ring's (out, lse), given dout and dlse (or None).

    K/V travel the ring again, in the forward's order. Each chunk's dK/dV accumulator (float32) travels one
    hop behind it: at step t rank r adds its share for chunk src = r - t into the accumulator that arrived
    from rank r - 1 (a fresh one at step 0, where the chunk starts) and sends it on; after the last step it
    reaches its owner. Shares use the final (out, lse), so nothing is merged again; each accumulator sums
    its shares in ring order, so the result is deterministic. Alive at once on a rank: at most two foreign
    K/V chunks (the one attended, the one arriving) and two accumulators (the one sent, the one arriving).
    A failed step poisons the accumulator it would have added to with NaN (its owner's gradients would
    otherwise be silently short of a share); the rank finishes the schedule, then raises."""
    group = dist.distributed_c10d._resolve_process_group(group_name)
    P, r = group.size(), group.rank()
    if q.device.type != "cpu":
        raise RuntimeError(
            f"{_OP}: the ring backward runs on CPU tensors only for now (its per-chunk backward kernel is "
            f"the CPU one), got {q.device.type}; use ulysses_attention, which backpropagates through torch's "
            "kernels on GPUs")
    B, Sq, H, D = q.shape
    Hkv = k.shape[2]
    q_start = sum(q_lens[:r])
    k_starts = [sum(k_lens[:i]) for i in range(P)]
    shift = sum(k_lens) - sum(q_lens)
    has_mask = kv_mask is not None
    dtype, device = q.dtype, q.device
    bwd_backend = "aten" if backend.startswith("aten") else "auto"

    def chunk_bytes(i: int) -> int:
        return 2 * B * k_lens[i] * Hkv * D * q.element_size() + (B * k_lens[i] if has_mask else 0)

    def acc_bytes(i: int) -> int:
        return 2 * B * k_lens[i] * Hkv * D * 4

    send_to = dist.get_global_rank(group, (r + 1) % P) if P > 1 else None
    recv_from = dist.get_global_rank(group, (r - 1) % P) if P > 1 else None

    def hop(buf, send_bytes, recv_bytes, first, tag):
        return _post_hop(buf, send_bytes, recv_bytes, send_to, recv_from, group, device, None, None, first,
                         tag)

    # Shares are computed in float32 whatever the inputs' dtype: Delta_i = rowsum(dout_i * out_i) must come
    # from the float32 out (a half-precision out's rounding would reach dq and dk), and dK/dV shares are
    # summed in float32 anyway. Each K/V chunk is upcast when its step comes.
    q32, dout32 = q.float(), dout.float()
    dq = torch.zeros((B, Sq, H, D), dtype=torch.float32, device=device)
    failure, held = None, None
    acc_works, acc_in = [], None  # the accumulator arriving for the next step's chunk
    sending = []  # the accumulator on its way to rank r + 1
    for t in range(P):
        src = (r - t) % P
        works, incoming = [], None
        if t + 1 < P:
            if t == 0 and chunk_bytes(src) > 0:
                held = _pack(k, v, kv_mask)
            works, incoming = hop(held, chunk_bytes(src), chunk_bytes((src - 1) % P), t == 0, 0)

        pieces = []
        if failure is None and B * H > 0:
            try:
                if t == 0:
                    k_t, v_t, m_t = k, v, kv_mask
                elif held is None:
                    k_t = v_t = q.new_empty((B, k_lens[src], Hkv, D))
                    m_t = None
                else:
                    k_t, v_t, m_t = _unpack(held, (B, k_lens[src], Hkv, D), dtype, has_mask)
                offset = q_start - k_starts[src] + shift if causal else None
                pieces = attend_chunk_bwd(dout32, q32, out, lse, dlse, k_t.float(), v_t.float(), dq,
                                          scale=scale, causal_offset=offset, kv_mask_chunk=m_t,
                                          backend=bwd_backend)
            except Exception as e:  # noqa: BLE001 (kept, the schedule finished, then raised)
                failure = e
            k_t = v_t = m_t = None

        # Chunk src's accumulator: fresh at step 0 (the chunk starts here), else the one from rank r - 1.
        _wait_hop(acc_works, None, None)  # also the send of the previous one: its buffer may go
        acc_works = []  # work handles hold their tensors
        sending.clear()
        if t == 0:
            acc = _new_recv_buffer(acc_bytes(src), device).zero_() if acc_bytes(src) > 0 else None
        else:
            acc = acc_in
        if acc is not None:
            dkv = acc.view(torch.float32).view(2, B, k_lens[src], Hkv, D)
            if failure is not None:
                dkv.fill_(float("nan"))
            for k1, dk_part, dv_part in pieces:
                dkv[0, :, :k1] += dk_part
                dkv[1, :, :k1] += dv_part
            dkv = None  # a view keeps the buffer alive
        del pieces
        if P > 1:  # on to rank r + 1 (after the last step: the chunk's owner); the next one comes in
            acc_works, acc_in = hop(acc, acc_bytes(src), acc_bytes((src - 1) % P), False, 1)
            sending.append(acc)  # kept alive until its send is waited on
        else:
            acc_in = acc
        acc = None
        if t + 1 < P:
            _wait_hop(works, None, None)
            held = incoming
            del works, incoming
    _wait_hop(acc_works, None, None)
    sending.clear()
    held = None

    if check_always:
        raise_if_any_failed(_OP, [group], failure)
    elif failure is not None:
        raise failure
    if acc_in is None:  # this rank's own chunk is empty
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    else:
        own = acc_in.view(torch.float32).view(2, B, k_lens[r], Hkv, D)
        dk, dv = own[0].to(dtype, copy=True), own[1].to(dtype, copy=True)
    return dq.to(dtype), dk, dv


def _post_hop(send_buf, send_bytes, recv_bytes, send_to, recv_from, group, device, compute_stream,
              comm_stream, first, tag=0):
    """Posts one hop (send the held chunk, receive the next); returns (work handles, receive buffer). The
    backward's dK/dV accumulators travel with tag 1, beside K/V with tag 0."""
    ctx = torch.cuda.stream(comm_stream) if comm_stream is not None else contextlib.nullcontext()
    if comm_stream is not None and first:
        comm_stream.wait_stream(compute_stream)  # the local chunk was packed on the compute stream
    with ctx:
        incoming = _new_recv_buffer(recv_bytes, device) if recv_bytes > 0 else None
        ops_ = []
        if send_bytes > 0:
            ops_.append(dist.P2POp(dist.isend, send_buf, send_to, group, tag))
        if incoming is not None:
            ops_.append(dist.P2POp(dist.irecv, incoming, recv_from, group, tag))
        works = dist.batch_isend_irecv(ops_) if ops_ else []
    return works, incoming


def _wait_hop(works, compute_stream, comm_stream):
    if comm_stream is None:
        for w in works:
            w.wait()  # gloo / CPU: blocks until this rank's send and receive are done
        return
    with torch.cuda.stream(comm_stream):
        for w in works:
            w.wait()  # NCCL: makes the side stream wait for the transfer, without blocking the host
    compute_stream.wait_stream(comm_stream)
