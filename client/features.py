"""Ask Swift for features: a HAPI GET on a shard, decoded frame by frame.

This is the trainer's side of the protocol. It sends its requests with
python-swiftclient and reads the frames with the modules both tiers share,
``hapi.protocol`` (the request headers) and ``hapi.wire`` (the frames, as
torch tensors in safetensors), which bring torch, torchvision, safetensors
and Pillow with them (through ``hapi.zoo`` and ``hapi.preprocess``).
Nothing of the storage tier: no eventlet, no aiohttp, no Swift server code
(tests/test_cli.py checks).
"""

import time
import urllib.parse
from collections import deque
from dataclasses import dataclass, field

from swiftclient import Connection

from hapi import protocol, wire

CHUNK_BYTES = 1 << 20
# After an idle moment a shaper's bucket (tc tbf: 32 KiB in the benchmarks)
# and the socket buffers let about this many bytes of a body through at
# once, however slow the link: they are not timed (:func:`burst_end`), and
# frames smaller than this are not timed at all.
BURST_BYTES = 64 * 1024


def burst_end(arrivals, start, end):
    """Where the first bytes of the body's bytes ``[start, end)`` that may
    have come in a burst end: of ``arrivals``, ``(body offset, time)`` per
    chunk read, in order, the last one inside ``(start, start +
    BURST_BYTES)``; None if there is none, or if all of the bytes fit in a
    burst."""
    if end - start <= BURST_BYTES:
        return None
    found = None
    for offset, at in arrivals:
        if offset >= start + BURST_BYTES:
            break
        if offset > start:
            found = (offset, at)
    return found


class ChunkReader:
    """``read(n)`` over ``read_some(n)`` (:func:`read_some_of`), which
    returns what has arrived of the next ``n`` bytes, at least one byte
    (``b""`` at the end of the body).

    A frame is therefore complete as soon as its last byte is here, never
    held until the next frame's first bytes fill a chunk (the next frame may
    still be computing). ``arrived_at``: ``time.perf_counter()`` when the
    bytes read last arrived; :meth:`burst_end`: when a frame's first bytes
    were here. ``on_arrival``, when set, hears of every read as it returns:
    ``on_arrival(received, arrived_at)``, the body's bytes arrived so far and
    when (the frame being read may not be whole yet)."""

    def __init__(self, read_some):
        self._read_some = read_some
        self.on_arrival = None
        self._buffer = bytearray()
        self._pos = 0
        self._received = 0
        self._arrivals = deque()  # (body offset after the chunk, time) per chunk read
        self.bytes_read = 0
        self.arrived_at = time.perf_counter()

    @property
    def received(self):
        """The body's bytes arrived so far (handed over or still buffered)."""
        return self._received

    def read(self, n):
        while len(self._buffer) - self._pos < n:
            chunk = self._read_some(CHUNK_BYTES)
            if not chunk:
                break
            self.arrived_at = time.perf_counter()
            self._received += len(chunk)
            self._arrivals.append((self._received, self.arrived_at))
            if self.on_arrival is not None:
                self.on_arrival(self._received, self.arrived_at)
            del self._buffer[:self._pos]
            self._pos = 0
            self._buffer += chunk
        data = bytes(self._buffer[self._pos:self._pos + n])
        self._pos += len(data)
        self.bytes_read += len(data)
        return data

    def burst_end(self, start, end):
        """:func:`burst_end` of the bytes ``[start, end)`` read; the chunks
        that arrived before ``end`` are forgotten (ask in the body's order)."""
        found = burst_end(self._arrivals, start, end)
        while self._arrivals and self._arrivals[0][0] <= end:
            self._arrivals.popleft()
        return found


@dataclass
class FeatureStream:
    """One shard's features: the response headers, then frames as they arrive.

    ``arrivals``: per frame read (the end frame too), when its last byte
    arrived, the body's bytes up to its end, and where its first bytes that
    may have come in a burst end (:meth:`ChunkReader.burst_end`)."""

    headers: dict
    reader: ChunkReader
    max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES
    end: wire.Frame | None = None
    arrivals: list = field(default_factory=list)

    @property
    def batch_used(self):
        return int(self.headers[protocol.BATCH_USED.lower()])

    @property
    def device(self):
        return self.headers[protocol.DEVICE.lower()]

    @property
    def samples(self):
        return int(self.headers[protocol.SAMPLES.lower()])

    @property
    def replayed(self):
        """Whether the storage tier replayed stored frames (its feature
        cache): all of them were ready at once, whatever their timings say."""
        return self.headers.get(protocol.CACHE.lower()) == protocol.CACHE_HIT

    def __iter__(self):
        """Yield the batch frames, their features decompressed, in the wire
        dtype (``frame.float_features()`` dequantizes uint8 to float32);
        raises wire.StreamError on an in-stream error."""
        for frame in wire.read_frames(self.reader.read, self.max_frame_bytes):
            start, end = self.arrivals[-1][1] if self.arrivals else 0, self.reader.bytes_read
            self.arrivals.append((self.reader.arrived_at, end, self.reader.burst_end(start, end)))
            if frame.kind == "batch":
                yield frame
            else:
                self.end = frame


def fetch_features(conn, container, name, feature_req,
                   max_frame_bytes=wire.DEFAULT_MAX_FRAME_BYTES):
    """GET ``container/name`` through the HAPI filter; ``conn`` is a
    ``swiftclient.Connection``. Swift's and HAPI's errors raise
    ``swiftclient.ClientException`` (``http_status``, ``http_response_content``)."""
    headers, body = conn.get_object(container, name, resp_chunk_size=CHUNK_BYTES,
                                    headers=protocol.request_headers(feature_req))
    return FeatureStream(headers=headers, reader=ChunkReader(read_some_of(body)),
                         max_frame_bytes=max_frame_bytes)


def read_some_of(body):
    """``read_some(n)`` over a swiftclient object body: what has arrived of
    the next ``n`` bytes, at least one (urllib3's ``read1`` on the response
    under it; the body's own reads wait for a whole ``resp_chunk_size``);
    closes the body at its end, as the body's own reads do. Any other body
    (an iterable of chunks, as a stand-in connection may give) is read a
    chunk at a time."""
    response = getattr(getattr(body, "resp", None), "raw", None)
    if response is None:
        chunks = iter(body)
        return lambda n: next(chunks, b"")

    def read_some(n):
        chunk = response.read1(n)
        if not chunk:
            body.close()
        return chunk
    return read_some


def endpoint_connection(conn, base_url):
    """A copy of ``conn`` (a ``swiftclient.Connection``) that sends its requests
    to another storage endpoint at ``base_url`` (``http://host:port``): another
    Swift proxy in front of the same cluster, or the standalone HAPI server.
    The same account path, the same token, and the same credentials to log in
    again with Swift's auth when the token expires. :func:`fetch_features`
    works unchanged over it.
    """
    if not conn.url or not conn.token:
        conn.get_auth()
    path = urllib.parse.urlsplit(conn.url).path
    return Connection(authurl=conn.authurl, user=conn.user, key=conn.key,
                      retries=conn.retries, auth_version=conn.auth_version,
                      os_options=conn.os_options, timeout=conn.timeout,
                      preauthurl=base_url.rstrip("/") + path, preauthtoken=conn.token)


# The standalone HAPI server is one such endpoint.
intermediate_connection = endpoint_connection
