"""The storage tier's models, each built once and kept on its device.

Both front ends build models in worker threads, several requests at a time.
This is the one place where that concurrency is handled:

- a key (model name and weights identity) is built once, under that key's
  lock; a request for a key being built waits for that build, and requests
  for other keys go on;
- builds from ``seed:`` weights draw from torch's global random generator,
  which concurrent seeded builds would interleave (the same seed would then
  give other weights); they take one process-wide lock for that, and only
  for the draw;
- the cache's order and its count of resident bytes change under one lock,
  so the front end's scheduling thread reads a consistent figure.

Locks come from ``threading_module``: the filter passes eventlet's original
``threading``, as Swift's proxy runs with ``threading`` monkey-patched.
"""

import threading
from collections import OrderedDict

from hapi.middleware.memory import tensor_bytes


class ModelCache:
    def __init__(self, max_models, threading_module=threading):
        self.max_models = max_models
        self._lock = threading_module.Lock()
        self._key_locks = {}
        self._lock_factory = threading_module.Lock
        self.random_lock = threading_module.Lock()
        self._models = OrderedDict()
        self._bytes = {}
        self.resident_bytes = 0

    def get(self, key):
        """The cached model for ``key`` (now the most recently used), or None."""
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
            return model

    def get_or_build(self, key, build):
        """The model for ``key``; ``build()`` makes it when no other thread
        has. Blocking: call it from a worker thread."""
        model = self.get(key)
        if model is not None:
            return model
        with self._lock:
            key_lock = self._key_locks.setdefault(key, self._lock_factory())
        with key_lock:
            model = self.get(key)
            if model is None:
                model = build()
                self._put(key, model)
        with self._lock:
            if not key_lock.locked():
                self._key_locks.pop(key, None)
        return model

    def _put(self, key, model):
        size = tensor_bytes(model)
        with self._lock:
            self._models[key] = model
            self._bytes[key] = size
            self.resident_bytes += size
            while len(self._models) > self.max_models:
                evicted, _ = self._models.popitem(last=False)
                self.resident_bytes -= self._bytes.pop(evicted)
