"""Triton kernels of cp_attention: the flash-attention forward with LSE (plain and fused with the ring-step
merge) and the merge of partial attention states.

The ops that run them are registered in ``cp_attention.ops`` (section "Triton kernels"); this package only
holds the kernels and their launchers. Nothing here imports triton at package import: the kernel modules
(`flash_fwd`, `merge`) do, and the ops import them on first use, so cp_attention imports where triton is
missing.

On the CPU, Triton kernels run only under Triton's interpreter, which is chosen when a kernel is decorated:
``TRITON_INTERPRET=1`` must be in the environment before the kernel modules are first imported (i.e.
before the first Triton op runs). This package never sets it.
"""

from __future__ import annotations

import functools
import importlib
import os


def interpret_requested() -> bool:
    """Whether the environment asks for Triton's interpreter (TRITON_INTERPRET, read as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")


@functools.cache
def triton_importable() -> bool:
    """Whether `import triton` works here (cached: the answer does not change within a process)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # a missing or broken install; either way the Triton backend is unavailable
        return False
    return True


def available_on(device_type: str) -> bool:
    """Whether the Triton kernels can run on tensors of this device type: CUDA with triton installed, or
    the CPU when the interpreter is requested."""
    if device_type == "cuda":
        return triton_importable()
    if device_type == "cpu":
        return interpret_requested() and triton_importable()
    return False
