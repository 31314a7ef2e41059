"""What every context-parallel attention checks before its first collective: this rank's own inputs, then
that all ranks hold shards of one problem. The facts travel as one int64 row per rank in a single small
all_gather, so a misuse raises the same kind of ValueError on every rank instead of leaving some ranks
waiting in a transfer that never comes."""

from __future__ import annotations

import math
import struct

import torch

DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPE_NAMES = {code: str(dt) for dt, code in DTYPE_CODES.items()}
DEVICE_CODES = {"cpu": 1, "cuda": 2}
_DEVICE_NAMES = {code: name for name, code in DEVICE_CODES.items()}

# Fields every rank must agree on, with the words an error uses for them.
MUST_AGREE = {"B": "batch size B", "H": "number of query heads H", "Hkv": "number of k/v heads Hkv",
              "D": "head dim D", "dtype": "dtype", "device": "device type", "causal": "causal flag",
              "has_mask": "presence of kv_mask", "scale": "scale"}


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
