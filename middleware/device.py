"""The storage tier's device: which one, how many computations it runs at
full speed, and the slots that frames take on it, in line.

Concurrent feature requests compute on the same device. If each ran as soon
as it asked, ``n`` of them would share the cores side by side, all finish
late and together, and then share the link, which idles meanwhile; on the
CPU each would also start as many OpenMP threads as there are cores. Instead
every frame (decode, layers, encode) takes one of the device's
:class:`DeviceSlots` for its whole computation, in line
(:func:`frame_priority`: first frames first come first served, then the
oldest request's frames), and is sent as soon as it is done. A frame's
timings are then its own device time, and the tier never runs more compute
threads than it was given cores.
"""

import collections
import itertools
import os
import threading
import typing
from contextlib import contextmanager

import torch

# Images and convolution weights channels-last (NHWC) when the storage tier
# runs layers: oneDNN's convolutions on a CPU (and cuDNN's on a GPU) run
# faster on it; AlexNet's frozen layers take about a fifth less time on one
# CPU core. The features are the same up to float rounding, and leave as
# contiguous tensors (hapi.wire.pack_features).
LAYOUT = torch.channels_last


def resolve_device(name):
    """``auto`` means the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


def device_capacity(device):
    """How many computations ``device`` runs at once at full speed: one on a
    GPU; on the CPU, the cores this process may use over torch's threads per
    computation (one torch thread on each of 4 cores: 4)."""
    if device.type != "cpu":
        return 1
    return max(1, len(os.sched_getaffinity(0)) // torch.get_num_threads())


def frame_priority(request_number, index):
    """Where a frame stands in line for the device (lower goes first).

    A request's first frame goes before every later frame, in the order the
    first frames asked: a request that arrives while others stream starts
    after at most the frames already computing, and its status and first
    bytes leave promptly. A later frame goes behind every first frame and
    behind the later frames of older requests (``request_number`` counts the
    requests as they came): the oldest request finishes first, as a trainer
    consumes them, instead of all the requests in flight finishing late and
    together (which would leave the trainer waiting at the start of an epoch
    and with several shards to compute at its end).
    """
    return (0, 0, 0) if index == 0 else (1, request_number, index)


class _Waiter(typing.NamedTuple):
    """A frame in line for a slot: ``granted`` is set when it has one."""

    priority: tuple
    arrival: int
    owner: object
    granted: object


class DeviceSlots:
    """``capacity`` slots handed out by priority (:func:`frame_priority`),
    first come first served among equals.

    Taken and given back in the worker threads that compute, so it is built on
    OS-thread primitives: under Swift's proxy ``threading`` is eventlet's
    green version, and the filter passes eventlet's original module in
    ``threading_module``. A released slot goes straight to the waiter that
    stands first in line; a waiter with an ``owner`` that already holds a
    slot waits for that slot (a request computes one frame at a time, so its
    next frame can stand in line while the current one computes without
    computing beside it).
    """

    def __init__(self, capacity, threading_module=threading):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._threading = threading_module
        self._lock = threading_module.Lock()
        self._free = capacity
        self._holders = collections.Counter()  # owner -> slots held
        self._waiters = []
        self._arrivals = itertools.count()

    @property
    def waiting(self):
        return len(self._waiters)

    @contextmanager
    def slot(self, priority=(0, 0, 0), owner=None):
        """Hold one slot, waiting in line for it."""
        with self._lock:
            turn = _Waiter(priority, next(self._arrivals), owner, self._threading.Event())
            self._waiters.append(turn)
            self._grant()
        turn.granted.wait()
        try:
            yield
        finally:
            with self._lock:
                self._free += 1
                if owner is not None:
                    self._holders[owner] -= 1
                    if not self._holders[owner]:
                        del self._holders[owner]
                self._grant()

    def _grant(self):
        """Give the free slots to the first eligible waiters (under the lock)."""
        while self._free:
            eligible = [w for w in self._waiters
                        if w.owner is None or w.owner not in self._holders]
            if not eligible:
                return
            turn = min(eligible, key=lambda w: (w.priority, w.arrival))
            self._waiters.remove(turn)
            self._free -= 1
            if turn.owner is not None:
                self._holders[turn.owner] += 1
            turn.granted.set()
