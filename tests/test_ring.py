"""Ring attention (cp_attention.distributed.ring_attention) on 1 to 4 gloo ranks: every rank's output and LSE
against the float64 reference over the whole sequence, sliced to the rank, under the tolerance rule; plus
determinism, the two-foreign-chunks memory bound, subgroups, and misuse that must raise on every rank.

Starting processes costs seconds here, so each world size is spawned once (the `runs` fixture) and runs all
of its items; each test then reports its own item's outcome on every rank.
"""

from __future__ import annotations

import time
import zlib
from typing import NamedTuple

import pytest
import torch
from conftest import make_kv_mask, randn
from dist_harness import SpawnedItems, run_case_items
from reference import assert_close_to_ref, assert_lse_float32_grade, attention_ref, same_dtype_math_path

from cp_attention.distributed import plan_chunk

SPAWN_TIMEOUT_S = 150.0


class Case(NamedTuple):
    """One ring problem. seq: global length split by torch.tensor_split, or explicit per-rank lengths.
    kv_seq: the same for K/V (None: like seq, i.e. self-attention). mask: "none", "random" (last batch
    fully masked when B > 1), "rank" (random, and one rank's whole chunk masked) or "4d" (random, passed
    as [B, 1, 1, S_r])."""
    name: str
    world_size: int
    B: int
    seq: int | tuple[int, ...]
    H: int
    Hkv: int
    D: int
    dtype: torch.dtype
    causal: bool
    mask: str = "none"
    kv_seq: int | tuple[int, ...] | None = None


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [
    Case("ws1-s37-full-f32", 1, 2, 37, 4, 2, 16, F32, False),
    Case("ws1-s37-causal-f16-mask", 1, 2, 37, 4, 1, 24, F16, True, "random"),
    Case("ws2-s64-full-f32", 2, 1, 64, 2, 2, 32, F32, False),
    Case("ws2-s65-causal-gqa-f16-mask", 2, 2, 65, 4, 2, 16, F16, True, "random"),
    Case("ws2-lens0,50-causal-f32-mask", 2, 2, (0, 50), 2, 1, 8, F32, True, "random"),
    Case("ws2-s40-causal-bf16", 2, 1, 40, 2, 1, 8, BF16, True),
    Case("ws3-s1001-causal-f32", 3, 1, 1001, 2, 1, 16, F32, True),
    Case("ws3-s1001-full-f16-rankmask", 3, 1, 1001, 2, 2, 16, F16, False, "rank"),
    Case("ws3-lens40,0,23-causal-gqa-f16-mask", 3, 2, (40, 0, 23), 4, 2, 16, F16, True, "random"),
    Case("ws3-cross-q30-kv45-causal-f32-mask", 3, 2, 30, 2, 1, 8, F32, True, "random", kv_seq=45),
    Case("ws3-cross-q0,20,7-kv13,0,9-causal-f16", 3, 1, (0, 20, 7), 2, 2, 8, F16, True, kv_seq=(13, 0, 9)),
    Case("ws3-cross-q50-kv11-full-f32-4d", 3, 2, 50, 2, 1, 8, F32, False, "4d", kv_seq=11),
    Case("ws4-lens10,0,30,5-causal-gqa-f16-mask", 4, 2, (10, 0, 30, 5), 4, 2, 16, F16, True, "random"),
    Case("ws4-s50-causal-f32-rankmask", 4, 2, 50, 2, 1, 16, F32, True, "rank"),
    Case("ws4-s50-full-f16-4d", 4, 2, 50, 3, 3, 8, F16, False, "4d"),
    Case("ws4-s3-causal-f32", 4, 1, 3, 2, 1, 8, F32, True),
    Case("ws4-s23-causal-gqa-bf16-mask", 4, 2, 23, 4, 1, 8, BF16, True, "random"),
]
WORLD_SIZES = [1, 2, 3, 4]
DETERMINISM_WS = [2, 3, 4]
MEMORY_WS = [3, 4]
MISUSE_WS = [2, 3]
SUBGROUP_WS = [4]
FUSED_WS = [3]


# ---------------------------------------------------------------------------------------------------------
# Problem construction and checks (run inside the ranks).
def _lengths(seq, world_size: int) -> list[int]:
    if isinstance(seq, int):
        return [t.shape[0] for t in torch.tensor_split(torch.empty(seq), world_size)]
    assert len(seq) == world_size, f"explicit lengths {seq} for {world_size} ranks"
    return list(seq)


def _make_problem(case: Case):
    """The global q, k, v, kv_mask (identical on every rank: one seed per case) and the per-rank lengths."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    q_lens = _lengths(case.seq, case.world_size)
    k_lens = _lengths(case.seq if case.kv_seq is None else case.kv_seq, case.world_size)
    Sq, Sk = sum(q_lens), sum(k_lens)
    q = randn(case.B, Sq, case.H, case.D, dtype=case.dtype, gen=gen)
    k = randn(case.B, Sk, case.Hkv, case.D, dtype=case.dtype, gen=gen)
    v = randn(case.B, Sk, case.Hkv, case.D, dtype=case.dtype, gen=gen)
    mask = None
    if case.mask != "none":
        mask = make_kv_mask(case.B, Sk, gen)
        if case.mask == "rank":
            r = case.world_size // 2
            start = sum(k_lens[:r])
            assert k_lens[r] > 0, "the masked rank must hold keys"
            mask[:, start:start + k_lens[r]] = False
    return q, k, v, mask, q_lens, k_lens


def _shard(x: torch.Tensor | None, lens: list[int], rank: int, dim: int = 1):
    if x is None:
        return None
    start = sum(lens[:rank])
    return x.narrow(dim, start, lens[rank])


def _check_shard(out, lse, q, k, v, rows: slice, causal, kv_mask):
    """Like reference.check_attention, for the query rows `rows` of the global problem: the float64
    reference and PyTorch's math path over the whole sequence, sliced to those rows."""
    B, _, H, D = q.shape
    n = rows.stop - rows.start
    assert out.shape == (B, n, H, D), f"out shape {list(out.shape)}, expected {[B, n, H, D]}"
    assert out.dtype == q.dtype, f"out dtype {out.dtype}, expected q's {q.dtype}"
    assert out.is_contiguous(), f"out must be contiguous, got strides {out.stride()}"
    assert lse.shape == (B, H, n), f"lse shape {list(lse.shape)}, expected {[B, H, n]}"
    assert lse.dtype == torch.float32, f"lse dtype {lse.dtype}, expected float32"

    ref_out, ref_lse = attention_ref(q, k, v, None, causal, kv_mask)
    base_out, base_lse = same_dtype_math_path(q, k, v, None, causal, kv_mask)
    ref_out, base_out = ref_out[:, rows], base_out[:, rows]
    ref_lse, base_lse = ref_lse[:, :, rows], base_lse[:, :, rows]

    empty = torch.isneginf(ref_lse)
    empty_bshd = empty.transpose(1, 2)[..., None].expand(B, n, H, D)
    assert not torch.isnan(out).any(), f"out has {int(torch.isnan(out).sum())} NaN"
    assert not torch.isnan(lse).any(), f"lse has {int(torch.isnan(lse).sum())} NaN"
    assert torch.isfinite(out).all(), "out has inf"
    assert not (torch.isinf(lse) & ~empty).any(), "lse is infinite on rows that see keys"
    assert (out[empty_bshd] == 0).all(), "rows that see no key must give out 0"
    assert torch.isneginf(lse[empty]).all(), "rows that see no key must give lse -inf"
    assert_close_to_ref("out", out, ref_out, base_out, q.dtype, ~empty_bshd)
    assert_close_to_ref("lse", lse, ref_lse, base_lse, q.dtype, ~empty)
    assert_lse_float32_grade(lse, ref_lse)  # the accumulator is float32 whatever the inputs' dtype


def _run_case(rank: int, case: Case, group=None, group_rank: int | None = None, backend: str = "auto"):
    from cp_attention.distributed import ring_attention

    r = rank if group_rank is None else group_rank
    q, k, v, mask, q_lens, k_lens = _make_problem(case)
    q_r, k_r, v_r = _shard(q, q_lens, r), _shard(k, k_lens, r), _shard(v, k_lens, r)
    mask_r = _shard(mask, k_lens, r)
    if case.mask == "4d":
        mask_r = mask_r[:, None, None, :]
    # Both collective calls come before any check: a rank that fails a check must not leave the others
    # waiting in a call it skips.
    out, lse = ring_attention(q_r, k_r, v_r, group=group, causal=case.causal, kv_mask=mask_r,
                             return_lse=True, backend=backend)
    out_only = ring_attention(q_r, k_r, v_r, group=group, causal=case.causal, kv_mask=mask_r, backend=backend)
    start = sum(q_lens[:r])
    _check_shard(out, lse, q, k, v, slice(start, start + q_lens[r]), case.causal, mask)
    assert isinstance(out_only, torch.Tensor), "return_lse=False must return only out"
    assert torch.equal(out_only, out), "return_lse=False changed out"


# ---------------------------------------------------------------------------------------------------------
# Items beyond the numeric cases.
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _check_determinism(rank: int, world_size: int):
    """Two runs with the ranks arriving in different orders give identical bits."""
    from cp_attention.distributed import ring_attention

    case = Case("det", world_size, 2, 45, 4, 2, 16, F16, True, "random")
    q, k, v, mask, lens, _ = _make_problem(case)
    args = [_shard(t, lens, rank) for t in (q, k, v, mask)]
    runs = []
    for delays in ([0.0] * world_size, [0.05 * (world_size - i) for i in range(world_size)]):
        time.sleep(delays[rank])
        runs.append(ring_attention(*args[:3], causal=True, kv_mask=args[3], return_lse=True))
    (o1, l1), (o2, l2) = runs
    assert torch.equal(_bits(o1), _bits(o2)), "out differs between two runs"
    assert torch.equal(_bits(l1), _bits(l2)), "lse differs between two runs"


def _check_memory(rank: int, world_size: int):
    """Counts the foreign K/V buffers alive at once (by storage, so views count too): at most two, each
    holding one chunk, and none left once the call returns."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from cp_attention.distributed import ring

    # Every foreign chunk non-empty on 4 ranks (so three arrive on every rank), an empty one on 3.
    lens = {3: [5, 0, 6], 4: [5, 3, 9, 6]}[world_size]
    case = Case("mem", world_size, 2, tuple(lens), 2, 1, 8, F32, True, "random")
    q, k, v, mask, _, _ = _make_problem(case)
    chunk_bytes = [2 * 2 * n * 1 * 8 * 4 + 2 * n for n in lens]  # k and v float32, then the bool mask
    live, peak, sizes = [], [0], []
    original = ring._new_recv_buffer

    def tracked(nbytes, device):
        buf = original(nbytes, device)
        live[:] = [w for w in live if not w.expired()]
        live.append(StorageWeakRef(buf.untyped_storage()))
        peak[0] = max(peak[0], len(live))
        sizes.append(nbytes)
        return buf

    ring._new_recv_buffer = tracked
    try:
        out = ring.ring_attention(*[_shard(t, lens, rank) for t in (q, k, v)], causal=True,
                                  kv_mask=_shard(mask, lens, rank))
    finally:
        ring._new_recv_buffer = original
    del out
    foreign = [chunk_bytes[(rank - t) % world_size] for t in range(1, world_size)]
    assert sorted(sizes) == sorted(b for b in foreign if b > 0), (
        f"receive buffers of {sizes} bytes, expected one per non-empty foreign chunk {foreign}")
    assert peak[0] <= 2, f"{peak[0]} foreign K/V chunks were alive at once (at most 2 allowed)"
    assert not [w for w in live if not w.expired()], "foreign K/V buffers outlived the call"


def _check_subgroups(rank: int, world_size: int):
    """Rings on subgroups [0] and [1, 2, 3] at once: neighbours are taken in the group's rank space and the
    group's chunk order, and two groups do not disturb each other."""
    import torch.distributed as dist

    groups = [dist.new_group([0]), dist.new_group([1, 2, 3])]  # every rank creates every group
    members = [[0], [1, 2, 3]]
    which = 0 if rank == 0 else 1
    size = len(members[which])
    case = Case(f"sub{size}", size, 2, 31, 4, 2, 8, F32, True, "random")
    _run_case(rank, case, group=groups[which], group_rank=members[which].index(rank))


def _check_misuse(rank: int, world_size: int):
    """Inputs that are wrong on one rank, or inconsistent across ranks, raise a ValueError on every rank
    (naming the problem) instead of hanging; afterwards the group still works."""
    from cp_attention.distributed import ring_attention

    last = world_size - 1
    gen = torch.Generator().manual_seed(7)

    def qkv(H=4, Hkv=2, S=5, D=8, dtype=F32):
        return (randn(1, S, H, D, dtype=dtype, gen=gen), randn(1, S, Hkv, D, dtype=dtype, gen=gen),
                randn(1, S, Hkv, D, dtype=dtype, gen=gen))

    def expect(match_here, match_elsewhere=None, *, on=0, **kw):
        """Calls ring_attention with kw (built per rank) and expects a ValueError everywhere."""
        pattern = match_here if (rank == on or match_elsewhere is None) else match_elsewhere
        with pytest.raises(ValueError, match=pattern):
            ring_attention(*kw.pop("args"), **kw)

    # Cross-rank inconsistencies: each rank's inputs are valid on their own.
    expect("disagree on the number of query heads H.*rank 0: 4.*rank 1: 2",
           args=qkv(H=4 if rank == 0 else 2))
    expect("disagree on the number of k/v heads Hkv", args=qkv(Hkv=2 if rank == 0 else 1))
    expect("disagree on the head dim D", args=qkv(D=8 if rank == 0 else 16))
    expect(r"disagree on the dtype.*torch.float16", args=qkv(dtype=F16 if rank == last else F32))
    expect("disagree on the causal flag", args=qkv(), causal=rank == 0)
    expect("disagree on the presence of kv_mask", args=qkv(),
           kv_mask=torch.ones(1, 5, dtype=torch.bool) if rank == 0 else None)
    expect("disagree on the scale", args=qkv(), scale=0.5 if rank == last else None)
    expect("disagree on the batch size B", args=tuple(t.expand(2 if rank == 0 else 1, *t.shape[1:])
                                                       for t in qkv()))
    # One rank's own inputs are invalid: it says why, the others that it rejected them.
    expect("kv_mask must have shape", "rank.*0.*rejected their own inputs", args=qkv(),
           kv_mask=torch.ones(1, 4 if rank == 0 else 5, dtype=torch.bool))
    expect("must be a multiple of the number of k/v heads", "rank.*1.*rejected", on=1,
           args=qkv(H=3) if rank == 1 else qkv(H=4))
    expect("q must be a torch.Tensor", "rejected", on=last,
           args=(None,) + qkv()[1:] if rank == last else qkv())
    expect("scale must be a finite number", args=qkv(), scale=float("nan"))
    # The group is still in step: a valid call goes through.
    out = ring_attention(*qkv(), causal=True)
    assert out.shape == (1, 5, 4, 8) and not torch.isnan(out).any()


def _check_fused_kernel(rank: int, world_size: int):
    """With our CPU kernel, every ring step goes through the fused attend-and-merge op
    (flash_attn_fwd_acc_): no separate forward, no separate merge. The library's op wrappers are counted
    while a cross-attention case (where some steps are two calls) runs; the ring loop is an op of its own,
    so a dispatch mode outside it would not see them."""
    from cp_attention import ops

    calls: dict[str, int] = {}
    names = ("flash_attn_fwd_acc_", "flash_attn_fwd", "merge_attn_states_", "merge_attn_states")
    originals = {name: getattr(ops, name) for name in names}

    def counted(name):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return originals[name](*args, **kwargs)
        return wrapper

    for name in names:
        setattr(ops, name, counted(name))
    try:
        # Named, not "auto": auto times our kernel against torch's, and on a loaded machine a rank may
        # measure torch's faster and run it (unfused), which is not what this checks.
        _run_case(rank, Case("fused", world_size, 2, 30, 2, 1, 8, F32, True, "random", kv_seq=45),
                  backend="cpu")
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)
    assert calls.get("flash_attn_fwd_acc_", 0) > 0, f"ring_attention did not use the fused op; calls: {calls}"
    for unfused in names[1:]:
        assert unfused not in calls, f"ring_attention called {unfused}: {calls}"


# ---------------------------------------------------------------------------------------------------------
def _item_list(world_size: int) -> list[tuple[str, object]]:
    items = [(c.name, c) for c in CASES if c.world_size == world_size]
    for key, sizes, fn in (("determinism", DETERMINISM_WS, _check_determinism),
                           ("memory", MEMORY_WS, _check_memory), ("misuse", MISUSE_WS, _check_misuse),
                           ("subgroups", SUBGROUP_WS, _check_subgroups),
                           ("fused", FUSED_WS, _check_fused_kernel)):
        if world_size in sizes:
            items.append((f"{key}-ws{world_size}", fn))
    return items


def _rank_main(rank: int, world_size: int) -> dict[str, str | None]:
    """Runs every item of this world size on this rank; returns {item: None or the traceback}."""
    return run_case_items(rank, world_size, _item_list(world_size), {Case: _run_case})


@pytest.fixture(scope="module")
def runs():
    return SpawnedItems(_rank_main, SPAWN_TIMEOUT_S)


def _assert_item(runs, world_size: int, key: str):
    runs.assert_ok(world_size, key)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_ring_matches_reference(runs, case):
    _assert_item(runs, case.world_size, case.name)


@pytest.mark.parametrize("world_size", DETERMINISM_WS)
def test_ring_is_deterministic(runs, world_size):
    _assert_item(runs, world_size, f"determinism-ws{world_size}")


@pytest.mark.parametrize("world_size", MEMORY_WS)
def test_ring_holds_at_most_two_foreign_chunks(runs, world_size):
    _assert_item(runs, world_size, f"memory-ws{world_size}")


@pytest.mark.parametrize("world_size", MISUSE_WS)
def test_ring_misuse_raises_on_every_rank(runs, world_size):
    _assert_item(runs, world_size, f"misuse-ws{world_size}")


@pytest.mark.parametrize("world_size", SUBGROUP_WS)
def test_ring_on_subgroups(runs, world_size):
    _assert_item(runs, world_size, f"subgroups-ws{world_size}")


@pytest.mark.parametrize("world_size", FUSED_WS)
def test_ring_uses_fused_kernel_when_present(runs, world_size):
    _assert_item(runs, world_size, f"fused-ws{world_size}")


def test_ring_needs_initialised_process_group():
    from cp_attention.distributed import ring_attention

    x = torch.zeros(1, 2, 1, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(x, x, x)


# ---------------------------------------------------------------------------------------------------------
# The causal plan of one step, exhaustively on small geometries (no processes needed).
@pytest.mark.parametrize("Sq", range(0, 6))
def test_plan_chunk_covers_exactly_the_visible_keys(Sq):
    for Sk in range(0, 6):
        for d in [None, *range(-8, 9)]:
            pieces = plan_chunk(Sq, Sk, d)
            seen = torch.zeros(Sq, Sk, dtype=torch.int64)
            for r0, r1, k1, causal in pieces:
                assert 0 <= r0 < r1 <= Sq and 0 < k1 <= Sk, (Sq, Sk, d, pieces)
                for i in range(r0, r1):
                    # the kernel's rule within the call: bottom-right causal over rows [r0, r1), keys [0, k1)
                    hi = (i - r0) + k1 - (r1 - r0) if causal else k1 - 1
                    seen[i, :max(0, min(hi, k1 - 1) + 1)] += 1
            i = torch.arange(Sq)[:, None]
            j = torch.arange(Sk)[None, :]
            want = torch.ones(Sq, Sk, dtype=torch.int64) if d is None else (j <= i + d).long()
            assert torch.equal(seen, want), (Sq, Sk, d, pieces)
            assert len(pieces) <= 2
            # Shards of one sequence (chunks in the past, the future, or the diagonal d == Sk - Sq with the
            # chunks' ends aligned) take one kernel call at most.
            if d is None or d >= Sk - 1 or d <= -Sq or d == Sk - Sq:
                assert len(pieces) <= 1, (Sq, Sk, d, pieces)
