"""The trainer's feature cache: a shard's features cross the network once per job.

With a deterministic preset (every preset is: ``imagenet-N``, ``resize-N``),
the frozen layers in eval mode compute the same features for the same
input every time: what the storage tier sends for a shard at split ``s`` is
a function of the shard's content (its ETag), the model, the weights (for
``swift:`` weights, their object's ETag too), the freeze index, the split,
the preset, the wire dtype and its encoding. The first time a shard's features arrive
they are kept here, on the trainer's disk, under a key hashed from exactly
those; later requests for the same key (the next epochs, the next run) are
read from disk and reach neither the network nor the storage tier.

An entry is the whole shard: its features (in the wire dtype, as they
arrived), labels and keys, as one safetensors file whose metadata holds the
sha256 of those bytes. A file that does not parse or fails its checksum is
deleted and the shard fetched again: a cached entry is either exactly what
the storage tier sent, or not used. Writes go to a temporary file in the
same folder, renamed into place, so two trainers filling the same entry at
once each leave a whole file (the same bytes) and a reader never sees half
of one. The folder holds at most ``max_bytes``: after each write the least
recently used entries (a hit refreshes its file's time) are deleted until
it fits.

Only features are cached. At split 0 (vanilla) the raw shard crosses the
network every epoch, as vanilla training does: it is the baseline the
storage tier's features are measured against.
"""

import dataclasses
import hashlib
import json
import os
import re
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

import hapi
from hapi import wire

FORMAT = "hapi-feature-cache/1"
SUFFIX = ".safetensors"
DEFAULT_MAX_BYTES = 1 << 30
STALE_PART_S = 3600  # a temporary file this old belongs to a trainer that died writing it

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)


def parse_size(text):
    """Bytes from ``2G``, ``512M``, ``1.5GiB``, ``100000`` (binary units);
    raises ValueError saying what is expected."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size: expected a number of bytes with an "
                         "optional K, M, G or T (binary units), such as 2G or 500M")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def default_dir():
    """Where the cache lives unless told: ``$XDG_CACHE_HOME/hapi/features``
    (``~/.cache/hapi/features``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hapi", "features")


@dataclass(frozen=True)
class Entry:
    """A shard's features as cached: all its samples, in key order."""

    inputs: torch.Tensor
    labels: torch.Tensor
    keys: list
    nbytes: int  # the entry's file size: what reading it cost


def _checksum(inputs, labels, keys):
    digest = hashlib.sha256()
    for tensor in (inputs, labels):
        digest.update(wire.raw_bytes(tensor))
    digest.update(json.dumps(keys).encode())
    return digest.hexdigest()


def _metadata(data):
    """The safetensors header's ``__metadata__`` (safetensors' loader drops it)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])["__metadata__"]


class FeatureCache:
    """A folder of cached shards, at most ``max_bytes``, least recently used
    evicted first. Thread-safe; several processes may share the folder.

    ``report()`` counts this process's use: hits, misses, bytes read and
    written, entries evicted, entries found corrupt and writes the disk
    refused.
    """

    def __init__(self, directory, max_bytes=DEFAULT_MAX_BYTES):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("hits", "misses", "read_bytes", "written_bytes",
                                      "evicted", "corrupt", "write_errors"), 0)

    def __str__(self):
        return str(self.directory)

    def _count(self, **amounts):
        with self._lock:
            for name, amount in amounts.items():
                self._counts[name] += amount

    def path(self, key):
        return self.directory / f"{key}{SUFFIX}"

    def get(self, key):
        """The :class:`Entry` under ``key``, or None (a miss). An entry that
        does not parse or fails its checksum is deleted: a miss too."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._count(misses=1)
            return None
        try:
            meta = _metadata(data)
            tensors = safetensors_load(data)
            inputs, labels, keys = tensors["features"], tensors["labels"], json.loads(meta["keys"])
            valid = meta["format"] == FORMAT and \
                _checksum(inputs, labels, keys) == meta["sha256"] and len(keys) == len(labels)
        except Exception:  # any damage to the file, wherever it shows
            valid = False
        if not valid:
            path.unlink(missing_ok=True)
            self._count(misses=1, corrupt=1)
            return None
        with _ignoring_missing():
            os.utime(path)  # most recently used
        self._count(hits=1, read_bytes=len(data))
        return Entry(inputs, labels, keys, len(data))

    def put(self, key, inputs, labels, keys):
        """Keep a shard's features under ``key``; returns the bytes written:
        0 when the entry alone would exceed the cache's size, or when the
        disk refused it (full, read-only, the folder removed: counted as a
        write error, and training goes on without that entry)."""
        data = safetensors_save(
            {"features": inputs.contiguous(), "labels": labels.contiguous()},
            metadata={"format": FORMAT, "keys": json.dumps(keys),
                      "sha256": _checksum(inputs, labels, keys)})
        if len(data) > self.max_bytes:
            return 0
        part = None
        try:
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".", suffix=".part",
                                             delete=False) as part:
                part.write(data)
            os.replace(part.name, self.path(key))
        except OSError:
            if part is not None:
                Path(part.name).unlink(missing_ok=True)
            self._count(write_errors=1)
            return 0
        self._count(written_bytes=len(data))
        self._evict()
        return len(data)

    def size(self):
        """The bytes the folder's entries hold now."""
        return sum(size for _, size, _ in self._entries())

    def _entries(self):
        """(mtime, size, path) of each entry; stale temporary files are removed."""
        found = []
        try:
            paths = list(self.directory.iterdir())
        except FileNotFoundError:  # the folder removed meanwhile: nothing cached
            return found
        for path in paths:
            with _ignoring_missing():
                stat = path.stat()
                if path.name.endswith(SUFFIX):
                    found.append((stat.st_mtime, stat.st_size, path))
                elif path.name.endswith(".part") and \
                        time.time() - stat.st_mtime > STALE_PART_S:
                    path.unlink()
        return found

    def _evict(self):
        entries = sorted(self._entries(), key=lambda entry: entry[0])
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            self._count(evicted=1)

    def report(self):
        """This process's use of the cache, for the metrics."""
        with self._lock:
            counts = dict(self._counts)
        return {"dir": str(self.directory), "max_bytes": self.max_bytes,
                "size_bytes": self.size(), **counts}


class _ignoring_missing:
    """Skip a file another process deleted meanwhile (eviction, a corrupt entry)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        return kind is not None and issubclass(kind, FileNotFoundError)


class ShardCache:
    """One job's view of a :class:`FeatureCache`: the ETag of each shard of its
    container and what, besides the split, the features depend on.

    ``get(name, split)`` and ``put(name, split, ...)`` address a shard's
    entry at a split; a shard the listing did not show (none here) is never
    cached.
    """

    def __init__(self, store, etags, request, weights_etag=None):
        self.store = store
        self.etags = etags
        # Every field of the request (model, weights, freeze index, preset, wire
        # dtype and encoding) but the storage batch, which changes how the
        # features are cut into frames, not what they are, and the split, part
        # of each entry's key.
        fields = {name: value for name, value in dataclasses.asdict(request).items()
                  if name not in ("split", "batch", "dtype", "encoding")}
        self.identity = {"format": FORMAT, "hapi": hapi.__version__, **fields,
                         "weights_etag": weights_etag}

    @classmethod
    def open(cls, store, conn, container, request):
        """The view for ``container``'s shards (their ETags from one listing)
        and ``request``'s model, weights (a HEAD for ``swift:`` weights),
        freeze index, preset and dtype."""
        _, listing = conn.get_container(container, full_listing=True)
        etags = {obj["name"]: obj["hash"] for obj in listing}
        weights_etag = None
        if request.weights.kind == "swift":
            weights_container, _, name = request.weights.value.partition("/")
            weights_etag = conn.head_object(weights_container, name)["etag"]
        return cls(store, etags, request, weights_etag)

    def key(self, name, split, dtype):
        """The entry's name: a hash of the shard's ETag, the request's identity,
        the split and the wire dtype (the encoding is lossless: it is not part
        of what the features are)."""
        etag = self.etags.get(name)
        if etag is None:
            return None
        text = json.dumps({**self.identity, "etag": etag, "split": split, "dtype": dtype},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, name, split, dtype):
        key = self.key(name, split, dtype)
        return self.store.get(key) if key else None

    def put(self, name, split, dtype, inputs, labels, keys):
        key = self.key(name, split, dtype)
        return self.store.put(key, inputs, labels, keys) if key else 0

    def report(self):
        return self.store.report()
