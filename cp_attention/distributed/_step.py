"""One step of context-parallel attention: attend the local queries to one K/V chunk and merge the partial
result into a running float32 accumulator. Ring, Ulysses and Unified attention all go through here, so
causal handling across chunks and the merge order live in one place.

Causal across chunks. Queries and keys carry global positions; with bottom-right alignment
(docs/design.md, "Causal alignment") global query gi sees global key gj iff gj <= gi + Sk_global -
Sq_global (for self-attention Sq_global == Sk_global and this is gj <= gi). For a query chunk starting
at global position qs and a key chunk starting at ks, local query i sees local key j iff j <= i + d with

    d = causal_offset = qs - ks + (Sk_global - Sq_global).

The kernel offers one causal rule, bottom-right within the call: j <= i + (Sk - Sq). `plan_chunk` cuts the
chunk into at most two kernel calls that each match what the kernel offers:
- rows with i + d < 0 see no key of this chunk: no call (the accumulator keeps what it has);
- the "band" rows, 0 <= i + d < Sk, over keys [0, k1) with k1 = (last band row) + d + 1: these rows and
  keys share their end position, so the kernel's bottom-right causal flag is exactly the global rule;
- rows with i + d >= Sk see the whole chunk: one non-causal call.
A chunk wholly in the past (d >= Sk - 1) is a single non-causal call, one wholly in the future
(d <= -Sq) is skipped. Under the sharding of docs/design.md (q and k/v split alike) every ring step is one
of these two or the diagonal, where d == Sk - Sq and the band is the whole chunk: one call per step, never
two. The second call only appears when queries and keys are sharded differently (cross-attention lengths).
A key-padding mask cannot express the causal rule (it is per key, not per query), hence the row split.
"""

from __future__ import annotations

import math

import torch

import cp_attention

_OP = "cp_attention.distributed.attend_chunk"


def new_accumulator(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty state for q [B, Sq, H, D]: (acc_out zeros [B, Sq, H, D] float32, acc_lse -inf [B, H, Sq]
    float32), i.e. attention over no key. Kept in float32 whatever q's dtype (merges run in float32)."""
    B, Sq, H, D = q.shape
    acc_out = torch.zeros((B, Sq, H, D), dtype=torch.float32, device=q.device)
    acc_lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    return acc_out, acc_lse


def plan_chunk(Sq: int, Sk: int, causal_offset: int | None) -> list[tuple[int, int, int, bool]]:
    """Kernel calls that attend Sq queries to a chunk of Sk keys: a list of (row_start, row_end, key_end,
    causal), rows [row_start, row_end) attending keys [0, key_end), bottom-right causal or not. Local query i
    sees local key j iff j <= i + causal_offset (None: every key). See the module docstring."""
    if Sq == 0 or Sk == 0:
        return []
    if causal_offset is None:
        return [(0, Sq, Sk, False)]
    d = int(causal_offset)
    if d >= Sk - 1:  # even the first row sees the last key: the chunk is wholly in the past
        return [(0, Sq, Sk, False)]
    if d <= -Sq:  # even the last row sees no key: wholly in the future
        return []
    b0, b1 = max(0, -d), min(Sq, Sk - d)  # band rows: 0 <= i + d < Sk (non-empty given the checks above)
    pieces = [(b0, b1, b1 + d, True)]  # rows [b0, b1) and keys [0, b1 + d) end together
    if b1 < Sq:
        pieces.append((b1, Sq, Sk, False))  # rows past the chunk's end see all of it
    return pieces


def attend_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc_out: torch.Tensor,
                 acc_lse: torch.Tensor, *, scale: float | None = None, causal_offset: int | None = None,
                 kv_mask_chunk: torch.Tensor | None = None, backend: str = "auto") -> None:
    """Attends q [B, Sq, H, D] to one K/V chunk k, v [B, Sk, Hkv, D] and merges the result into the running
    state (acc_out [B, Sq, H, D] float32, acc_lse [B, H, Sq] float32) in place.

    causal_offset: None for no causal masking; otherwise local query i sees local key j iff
        j <= i + causal_offset, i.e. causal_offset = q_global_start - k_global_start + (Sk_global -
        Sq_global) (bottom-right alignment over the global sequences).
    kv_mask_chunk: bool [B, Sk], True = attend: the key-padding mask's slice for this chunk.
    scale: defaults to 1 / sqrt(D); callers pass one value for every chunk.
    backend: the flash_attn backend; each call goes through flash_attn_acc_, so our own kernels attend and
        merge in one pass (the fused kernel), other backends attend, then merge.

    Rows that see no key of this chunk are left as they were; merging is exact in any chunk order, but
    callers keep a fixed order so results do not depend on timing.
    """
    if acc_out.dtype != torch.float32 or tuple(acc_out.shape) != tuple(q.shape):
        raise ValueError(f"{_OP}: acc_out must be float32 with q's shape {list(q.shape)}, got "
                         f"{acc_out.dtype} {list(acc_out.shape)}")
    B, Sq, H, _ = q.shape
    if acc_lse.dtype != torch.float32 or tuple(acc_lse.shape) != (B, H, Sq):
        raise ValueError(f"{_OP}: acc_lse must be float32 [B, H, Sq] = {[B, H, Sq]}, got "
                         f"{acc_lse.dtype} {list(acc_lse.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if B == 0 or H == 0:
        return
    for r0, r1, k1, causal in plan_chunk(Sq, k.shape[1], causal_offset):
        mask = None if kv_mask_chunk is None else kv_mask_chunk[:, :k1]
        # Row slices of the accumulators are strided views; the merge writes through them in place.
        cp_attention.flash_attn_acc_(q[:, r0:r1], k[:, :k1], v[:, :k1], acc_out[:, r0:r1],
                                     acc_lse[:, :, r0:r1], scale=scale, causal=causal, kv_mask=mask,
                                     backend=backend)


def attend_chunk_bwd(dout: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                     dlse: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, dq_acc: torch.Tensor, *,
                     scale: float, causal_offset: int | None = None,
                     kv_mask_chunk: torch.Tensor | None = None, backend: str = "auto"
                     ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """The backward of attend_chunk for one K/V chunk, given the final (out, lse) over all chunks and their
    gradients dout [B, Sq, H, D], dlse [B, H, Sq] float32 or None (docs/design.md, "Backward"): with the
    global lse, P = exp(scale q.k - lse) is already the final probability, so the chunk's share of the
    gradients needs no merge. Adds the chunk's share of dq into dq_acc [B, Sq, H, D] float32 and returns its
    shares of dk and dv as pieces (key_end, dk [B, key_end, Hkv, D], dv likewise) in q's dtype, which the
    caller adds to keys [0, key_end) of the chunk (an empty list when no row sees this chunk). Same cuts as
    attend_chunk (plan_chunk); backend: a flash_attn_bwd backend."""
    pieces = []
    for r0, r1, k1, causal in plan_chunk(q.shape[1], k.shape[1], causal_offset):
        mask = None if kv_mask_chunk is None else kv_mask_chunk[:, :k1]
        part_dlse = None if dlse is None else dlse[:, :, r0:r1]
        dq, dk, dv = cp_attention.flash_attn_bwd(dout[:, r0:r1], q[:, r0:r1], k[:, :k1], v[:, :k1],
                                                 out[:, r0:r1], lse[:, :, r0:r1], scale=scale, causal=causal,
                                                 kv_mask=mask, dlse=part_dlse, backend=backend)
        dq_acc[:, r0:r1] += dq
        pieces.append((k1, dk, dv))
    return pieces
