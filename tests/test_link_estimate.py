"""The trainer's estimate of the link: bytes over the time the link was busy,
over all connections at once, from when each frame was ready at the storage
tier to when its last byte arrived.

The clock's arithmetic on stated intervals, the reader that hands a frame
over as soon as its last byte is here, and, through the session's Swift,
the frames' ``ready_s`` and arrivals a real feature request gives.
"""

import itertools
import time

import pytest
import torch
from helpers import feature_request, small_shard_connection
from pytest import approx

from hapi import wire
from hapi.client.autosplit.estimator import (
    MIN_OBSERVED_S,
    MIN_TIMED_BYTES,
    MIN_TIMED_S,
    LinkClock,
    OnlineEstimator,
)
from hapi.client.data import FramesOnLink, ShardRef, Transfer, leading_samples
from hapi.client.features import BURST_BYTES, ChunkReader, FeatureStream, fetch_features

CONTAINER = "hapi-link-estimate"


class RecordingEstimator(OnlineEstimator):
    """An estimator that also keeps every transfer observation it was given."""

    def __init__(self):
        super().__init__()
        self.observed = []

    def observe_transfer(self, nbytes, seconds):
        self.observed.append((nbytes, seconds))
        super().observe_transfer(nbytes, seconds)


def clock():
    estimator = RecordingEstimator()
    return LinkClock(estimator), estimator


def test_requests_in_flight_together_read_the_link_rate_together():
    """A 1 MB/s link. The first request's 1 MB: 0.5 MB alone, then 0.5 MB
    at half the rate while the second's shares the link; the second's
    finishes alone. Each window of wall time is observed once every open
    request has reported up to its end, as the bytes of both over the time
    the link was busy: the link's rate each time."""
    link, estimator = clock()
    first, second = link.open(at=-0.1), link.open(at=0.4)
    link.on_link(first, 0.0, 0.5, 500_000, arriving=True)
    assert estimator.observed == [(400_000, approx(0.4))]  # the second was open since 0.4
    link.on_link(second, 0.5, 1.0, 250_000, arriving=True)
    link.on_link(first, 0.0, 1.0, 750_000, arriving=True)
    assert estimator.observed[1:] == [(600_000, approx(0.6))]
    link.on_link(first, 0.0, 1.5, 10**6)
    link.close(first)
    assert len(estimator.observed) == 2  # the second may have had bytes after 1.0
    link.on_link(second, 0.5, 2.0, 10**6)
    assert estimator.observed[2:] == [(10**6, approx(1.0))]
    link.close(second)
    assert estimator.bandwidth_bytes_per_s == approx(1e6)


def test_a_request_within_anothers_time_reads_the_link_rate_too():
    """The second request's 1 MB crossed while the first's 2 MB were on the
    link: both bodies' bytes over the busy time read the 1 MB/s, whichever
    ended first; no observation reads a spike."""
    link, estimator = clock()
    first, second = link.open(at=0.0), link.open(at=0.9)
    link.on_link(second, 1.0, 3.0, 10**6)
    link.close(second)
    assert estimator.observed == []  # the first may have had bytes since 0.0
    link.on_link(first, 0.0, 3.0, 2 * 10**6)
    link.close(first)
    assert estimator.observed == [(3 * 10**6, approx(3.0))]


def test_a_connection_that_stalls_while_others_bytes_arrive_does_not_skew_the_rate():
    """A 1 MB/s link. The second request's frame was ready from 0 but its
    connection stalled (a lost segment) until 1.0 while the first's 1 MB
    arrived; then it had the link alone. Dividing each moment among the
    requests on the link would have read the first at 2 MB/s; the bytes
    over the busy time read the link's rate."""
    link, estimator = clock()
    first, second = link.open(at=0.0), link.open(at=0.0)
    link.on_link(first, 0.0, 1.0, 10**6)
    link.close(first)
    link.on_link(second, 1.0, 1.5, 500_000, arriving=True)
    link.on_link(second, 0.0, 2.0, 10**6)
    link.close(second)
    assert [nbytes / seconds for nbytes, seconds in estimator.observed] == \
        [approx(1e6)] * len(estimator.observed)
    assert sum(nbytes for nbytes, _ in estimator.observed) == 2 * 10**6


def test_a_frame_still_arriving_lets_the_parts_beside_it_be_observed():
    """Two requests on a 2 MB/s link. The first's 1 MB frame arrived over 1 s
    while the second's frame was arriving too: once the second tells how
    many of its bytes had arrived by then, that second is observed, without
    waiting for the second's frame to end; the rest of the second's frame
    (1 MB alone) follows."""
    link, estimator = clock()
    first, second = link.open(at=0.0), link.open(at=0.0)
    link.on_link(first, 0.0, 1.0, 10**6)
    assert estimator.observed == []  # the second may have had bytes in that second
    link.on_link(second, 0.0, 1.0, 10**6, arriving=True)
    assert estimator.observed == [(2 * 10**6, approx(1.0))]
    link.close(first)
    link.on_link(second, 0.2, 1.5, 2 * 10**6)  # counted from when it was seen arriving
    link.close(second)
    assert estimator.observed == [(2 * 10**6, approx(1.0)), (10**6, approx(0.5))]


def test_the_first_read_after_an_idle_link_is_not_timed():
    """After an idle moment a shaper's bucket passes a burst at once: the
    bytes of a body's first read, when nothing else was on the link, are
    not counted, nor is the moment they took."""
    link, estimator = clock()
    request = link.open(at=0.0)
    link.on_link(request, 0.1, 0.1, 40_000, arriving=True)
    link.on_link(request, 0.1, 0.6, 540_000, arriving=True)
    assert estimator.observed == [(500_000, approx(0.5))]
    link.on_link(request, 0.05, 1.1, 1_040_000)
    link.close(request)
    assert estimator.observed == [(500_000, approx(0.5))] * 2


def test_a_frame_in_two_parts_keeps_the_bytes_seen_arriving_in_each():
    """A frame that found its connection idle arrives as a burst (its first
    read, 30 KB) and the rest (1 MB at 1 MB/s). Its bytes were seen arriving
    before it was whole and split in two: each part keeps the bytes that
    arrived in it, the burst is not timed, and the rest reads the link's rate
    before and after the split."""
    link, estimator = clock()
    request = link.open(at=-0.2)
    link.on_link(request, 0.0, 0.0, 30_000, arriving=True)
    link.on_link(request, 0.0, 0.5, 530_000, arriving=True)
    assert estimator.observed == [(500_000, approx(0.5))]
    link.on_link(request, -0.1, 0.0, 30_000)
    link.on_link(request, 0.0, 1.0, 10**6)
    link.close(request)
    assert estimator.observed == [(500_000, approx(0.5))] * 2


def test_a_frame_arriving_is_counted_from_its_first_bytes_arrival():
    """The part still arriving starts when the first bytes after the last
    whole part arrived, in the same read as that part's end or later."""
    on_link = FramesOnLink(answered_at=0.0)
    assert on_link.arriving(0, 0.1) is None
    assert on_link.arriving(100, 0.2) == (0.2, 0.2, 100)
    assert on_link.arriving(300, 0.5) == (0.2, 0.5, 300)
    on_link.frame({"ready_s": 0.0}, 0.6, 250)
    assert on_link.arriving(250, 0.6) is None  # the read ended on the frame's last byte
    assert on_link.arriving(400, 0.7) == (0.7, 0.7, 150)
    on_link.frame({"ready_s": 0.1}, 0.8, 350)
    assert on_link.arriving(400, 0.8) == (0.8, 0.8, 50)  # the next frame's first bytes


def test_frames_are_observed_as_they_arrive_each_after_the_one_before():
    """A body's frames are observed before the request ends. A frame ready
    while the one before it was still arriving was on the link only from
    that one's last byte: a connection's bytes go in order."""
    link, estimator = clock()
    request = link.open(at=0.0)
    link.on_link(request, 0.0, 1.0, 10**6)
    assert estimator.observed == [(10**6, approx(1.0))]
    link.on_link(request, 0.5, 2.0, 10**6)
    assert estimator.observed == [(10**6, approx(1.0))] * 2
    link.close(request)
    assert estimator.bandwidth_bytes_per_s == approx(1e6)


def test_short_frames_are_pooled_into_observations_of_min_observed_s():
    """Frames of 0.1 s at 1 MB/s: one observation per MIN_OBSERVED_S of link
    time, each at the link's rate; what is left is observed when the link
    has nothing more in flight."""
    link, estimator = clock()
    request = link.open(at=0.0)
    per_observation = round(MIN_OBSERVED_S / 0.1)
    for index in range(per_observation + 1):
        link.on_link(request, index * 0.1, (index + 1) * 0.1, 10**5)
        assert len(estimator.observed) == (index + 1) // per_observation
    link.close(request)
    assert estimator.observed == [(per_observation * 10**5, approx(MIN_OBSERVED_S)),
                                  (10**5, approx(0.1))]


def test_a_frame_still_computing_is_not_link_time():
    """Three frames of 1 MB, each on the link for 0.5 s, with 1 s of storage
    compute before each: the body took 4.5 s, the link carried 3 MB in 1.5 s."""
    link, estimator = clock()
    frames = ((1.0, 1.5, 10**6), (2.5, 3.0, 10**6), (4.0, 4.5, 10**6))
    link.observe(Transfer(3 * 10**6, sent_at=0.0, answered_at=1.0, done_at=4.5,
                          storage_early_s=1.0, frames_on_link=frames))
    assert estimator.bandwidth_bytes_per_s == approx(2e6)
    assert estimator.request_latency_s == approx(0.0)


def test_small_parts_and_instant_transfers_are_not_timed():
    """Frames of a few KB cross in a shaper's burst or the socket buffers, a
    megabyte in a millisecond on loopback: they leave the estimate to
    transfers the link paced."""
    link, estimator = clock()
    small = MIN_TIMED_BYTES - 1
    link.observe(Transfer(3 * small, 0.0, 0.0, 3.0,
                          frames_on_link=((0.0, 0.001, small), (1.0, 1.001, small),
                                          (2.0, 2.001, small))))
    link.observe(Transfer(10**6, 3.0, 3.0, 3.0 + MIN_TIMED_S / 2))
    assert estimator.bandwidth_bytes_per_s is None
    link.observe(Transfer(small + 10**6, 4.0, 4.0, 6.0,
                          frames_on_link=((4.0, 4.001, small), (5.0, 6.0, 10**6))))
    assert estimator.observed == [(10**6, approx(1.0))]


def test_frames_on_link_are_counted_from_the_headers_in_the_storage_tiers_clock():
    """The headers leave with the first frame: later frames were ready their
    ``ready_s`` after it, from when the headers came; the end frame follows
    the last batch frame; a replay had every frame ready at once."""
    timings = [{"ready_s": 5.0}, {"ready_s": 5.75}, {"ready_s": 6.0}]
    arrivals = [(10.5, 100), (11.0, 250), (11.75, 400), (11.8, 420)]

    def parts(replayed):
        on_link = FramesOnLink(10.0, replayed)
        frames = [part for t, arrived in zip(timings, arrivals, strict=False)
                  for part in on_link.frame(t, *arrived)]
        assert [*frames, *on_link.end(*arrivals[-1])] == on_link.parts
        return on_link.parts

    assert parts(False) == [(10.0, 10.5, 100), (10.75, 11.0, 150), (11.0, 11.75, 150),
                            (11.75, 11.8, 20)]
    assert parts(True) == [(10.0, 10.5, 100), (10.0, 11.0, 150), (10.0, 11.75, 150),
                           (11.75, 11.8, 20)]
    # A frame's ready time never falls after its arrival.
    on_link = FramesOnLink(10.0)
    on_link.frame({"ready_s": 0.0}, 10.2, 10)
    assert on_link.frame({"ready_s": 9.0}, 10.4, 20) == [(10.4, 10.4, 10)]


def test_a_frame_that_found_its_connection_idle_is_timed_after_its_first_burst():
    """A 1 MB/s link whose shaper passes 32 KiB at once after an idle moment.
    A 160 KB frame ready on an idle connection: its first 32 KiB arrive at
    once, the rest at 1 MB/s; timed whole it reads 1.26 MB/s. As two parts,
    its first bytes up to the burst's end (48 KiB, untimed) and the rest,
    the link reads 1 MB/s. The next frame, ready before the first had
    arrived, was queued behind it: one part, timed whole."""
    rate, bucket, size, burst = 1e6, 32 * 1024, 160_000, 48 * 1024

    def arrived(offset):  # when the body's first ``offset`` bytes were here
        return max(offset - bucket, 0) / rate

    assert size / arrived(size) == approx(1.26 * rate, rel=0.01)
    on_link = FramesOnLink(0.0)
    first = on_link.frame({"ready_s": 1.0}, arrived(size), size, (burst, arrived(burst)))
    assert first == [(0.0, arrived(burst), burst), (arrived(burst), arrived(size), size - burst)]
    done = arrived(size) + size / rate
    second = on_link.frame({"ready_s": 1.1}, done, 2 * size, (size + burst, done - 0.1))
    assert second == [(approx(0.1), done, size)]
    link, estimator = clock()
    link.observe(Transfer(2 * size, 0.0, 0.0, done, frames_on_link=tuple(on_link.parts)))
    assert estimator.bandwidth_bytes_per_s == approx(rate)


def test_the_reader_tells_where_each_frames_first_burst_ends():
    """Frames of about 100 KB read 16 KiB at a time: for each, the last
    chunk that arrived within its first BURST_BYTES, when it arrived; none
    for a frame of 40 KB, which fits in a burst whole."""
    frames = [wire.encode_frame("batch", {"index": str(i), "keys": ["a"], "timings": {}},
                                features=torch.zeros(1, size))
              for i, size in enumerate((25_000, 10_000, 25_000))]
    body, chunk = b"".join(frames), 16 * 1024
    pieces = [body[at:at + chunk] for at in range(0, len(body), chunk)]
    handed = []

    def read_some(n):
        handed.append(time.perf_counter())
        return pieces.pop(0) if pieces else b""

    stream = FeatureStream(headers={}, reader=ChunkReader(read_some))
    assert len(list(itertools.islice(stream, 3))) == 3
    ends = list(itertools.accumulate(len(frame) for frame in frames))
    for (_, end, burst), start, stop in zip(stream.arrivals, [0, *ends[:-1]], ends, strict=True):
        assert end == stop
        if stop - start <= BURST_BYTES:
            assert burst is None
            continue
        offset, at = burst
        assert offset % chunk == 0 and start < offset < start + BURST_BYTES <= offset + chunk
        assert handed[offset // chunk - 1] <= at <= handed[offset // chunk]


def test_a_frame_is_handed_over_before_the_next_frames_bytes_exist():
    """The reader asks for what has arrived, not for a full chunk: a frame
    whose bytes are all here is yielded even though the next frame is still
    computing (here: reading further would fail the test)."""
    first = wire.encode_frame("batch", {"index": "0", "keys": ["a"], "timings": {}},
                              labels=wire.torch.tensor([1]))
    parts = [first[:7], first[7:]]

    def read_some(n):
        if not parts:
            raise AssertionError("read past the first frame before it was handed over")
        return parts.pop(0)[:n]

    stream = FeatureStream(headers={}, reader=ChunkReader(read_some))
    assert next(iter(stream)).keys == ["a"]
    assert [offset for _, offset, _ in stream.arrivals] == [len(first)]


@pytest.fixture(scope="module")
def conn(swift_cluster):
    yield from small_shard_connection(swift_cluster, CONTAINER)


def test_a_feature_stream_tells_when_each_frame_was_ready_and_arrived(conn):
    """Five samples at storage batch 2, through the session's Swift proxy:
    three frames, each ready after the one before, each arrival after its
    ready time, and the parts' bytes add up to the body."""
    stream = fetch_features(conn, CONTAINER, "small.tar", feature_request("alexnet", batch=2))
    frames = list(stream)
    ready = [frame.timings["ready_s"] for frame in frames]
    assert len(frames) == 3 and ready == sorted(ready) and ready[0] > 0
    assert len(stream.arrivals) == 4 and stream.end is not None
    offsets = [offset for _, offset, _ in stream.arrivals]
    assert offsets == sorted(offsets) and offsets[-1] == stream.reader.bytes_read
    answered = stream.arrivals[0][0] - 1.0
    on_link = FramesOnLink(answered)
    for frame, arrived in zip(frames, stream.arrivals, strict=False):
        on_link.frame(frame.timings, *arrived)
    on_link.end(*stream.arrivals[-1])
    intervals = on_link.parts
    assert sum(nbytes for _, _, nbytes in intervals) == stream.reader.bytes_read
    assert [start for start, _, _ in intervals] == sorted(start for start, _, _ in intervals)
    assert all(answered <= start <= end for start, end, _ in intervals)


def test_a_raw_body_is_timed_after_its_first_burst(conn):
    """A raw GET through the session's Swift proxy: the link is timed from
    after the body's first burst to its last byte, on the bytes after it."""
    ref = data_ref(conn)
    images, transfer = leading_samples(conn, CONTAINER, ref, ref.bytes)
    (start, end, nbytes), = transfer.link_intervals()
    assert images and transfer.nbytes == ref.bytes
    assert transfer.answered_at <= start <= end == transfer.done_at
    assert 0 <= nbytes < transfer.nbytes


class ChunkedConnection:
    """A stand-in for swiftclient's connection whose GET body is ``chunks``."""

    def __init__(self, chunks):
        self.chunks = chunks

    def get_object(self, container, name, resp_chunk_size=None, headers=None):
        return {}, self.chunks


def test_a_raw_bodys_first_burst_is_not_timed():
    """After an idle moment a shaper's bucket passes a body's first bytes at
    line rate: of a body that arrives 16 KiB at a time, the link is timed
    on what came after the last chunk within its first BURST_BYTES, from
    when that chunk was read."""
    chunk, count, handed = 16 * 1024, 10, []

    def body():
        for _ in range(count):
            handed.append(time.perf_counter())
            yield bytes(chunk)

    ref = ShardRef("burst.tar", 1, chunk * count, 0, 1)
    _, transfer = leading_samples(ChunkedConnection(body()), CONTAINER, ref, ref.bytes)
    (start, end, nbytes), = transfer.link_intervals()
    burst = (BURST_BYTES - 1) // chunk  # chunks that end within the first BURST_BYTES
    assert nbytes == chunk * (count - burst) == transfer.nbytes - burst * chunk
    assert handed[burst - 1] <= start <= handed[burst]
    assert end == transfer.done_at


def data_ref(conn):
    size = int(conn.head_object(CONTAINER, "small.tar")["content-length"])
    return ShardRef("small.tar", 5, size, 0, 5)
