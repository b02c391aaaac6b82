"""Training data from Swift: which shards, in which order, fetched ahead, re-batched.

A data set is a container of shards plus a manifest (``hapi.shards``). The
trainer plans once which shards it uses (the ``--start``/``--end`` sample
range, a held-out part chosen by shard) and then, every epoch:

1. orders the training shards with a generator seeded from (seed, epoch);
2. loads them with a bounded number of requests in flight, in that order
   whatever order they arrive in, each at the split its selector gives when
   it is sent: at a split s > 0 a HAPI GET returns the storage tier's
   features of layers [0, s); at s = 0 (vanilla) a plain GET returns the raw
   shard, decoded and preprocessed here. Each loaded shard says its split and
   how its request went (frames' timings, bytes, waits) and the selector
   learns from it before the next request goes out. A request that fails
   on the way (503 at capacity, a lost connection, a stream cut short) is
   retried whole (``hapi.client.retry``): a shard counts as loaded only once
   its response has been read to its end;
3. shuffles each shard's samples with a generator seeded from (seed, epoch,
   shard name) and cuts the stream into batches of exactly the user's batch
   size (the epoch's last batch may be smaller), whatever batch the storage
   tier used. A batch keeps the split of each of its parts: the trainer runs
   layers [s, f) of each part itself, so a batch that straddles a change of
   split computes what it would have computed at either split.

Nothing depends on timing, on the mode or on the split, so runs with the
same seed see the same samples in the same batches whatever their splits,
and a resumed epoch can skip exactly the samples it has already trained on.
"""

import dataclasses
import functools
import hashlib
import itertools
import threading
import time
import urllib.parse
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from swiftclient import ClientException

from hapi import protocol
from hapi.client.autosplit.wireformats import WireFormat
from hapi.client.endpoints import Endpoints, merged_report
from hapi.client.features import (
    CHUNK_BYTES,
    burst_end,
    endpoint_connection,
    fetch_features,
    read_some_of,
)
from hapi.client.retry import transient
from hapi.preprocess import DecodeError, preprocess
from hapi.shards import MANIFEST_NAME, Manifest, ShardError, leading_images, read_shard

# Loaded shards waiting for the trainer, at most (their tensors' bytes).
DEFAULT_MAX_BUFFERED_BYTES = 512 << 20
# The storage batch asked for by default: shards stream as this many frames or
# more, so that the first frame leaves while the rest of the shard computes;
# and no larger than this.
FRAMES_PER_SHARD = 4
MAX_STREAMING_BATCH = 64
# A frame's bytes still arriving are told to the split selector at most this
# often: often enough that it need not wait for whole frames to time the
# link, seldom enough that its lock costs the loader nothing.
ARRIVING_EVERY_S = 0.05


def streaming_batch(shard_samples):
    """The storage batch that streams a shard of ``shard_samples`` as several frames."""
    return max(1, min(MAX_STREAMING_BATCH, -(-shard_samples // FRAMES_PER_SHARD)))


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


@dataclass(frozen=True)
class Transfer:
    """How one shard's request went, as the split selector measures it.

    ``sent_at``, ``answered_at``, ``done_at``: ``time.perf_counter()`` when
    the request went out, when its response headers came, when its last byte
    was read. ``storage_early_s``: the storage tier's compute before the
    headers (the filter computes the first frame before it answers).
    ``frames_on_link``: per part of a frame, ``(start, arrived_at, nbytes)``:
    from when the storage tier had it ready to send (in this host's clock)
    or its first bytes had arrived, to when its last byte arrived, and its
    bytes (:class:`FramesOnLink`); for a raw GET, its body after its first
    read and its first bytes' burst; when empty, the body from the headers
    to its last byte (:meth:`link_intervals`).
    """

    nbytes: int
    sent_at: float
    answered_at: float
    done_at: float
    storage_early_s: float = 0.0
    frames_on_link: tuple = ()

    def link_intervals(self):
        """``(start, end, nbytes)`` per part of the body that was on the link."""
        return self.frames_on_link or ((self.answered_at, self.done_at, self.nbytes),)


class FramesOnLink:
    """When each frame of a feature stream whose headers came at
    ``answered_at`` was on the link: ``(start, end, nbytes)`` per part of a
    frame as it arrives (:meth:`frame`, then :meth:`end` for the end frame),
    all kept in :attr:`parts` (:attr:`Transfer.frames_on_link`).

    A frame was on the link from when the storage tier had it ready to when
    its last byte arrived. The headers leave the storage tier with the first
    frame, so a frame was ready ``ready_s`` after the first one's, counted
    from the headers: a difference of the storage tier's own clock, whatever
    this host's clock says; never after its arrival. A replay from the
    storage tier's feature cache (``replayed``) had every frame ready at
    once. The end frame follows the last batch frame.

    A frame ready after the one before it had arrived found its connection
    idle, and a shaper's bucket may have passed its first bytes at once: it
    is two parts, its first bytes up to where such a burst ends (``burst``,
    :meth:`hapi.client.features.ChunkReader.burst_end`: fewer than
    :data:`hapi.client.features.BURST_BYTES`, never timed) and the rest.
    Measured on a 32 Mbit/s link of 30.5 Mbit/s goodput, alexnet's 153 KB
    frames, each timed whole, read 38 Mbit/s. A frame queued behind the one
    before it is one part: the link was busy, the bucket empty.

    Until a frame is whole, :meth:`arriving` tells that its bytes are
    arriving: the link's clock then knows that the connection was busy up to
    now, and need not wait for the frame's last byte to share the moments
    before among the requests on the link."""

    def __init__(self, answered_at, replayed=False):
        self.answered_at = answered_at
        self.replayed = replayed
        self.parts = []
        self._first = None  # the first frame's ready_s
        self._offset = 0
        self._since = None  # when the first bytes after the last part arrived

    def frame(self, timings, arrived_at, upto, burst=None):
        """A batch frame with ``timings``, its last byte at ``arrived_at`` and
        at byte ``upto`` of the body, its first bytes' burst ending at
        ``burst`` (``(body offset, time)``, or None); returns its parts."""
        if self._first is None:
            self._first = timings.get("ready_s", 0.0)
        ready = 0.0 if self.replayed else max(timings.get("ready_s", self._first) - self._first,
                                              0.0)
        return self._parts(min(self.answered_at + ready, arrived_at), arrived_at, upto, burst)

    def end(self, arrived_at, upto, burst=None):
        """The end frame, its last byte at ``arrived_at`` and at byte ``upto``."""
        return self._parts(self.parts[-1][1] if self.parts else self.answered_at, arrived_at,
                           upto, burst)

    def _parts(self, start, end, upto, burst):
        parts = []
        idle = not self.parts or start > self.parts[-1][1]
        if idle and burst is not None and start < burst[1] < end:
            parts.append(self._part(start, burst[1], burst[0]))
            start = burst[1]
        parts.append(self._part(start, end, upto))
        return parts

    def arriving(self, received, at):
        """The body's first ``received`` bytes have arrived, the last of them
        at ``at``: ``(start, at, nbytes)`` of the part whose bytes are
        arriving (from its first bytes' arrival; its bytes so far), or None
        when all of them are in parts."""
        if received <= self._offset:
            return None
        if self._since is None:
            self._since = at
        return self._since, at, received - self._offset

    def _part(self, start, end, upto):
        part = (start, end, upto - self._offset)
        self._offset = upto
        self._since = None
        self.parts.append(part)
        return part


@dataclass(frozen=True)
class FrameStats:
    """What one frame says about the storage tier: its ``timings``
    (``hapi.wire``) for ``samples`` samples of ``feature_bytes`` bytes."""

    timings: dict
    samples: int
    feature_bytes: int


@dataclass
class ShardData:
    """A loaded shard at ``split``: model inputs (the features at that
    boundary, or at 0 the preprocessed images), labels, keys, and what its
    request measured."""

    ref: ShardRef
    split: int
    inputs: torch.Tensor
    labels: torch.Tensor
    keys: list
    transfer: Transfer
    load_s: float
    frames: list = field(default_factory=list)
    storage: dict = field(default_factory=dict)
    cache: str = ""  # with a feature cache: "hit" (read from it, nothing received) or "miss"
    cache_read_bytes: int = 0
    wire_format: str = ""  # the features' dtype[+encoding] on the wire ("" for raw shards)
    host_cpu_s: float = 0.0  # the loader thread's CPU for reading and decoding the response

    @property
    def bytes_received(self):
        return self.transfer.nbytes


@dataclass
class Part:
    """Consecutive samples of a batch that came at the same split."""

    split: int
    inputs: torch.Tensor


@dataclass
class Batch:
    parts: list
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


def rank_share(ordered, rank, world_size):
    """Rank ``rank``'s shards of an epoch's seeded order: every ``world_size``-th
    shard from its ``rank``-th. Every rank derives the same order from the
    seed and the epoch, so the shares are disjoint and cover every shard,
    and each sample is trained on once per epoch across the ranks."""
    if len(ordered) < world_size:
        raise DataError(f"{len(ordered)} training shards cannot be shared among {world_size} "
                        f"ranks: use at most {len(ordered)} ranks, or smaller shards")
    return ordered[rank::world_size]


def resume_point(ordered, consumed):
    """Where an epoch continues after ``consumed`` samples: (shards to skip,
    samples to skip in the next shard)."""
    for index, ref in enumerate(ordered):
        if consumed < ref.selected:
            return index, consumed
        consumed -= ref.selected
    return len(ordered), 0


# Loading --------------------------------------------------------------------


class FixedSplit:
    """Every request at one split (``--manual_split``, or nothing frozen), in
    the run's own wire format.

    A split selector: ``split`` for the next request, ``route`` (the split
    and the wire format name, None: the request's own); ``resumed(epochs,
    samples)`` when the job resumes from a checkpoint; in the loader's
    threads, ``opened()`` before each request goes out, then
    ``on_link(request, start, end, nbytes)`` for each part of its body as it
    arrives (with ``arriving=True`` while a part's bytes are still arriving:
    ``nbytes`` of it so far, from ``start`` to ``end``; the whole part
    follows) and ``closed(request, shard)`` (``shard`` None when it failed),
    with what ``opened`` returned; ``observe(shard)`` as the consumer takes
    each loaded shard, ``wants_step_times`` (and then
    ``observe_step(seconds)``), ``observe_iteration(parts, seconds)`` after
    each training iteration, ``report()`` for the metrics. The trainer's
    automatic selection (``hapi.client.autosplit.AutomaticSplit``) is the other.
    """

    automatic = False
    wants_step_times = False

    def __init__(self, split):
        self.split = split

    @property
    def route(self):
        return self.split, None

    def resumed(self, epochs, samples):
        """A fixed split does not rank the job."""

    def opened(self):
        """A fixed split follows no request."""

    def on_link(self, request, start, end, nbytes, arriving=False):
        """A fixed split learns nothing from a body's parts."""

    def closed(self, request, shard):
        """A fixed split learns nothing from a request."""

    def observe(self, shard):
        """A fixed split learns nothing from a shard."""

    def observe_iteration(self, parts, seconds):
        """A fixed split learns nothing from an iteration."""

    def report(self):
        return {"automatic": False, "split": self.split}


@dataclass
class Channel:
    """A loader thread's connections, one per storage endpoint
    (``hapi.client.endpoints``): for the endpoint None, ``swift`` (to the
    storage URL the auth returned) for raw shards and ``features`` for
    feature requests (``swift`` itself, or a connection with the same token
    to the standalone HAPI server); for each listed endpoint, a connection
    with the same token, opened when first used."""

    swift: object
    features: object
    listed: dict = field(default_factory=dict)

    def connection(self, url, for_features):
        """The connection to endpoint ``url`` (None: ``swift`` or ``features``)."""
        if url is None:
            return self.features if for_features else self.swift
        conn = self.listed.get(url)
        if conn is None:
            conn = self.listed[url] = endpoint_connection(self.swift, url)
        return conn

    def close(self):
        """Drop the sockets (after a failure); the next request opens new ones."""
        self.swift.close()
        if self.features is not self.swift:
            self.features.close()
        for conn in self.listed.values():
            conn.close()


class ShardSource:
    """Loads a shard at a split: at ``split > 0`` the storage tier runs layers
    [0, split) and sends features (``request`` gives the other HAPI
    parameters; its own split is replaced); at 0 the raw shard crosses the
    network and is preprocessed here (vanilla). Feature requests go to the
    Swift proxy's filter, or with ``intermediate_url`` to the standalone HAPI
    server there; raw shards always come from Swift.

    ``storage_urls`` spreads the requests over several endpoints (base URLs,
    round robin per request, :class:`hapi.client.endpoints.Endpoints`): Swift
    proxies in front of the same cluster, which then serve both raw shards
    and features; with ``intermediate_url``, standalone HAPI servers, which
    then serve the features in its place (raw shards still come from the
    storage URL the auth returned). A request that fails in a way worth
    retrying counts against its endpoint, which is skipped for a while, so
    that the loader's retry of the shard goes to another endpoint.

    ``load`` returns only once the shard's response has been read to its end
    and checked, and raises what the request raised (``ClientException``,
    ``wire.FrameError``, connection errors) for the loader to retry.

    With ``cache`` (a ``hapi.client.feature_cache.ShardCache``) a shard's
    features at a split are read from the trainer's disk when they are there
    (no request at all), and kept there once they have arrived whole.
    """

    def __init__(self, container, request, intermediate_url=None, cache=None,
                 storage_urls=None):
        self.container = container
        self.request = request
        self.intermediate_url = intermediate_url
        self.cache = cache
        urls = list(storage_urls or [None])
        if intermediate_url is None:
            self.raw_endpoints = self.feature_endpoints = Endpoints(urls)
        else:
            self.raw_endpoints = Endpoints([None])
            self.feature_endpoints = Endpoints(urls, none_name=intermediate_url)

    def open_channel(self, conn):
        """The :class:`Channel` for a loader thread whose Swift connection is ``conn``."""
        if self.intermediate_url is None or None not in self.feature_endpoints.urls:
            return Channel(conn, conn)
        return Channel(conn, endpoint_connection(conn, self.intermediate_url))

    def describe(self, ref, split):
        """What loading ``ref`` at ``split`` asks for, in a log line."""
        if split == 0:
            return f"raw shard {self.container}/{ref.name}"
        via = f" from the HAPI server at {self.intermediate_url}" if self.intermediate_url \
            else ""
        if len(self.feature_endpoints.urls) > 1:
            via = f" from {', '.join(self.feature_endpoints.urls)}"
        return f"features of {self.container}/{ref.name}{via}"

    def endpoints_report(self):
        """Requests and failures per endpoint, for the metrics."""
        return merged_report(self.raw_endpoints, self.feature_endpoints)

    def load(self, channel, ref, split, wire_format=None, on_link=None):
        """``ref`` at ``split``, its features in ``wire_format`` (a
        ``hapi.client.autosplit.wireformats.WireFormat``; None: the request's).
        ``on_link(start, end, nbytes)`` hears of each part of the body as it
        arrives (:attr:`Transfer.frames_on_link`), and of a frame's bytes as
        they arrive (``arriving=True``, :class:`FramesOnLink`)."""
        on_link = on_link or _ignore_part
        if split == 0:
            return self._on_endpoint(self.raw_endpoints, channel, False,
                                     lambda conn: self._load_raw(conn, ref, on_link))
        request = dataclasses.replace(self.request, split=split)
        if wire_format is not None:
            request = dataclasses.replace(request, dtype=wire_format.dtype,
                                          encoding=wire_format.encoding)
        if self.cache is not None:
            began = time.perf_counter()
            entry = self.cache.get(ref.name, split, request.dtype)
            if entry is not None:
                return self._cached(ref, split, entry, began)
        return self._on_endpoint(self.feature_endpoints, channel, True,
                                 lambda conn: self._load_features(conn, ref, request, on_link))

    @staticmethod
    def _on_endpoint(endpoints, channel, for_features, fetch):
        """``fetch(conn)`` over the connection to the next of ``endpoints``; a
        failure worth retrying counts against that endpoint (and drops its
        socket), so that the retry goes elsewhere."""
        url = endpoints.pick()
        conn = channel.connection(url, for_features)
        try:
            result = fetch(conn)
        except Exception as err:
            if transient(err) is not None:
                endpoints.failed(url)
                conn.close()
            raise
        endpoints.succeeded(url)
        return result

    def _load_features(self, conn, ref, request, on_link):
        began = time.perf_counter()
        cpu_began = time.thread_time()
        stream = fetch_features(conn, self.container, ref.name, request)
        answered = time.perf_counter()
        if protocol.SAMPLES.lower() not in stream.headers:
            where = urllib.parse.urlsplit(conn.url)
            where = f"{where.scheme}://{where.netloc}"
            why = f"{where} is not a HAPI server" if self.intermediate_url \
                else f"the proxy at {where} has no hapi filter in its pipeline"
            raise DataError(f"GET {self.container}/{ref.name} returned the object, not "
                            f"features: {why}")
        frames_on_link = FramesOnLink(answered, stream.replayed)
        stream.reader.on_arrival = arriving = _ArrivingParts(frames_on_link, on_link)
        frames = []
        for frame in stream:
            frames.append(frame)
            for part in frames_on_link.frame(frame.timings, *stream.arrivals[-1]):
                on_link(*part)
            # The read that ended the frame may have brought the next one's first bytes.
            arriving(stream.reader.received, stream.arrivals[-1][0])
        for part in frames_on_link.end(*stream.arrivals[-1]):
            on_link(*part)
        done = time.perf_counter()
        keys = [key for frame in frames for key in frame.keys]
        if len(keys) != ref.samples:
            raise DataError(f"{self.container}/{ref.name} holds {len(keys)} samples, its "
                            f"manifest says {ref.samples}")
        stats = [FrameStats(frame.timings, len(frame.keys), frame.features.nbytes)
                 for frame in frames]
        compute = [_storage_seconds(frame.timings) for frame in stats]
        transfer = Transfer(nbytes=stream.reader.bytes_read, sent_at=began,
                            answered_at=answered, done_at=done,
                            storage_early_s=sum(compute[:1]),
                            frames_on_link=tuple(frames_on_link.parts))
        storage = {"device": stream.device, "batch_used": stream.batch_used,
                   "compute_s": sum(compute)}
        inputs = torch.cat([f.float_features() for f in frames])
        labels = torch.cat([f.labels for f in frames])
        host_cpu_s = time.thread_time() - cpu_began
        if self.cache is not None:
            self.cache.put(ref.name, request.split, request.dtype, inputs, labels, keys)
        wire_format = WireFormat(request.dtype, request.encoding).name
        return ShardData(ref=ref, split=request.split, inputs=inputs[ref.lo:ref.hi],
                         labels=labels[ref.lo:ref.hi], keys=keys[ref.lo:ref.hi],
                         transfer=transfer, load_s=time.perf_counter() - began, frames=stats,
                         storage=storage, cache="" if self.cache is None else "miss",
                         wire_format=wire_format, host_cpu_s=host_cpu_s)

    def _cached(self, ref, split, entry, began):
        """A shard read from the feature cache: nothing crossed the network."""
        if len(entry.keys) != ref.samples:
            raise DataError(f"{self.container}/{ref.name} holds {len(entry.keys)} samples, "
                            f"its manifest says {ref.samples}")
        done = time.perf_counter()
        return ShardData(ref=ref, split=split, inputs=entry.inputs[ref.lo:ref.hi],
                         labels=entry.labels[ref.lo:ref.hi], keys=entry.keys[ref.lo:ref.hi],
                         transfer=Transfer(nbytes=0, sent_at=began, answered_at=done,
                                           done_at=done),
                         load_s=done - began, cache="hit", cache_read_bytes=entry.nbytes)

    def _load_raw(self, conn, ref, on_link):
        began = time.perf_counter()
        samples, transfer = raw_samples(conn, self.container, ref)
        for part in transfer.link_intervals():
            on_link(*part)
        samples = samples[ref.lo:ref.hi]
        try:
            inputs = preprocess([s.image for s in samples], self.request.preset,
                                self.request.model)
        except DecodeError as err:
            raise decode_error(err, self.container, ref.name, samples) from None
        return ShardData(ref=ref, split=0, inputs=inputs,
                         labels=torch.tensor([s.label for s in samples]),
                         keys=[s.key for s in samples], transfer=transfer,
                         load_s=time.perf_counter() - began)


def _ignore_part(start, end, nbytes, arriving=False):
    """``on_link`` for a load that no one measures."""


class _ArrivingParts:
    """A ``ChunkReader.on_arrival`` that tells ``on_link`` of the part whose
    bytes are arriving (``arriving=True``; the whole part comes later), at
    most once every :data:`ARRIVING_EVERY_S`."""

    def __init__(self, frames_on_link, on_link):
        self._frames_on_link, self._on_link = frames_on_link, on_link
        self._told_at = None

    def __call__(self, received, at):
        part = self._frames_on_link.arriving(received, at)
        if part is not None and (self._told_at is None or at - self._told_at >= ARRIVING_EVERY_S):
            self._told_at = at
            self._on_link(*part, arriving=True)


def _storage_seconds(timings):
    return timings.get("decode_s", 0.0) + sum(timings.get("layers_s", ())) + \
        timings.get("to_wire_s", 0.0)


def raw_samples(conn, container, ref):
    """Download the raw shard ``ref`` and read its samples (all of them, in
    key order); returns (samples, :class:`Transfer`). A failed GET raises
    swiftclient's ``ClientException`` (see :func:`storage_error`)."""
    body, transfer = _raw_get(conn, container, ref.name)
    try:
        samples = read_shard(body)
    except ShardError as err:
        raise DataError(f"{container}/{ref.name}: {err}"
                        + (f" (member {err.member})" if err.member else "")) from None
    if len(samples) != ref.samples:
        raise DataError(f"{container}/{ref.name} holds {len(samples)} samples, "
                        f"its manifest says {ref.samples}")
    return samples, transfer


def leading_samples(conn, container, ref, nbytes):
    """The images wholly inside the first ``nbytes`` of the raw shard ``ref``
    (a ranged GET, so that measuring vanilla's decode does not download a
    whole shard); returns (images, :class:`Transfer`)."""
    body, transfer = _raw_get(conn, container, ref.name,
                              {"Range": f"bytes=0-{max(nbytes, 1) - 1}"})
    return leading_images(body), transfer


def _raw_get(conn, container, name, headers=None):
    """A plain GET of an object, whole; returns (body, :class:`Transfer`).

    The link is timed on the body after its first read (what came with the
    headers) and after its first bytes that may have come in a burst
    (:func:`hapi.client.features.burst_end`): timed from its first read,
    the 128 KiB probe read a 2 Mbit/s link of 1.7 Mbit/s goodput as 2.35."""
    began = time.perf_counter()
    _, response = conn.get_object(container, name, resp_chunk_size=CHUNK_BYTES,
                                  headers=headers)
    answered = time.perf_counter()
    read_some = read_some_of(response)
    parts, arrivals, received = [], [], 0
    while chunk := read_some(CHUNK_BYTES):
        parts.append(chunk)
        received += len(chunk)
        arrivals.append((received, time.perf_counter()))
    done = time.perf_counter()
    body = b"".join(parts)
    untimed, timed_from = received, done  # an empty body: nothing to time
    if arrivals:  # a burst ends at the first read or after it
        untimed, timed_from = burst_end(arrivals, 0, received) or arrivals[0]
    return body, Transfer(nbytes=len(body), sent_at=began, answered_at=answered, done_at=done,
                          frames_on_link=((timed_from, done, len(body) - untimed),))


def decode_error(err, container, name, samples):
    """A readable error for the member of ``samples`` that did not decode."""
    bad = samples[err.index]
    return DataError(f"{container}/{name}: member {bad.key}.{bad.ext}: {err}")


def storage_error(err, container, name):
    """A readable error for a failed shard GET (HAPI answers 4xx with a JSON body)."""
    detail = err.http_response_content
    if isinstance(detail, bytes):
        detail = detail.decode("utf-8", "replace")
    return DataError(f"GET {container}/{name} failed: {err.http_status} {err.http_reason}"
                     + (f": {detail[:300]}" if detail else ""))


class ShardLoader:
    """Loads shards in the order given, ahead of the consumer.

    Requests go out as long as three bounds hold: at most ``depth`` requests
    in flight; at most ``lookahead_samples`` samples ahead of the consumer
    (requested or loaded, not yet consumed; at least one shard is always
    asked for); and at most ``max_buffered_bytes`` of loaded shards waiting
    for the consumer (their tensors). A new request goes out as soon as one
    completes, not when the consumer takes a shard, so the link never idles
    while the trainer computes; a slow consumer stops the requests once the
    loaded shards reach the byte bound, so memory stays bounded (by that
    bound plus the ``depth`` shards in flight) whatever the speed of either
    side. Shards are yielded in the order given, whatever order they arrive in.

    ``selector`` chooses the split and the wire format: each request is sent
    at ``selector.route`` as it is then; the selector hears of each request
    in its worker's thread (``opened``, ``on_link`` for each part of the
    body as it arrives, ``closed``: see :class:`FixedSplit`), and of every
    loaded shard in order and in the consumer's thread (``observe``).
    ``depth=0`` loads each shard in the caller's thread when it is needed: no
    overlap (``--sequential``).

    Each worker thread has its own connections (``connect()`` gives a Swift
    one; python-swiftclient connections are not thread-safe). ``retry`` (a
    :class:`hapi.client.retry.RetryPolicy`) retries a shard's failed request
    as a whole, after closing the thread's sockets; swiftclient's own
    retries are turned off on these connections so that a failure is
    retried once, by that policy, which honours Retry-After. A shard is
    yielded only once its request completed, so no sample comes twice or
    from half a shard.
    """

    def __init__(self, source, connect, depth, selector, retry, lookahead_samples=0,
                 max_buffered_bytes=DEFAULT_MAX_BUFFERED_BYTES):
        self.source = source
        self.connect = connect
        self.depth = depth
        self.selector = selector
        self.retry = retry
        self.lookahead_samples = lookahead_samples
        self.max_buffered_bytes = max_buffered_bytes
        self._local = threading.local()
        self._channels = []
        self._pool = ThreadPoolExecutor(depth, thread_name_prefix="hapi-fetch") \
            if depth > 0 else None
        self.peak_buffered_bytes = 0

    def _channel(self):
        channel = getattr(self._local, "channel", None)
        if channel is None:
            conn = self.connect()
            conn.retries = 0
            channel = self._local.channel = self.source.open_channel(conn)
            self._channels.append(channel)
        return channel

    def _load(self, ref, route):
        split, wire_format = route
        channel = self._channel()
        request, shard = self.selector.opened(), None
        on_link = functools.partial(self.selector.on_link, request)
        try:
            shard = self.retry.call(
                self.source.describe(ref, split),
                lambda: self.source.load(channel, ref, split, wire_format, on_link),
                reset=channel.close)
            return shard
        except ClientException as err:
            raise storage_error(err, self.source.container, ref.name) from None
        finally:
            self.selector.closed(request, shard)

    def __call__(self, refs):
        """Yield a :class:`ShardData` per ref, in order."""
        if self._pool is None:
            for ref in refs:
                shard = self._load(ref, self.selector.route)
                self.selector.observe(shard)
                yield shard
            return
        ahead = _Lookahead(self, iter(refs))
        try:
            ahead.refill()
            while ahead.pending:
                shard = ahead.take()
                self.selector.observe(shard)
                yield shard
        finally:
            ahead.cancel()

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for channel in self._channels:
            channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Lookahead:
    """One pass of a :class:`ShardLoader`: its requests, issued from the
    consumer's thread and from the workers' completion callbacks, under one
    lock."""

    def __init__(self, loader, refs):
        self.loader = loader
        self.refs = refs
        self.pending = deque()  # (ref, future), in the consumer's order
        # Reentrant: a future already done runs its callback inside refill().
        self.lock = threading.RLock()
        self.in_flight = 0
        self.samples_ahead = 0
        self.buffered_bytes = 0
        self.exhausted = False

    def refill(self):
        loader = self.loader
        with self.lock:
            while (not self.exhausted and self.in_flight < loader.depth
                   and self.buffered_bytes < loader.max_buffered_bytes
                   and (not self.pending or self.samples_ahead < loader.lookahead_samples)):
                ref = next(self.refs, None)
                if ref is None:
                    self.exhausted = True
                    break
                future = loader._pool.submit(loader._load, ref, loader.selector.route)
                self.in_flight += 1
                self.samples_ahead += ref.selected
                self.pending.append((ref, future))
                future.add_done_callback(self._done)

    def _done(self, future):
        if future.cancelled():
            return
        with self.lock:
            self.in_flight -= 1
            if future.exception() is None:
                self.buffered_bytes += _tensor_bytes(future.result())
                self.loader.peak_buffered_bytes = max(self.loader.peak_buffered_bytes,
                                                      self.buffered_bytes)
        self.refill()

    def take(self):
        """The next shard in order, once loaded; its room goes to a new request."""
        ref, future = self.pending.popleft()
        shard = future.result()
        with self.lock:
            self.samples_ahead -= ref.selected
            self.buffered_bytes -= _tensor_bytes(shard)
        self.refill()
        return shard

    def cancel(self):
        with self.lock:
            self.exhausted = True
            for _, future in self.pending:
                future.cancel()


def _tensor_bytes(shard):
    return shard.inputs.numel() * shard.inputs.element_size()


# Batching --------------------------------------------------------------------


def shuffled(shard, seed, epoch):
    """The shard's samples in their seeded order for this epoch."""
    perm = torch.randperm(len(shard.keys), generator=_generator("samples", seed, epoch,
                                                                shard.ref.name))
    return dataclasses.replace(shard, inputs=shard.inputs[perm], labels=shard.labels[perm],
                               keys=[shard.keys[i] for i in perm.tolist()])


def rebatch(shards, batch_size, skip=0):
    """Cut a stream of shards into batches of ``batch_size`` samples (the last
    may be smaller), dropping the first ``skip`` samples of the stream. A
    batch whose samples came at different splits has a part per split."""
    pieces, labels, keys = [], [], []
    for shard in shards:
        offset = min(skip, len(shard.keys))
        skip -= offset
        while offset < len(shard.keys):
            take = min(batch_size - len(keys), len(shard.keys) - offset)
            pieces.append((shard.split, shard.inputs[offset:offset + take]))
            labels.append(shard.labels[offset:offset + take])
            keys.extend(shard.keys[offset:offset + take])
            offset += take
            if len(keys) == batch_size:
                yield _batch(pieces, labels, keys)
                pieces, labels, keys = [], [], []
    if keys:
        yield _batch(pieces, labels, keys)


def _batch(pieces, labels, keys):
    parts = [Part(split, torch.cat([inputs for _, inputs in group]))
             for split, group in itertools.groupby(pieces, key=lambda piece: piece[0])]
    return Batch(parts, torch.cat(labels), keys)
