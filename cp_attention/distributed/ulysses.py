"""Ulysses attention: exact attention over a sequence sharded across the ranks of a process group, by
trading the sequence split for a head split (docs/design.md, "Ulysses").

Rank r holds sequence chunk r (torch.tensor_split order; lengths may differ, even be 0) of q, k, v with all
heads. One all-to-all (`cp_attention::a2a_seq_to_head`, q, k and v packed into one buffer) gives rank r its
share of the query heads over the whole sequence, attention runs there with the ordinary kernel, and a second
all-to-all (`cp_attention::a2a_head_to_seq`) brings each rank its positions of every head back.

Heads (ops.ulysses_head_split): any H >= P. Query heads split in torch.tensor_split order, so when P does
not divide H the first H % P ranks get one head more. Each rank receives exactly the kv heads its query
heads read; a kv head read by several ranks' query heads (MQA, or a GQA group cut by the split) is copied to
each of them, and their gradients are summed. Where a rank's query heads do not fall on its kv heads in
equal runs (a group cut by the split), the rank repeats its kv heads locally after the transfer, so that the
kernel's GQA rule holds; only the heads read cross the wire. P > H raises ValueError.

The ranks' lengths are stated (`seq_lens`) or exchanged, and their agreement settled once per signature
(see _agreement). A failure of the attention between the two all-to-alls does not strand the other ranks:
the failed rank still takes part in the second one, sending NaN for its heads, then raises; with
check="always" every rank raises.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import cp_attention
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
from .ring import require_process_group

_OP = "cp_attention.distributed.ulysses_attention"

# The agreement row: one int64 per field. "status" is 0 when the rank's own checks passed.
FIELDS = ("status", "B", "S", "H", "Hkv", "D", "dtype", "device", "causal", "has_mask", "scale")


def check_local(op: str, group, q, k, v, kv_mask, scale, causal, stated, r: int):
    """This rank's own checks; returns (row of FIELDS, kv_mask as [B, S] or None, scale as a float)."""
    kv_mask = normalize_kv_mask(op, kv_mask)
    B, Sq, Sk, H, Hkv, D = check_attn_inputs(op, q, k, v, kv_mask)
    if Sq != Sk:
        raise ValueError(f"{op}: q and k/v must be chunks of one sequence (self-attention), got q "
                         f"{list(q.shape)}, k {list(k.shape)}")
    scale = check_scale(op, scale, D)
    check_group_device(op, group, q)
    if stated is not None and Sq != stated[r]:
        raise ValueError(f"{op}: seq_lens gives this rank {stated[r]} positions (rank {r} of the Ulysses "
                         f"group), but q has {Sq}")
    row = (0, B, Sq, H, Hkv, D, DTYPE_CODES[q.dtype], DEVICE_CODES.get(q.device.type, 99), int(bool(causal)),
           int(kv_mask is not None), scale_bits(scale))
    return row, kv_mask, scale


def failed_row() -> tuple[int, ...]:
    return (1,) + (0,) * (len(FIELDS) - 1)


def head_split_check(op: str, P: int, name: str):
    def validate(metas):
        # The same on every rank, since H and Hkv agree. name: the argument that sets P, for the error.
        ops.ulysses_head_split(op, metas[0]["H"], metas[0]["Hkv"], P, name)
    return validate


@torch._dynamo.assume_constant_result
def _auto_backend(device_type: str, dtype_name: str, train: bool) -> str:
    """flash_attn's "auto" choice, resolved outside the traced graph (the lookup queries the dispatcher and
    may time a probe, which torch.compile cannot trace; the answer is fixed for a process)."""
    return cp_attention.auto_backend(device_type, getattr(torch, dtype_name), train)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend "auto" runs for q's device and dtype (and training where q requires grad)."""
    if backend != "auto":
        return backend
    train = torch.is_grad_enabled() and q.requires_grad
    return _auto_backend(q.device.type, str(q.dtype).removeprefix("torch."), train)


def through_heads(q, k, v, kv_mask, seq_lens: list[int], group_name: str, rank: int, attend,
                  return_lse: bool):
    """The Ulysses round trip on the group `group_name`, of which this is rank `rank`: the seq -> head
    all-to-all, attend(q_h [B, S, nq, D], k_h, v_h [B, S, n, D], mask_h [B, S] or None) -> (out_h [B, S, nq,
    D], lse_h [B, nq, S]) on this rank's nq query heads over the whole sequence (k_h, v_h: its kv heads, n =
    nkv, or repeated to n = nq where the kernel's GQA rule needs it), the head -> seq all-to-all back.
    Returns ([out [B, S_r, H, D](, lse [B, H, S_r])] for this rank's positions, the failure of `attend` or
    None).

    In eager code a failure of `attend` is kept, not raised, and NaN stands in for its result, so that this
    rank still takes part in the second all-to-all (the other ranks wait in it); the caller raises after."""
    H, Hkv, P = q.shape[2], k.shape[2], len(seq_lens)
    split = ops.ulysses_head_split("cp_attention.ulysses", H, Hkv, P)
    parts = ops.a2a_seq_to_head(q, k, v, kv_mask, seq_lens, group_name)
    q_h, k_h, v_h = parts[:3]
    mask_h = parts[3] if kv_mask is not None else None
    index = ops.local_kv_index(split[rank], H, Hkv)
    if index is not None:
        # One kv head per query head on this rank (a copy, not sent): autograd sums the repeats' gradients.
        k_h, v_h = k_h[:, :, index], v_h[:, :, index]
    failure = None
    if torch.compiler.is_compiling():
        out_h, lse_h = attend(q_h, k_h, v_h, mask_h)
    else:
        try:
            out_h, lse_h = attend(q_h, k_h, v_h, mask_h)
        except Exception as e:  # noqa: BLE001 (raised by the caller once the collective is done)
            B, S, h, D = q_h.shape
            out_h = q_h.new_full((B, S, h, D), float("nan"))
            lse_h = q_h.new_full((B, h, S), float("nan"), dtype=torch.float32)
            failure = e
    back = ops.a2a_head_to_seq(out_h, lse_h if return_lse else None, seq_lens, [r.nq for r in split],
                               group_name)
    return back, failure


def finish(op: str, groups, failure: BaseException | None, check: str) -> None:
    if check == "always":
        raise_if_any_failed(op, groups, failure)
    elif failure is not None:
        raise failure


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      group: dist.ProcessGroup | None = None, scale: float | None = None,
                      causal: bool = False, kv_mask: torch.Tensor | None = None, return_lse: bool = False,
                      backend: str = "auto", seq_lens=None, check: str = "once"):
    """Exact attention over sequence-sharded q, k, v by two all-to-alls (Ulysses); a collective over `group`.

    Args:
        q, k, v: [B, S_r, H, D] and [B, S_r, Hkv, D], this rank's chunk of the global sequence (chunk r on
            group rank r, torch.tensor_split order; lengths may differ between ranks, even be 0). q and k/v
            share S_r (self-attention). dtype float32, float16 or bfloat16, one device, last dim contiguous.
        group: the process group (None: the default group); the Ulysses degree is its size P <= H. Query
            heads split in torch.tensor_split order (the first H % P ranks one more); each rank receives
            the kv heads its query heads read (ops.ulysses_head_split).
        scale: multiplies q.k; defaults to 1 / sqrt(D). Must be the same on every rank.
        causal: causal over the global sequence (global query i sees global key j iff j <= i).
        kv_mask: bool [B, S_r] or [B, 1, 1, S_r], True = attend: this rank's slice of the key-padding mask
            (gathered to the whole sequence, it is small). Given on every rank or on none.
        return_lse: also return the LSE.
        backend: the flash_attn backend for the attention over whole sequences ("auto": the fastest
            measured one for the device).
        seq_lens: the ranks' lengths, the same on every rank: the global length (an int, split as
            torch.tensor_split splits it) or a list of per-rank lengths. Stated, a call whose signature
            was agreed before runs only its all-to-alls, and torch.compile traces it with fullgraph=True.
            None: the lengths are exchanged on every call (outside the graph under torch.compile).
        check: "once" (agreement checked once per signature) or "always" (every call, and a failure on
            any rank raises on every rank).

    Returns:
        out [B, S_r, H, D] in q's dtype; with return_lse also lse [B, H, S_r] float32 over the whole global
        key sequence. Rows that see no key: out 0, lse -inf.

    Raises:
        ValueError on every rank of the group when any rank's inputs are invalid, the ranks disagree on B,
        H, Hkv, D, dtype, device type, causal, the presence of kv_mask, scale or the stated lengths, or the
        group has more ranks than q has heads (once per signature unless check="always").
    """
    group = require_process_group(_OP, group)
    P, r = dist.get_world_size(group), dist.get_rank(group)
    check = check_mode(_OP, check)
    stated = resolve_seq_lens(_OP, "seq_lens", seq_lens, P)

    # Local checks first, their failure raised only after the exchange, which the other ranks wait in.
    error, row, key = None, failed_row(), None
    try:
        row, kv_mask, scale = check_local(_OP, group, q, k, v, kv_mask, scale, causal, stated, r)
        if stated is not None:
            key = ("ulysses", stated, *row[1:2], *row[3:])
    except (ValueError, TypeError) as e:
        error = e
    head_split = head_split_check(_OP, P, "group.size()")

    def validate(metas):
        head_split(metas)
        check_stated_lengths(_OP, "seq_lens", stated, "S", metas)

    metas = settle(_OP, group, FIELDS, row, error, key, check, validate)
    seq_lens = list(stated) if metas is None else [m["S"] for m in metas]
    backend = resolve_backend(backend, q)

    def attend(q_h, k_h, v_h, mask_h):
        # Whole sequences on both sides, so the kernel's bottom-right causal rule is the global one.
        return cp_attention.flash_attn(q_h, k_h, v_h, scale=scale, causal=causal, kv_mask=mask_h,
                                       return_lse=True, backend=backend)

    back, failure = through_heads(q, k, v, kv_mask, seq_lens, group.group_name, r, attend, return_lse)
    finish(_OP, [group], failure, check)
    return (back[0], back[1]) if return_lse else back[0]


__all__ = ["ulysses_attention"]
