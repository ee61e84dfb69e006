"""The operator's work queue: which FineTuneJobs to sync, in what order, and when to try a failed one again.

It behaves as controller-runtime's rate-limited workqueue does (STYLE.md habit 7):
- a key is held once however often it is added while it waits, and is handed to one worker at a time: a key
  added while a worker holds it is handed out again after `done`;
- two priorities: keys added with `first=True` (runs that still need their children) are handed out before
  the others, each priority in arrival order;
- a failed key comes back after a per-key exponential backoff (`Backoff`: from about a second, doubling,
  capped at a few minutes, with jitter so that keys refused together do not retry together), forever:
  nothing is dropped after N tries; `forget` resets the backoff once a sync succeeded;
- `resync_every` re-adds every known key periodically, a safety net for a change no event announced.

Timers run on the event loop's clock, so tests drive them in loop time (looptime).
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Backoff:
    """Per-key delay before the n-th retry: base * 2**(n-1), at most `cap`, less a random part up to `jitter`."""

    base: float = 1.0
    cap: float = 300.0
    jitter: float = 0.2  # a fraction of the delay taken off at random: within [delay * (1 - jitter), delay]

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        exact = min(self.cap, self.base * 2 ** max(0, min(failures - 1, 62)))
        return exact * (1 - self.jitter * rand())


class QueueClosed(Exception):
    """`get` on a closed queue: the worker stops."""


class WorkQueue(Generic[K]):
    """Keys to work on, each held once, in two priorities, with per-key backoff on failure."""

    def __init__(self, backoff: Backoff | None = None, rand: Callable[[], float] = random.random) -> None:
        self.backoff = backoff or Backoff()
        self._rand = rand
        self._first: collections.deque[K] = collections.deque()
        self._then: collections.deque[K] = collections.deque()
        self._waiting: set[K] = set()  # in one of the two deques
        self._active: set[K] = set()  # handed to a worker, not done yet
        self._again: dict[K, bool] = {}  # added while active: handed out again after `done` (value: first)
        self._failures: collections.Counter[K] = collections.Counter()
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}  # delayed adds: (when, timer)
        self._ready: asyncio.Event | None = None  # set while a key waits (made inside the running loop)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- adding ---------------------------------------------------------------------------------------

    def add(self, key: K, first: bool = False) -> None:
        """Hand `key` out soon (once, however often it is added while it waits)."""
        if self._closed:
            return
        if key in self._active:
            self._again[key] = self._again.get(key, False) or first
            return
        if key in self._waiting:
            if first and key in self._then:  # asked for sooner than it waits: move it up
                self._then.remove(key)
                self._first.append(key)
            return
        self._waiting.add(key)
        (self._first if first else self._then).append(key)
        self._event().set()

    def add_after(self, key: K, delay: float) -> None:
        """`add(key)` after `delay` seconds; of several pending delayed adds of a key, the earliest holds."""
        if self._closed:
            return
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= when:
                return
            pending[1].cancel()
        self._timers[key] = (when, loop.call_at(when, self._fire, key))

    def add_rate_limited(self, key: K, at_least: float = 0.0) -> float:
        """A failed `key`: count the failure and add it back after its backoff (or `at_least` seconds, if longer).
        Returns the delay."""
        self._failures[key] += 1
        delay = max(at_least, self.backoff.delay(self._failures[key], self._rand))
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """`key` succeeded: its next failure starts the backoff from the beginning."""
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        """Failures of `key` since it last succeeded."""
        return self._failures.get(key, 0)

    def resync_every(self, period: float, keys: Callable[[], Iterable[K]]) -> None:
        """Every `period` seconds, add each of `keys()` (after the others waiting: the lower priority)."""

        async def resync() -> None:
            while not self._closed:
                await asyncio.sleep(period)
                for key in list(keys()):
                    self.add(key)

        task = asyncio.get_running_loop().create_task(resync(), name="kubetune-resync")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- taking ---------------------------------------------------------------------------------------

    async def get(self) -> K:
        """The next key (first priority before the other), marked active until `done`; waits for one."""
        while not self._closed and not (self._first or self._then):
            ready = self._event()
            ready.clear()
            await ready.wait()
        if self._closed:
            raise QueueClosed()
        key = (self._first or self._then).popleft()
        self._waiting.discard(key)
        self._active.add(key)
        return key

    async def serve(self, work: Callable[[K], Awaitable[None]]) -> None:
        """A worker's loop: hand each key to `work`, one at a time, marking it done after, until the queue closes.
        `work` handles its own failures (`add_rate_limited` or `forget`)."""
        while True:
            try:
                key = await self.get()
            except QueueClosed:
                return
            try:
                await work(key)
            finally:
                self.done(key)

    def done(self, key: K) -> None:
        """A worker finished with `key`; one added meanwhile is queued again."""
        self._active.discard(key)
        if key in self._again:
            self.add(key, self._again.pop(key))

    # -- state ------------------------------------------------------------------------------------------

    def idle(self) -> bool:
        """Nothing waits and nothing is being worked on (delayed adds may still be due)."""
        return not (self._waiting or self._active)

    def has_first(self) -> bool:
        """Whether a first-priority key waits (a burst of new runs is being handled)."""
        return bool(self._first)

    def __len__(self) -> int:
        return len(self._waiting)

    def pending_retries(self) -> int:
        """Delayed adds not yet due (failed keys waiting out their backoff among them)."""
        return len(self._timers)

    async def close(self) -> None:
        """Hand nothing more out: workers waiting in `get` get QueueClosed; timers and resyncs stop."""
        self._closed = True
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._event().set()

    # -- inside -------------------------------------------------------------------------------------------

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def _event(self) -> asyncio.Event:
        if self._ready is None:
            self._ready = asyncio.Event()
        return self._ready
