"""A clock that times each computation's share of the device, not its wall time.

The storage tier computes several requests at once on the same cores (the
proxy's OS threads, the server's executor): a trainer keeps a few requests
in flight, and other trainers send theirs. A layer timed with the wall
clock while another request computed then reads about twice what it costs,
and the trainer's cost model (``hapi.client.split``), which turns these
timings into the storage tier's throughput, would find the storage tier
twice as slow as it is.

:class:`ShareClock` is processor sharing's virtual time. A device runs
``capacity`` computations at full speed (a GPU: 1; CPU cores: the cores
over the torch threads each computation uses); while ``n`` computations
run, the clock advances at ``min(1, capacity / n)`` of the wall clock's
rate. A computation's reading over an interval is its share of the device
then: alone, it reads like the wall clock, and the shares of computations
that overlapped add up to at most ``capacity`` times the time the device
was busy.
"""

import threading
import time
from contextlib import contextmanager


class ShareClock:
    def __init__(self, capacity: int = 1, wall=time.perf_counter):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._wall = wall
        self._lock = threading.Lock()
        self._running = 0
        self._last = wall()
        self._virtual = 0.0

    def _advance(self):
        """Bring the virtual time up to now; the caller holds the lock."""
        now = self._wall()
        if self._running:
            self._virtual += (now - self._last) * min(1.0, self.capacity / self._running)
        self._last = now

    def now(self) -> float:
        """Seconds of virtual time; differences between readings taken inside
        :meth:`computing` are the reader's share of the device."""
        with self._lock:
            self._advance()
            return self._virtual

    @contextmanager
    def computing(self):
        """Count the caller as one of the computations sharing the device."""
        with self._lock:
            self._advance()
            self._running += 1
        try:
            yield self
        finally:
            with self._lock:
                self._advance()
                self._running -= 1
