"""The work queue, through its public interface: each key once, two priorities, per-key backoff forever.

Timed behaviour runs in loop time (looptime): `asyncio.sleep` and the queue's timers take no real time, and
`loop.time()` says exactly when a key came back.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import looptime
import pytest

from kubetune_operator.workqueue import Backoff, QueueClosed, WorkQueue

T = TypeVar("T")


def in_loop_time(test: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `test()` in a loop of its own whose clock starts at 0 and jumps over every wait; closed after."""
    loop = looptime.new_event_loop(start=0)
    try:
        return loop.run_until_complete(test())
    finally:
        loop.close()


async def take_all(queue: WorkQueue[str]) -> list[str]:
    """Every key waiting now, in the order handed out (each marked done)."""
    taken = []
    while len(queue):
        key = await queue.get()
        queue.done(key)
        taken.append(key)
    return taken


def test_a_key_added_many_times_while_it_waits_is_handed_out_once() -> None:
    async def scenario() -> list[str]:
        queue: WorkQueue[str] = WorkQueue()
        for key in ("a", "b", "a", "a", "b"):
            queue.add(key)
        assert len(queue) == 2
        return await take_all(queue)

    assert in_loop_time(scenario) == ["a", "b"]


def test_first_priority_keys_go_before_the_others_each_in_arrival_order() -> None:
    async def scenario() -> list[str]:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("old-1")
        queue.add("new-1", first=True)
        queue.add("old-2")
        queue.add("new-2", first=True)
        queue.add("old-2", first=True)  # asked for sooner while it waits: moves up
        assert queue.has_first()
        return await take_all(queue)

    assert in_loop_time(scenario) == ["new-1", "new-2", "old-2", "old-1"]


def test_a_key_added_while_a_worker_holds_it_comes_back_only_after_done() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("a")
        held = await queue.get()
        queue.add("a")
        assert len(queue) == 0 and not queue.idle()  # not handed to a second worker meanwhile
        second = asyncio.create_task(queue.get())
        await asyncio.sleep(1)
        assert not second.done()
        queue.done(held)
        assert await asyncio.wait_for(second, 1) == "a"
        queue.done("a")
        assert queue.idle()

    in_loop_time(scenario)


def test_a_failing_key_backs_off_exponentially_to_the_cap_and_is_never_dropped() -> None:
    async def scenario() -> list[float]:
        queue: WorkQueue[str] = WorkQueue(Backoff(base=1, cap=60, jitter=0.2), rand=lambda: 0.0)
        loop = asyncio.get_running_loop()
        queue.add("refused")
        waits = []
        for _ in range(20):  # far beyond any fixed number of tries
            key = await queue.get()
            before = loop.time()
            queue.add_rate_limited(key)
            queue.done(key)
            assert await queue.get() == key  # it comes back
            waits.append(round(loop.time() - before, 3))
            queue.add(key)  # the next round's failure
            queue.done(key)
        return waits

    waits = in_loop_time(scenario)
    assert waits[:7] == [1, 2, 4, 8, 16, 32, 60]
    assert waits[7:] == [60] * 13
    assert in_loop_time(scenario) == waits  # the same sequence again: no state outside the queue


def test_success_forgets_the_failures_so_the_next_backoff_starts_over() -> None:
    async def scenario() -> tuple[float, float, int]:
        queue: WorkQueue[str] = WorkQueue(Backoff(base=1, cap=300, jitter=0), rand=lambda: 0.5)
        for _ in range(5):
            queue.add_rate_limited("a")
        long_delay = queue.add_rate_limited("a")
        queue.forget("a")
        return long_delay, queue.add_rate_limited("a"), queue.failures("b")

    long_delay, after_success, untouched = in_loop_time(scenario)
    assert (long_delay, after_success, untouched) == (32, 1, 0)


def test_jitter_spreads_retries_within_the_cap() -> None:
    backoff = Backoff(base=1, cap=180, jitter=0.2)
    for failures in range(1, 40):
        exact = min(180, 2 ** (failures - 1))
        for rand in (0.0, 0.3, 0.999):
            delay = backoff.delay(failures, functools.partial(float, rand))
            assert exact * 0.8 <= delay <= exact <= 180
    assert backoff.delay(10**6, lambda: 0.0) == 180  # no overflow, however long it failed


def test_of_two_delayed_adds_the_earlier_holds() -> None:
    async def scenario() -> float:
        queue: WorkQueue[str] = WorkQueue()
        loop = asyncio.get_running_loop()
        queue.add_after("a", 30)
        queue.add_after("a", 5)
        queue.add_after("a", 50)
        assert queue.pending_retries() == 1
        await queue.get()
        return loop.time()

    assert in_loop_time(scenario) == pytest.approx(5)


def test_resync_adds_every_known_key_each_period() -> None:
    async def scenario() -> list[tuple[int, list[str]]]:
        queue: WorkQueue[str] = WorkQueue()
        loop = asyncio.get_running_loop()
        known = ["x", "y"]
        queue.resync_every(600, lambda: known)
        rounds = []
        for _ in range(3):
            first = await queue.get()
            queue.done(first)
            rounds.append((round(loop.time()), [first, *await take_all(queue)]))
            known[2:] = ["z"]  # a FineTuneJob created meanwhile
        await queue.close()
        return rounds

    assert in_loop_time(scenario) == [(600, ["x", "y"]), (1200, ["x", "y", "z"]), (1800, ["x", "y", "z"])]


def test_close_stops_waiting_workers_and_pending_retries() -> None:
    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue()
        waiting = asyncio.create_task(queue.get())
        queue.add_rate_limited("a")
        await asyncio.sleep(0)
        await queue.close()
        with pytest.raises(QueueClosed):
            await waiting
        assert queue.pending_retries() == 0
        queue.add("b")
        assert len(queue) == 0

    in_loop_time(scenario)
