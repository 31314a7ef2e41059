"""What every context-parallel attention settles before it moves data: this rank's own inputs, the ranks'
sequence lengths, and that all ranks hold shards of one problem (docs/design.md, "Agreement across ranks").

The facts travel as one int64 row per rank in a single small all_gather, so a misuse raises the same kind of
ValueError on every rank instead of leaving some ranks waiting in a transfer that never comes. That exchange
is a blocking collective with a host read (on NCCL it drains the GPU), so it runs once per signature: the
facts every rank knows alike (group, per-rank sequence lengths, B, H, Hkv, D, dtype, device type, causal,
mask presence, scale). A call whose signature has been agreed before moves only its data. The lengths are
part of that signature only when the caller states them (`seq_lens`); otherwise no rank can know the
others' lengths and the exchange runs on every call. `check="always"` repeats it on every call.

Inside traced code (torch.compile) no collective runs to learn or check anything: with `seq_lens` the call
traces whole (fullgraph), without it the exchange runs eagerly through a graph break.
"""

from __future__ import annotations

import math
import struct
import weakref
from collections.abc import Sequence

import torch
import torch.distributed as dist

DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPE_NAMES = {code: str(dt) for dt, code in DTYPE_CODES.items()}
DEVICE_CODES = {"cpu": 1, "cuda": 2}
_DEVICE_NAMES = {code: name for name, code in DEVICE_CODES.items()}
CHECK_MODES = ("once", "always")

# Fields every rank must agree on, with the words an error uses for them.
MUST_AGREE = {"B": "batch size B", "H": "number of query heads H", "Hkv": "number of k/v heads Hkv",
              "D": "head dim D", "dtype": "dtype", "device": "device type", "causal": "causal flag",
              "has_mask": "presence of kv_mask", "scale": "scale"}

# Signatures agreed per process group; the entries go with the group. A bounded set: a workload with
# ever-changing lengths re-validates now and then instead of growing without end.
_AGREED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MAX_AGREED = 256


def scale_bits(scale: float) -> int:
    # Compared bit for bit across ranks: the float64 pattern as an int64 fits the integer all_gather.
    return struct.unpack("<q", struct.pack("<d", scale))[0]


def bits_scale(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def normalize_kv_mask(op: str, kv_mask):
    """Accepts [B, Sk] and the [B, 1, 1, Sk] form attention processors pass (e.g. Qwen-Image)."""
    if (isinstance(kv_mask, torch.Tensor) and kv_mask.dim() == 4 and kv_mask.shape[1] == 1
            and kv_mask.shape[2] == 1):
        kv_mask = kv_mask[:, 0, 0]
    if kv_mask is not None and not isinstance(kv_mask, torch.Tensor):
        raise ValueError(f"{op}: kv_mask must be a bool tensor [B, Sk] or [B, 1, 1, Sk] or None, "
                         f"got {type(kv_mask).__name__}")
    return kv_mask


def check_scale(op: str, scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    return float(scale)


def check_mode(op: str, check) -> str:
    if check not in CHECK_MODES:
        raise ValueError(f"{op}: check must be one of {list(CHECK_MODES)}, got {check!r}")
    return check


def split_lengths(total: int, parts: int) -> tuple[int, ...]:
    """The chunk lengths torch.tensor_split gives a dimension of `total` cut in `parts`: the first
    total % parts chunks one longer."""
    base, extra = total // parts, total % parts
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def resolve_seq_lens(op: str, name: str, seq_lens, parts: int):
    """`seq_lens` as a tuple of `parts` per-rank lengths, or None when not given. An int is the global
    length, split as torch.tensor_split splits it; a sequence lists every rank's length."""
    if seq_lens is None:
        return None
    if isinstance(seq_lens, (int, torch.SymInt)) and not isinstance(seq_lens, bool):
        if not isinstance(seq_lens, torch.SymInt) and seq_lens < 0:
            raise ValueError(f"{op}: {name} as an int is the global sequence length and must be >= 0, got "
                             f"{seq_lens}")
        return split_lengths(seq_lens, parts)
    if isinstance(seq_lens, Sequence) and not isinstance(seq_lens, str):
        lens = tuple(seq_lens)
        ok = all(isinstance(s, (int, torch.SymInt)) and not isinstance(s, bool) for s in lens)
        if ok and len(lens) == parts and all(isinstance(s, torch.SymInt) or s >= 0 for s in lens):
            return lens
    raise ValueError(f"{op}: {name} must be None, the global sequence length (an int >= 0) or a list of "
                     f"{parts} per-rank lengths >= 0 (one per rank of the group), got {seq_lens!r}")


def exchange_device(group) -> torch.device:
    """The device of the small metadata exchanges on `group`: NCCL carries only CUDA tensors (the current
    device), every other backend takes CPU tensors. Decided by the group alone, since a rank whose inputs
    failed its checks has no usable device of its own."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_backend(group) -> str:
    # Read outside traced code only: a compiled call has passed its device checks while tracing.
    return "" if torch.compiler.is_compiling() else str(dist.get_backend(group))


def check_group_device(op: str, group, t: torch.Tensor) -> None:
    """NCCL moves only CUDA tensors: a CPU tensor on an NCCL group would fail inside the first transfer on
    this rank alone and leave the others waiting, so it is refused up front (and the refusal exchanged)."""
    if group_backend(group) == "nccl" and t.device.type != "cuda":
        raise ValueError(f"{op}: the process group uses NCCL, which moves CUDA tensors only; got q on "
                         f"{t.device}")


def is_agreed(group, key) -> bool:
    agreed = _AGREED.get(group)
    return agreed is not None and key in agreed


def remember(group, key) -> None:
    agreed = _AGREED.setdefault(group, {})
    if len(agreed) >= _MAX_AGREED:
        agreed.pop(next(iter(agreed)))
    agreed[key] = None


@torch._dynamo.disable(reason="the ranks' lengths are exchanged outside the graph when seq_lens is not given")
def exchange_rows(group, fields: Sequence[str], row: Sequence[int]) -> list[dict[str, int]]:
    """Every rank's row of `fields`, gathered with one all_gather (blocking, host read)."""
    P = dist.get_world_size(group)
    mine = torch.tensor(list(row), dtype=torch.int64, device=exchange_device(group))
    rows = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(rows, mine, group=group)
    return [dict(zip(fields, r.tolist())) for r in rows]


def _describe(field: str, value: int) -> str:
    if field == "dtype":
        return _DTYPE_NAMES.get(value, "an unsupported dtype")
    if field == "device":
        return _DEVICE_NAMES.get(value, "another device type")
    if field == "scale":
        return repr(bits_scale(value))
    if field in ("causal", "has_mask"):
        return str(bool(value))
    return str(value)


def check_agreement(op: str, metas: list[dict[str, int]]):
    """Raises the same ValueError on every rank when the ranks' inputs are not shards of one problem.
    Each meta row has "status" (0 when the rank's own checks passed) and the MUST_AGREE fields."""
    failed = [i for i, m in enumerate(metas) if m["status"] != 0]
    if failed:
        raise ValueError(f"{op}: group rank(s) {failed} rejected their own inputs (each raised a ValueError "
                         f"saying why); every rank must pass valid shards")
    for field, words in MUST_AGREE.items():
        values = [m[field] for m in metas]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {i}: {_describe(field, x)}" for i, x in enumerate(values))
            raise ValueError(f"{op}: the ranks of the group disagree on the {words} ({per_rank}); every "
                             f"rank must pass shards of the same q, k, v (only the sequence length may "
                             f"differ)")


def check_stated_lengths(op: str, name: str, stated, field: str, metas: list[dict[str, int]]):
    """With lengths stated by the caller, the gathered actual lengths must be those on every rank."""
    actual = tuple(m[field] for m in metas)
    if stated is not None and tuple(stated) != actual:
        raise ValueError(f"{op}: {name}={list(stated)} does not match the ranks' actual sequence lengths "
                         f"{list(actual)}; every rank must pass the same {name}")


@torch._dynamo.disable(reason="a failed rank's status is exchanged outside the graph")
def raise_if_any_failed(op: str, groups: Sequence, failure: BaseException | None) -> None:
    """check="always": every rank learns whether any rank of `groups` failed during the call (one all_gather
    per group; a failure seen in one group is passed on through the next). Re-raises this rank's own
    failure, or raises RuntimeError on a rank whose peers failed."""
    failed = failure is not None
    for group in groups:
        if dist.get_world_size(group) > 1:
            flags = exchange_rows(group, ("failed",), (int(failed),))
            failed = failed or any(f["failed"] for f in flags)
    if failure is not None:
        raise failure
    if failed:
        raise RuntimeError(f"{op}: another rank of the group failed during this call (it raised the error); "
                           f"this rank's result is incomplete and is not returned")


def settle(op: str, group, fields: Sequence[str], row: Sequence[int], error: Exception | None, key,
           check: str, validate=None) -> list[dict[str, int]] | None:
    """Settles a call's agreement on `group`: this rank's checks gave `row` (or `error`), `key` is the
    call's signature (None when the ranks' lengths are not stated, so they must be exchanged).

    Exchanges the rows when the signature is new to the group, `check` is "always" or the lengths are
    unknown; then raises this rank's own error, or the same ValueError on every rank when the ranks
    disagree (`validate(metas)` adds the caller's checks). Returns the gathered rows, or None when nothing
    was exchanged: a signature agreed before, or traced code with stated lengths (no collective in a graph).
    """
    compiling = torch.compiler.is_compiling()
    if compiling:
        needed = key is None
    else:
        needed = check == "always" or key is None or not is_agreed(group, key)
    if not needed:
        if error is not None:
            raise error
        return None
    metas = exchange_rows(group, fields, row)
    if error is not None:
        raise error
    check_agreement(op, metas)
    if validate is not None:
        validate(metas)
    if key is not None and not compiling:
        remember(group, key)
    return metas
