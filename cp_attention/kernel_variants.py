"""Which kernel variants of our GPU backends have passed on a GPU, what the API runs by default, and the
log of which backend and kernel each call took.

The record (PROVEN and DEFAULTS below) is the one place that says which variants a GPU run has shown right:
each proven variant names the results file in benchmarks/results/ of the run it passed in, and the
defaults may only name proven variants (tests/test_kernel_variants.py checks both). A GPU run that proves
another variant flips a default by editing this record, not code (docs/gpu_check.md says how).

Variants are named by engine, the ops that run them, and the value of those ops' `variant` argument (not
`kernel`, a name torch's inductor keeps for itself):

- "cuda" (cp_attention::flash_attn_fwd / flash_attn_fwd_acc_ on CUDA tensors, csrc/cuda/flash_attn_fwd.cu):
  "mma", "sm90", "sm90_tma", "sm90_tma_no_pingpong", and "auto", which chooses among them per call.
- "triton" (cp_attention::triton_flash_attn_fwd / triton_flash_attn_fwd_acc_): "pointer", "tma", and "auto",
  for which the autotuner times pointer and TMA tiles.

Each op's own default, "default", is the variant proven when the op was written (the mma.sync kernel, the
pointer tiles); cp_attention.flash_attn and the distributed functions pass the record's choice explicitly.

Logging: every call of cp_attention.flash_attn, flash_attn_acc_ and the merges reports its backend and
kernel to the logger "cp_attention" at DEBUG level. CP_ATTENTION_LOG=1 (read at the first call) sets that
logger to DEBUG and, if it has no handler, adds one that writes to stderr; without it, a caller's own
logging configuration decides, and a call costs one level check.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NamedTuple

import torch

# Every variant, by engine: kernel name -> what runs.
KERNELS = {
    "cuda": {
        "mma": "the mma.sync tensor-core kernel (sm_80 and newer)",
        "sm90": "the Hopper wgmma kernel that loads by cp.async (sm_90)",
        "sm90_tma": "the warp-specialized Hopper wgmma kernel that loads by TMA (sm_90)",
        "sm90_tma_no_pingpong": "sm90_tma with its compute warpgroups issuing without turns",
    },
    "triton": {
        "pointer": "tiles that load through pointers, autotuned on problems big enough",
        "tma": "the first TMA tile of the list (sm_90 and newer), untuned",
    },
}
# Kernel names that choose per call, and the variants each may run.
CHOOSERS = {
    "cuda": {"auto": ("sm90_tma", "sm90", "mma")},  # the first that can run the call
    "triton": {"auto": ("pointer", "tma")},  # what the autotuner times fastest (TMA tiles on sm_90+)
}

# ------------------------------------------------------------------------------------------ the record
class Proof(NamedTuple):
    """Where a variant passed: a results file of benchmarks/results/ and the name the variant ran under in
    it (a forward benchmark's timed backend, or a kernel probe's variant)."""

    file: str
    name: str


# Variants that passed on a GPU. The H200 run of 2026-11-30 (gpu_check-20261130T170225Z.{json,log}, source
# tree 04ef018 with the changes committed as cb79e26) built neither Hopper kernel and offered Triton no TMA
# tile; in it our forward passed every correctness check of the forward benchmark (bfloat16, D 64 and 128,
# S 1k to 16k, plain and fused into a float32 state) and the CUDA and Triton tests of the shards that ran.
# The kernels have changed since (the staged epilogue of the CUDA 16-bit kernels, Triton's size classes):
# the next GPU run checks them again.
PROVEN = {
    ("cuda", "mma"): Proof("flash_fwd-nvidia-h200-20261130T170819Z.json", "cuda"),
    ("triton", "pointer"): Proof("flash_fwd-nvidia-h200-20261130T170819Z.json", "triton"),
}
# The kernel each engine runs for cp_attention.flash_attn(backend=<engine>): proven variants only, or a
# chooser whose every variant is proven.
DEFAULTS = {"cuda": "mma", "triton": "pointer"}
# ----------------------------------------------------------------------------------------------------

# The flash_attn backends that run our GPU kernels: backend -> (engine, kernel); None = the engine's
# DEFAULTS entry. The others are opt-in: unproven until the record says otherwise.
BACKENDS = {
    "cuda": ("cuda", None),
    "cuda_sm90": ("cuda", "auto"),
    "triton": ("triton", None),
    "triton_tma": ("triton", "auto"),
}


def kernel_names(engine: str) -> list[str]:
    """The values an engine's ops take for `variant`, "default" first."""
    return ["default", *KERNELS[engine], *CHOOSERS[engine]]


def variants_of(engine: str, kernel: str) -> tuple[str, ...]:
    """The variants a kernel name may run ("default" resolves to the engine's DEFAULTS entry)."""
    if kernel == "default":
        kernel = DEFAULTS[engine]
    return CHOOSERS[engine].get(kernel, (kernel,))


def is_proven(engine: str, kernel: str) -> bool:
    """Whether every variant a kernel name may run has passed on a GPU (PROVEN)."""
    return all((engine, v) in PROVEN for v in variants_of(engine, kernel))


def resolve(backend: str) -> tuple[str, str]:
    """(engine, kernel) of one of our GPU backends (BACKENDS)."""
    engine, kernel = BACKENDS[backend]
    return engine, DEFAULTS[engine] if kernel is None else kernel


# The CPU forward's kernels (csrc/cpu/dispatch.cpp): "default" chooses between the other two.
CPU_VARIANTS = ("default", "panels", "brgemm")


def check_variant(op: str, engine: str, variant: str) -> None:
    """ValueError unless `variant` is a kernel name the engine's ops take: on the CPU "default", "panels" or
    "brgemm" (whether this CPU runs brgemm is the real kernel's to say). The messages are the C++ ops' own
    (csrc/cpu/dispatch.cpp, csrc/cuda/flash_attn_fwd.cu)."""
    if engine == "cpu":
        if variant not in CPU_VARIANTS:
            raise ValueError(f"{op}: variant must be 'default', 'panels' or 'brgemm' on the CPU, "
                             f"got '{variant}'")
        return
    names = kernel_names(engine)
    if variant not in names:
        raise ValueError(f"{op}: variant must be {', '.join(names[:-1])} or {names[-1]}, got '{variant}'")


# ------------------------------------------------------------------------------------------ logging
LOG_ENV = "CP_ATTENTION_LOG"
logger = logging.getLogger("cp_attention")
_env_read = False


def _read_env() -> None:
    global _env_read
    _env_read = True
    if os.environ.get(LOG_ENV, "").strip().lower() in ("", "0", "false", "off", "no"):
        return
    logger.setLevel(logging.DEBUG)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)


def log_enabled() -> bool:
    """Whether calls report their choice (CP_ATTENTION_LOG, or the logger's own level)."""
    if not _env_read:
        _read_env()
    return logger.isEnabledFor(logging.DEBUG)


def log_choice(op: str, backend: str, engine: str, kernel: str, t: torch.Tensor) -> None:
    """One call's choice: the backend asked for, the engine and kernel that run, and the call's first
    tensor (dtype, shape, device). Nothing while torch.compile traces."""
    if not torch.compiler.is_compiling() and log_enabled():
        proven = ""
        if engine in KERNELS and kernel in kernel_names(engine):
            proven = " (proven)" if is_proven(engine, kernel) else " (unproven)"
        logger.debug("%s: backend %r -> %s kernel %r%s; %s %s on %s", op, backend, engine, kernel, proven,
                     str(t.dtype).removeprefix("torch."), list(t.shape), t.device)
