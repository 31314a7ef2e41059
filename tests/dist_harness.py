"""Runs a function on several processes that form a gloo process group on localhost, for the distributed
tests: `run_distributed(fn, world_size, *args)` calls `fn(rank, world_size, *args)` on every rank and returns
the ranks' return values, or fails with the tracebacks of every rank that raised, died or hung.

A bug in the code under test must fail, never hang: each run has a hard timeout after which the remaining
processes are killed, and once one rank has failed the others get a short grace period (they are often
stuck waiting for the failed rank) before they are killed too.
"""

from __future__ import annotations

import datetime
import functools
import time
import traceback
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# How long the other ranks may take to finish once one rank has failed.
GRACE_S = 5.0


def _worker(rank: int, world_size: int, port: int, timeout: float, collective_timeout: float, backend: str,
            fn, args, conn):
    try:
        # One thread per rank: the ranks share few cores with whatever else runs on the machine.
        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, None, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout))
        # The group's own timeout turns a missing peer into an error inside the rank, with a traceback that
        # shows where it waited, before the hard kill.
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 (everything a rank raises goes to the parent)
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_distributed(fn, world_size: int, *args, timeout: float = 60.0,
                    collective_timeout: float | None = None, backend: str = "gloo") -> list:
    """Runs fn(rank, world_size, *args) on `world_size` spawned processes in one gloo group.

    collective_timeout: how long a collective or transfer may wait for its peers before it raises in the
    rank (default: a third of `timeout`, so a deadlock is reported with tracebacks, not only killed).
    backend: the process group's backend string; a gloo one ("gloo", or "cpu:gloo", whose name tells code
    that picks a device from it, such as diffusers' size exchange, to stay on the CPU).

    fn and args must be picklable (fn a module-level function). Returns [fn's return value per rank].
    Raises AssertionError with every failing rank's traceback if any rank raised, exited without an answer
    or was still running after `timeout` seconds (then it is killed).
    """
    if collective_timeout is None:
        collective_timeout = timeout / 3
    ctx = mp.get_context("spawn")
    # The parent hosts the rendezvous store on a port the OS picks, so concurrent runs cannot collide on a
    # port and no rank has to win a race to bind it.
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True,
                          timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)
    procs, conns = [], []
    for rank in range(world_size):
        recv_end, send_end = ctx.Pipe(duplex=False)
        worker_args = (rank, world_size, store.port, timeout, collective_timeout, backend, fn, args, send_end)
        p = ctx.Process(target=_worker, args=worker_args, daemon=True, name=f"rank{rank}")
        p.start()
        send_end.close()  # only the child writes; the parent sees EOF if the child dies
        procs.append(p)
        conns.append(recv_end)

    results: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout
    first_failure = None
    try:
        while len(results) < world_size:
            now = time.monotonic()
            limit = deadline if first_failure is None else min(deadline, first_failure + GRACE_S)
            if now >= limit:
                break
            waiting = {conns[r]: r for r in range(world_size) if r not in results}
            for conn in wait(list(waiting), timeout=limit - now):
                rank = waiting[conn]
                try:
                    results[rank] = conn.recv()
                except EOFError:
                    procs[rank].join(1.0)
                    results[rank] = ("error", f"rank {rank} exited without a result "
                                              f"(exit code {procs[rank].exitcode})")
                if results[rank][0] != "ok" and first_failure is None:
                    first_failure = time.monotonic()
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for c in conns:
            c.close()
        del store

    problems = []
    for rank in range(world_size):
        status, payload = results.get(rank, ("missing", None))
        if status == "error":
            problems.append(f"--- rank {rank} raised:\n{payload}")
        elif status == "missing":
            why = "timed out" if first_failure is None else "did not finish after another rank failed"
            problems.append(f"--- rank {rank} {why} (limit {timeout:.0f} s) and was killed")
    if problems:
        raise AssertionError(f"distributed run of {getattr(fn, '__name__', fn)} on {world_size} ranks failed "
                             ":\n" + "\n".join(problems))
    return [results[rank][1] for rank in range(world_size)]


class SpawnedItems:
    """Batches many test items into one spawn per world size: `rank_main(rank, world_size)` runs every item
    of that world size and returns {item key: None or the traceback}; each test then checks its own item
    with `assert_ok(world_size, key)`. A spawn that failed as a whole (a hang, a crash) fails every item of
    it with the harness's message."""

    def __init__(self, rank_main, timeout: float, backend: str = "gloo"):
        self._rank_main, self._timeout, self._backend = rank_main, timeout, backend
        self._cache: dict[int, list[dict] | str] = {}

    def _results(self, world_size: int):
        if world_size not in self._cache:
            try:
                self._cache[world_size] = run_distributed(self._rank_main, world_size, timeout=self._timeout,
                                                            backend=self._backend)
            except AssertionError as e:
                self._cache[world_size] = str(e)
        return self._cache[world_size]

    def assert_ok(self, world_size: int, key: str):
        import pytest

        per_rank = self._results(world_size)
        if isinstance(per_rank, str):
            pytest.fail(per_rank, pytrace=False)
        failures = [f"--- rank {r}:\n{res[key]}" for r, res in enumerate(per_rank) if res[key] is not None]
        if failures:
            pytest.fail(f"{key} failed on {len(failures)} of {world_size} ranks:\n" + "\n".join(failures),
                        pytrace=False)


def run_items(items) -> dict[str, str | None]:
    """Runs (key, fn) items in order on this rank: {key: None, or the traceback if fn raised}. Every rank
    waits for the others after each item, so the next one starts together and one failure does not shift
    the collectives of the rest."""
    import pytest
    import torch.distributed as dist

    results = {}
    for key, fn in items:
        try:
            fn()
            results[key] = None
        except (Exception, pytest.fail.Exception):  # reported per item by the test that owns it
            results[key] = traceback.format_exc()
        dist.barrier()
    return results


def run_case_items(rank: int, world_size: int, items, runners: dict) -> dict[str, str | None]:
    """run_items over (key, item) pairs, seeded alike on every rank: an item whose type is a key of
    `runners` runs as runners[type](rank, item) (a numeric case), any other item is a check function,
    called as item(rank, world_size)."""
    torch.manual_seed(0)

    def call(item):
        run = runners.get(type(item))
        return functools.partial(run, rank, item) if run else functools.partial(item, rank, world_size)

    return run_items((key, call(item)) for key, item in items)
