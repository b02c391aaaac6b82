"""Training data from Swift: which shards, in which order, fetched ahead, re-batched.

A data set is a container of shards plus a manifest (``hapi.shards``). The
trainer plans once which shards it uses (the ``--start``/``--end`` sample
range, a held-out part chosen by shard) and then, every epoch:

1. orders the training shards with a generator seeded from (seed, epoch);
2. loads them with a bounded number of requests in flight, in that order
   whatever order they arrive in: in split mode a HAPI GET returns the
   storage tier's features of layers [0, split); in vanilla mode a plain GET
   returns the raw shard, decoded and preprocessed here;
3. shuffles each shard's samples with a generator seeded from (seed, epoch,
   shard name) and cuts the stream into batches of exactly the user's batch
   size (the epoch's last batch may be smaller), whatever batch the storage
   tier used.

Nothing depends on timing or on the mode, so split and vanilla runs with the
same seed see the same samples in the same batches, and a resumed epoch can
skip exactly the samples it has already trained on.
"""

import hashlib
import itertools
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from swiftclient import ClientException

from hapi import protocol
from hapi.client.features import fetch_features
from hapi.preprocess import DecodeError, preprocess
from hapi.shards import MANIFEST_NAME, Manifest, ShardError, read_shard


class DataError(RuntimeError):
    """The data set in Swift is missing, malformed, or unusable as asked."""


@dataclass(frozen=True)
class ShardRef:
    """One shard and the part of it in use: samples [lo, hi) in key order."""

    name: str
    samples: int
    bytes: int
    lo: int
    hi: int

    @property
    def selected(self):
        return self.hi - self.lo


@dataclass
class DataPlan:
    classes: list
    train: list
    holdout: list

    @property
    def train_samples(self):
        return sum(ref.selected for ref in self.train)

    @property
    def holdout_samples(self):
        return sum(ref.selected for ref in self.holdout)


@dataclass
class ShardData:
    """A loaded shard: model inputs (features or preprocessed images), labels, keys."""

    ref: ShardRef
    inputs: torch.Tensor
    labels: torch.Tensor
    keys: list
    bytes_received: int
    load_s: float
    storage: dict = field(default_factory=dict)


@dataclass
class Batch:
    inputs: torch.Tensor
    labels: torch.Tensor
    keys: list

    def __len__(self):
        return len(self.keys)


def derived_seed(*parts):
    """A 63-bit seed from any printable parts, stable across runs and platforms."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(*parts):
    return torch.Generator().manual_seed(derived_seed(*parts))


# Planning ------------------------------------------------------------------


def open_dataset(conn, container):
    """The container's manifest and the byte size of each object in it."""
    try:
        _, listing = conn.get_container(container, full_listing=True)
    except ClientException as err:
        if err.http_status == 404:
            raise DataError(f"container {container!r} does not exist in this account "
                            "(upload a data set with hapi-load)") from None
        raise
    sizes = {obj["name"]: obj["bytes"] for obj in listing}
    if MANIFEST_NAME not in sizes:
        raise DataError(f"container {container!r} has no {MANIFEST_NAME}: it is not a HAPI "
                        "data set (upload one with hapi-load)")
    _, body = conn.get_object(container, MANIFEST_NAME)
    try:
        manifest = Manifest.from_json(body)
    except (ShardError, KeyError, TypeError) as err:
        raise DataError(f"{container}/{MANIFEST_NAME} is not a valid manifest: {err}") from None
    missing = [s["name"] for s in manifest.shards if s["name"] not in sizes]
    if missing:
        raise DataError(f"{container}/{MANIFEST_NAME} lists shards that are not in the "
                        f"container: {', '.join(missing[:5])}")
    return manifest, sizes


def plan_data(manifest, sizes, start=0, end=None, holdout=0.2):
    """Select samples [start, end) of the manifest's order and hold out whole shards.

    The held-out shards are the ``round(holdout * n)`` shards (at least one
    when ``holdout > 0``) that come first when sorted by a hash of their name:
    a deterministic choice that does not depend on the upload order.
    """
    total = manifest.samples
    end = total if end is None else end
    if not 0 <= start < end <= total:
        raise DataError(f"sample range [{start}, {end}) is not within the data set's "
                        f"{total} samples")
    refs, first = [], 0
    for shard in manifest.shards:
        lo, hi = max(start - first, 0), min(end - first, shard["samples"])
        if lo < hi:
            refs.append(ShardRef(shard["name"], shard["samples"], sizes[shard["name"]], lo, hi))
        first += shard["samples"]
    held = 0
    if holdout > 0:
        if len(refs) < 2:
            raise DataError(f"the selected samples lie in {len(refs)} shard(s): holding out "
                            "whole shards needs at least 2 (use --holdout 0 or smaller shards)")
        held = min(max(round(holdout * len(refs)), 1), len(refs) - 1)
    by_hash = sorted(refs, key=lambda ref: hashlib.sha256(ref.name.encode()).digest())
    held_names = {ref.name for ref in by_hash[:held]}
    return DataPlan(classes=list(manifest.classes),
                    train=[r for r in refs if r.name not in held_names],
                    holdout=[r for r in refs if r.name in held_names])


def epoch_order(refs, seed, epoch):
    """The training shards of ``epoch`` in their seeded order."""
    order = torch.randperm(len(refs), generator=_generator("shards", seed, epoch))
    return [refs[i] for i in order.tolist()]


def resume_point(ordered, consumed):
    """Where an epoch continues after ``consumed`` samples: (shards to skip,
    samples to skip in the next shard)."""
    for index, ref in enumerate(ordered):
        if consumed < ref.selected:
            return index, consumed
        consumed -= ref.selected
    return len(ordered), 0


# Loading --------------------------------------------------------------------


class FeatureSource:
    """Split mode: the Swift proxy runs layers [0, split) and sends features."""

    def __init__(self, container, request):
        self.container = container
        self.request = request

    def load(self, conn, ref):
        began = time.perf_counter()
        try:
            stream = fetch_features(conn, self.container, ref.name, self.request)
        except ClientException as err:
            raise storage_error(err, self.container, ref.name) from None
        if protocol.SAMPLES.lower() not in stream.headers:
            raise DataError(f"GET {self.container}/{ref.name} returned the object, not "
                            "features: the proxy has no hapi filter in its pipeline")
        frames = list(stream)
        keys = [key for frame in frames for key in frame.keys]
        if len(keys) != ref.samples:
            raise DataError(f"{self.container}/{ref.name} holds {len(keys)} samples, its "
                            f"manifest says {ref.samples}")
        storage = {"device": stream.device, "batch_used": stream.batch_used,
                   "compute_s": sum(_storage_seconds(frame.timings) for frame in frames)}
        return ShardData(ref=ref,
                         inputs=torch.cat([f.features for f in frames])[ref.lo:ref.hi],
                         labels=torch.cat([f.labels for f in frames])[ref.lo:ref.hi],
                         keys=keys[ref.lo:ref.hi],
                         bytes_received=stream.reader.bytes_read,
                         load_s=time.perf_counter() - began, storage=storage)


def _storage_seconds(timings):
    return timings.get("decode_s", 0.0) + sum(timings.get("layers_s", ())) + \
        timings.get("to_wire_s", 0.0)


class RawSource:
    """Vanilla mode: the raw shard crosses the network and is preprocessed here."""

    def __init__(self, container, preset, model):
        self.container = container
        self.preset = preset
        self.model = model

    def load(self, conn, ref):
        began = time.perf_counter()
        try:
            _, body = conn.get_object(self.container, ref.name)
        except ClientException as err:
            raise storage_error(err, self.container, ref.name) from None
        try:
            samples = read_shard(body)
            if len(samples) != ref.samples:
                raise DataError(f"{self.container}/{ref.name} holds {len(samples)} samples, "
                                f"its manifest says {ref.samples}")
            samples = samples[ref.lo:ref.hi]
            inputs = preprocess([s.image for s in samples], self.preset, self.model)
        except ShardError as err:
            raise DataError(f"{self.container}/{ref.name}: {err}"
                            + (f" (member {err.member})" if err.member else "")) from None
        except DecodeError as err:
            bad = samples[err.index]
            raise DataError(f"{self.container}/{ref.name}: member {bad.key}.{bad.ext}: "
                            f"{err}") from None
        return ShardData(ref=ref, inputs=inputs,
                         labels=torch.tensor([s.label for s in samples]),
                         keys=[s.key for s in samples], bytes_received=len(body),
                         load_s=time.perf_counter() - began)


def storage_error(err, container, name):
    """A readable error for a failed shard GET (HAPI answers 4xx with a JSON body)."""
    detail = err.http_response_content
    if isinstance(detail, bytes):
        detail = detail.decode("utf-8", "replace")
    return DataError(f"GET {container}/{name} failed: {err.http_status} {err.http_reason}"
                     + (f": {detail[:300]}" if detail else ""))


class ShardLoader:
    """Loads shards in the order given, with up to ``depth`` requests in flight.

    Each worker thread has its own Swift connection (``connect()``; python-
    swiftclient connections are not thread-safe). ``depth=0`` loads each shard
    in the caller's thread when it is needed: no overlap (``--sequential``).
    At most ``depth`` loaded shards wait for the consumer, so memory stays
    bounded whatever the speed of either side.
    """

    def __init__(self, source, connect, depth):
        self.source = source
        self.connect = connect
        self.depth = depth
        self._local = threading.local()
        self._connections = []
        self._pool = ThreadPoolExecutor(depth, thread_name_prefix="hapi-fetch") \
            if depth > 0 else None

    def _load(self, ref):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.connect()
            self._connections.append(conn)
        return self.source.load(conn, ref)

    def __call__(self, refs):
        """Yield a :class:`ShardData` per ref, in order."""
        if self._pool is None:
            for ref in refs:
                yield self._load(ref)
            return
        refs = iter(refs)
        pending = deque(self._pool.submit(self._load, ref)
                        for ref in itertools.islice(refs, self.depth))
        try:
            while pending:
                data = pending.popleft().result()
                for ref in itertools.islice(refs, 1):
                    pending.append(self._pool.submit(self._load, ref))
                yield data
        finally:
            for future in pending:
                future.cancel()

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for conn in self._connections:
            conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Batching --------------------------------------------------------------------


def shuffled(shard, seed, epoch):
    """The shard's samples in their seeded order for this epoch."""
    perm = torch.randperm(len(shard.keys), generator=_generator("samples", seed, epoch,
                                                                shard.ref.name))
    return ShardData(ref=shard.ref, inputs=shard.inputs[perm], labels=shard.labels[perm],
                     keys=[shard.keys[i] for i in perm.tolist()],
                     bytes_received=shard.bytes_received, load_s=shard.load_s,
                     storage=shard.storage)


def rebatch(shards, batch_size, skip=0):
    """Cut a stream of shards into batches of ``batch_size`` samples (the last
    may be smaller), dropping the first ``skip`` samples of the stream."""
    inputs, labels, keys = [], [], []
    held = 0
    for shard in shards:
        start = min(skip, len(shard.keys))
        skip -= start
        offset = start
        while offset < len(shard.keys):
            take = min(batch_size - held, len(shard.keys) - offset)
            inputs.append(shard.inputs[offset:offset + take])
            labels.append(shard.labels[offset:offset + take])
            keys.extend(shard.keys[offset:offset + take])
            held += take
            offset += take
            if held == batch_size:
                yield Batch(torch.cat(inputs), torch.cat(labels), keys)
                inputs, labels, keys, held = [], [], [], 0
    if held:
        yield Batch(torch.cat(inputs), torch.cat(labels), keys)
