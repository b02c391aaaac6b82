"""Admission of feature requests against a memory budget (docs/DESIGN.md, "bounded memory").

A request that asks for storage batch b holds ``cost.at(b)`` bytes while it
runs (see :meth:`FeatureEngine.memory_cost`). :class:`MemoryBudget` decides,
in this order:

1. the asked batch fits what is left of the budget: reserve it;
2. a smaller batch fits, down to ``min_batch``: reserve the largest that
   does (batch adaptation; the trainer re-batches: docs/DESIGN.md, "the user's training batch");
3. otherwise wait in a FIFO queue, up to ``queue_timeout`` seconds, for
   other requests to release memory;
4. otherwise :class:`OverBudget`: a 503 with a Retry-After estimated from
   the queue. A request that would not fit even an idle budget gets it at
   once rather than block the queue's head for nothing.

The class is pure bookkeeping: no threads, no locks, no waiting. Each front
end calls it from its single scheduling thread (the eventlet hub in the
proxy, the asyncio loop in the standalone server) and brings its own way to
wait for a queued ticket's ``wake`` callback, bounded by ``queue_timeout``;
:meth:`MemoryBudget.settle` then says how the wait ended. Every ticket
must be given back with :meth:`MemoryBudget.release` once its stream ends,
however it ends.
"""

import collections
import math
import time
from dataclasses import dataclass

# Weight of the newest hold time in the running mean used for Retry-After.
HOLD_TIME_WEIGHT = 0.3


@dataclass(frozen=True)
class MemoryCost:
    """Bytes one request holds at storage batch b: ``fixed + per_sample * b``."""

    fixed: int
    per_sample: int

    def at(self, batch):
        return self.fixed + self.per_sample * batch

    def largest_batch(self, available, limit):
        """The largest batch <= ``limit`` that fits in ``available`` bytes; 0 if none."""
        if self.fixed > available:
            return 0
        if self.per_sample == 0:
            return limit
        return min(limit, (available - self.fixed) // self.per_sample)

    @classmethod
    def fit(cls, peaks):
        """The line through peak bytes measured at two batch sizes,
        ``{b1: bytes, b2: bytes}``; a per-sample slope below zero (noise)
        counts as zero and the fixed part never drops below zero."""
        (b1, p1), (b2, p2) = sorted(peaks.items())
        per_sample = max(0, math.ceil((p2 - p1) / (b2 - b1)))
        return cls(fixed=max(0, p1 - per_sample * b1), per_sample=per_sample)


class OverBudget(Exception):
    """No memory for a request now: answered 503 with ``retry_after`` seconds."""

    def __init__(self, message, retry_after, **fields):
        super().__init__(message)
        self.retry_after = retry_after
        self.fields = fields


@dataclass(eq=False)
class Ticket:
    """One request's claim on the budget: queued until ``batch`` is set."""

    cost: MemoryCost
    wanted: int
    lowest: int
    wake: object = None
    batch: int = 0
    reserved: int = 0
    granted_at: float = 0.0
    queued_at: float = 0.0

    @property
    def granted(self):
        return self.batch > 0

    @property
    def reduced(self):
        """Granted a smaller batch than it asked for."""
        return 0 < self.batch < self.wanted


class MemoryBudget:
    """Reservations against ``capacity()``, the bytes requests may hold now.

    ``capacity`` is a callable because the budget moves: models cached on the
    device take their share, and on a GPU other processes take theirs.
    """

    def __init__(self, capacity, min_batch=1, queue_timeout=10.0, clock=time.monotonic):
        self.capacity = capacity
        self.min_batch = min_batch
        self.queue_timeout = queue_timeout
        self.clock = clock
        self.reserved = 0
        self._holders = set()
        self._queue = collections.deque()
        self._mean_hold_s = None

    @property
    def holders(self):
        return len(self._holders)

    @property
    def queued(self):
        return len(self._queue)

    def admit(self, cost, batch, wake=None):
        """A ticket for a request of ``batch`` samples: granted now, or queued
        (``wake()`` is called when it is granted later). Raises OverBudget
        when even ``min_batch`` samples would not fit an idle budget."""
        ticket = Ticket(cost=cost, wanted=batch, lowest=min(self.min_batch, batch), wake=wake,
                        queued_at=self.clock())
        capacity = self.capacity()
        if cost.at(ticket.lowest) > capacity:
            raise OverBudget(
                f"this request needs {cost.at(ticket.lowest)} bytes at batch {ticket.lowest}, "
                f"more than the {capacity} bytes of the storage tier's memory budget",
                self.retry_after(), needed_bytes=cost.at(ticket.lowest),
                budget_bytes=capacity)
        # FIFO: while others wait, a newcomer waits behind them even if it fits.
        if self._queue or not self._grant(ticket, capacity):
            self._queue.append(ticket)
        return ticket

    def settle(self, ticket):
        """After the front end's wait: the granted ticket, or OverBudget (and
        the ticket leaves the queue) when the wait ran out."""
        if ticket.granted:
            return ticket
        waited = self.clock() - ticket.queued_at
        self.release(ticket)
        raise OverBudget("HAPI is out of memory for this request; retry later",
                         self.retry_after(), waited_s=round(waited, 3),
                         needed_bytes=ticket.cost.at(ticket.lowest), queued=self.queued)

    def release(self, ticket):
        """Give back what ``ticket`` holds, or take it out of the queue; then
        grant the queue's head while it fits. Releasing twice is harmless."""
        if ticket in self._holders:
            self._holders.remove(ticket)
            self.reserved -= ticket.reserved
            self._record_hold(self.clock() - ticket.granted_at)
        elif ticket in self._queue:
            self._queue.remove(ticket)
        else:
            return
        self._grant_queued()

    def retry_after(self):
        """Whole seconds, at least 1, until memory is likely to be free for a
        newcomer: one mean hold time per request ahead of it (the queue and
        itself), shared among the requests holding memory, which release
        independently of one another."""
        hold_s = self._mean_hold_s if self._mean_hold_s is not None else 1.0
        return max(1, math.ceil(hold_s * (self.queued + 1) / max(1, self.holders)))

    def _grant(self, ticket, capacity):
        batch = ticket.cost.largest_batch(capacity - self.reserved, ticket.wanted)
        if batch < ticket.lowest:
            return False
        ticket.batch, ticket.reserved = batch, ticket.cost.at(batch)
        ticket.granted_at = self.clock()
        self.reserved += ticket.reserved
        self._holders.add(ticket)
        return True

    def _grant_queued(self):
        capacity = self.capacity()
        while self._queue and self._grant(self._queue[0], capacity):
            ticket = self._queue.popleft()
            if ticket.wake is not None:
                ticket.wake()

    def _record_hold(self, seconds):
        if self._mean_hold_s is None:
            self._mean_hold_s = seconds
        else:
            self._mean_hold_s += HOLD_TIME_WEIGHT * (seconds - self._mean_hold_s)
