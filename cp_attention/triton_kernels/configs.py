"""Launch configurations of the Triton kernels, per GPU generation, and the single one of the interpreter.

The forward kernel's tile is (BLOCK_M query rows) x (BLOCK_N keys) x (BLOCK_D = head dim padded to a power
of two). Candidates are chosen per (dtype class, BLOCK_D) and autotuned once per key (BLOCK_D, causal,
mask, accumulation, TMA possible, tensor dtypes): few candidates, so the first call of a shape class stays
cheap. Problems with fewer than AUTOTUNE_MIN_WORK (query, key) pairs run the first pointer tile untuned.
The key also holds a coarse size class of the launch (length_bucket): the best tile for 1k keys per row and
a few waves of CTAs is not the best for 16k keys per row, so one tuning must not serve every length.

Why these tiles:
- BLOCK_M 128 is what wgmma (sm_90) and mma.sync (sm_80) keep busy with 4-8 warps, and it halves the K/V
  re-reads of BLOCK_M 64. 64-row tiles stay in the list for D 256 (register pressure) and short sequences.
- BLOCK_N 64 or 128: 128 amortizes the softmax rescale per key block, 64 leaves registers (and shared
  memory) for deeper pipelining. Which wins depends on D and the chip, hence autotuning.
- num_stages 2-4: K and V tiles are software-pipelined; shared memory per stage is
  BLOCK_N * BLOCK_D * (bytes per element) * 2 (K and V), so D 256 gets 2 stages, small D up to 4.
  Hopper has 228 KB of shared memory per SM, A100 164 KB, consumer Ampere/Ada about 100 KB.
- float32 inputs use IEEE-exact dots (tf32 would miss the float32 tolerance), which run on the CUDA cores,
  not the tensor cores: small tiles, since every operand lives in registers.
- TMA tiles (Hopper and newer): the copy engine moves Q, K and V into shared memory and bounds-checks them
  itself, which frees the registers and instructions of pointer arithmetic and masks. No GPU run has tried
  them yet, so the autotuner is offered them only when a call asks (the ops' variant "auto", backend
  "triton_tma"); by default it chooses among the pointer tiles.
- 64-row TMA tiles of one warpgroup (4 warps) at D 64 and 128: small enough in registers and shared memory
  for two or more CTAs per SM. The 8-warp tiles keep their two warpgroups in step (Triton's sm_90 code
  waits for every wgmma before the softmax and synchronizes the CTA once per key block), so the tensor
  cores idle during the softmax; separate CTAs run their softmax and products independently, at the price
  of reading K and V twice as often.
The pointer tiles of every list end with a small tile that fits any chip of its generation, so a config
that runs out of shared memory (skipped by the autotuner) never leaves the list empty. The lists are what
compiles well; the autotuner picks among them on the GPU at hand.
"""

from __future__ import annotations

from typing import NamedTuple


class FwdConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False  # Q/K/V tiles (and out) move through TMA descriptors (sm_90+), else through pointers


# (dtype class, BLOCK_D) -> candidates; BLOCK_D 16, 32 and 64 share the "small D" entry. Each list was
# compiled ahead of time for its architecture (cp_attention/triton_kernels/aot.py, Triton 3.8) and keeps
# tiles that fit shared memory and spill no or few registers; the first of each list spilled nothing.
# Hopper's half-precision lists end with TMA tiles (the launcher drops them where the tensors do not allow
# TMA); compiled for sm_90 they load through cp.async.bulk.tensor and, without accumulation, use fewer
# registers than the pointer tiles (D 128, 128 x 64: 176 vs 222). Accumulating (with a mask) spills 8 B at
# D 128 x 128 keys and 304 B at D 256 x 128 rows; the autotuner weighs that.
_T = True
_HOPPER = {
    # The 64-row TMA tiles: 127 and 173 registers, 48 and 64 KB of shared memory: 4 and 2 CTAs per SM.
    ("half", 64): [FwdConfig(128, 64, 4, 3), FwdConfig(128, 128, 8, 3), FwdConfig(128, 64, 4, 4),
                   FwdConfig(64, 64, 4, 3), FwdConfig(128, 64, 4, 3, _T), FwdConfig(128, 128, 8, 3, _T),
                   FwdConfig(64, 64, 4, 3, _T), FwdConfig(64, 128, 4, 2, _T)],
    # 4 warps cannot hold a 128 x 128 float32 accumulator plus the scores without spilling: 8 warps.
    # 128 x 128 x 3 stages with TMA takes 229,440 B of shared memory, just under Hopper's 232,448 B. The
    # 64 x 64 TMA tile: 170 registers (194 accumulating), 96 KB, so two CTAs per SM.
    ("half", 128): [FwdConfig(128, 64, 8, 3), FwdConfig(128, 128, 8, 3), FwdConfig(128, 64, 8, 4),
                    FwdConfig(128, 128, 8, 2), FwdConfig(64, 64, 4, 3), FwdConfig(128, 64, 8, 3, _T),
                    FwdConfig(128, 128, 8, 2, _T), FwdConfig(128, 64, 8, 4, _T),
                    FwdConfig(128, 128, 8, 3, _T), FwdConfig(64, 64, 4, 3, _T)],
    ("half", 256): [FwdConfig(128, 32, 8, 3), FwdConfig(128, 64, 8, 2), FwdConfig(64, 64, 8, 2),
                    FwdConfig(64, 32, 8, 2), FwdConfig(64, 64, 8, 2, _T), FwdConfig(128, 64, 8, 2, _T)],
    ("fp32", 64): [FwdConfig(64, 32, 8, 2), FwdConfig(32, 32, 8, 2), FwdConfig(32, 32, 4, 2)],
    ("fp32", 128): [FwdConfig(32, 16, 4, 2), FwdConfig(64, 16, 8, 2), FwdConfig(32, 16, 8, 2),
                    FwdConfig(16, 16, 4, 1)],
    ("fp32", 256): [FwdConfig(16, 16, 4, 2), FwdConfig(16, 32, 8, 2), FwdConfig(32, 16, 8, 2),
                    FwdConfig(16, 16, 8, 1)],
}

# mma.sync keeps the q tile in registers too, so Ampere needs more warps per query row than Hopper.
_AMPERE = {
    ("half", 64): [FwdConfig(128, 64, 8, 3), FwdConfig(128, 64, 4, 3), FwdConfig(128, 32, 4, 3),
                   FwdConfig(64, 64, 4, 3)],
    ("half", 128): [FwdConfig(128, 32, 8, 3), FwdConfig(128, 64, 8, 3), FwdConfig(64, 64, 8, 3),
                    FwdConfig(64, 64, 4, 3), FwdConfig(64, 32, 4, 2)],
    ("half", 256): [FwdConfig(64, 32, 8, 2), FwdConfig(64, 64, 8, 2), FwdConfig(128, 32, 8, 2),
                    FwdConfig(32, 32, 4, 1)],
    ("fp32", 64): [FwdConfig(32, 32, 4, 2), FwdConfig(64, 32, 8, 2), FwdConfig(32, 16, 4, 2)],
    ("fp32", 128): [FwdConfig(32, 16, 4, 2), FwdConfig(64, 32, 8, 2), FwdConfig(16, 16, 4, 1)],
    ("fp32", 256): [FwdConfig(16, 16, 4, 1), FwdConfig(32, 16, 4, 2)],
}

# Below this many (query, key) pairs a launch takes microseconds: tuning would cost more than it saves, and a
# test suite of small shapes compiles one variant per shape class instead of timing every candidate.
AUTOTUNE_MIN_WORK = 1 << 20

# The interpreter runs one program at a time in numpy: one config, no tuning. Small, unequal tiles make the
# small test shapes span several query and key blocks (full, causal-diagonal and ragged ones) and keep the
# causal block arithmetic honest (BLOCK_M != BLOCK_N). The launcher switches its tma field on request.
INTERPRETER_FWD = FwdConfig(32, 16, 4, 1)

# Rows of the merge kernel per program, by BLOCK_D: about 4K elements per program keeps enough bytes in
# flight per SM for a memory-bound kernel without spilling.
MERGE_ELEMS_PER_PROGRAM = 4096
MERGE_NUM_WARPS = 4


# Size classes of the tuning key: powers of two between these bounds (keys per query row; query rows of the
# whole launch, B * H * Sq). Below the low bound a launch is short enough for any tuned tile to do; past the
# high one the work per CTA (keys) or the number of waves (rows) no longer changes which tile wins.
KEYS_BUCKETS = (1 << 10, 1 << 14)
ROWS_BUCKETS = (1 << 14, 1 << 20)


def _pow2_class(n: int, lo: int, hi: int) -> int:
    """n rounded up to a power of two, clamped to [lo, hi]."""
    return min(max(1 << max(int(n) - 1, 0).bit_length(), lo), hi)


def length_bucket(rows: int, keys: int) -> int:
    """The size class of a launch with `rows` query rows in all (B * H * Sq) and `keys` keys per row (Sk):
    one int, part of the autotuning key, so that tile choices are made per class (at most 5 x 7 classes)
    rather than once for every length (a ring step's chunks, for instance, are all of one class)."""
    return _pow2_class(rows, *ROWS_BUCKETS) * (KEYS_BUCKETS[1] * 2) + _pow2_class(keys, *KEYS_BUCKETS)


def _d_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else block_d


def dtype_class(is_fp32: bool) -> str:
    return "fp32" if is_fp32 else "half"


def fwd_candidates(capability: tuple[int, int], is_fp32: bool, block_d: int) -> list[FwdConfig]:
    """Autotune candidates for a GPU of this compute capability: Hopper and newer get the sm_90 list, sm_80
    class chips (A100, and with fewer fitting tiles A10/L4/RTX) the Ampere one, older chips its last tiles."""
    key = (dtype_class(is_fp32), _d_bucket(block_d))
    if capability[0] >= 9:
        return list(_HOPPER[key])
    if capability[0] == 8:
        return list(_AMPERE[key])
    return list(_AMPERE[key][-2:])


def all_fwd_candidates(capability: tuple[int, int]) -> list[FwdConfig]:
    """Every candidate of one generation (what the autotuner is built with; a pruning step then keeps those
    of the call's dtype class and BLOCK_D)."""
    table = _HOPPER if capability[0] >= 9 else _AMPERE
    seen: dict[FwdConfig, None] = {}
    for configs in table.values():
        for c in configs:
            seen.setdefault(c, None)
    return list(seen)
