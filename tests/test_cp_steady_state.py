"""What context-parallel calls cost and how they fail, on gloo.

- Collectives per call, counted by wrapping torch.distributed's functions: with `seq_lens` stated, the first
  call of a signature settles the ranks' agreement with one small all_gather (two for Unified: row and
  column) and every later call moves only its data: a ring call its peer-to-peer hops, a Ulysses call its
  two all-to-alls. Without `seq_lens`, or with check="always", the exchange runs on every call.
- A failure inside a call (injected at ring step t on one rank or on all ranks, or in Ulysses' attention)
  leaves the group usable: the next call on the same group succeeds with exact results on every rank. The
  failing rank raises; with check="always" every rank raises; with the default the ring's other ranks return
  exact results (theirs do not depend on the failed rank's computation) and Ulysses' receive NaN for the
  failed rank's heads, never silent garbage.
- Stated lengths that do not match the shards raise ValueError on every rank.
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch
from conftest import make_kv_mask, randn
from dist_harness import SpawnedItems, run_items
from test_ring import _check_shard, _lengths, _shard
from test_unified import _groups

SPAWN_TIMEOUT_S = 180.0
# isend and irecv themselves are not wrapped: P2POp takes them as tags, and the ring posts its hops through
# batch_isend_irecv.
COUNTED = ("all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "broadcast",
           "all_to_all_single", "all_to_all", "batch_isend_irecv", "send", "recv", "barrier")
RING_FAIL_STEPS = [0, 1, 2]  # on 3 ranks: the first, a middle and the last step


class InjectedFailure(RuntimeError):
    pass


def _problem(S: int, world: int, seed: str, masked: bool = False):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}-{S}".encode()))
    q, k, v = randn(1, S, 4, 8, gen=gen), randn(1, S, 2, 8, gen=gen), randn(1, S, 2, 8, gen=gen)
    mask = make_kv_mask(1, S, gen) if masked else None
    return q, k, v, mask, _lengths(S, world)


class CountCollectives:
    """Counts calls of torch.distributed's communication functions while active."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.calls, self.saved = dist, {}, {}

    def __enter__(self):
        for name in COUNTED:
            fn = getattr(self.dist, name)
            self.saved[name] = fn

            def counted(*args, _name=name, _fn=fn, **kwargs):
                self.calls[_name] = self.calls.get(_name, 0) + 1
                return _fn(*args, **kwargs)

            setattr(self.dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.dist, name, fn)

    def take(self) -> dict[str, int]:
        calls, self.calls = self.calls, {}
        return calls


def _caller(mode: str, rank: int, world: int):
    import torch.distributed as dist

    from cp_attention.distributed import ring_attention, ulysses_attention, unified_attention

    if mode == "unified":
        ring_group, ulysses_group = _groups(2, world // 2)
        return functools.partial(unified_attention, ring_group=ring_group, ulysses_group=ulysses_group)
    # A group of its own, so that no earlier item has agreed a signature on it.
    group = dist.new_group(list(range(world)))
    return functools.partial(ring_attention if mode == "ring" else ulysses_attention, group=group)


def _data_only(mode: str, world: int) -> dict[str, int]:
    """The collectives one call moves its data with (no mask, no lse; every rank's chunk non-empty)."""
    if mode == "ring":
        return {"batch_isend_irecv": world - 1}
    if mode == "ulysses":
        return {"all_to_all_single": 2}
    return {"all_to_all_single": 2, "batch_isend_irecv": 1}  # 2x2: the row's two, one hop of the column


def _check_counts(rank: int, world: int, mode: str):
    call = _caller(mode, rank, world)
    q, k, v, _, lens = _problem(45, world, mode)
    args = [_shard(t, lens, rank) for t in (q, k, v)]
    data = _data_only(mode, world)
    agree = {"all_gather": 2 if mode == "unified" else 1}
    with CountCollectives() as counter:
        seen = []
        for kw in ({"seq_lens": 45}, {"seq_lens": 45}, {"seq_lens": 45}, {"seq_lens": lens}, {},
                   {"seq_lens": 45, "check": "always"}):
            out = call(*args, causal=True, **kw)
            seen.append(counter.take())
            assert out.shape == args[0].shape and not torch.isnan(out).any()
    want = [{**data, **agree}, data, data, data, {**data, **agree}]
    assert seen[:5] == want, f"collectives per call {seen[:5]}, expected {want}"
    # check="always": the agreement before, and a status exchange after (one per group).
    status = {"all_gather": agree["all_gather"] * 2}
    assert seen[5] == {**data, **status}, f"check='always' call: {seen[5]}, expected {({**data, **status})}"


def _check_results_after_agreement(rank: int, world: int, mode: str):
    """Calls that skip the exchange still give exact results, with uneven lengths and a mask."""
    call = _caller(mode, rank, world)
    for S in (45, 46, 45):
        q, k, v, mask, lens = _problem(S, world, f"{mode}-agreed", masked=True)
        args = [_shard(t, lens, rank) for t in (q, k, v, mask)]
        for _ in range(2):
            out, lse = call(*args[:3], causal=True, kv_mask=args[3], return_lse=True, seq_lens=S)
            start = sum(lens[:rank])
            _check_shard(out, lse, q, k, v, slice(start, start + lens[rank]), True, mask)


def _inject(target: str, fail_on, at_call: int):
    """Replaces the step function behind `target` with one that raises InjectedFailure on call number
    `at_call` (0-based) of this process when `fail_on` is true; returns a restore function."""
    import cp_attention
    from cp_attention.distributed import ring

    module, name = (ring, "attend_chunk") if target == "ring" else (cp_attention, "flash_attn")
    original = getattr(module, name)
    count = [0]

    def failing(*args, **kwargs):
        n = count[0]
        count[0] += 1
        if fail_on and n == at_call:
            raise InjectedFailure(f"injected at call {n}")
        return original(*args, **kwargs)

    setattr(module, name, failing)
    return lambda: setattr(module, name, original)


def _check_failure(rank: int, world: int, mode: str, failing: str, step: int, check: str):
    """One call fails (on rank 1, or on every rank) at `step`; then a valid call must succeed everywhere."""
    call = _caller(mode, rank, world)
    q, k, v, mask, lens = _problem(37, world, f"{mode}-fail", masked=True)
    args = [_shard(t, lens, rank) for t in (q, k, v, mask)]
    start = sum(lens[:rank])
    rows = slice(start, start + lens[rank])
    fails_here = failing == "all" or rank == 1
    restore = _inject("flash" if mode == "ulysses" else "ring", fails_here, step)
    try:
        result = None
        try:
            result = call(*args[:3], causal=True, kv_mask=args[3], return_lse=True, seq_lens=37, check=check)
        except InjectedFailure:
            assert fails_here, "InjectedFailure raised on a rank where nothing was injected"
        except RuntimeError as e:
            assert not fails_here and check == "always" and "another rank" in str(e), f"unexpected: {e!r}"
        else:
            assert not fails_here, "the failing rank returned a result"
            assert check == "once", "check='always' must raise on every rank"
            out, lse = result
            if mode == "ring":
                _check_shard(out, lse, q, k, v, rows, True, mask)
            else:
                assert torch.isnan(out).any(), "Ulysses returned no NaN for the failed rank's heads"
    finally:
        restore()
    # The group is still in step: the same call succeeds, exact, on every rank.
    out, lse = call(*args[:3], causal=True, kv_mask=args[3], return_lse=True, seq_lens=37, check=check)
    _check_shard(out, lse, q, k, v, rows, True, mask)


def _check_stated_mismatch(rank: int, world: int, mode: str):
    """seq_lens that do not describe the shards raise ValueError on every rank, then the group works."""
    call = _caller(mode, rank, world)
    q, k, v, _, lens = _problem(45, world, f"{mode}-mismatch")
    args = [_shard(t, lens, rank) for t in (q, k, v)]
    with pytest.raises(ValueError, match="seq_lens|rejected their (own )?inputs"):
        call(*args, seq_lens=46)
    with pytest.raises(ValueError, match="seq_lens must be None, the global sequence length"):
        call(*args, seq_lens=[1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="check must be one of"):
        call(*args, seq_lens=45, check="sometimes")
    out, lse = call(*args, seq_lens=45, return_lse=True)
    _check_shard(out, lse, q, k, v, slice(sum(lens[:rank]), sum(lens[:rank + 1])), False, None)


def _check_cpu_tensors_on_nccl(rank: int, world: int, mode: str):
    """CPU tensors on an NCCL group (the group's backend faked as NCCL on one rank, then on all) raise
    ValueError on every rank before any transfer, instead of failing on one rank inside NCCL."""
    from cp_attention.distributed import _agreement

    call = _caller(mode, rank, world)
    q, k, v, _, lens = _problem(45, world, f"{mode}-nccl")
    args = [_shard(t, lens, rank) for t in (q, k, v)]
    original = _agreement.group_backend
    for faked in ([1], list(range(world))):
        _agreement.group_backend = (lambda group: "nccl") if rank in faked else original
        try:
            pattern = "NCCL, which moves CUDA tensors" if rank in faked else "rejected their (own )?inputs"
            with pytest.raises(ValueError, match=pattern):
                call(*args, seq_lens=45)
        finally:
            _agreement.group_backend = original
    assert call(*args, seq_lens=45).shape == args[0].shape


FAILURES = ([("ring", 3, who, step, check) for who in ("one", "all") for step in RING_FAIL_STEPS
             for check in ("once", "always")]
            + [("ulysses", 2, "one", 0, check) for check in ("once", "always")]
            + [("unified", 4, "one", 1, "always"), ("unified", 4, "all", 0, "once")])
MODES = [("ring", 3), ("ulysses", 2), ("unified", 4)]


def _failure_key(f) -> str:
    return "fail-{}-{}-step{}-{}".format(*([f[0]] + list(f[2:])))


def _rank_main(rank: int, world_size: int) -> dict[str, str | None]:
    items = []
    for mode, world in MODES:
        if world != world_size:
            continue
        items += [(f"counts-{mode}", functools.partial(_check_counts, rank, world, mode)),
                  (f"agreed-{mode}", functools.partial(_check_results_after_agreement, rank, world, mode)),
                  (f"mismatch-{mode}", functools.partial(_check_stated_mismatch, rank, world, mode)),
                  (f"nccl-cpu-{mode}", functools.partial(_check_cpu_tensors_on_nccl, rank, world, mode))]
    items += [(_failure_key(f), functools.partial(_check_failure, rank, *f[1:2], f[0], *f[2:]))
              for f in FAILURES if f[1] == world_size]
    return run_items(items)


@pytest.fixture(scope="module")
def runs():
    return SpawnedItems(_rank_main, SPAWN_TIMEOUT_S)


@pytest.mark.parametrize("mode,world", MODES, ids=[m for m, _ in MODES])
def test_agreed_signature_moves_only_data(runs, mode, world):
    runs.assert_ok(world, f"counts-{mode}")


@pytest.mark.parametrize("mode,world", MODES, ids=[m for m, _ in MODES])
def test_calls_without_exchange_stay_exact(runs, mode, world):
    runs.assert_ok(world, f"agreed-{mode}")


@pytest.mark.parametrize("mode,world", MODES, ids=[m for m, _ in MODES])
def test_stated_lengths_are_checked(runs, mode, world):
    runs.assert_ok(world, f"mismatch-{mode}")


@pytest.mark.parametrize("mode,world", MODES, ids=[m for m, _ in MODES])
def test_cpu_tensors_on_an_nccl_group_raise_on_every_rank(runs, mode, world):
    runs.assert_ok(world, f"nccl-cpu-{mode}")


def test_exchange_device_follows_the_group_backend(monkeypatch):
    """The one helper that places the metadata exchanges: the current CUDA device for NCCL, else the CPU."""
    import torch.distributed as dist

    from cp_attention.distributed import _agreement

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert _agreement.exchange_device(None) == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert _agreement.exchange_device(None) == torch.device("cuda", 3)


@pytest.mark.parametrize("failure", FAILURES, ids=[_failure_key(f) for f in FAILURES])
def test_failure_inside_a_call_leaves_the_group_usable(runs, failure):
    runs.assert_ok(failure[1], _failure_key(failure))
