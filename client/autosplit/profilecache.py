"""What the trainer measures of itself, kept on local disk between runs.

Before its first request the trainer times every layer of the model, the
cost of each wire format on real features and one step of its optimizer:
seconds to tens of seconds that depend only on the model (its layers and
the shapes through them), the device, the batch and the torch and
torchvision versions, plus what each measurement adds to its key
(:func:`times_key`). :class:`TrainerTimesCache` keeps each measurement as
one JSON file per key (no pickle) under ``$HAPI_PROFILE_CACHE``, else
``$XDG_CACHE_HOME/hapi/profiles``, else ``~/.cache/hapi/profiles``, so a
second run of the same model starts at once; :func:`cached` is the one way
the measurements go through it. A file that cannot be read or does not
match its key is measured again and replaced; a cache that cannot be
written is skipped (the run goes on, measured).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torchvision

from hapi import hostmem

__all__ = ["CACHE_ENV", "TIMES_FORMAT", "TrainerTimesCache", "cached", "default_cache_dir",
           "times_key"]

CACHE_ENV = "HAPI_PROFILE_CACHE"
TIMES_FORMAT = "hapi-trainer-times/1"

T = TypeVar("T")


def default_cache_dir() -> Path:
    """``$HAPI_PROFILE_CACHE``, else the user's cache dir's ``hapi/profiles``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hapi" / "profiles"


def times_key(model, input_shape, freeze: int, batch: int, device) -> dict:
    """What a model's layer times on the trainer depend on: the model's name,
    its layers and the shapes through them (the classifier's width too), the
    freeze index (layers below it run without gradients), the batch, the
    device (with its name on a GPU), torch's and torchvision's versions, and
    whether the allocator keeps freed memory (:func:`hapi.hostmem.keep_freed_memory`:
    a CPU forward whose pages fault in afresh takes longer)."""
    device = torch.device(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        device.type
    return {"model": model.name, "layers": list(model.layer_names),
            "shapes": [list(shape) for shape in model.boundary_shapes(tuple(input_shape))],
            "freeze": freeze, "batch": batch, "device": device_name,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "allocator": hostmem.allocator()}


class TrainerTimesCache:
    """The trainer's measurements (a JSON document each) by key, in ``folder``."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else default_cache_dir()

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.folder / f"{key['model']}-{digest}.json"

    def get(self, key: dict) -> dict | None:
        """The document stored for ``key``, or None (none, unreadable, another key's)."""
        try:
            doc = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("format") != TIMES_FORMAT or \
                doc.get("key") != key or not isinstance(doc.get("times"), dict):
            return None
        return doc["times"]

    def put(self, key: dict, times: dict) -> bool:
        """Store ``times`` (a JSON-able document) for ``key``, atomically; False when the
        folder cannot be written."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.folder, suffix=".tmp",
                                             delete=False) as f:
                json.dump({"format": TIMES_FORMAT, "key": key, "times": times}, f)
        except OSError:
            return False
        try:
            os.replace(f.name, self.path(key))
        except OSError:
            Path(f.name).unlink(missing_ok=True)
            return False
        return True


def cached(cache: TrainerTimesCache | None, key: dict, measure: Callable[[], T],
           encode: Callable[[T], dict], decode: Callable[[dict], T]) -> tuple[T, bool]:
    """``decode`` of what ``cache`` holds for ``key``, else ``measure()``,
    stored there ``encode``d. An entry ``decode`` rejects (TypeError,
    ValueError or KeyError: written by another version) is measured again
    and replaced. Returns (the value, whether it came from the cache)."""
    if cache is not None and (doc := cache.get(key)) is not None:
        try:
            return decode(doc), True
        except (TypeError, ValueError, KeyError):
            pass
    value = measure()
    if cache is not None:
        cache.put(key, encode(value))
    return value, False
