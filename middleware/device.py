"""The storage tier's device: which one, how many computations it runs at
full speed, and the first-come-first-served slots that frames take on it.

Concurrent feature requests compute on the same device. If each ran as soon
as it asked, ``n`` of them would share the cores side by side, all finish
late and together, and then share the link, which idles meanwhile; on the
CPU each would also start as many OpenMP threads as there are cores. Instead
every frame (decode, layers, encode) takes one of the device's
:class:`DeviceSlots` for its whole computation, in the order the frames asked
for one, and is sent as soon as it is done. A frame's timings are then its
own device time, and the tier never runs more compute threads than it was
given cores.
"""

import collections
import os
import threading
from contextlib import contextmanager

import torch


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


class DeviceSlots:
    """``capacity`` slots handed out in first-come-first-served order.

    Taken and given back in the worker threads that compute, so it is built on
    OS-thread primitives: under Swift's proxy ``threading`` is eventlet's
    green version, and the filter passes eventlet's original module in
    ``threading_module``. A released slot goes straight to the oldest waiter,
    so a frame that asked later never overtakes one that asked earlier.
    """

    def __init__(self, capacity, threading_module=threading):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._threading = threading_module
        self._lock = threading_module.Lock()
        self._free = capacity
        self._waiters = collections.deque()

    @property
    def waiting(self):
        return len(self._waiters)

    @contextmanager
    def slot(self):
        """Hold one slot, waiting in line for it."""
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                turn = None
            else:
                turn = self._threading.Event()
                self._waiters.append(turn)
        if turn is not None:
            turn.wait()
        try:
            yield
        finally:
            with self._lock:
                if self._waiters:
                    self._waiters.popleft().set()
                else:
                    self._free += 1
