"""The data path's scheduling: the storage tier computes frames first come,
first served on its device, and the trainer keeps its requests going ahead
of it within bounds of samples and bytes.

Narrow logic, so stubs stand in for the network here; the end-to-end runs
are in test_train.py and the benchmarks."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import feature_request, samples

from hapi.client import data
from hapi.middleware.device import DeviceSlots, frame_priority
from hapi.middleware.engine import FeatureEngine

# The storage tier --------------------------------------------------------------------


def test_device_slots_are_handed_out_in_arrival_order():
    slots = DeviceSlots(1)
    order, started = [], []
    holder = slots.slot()
    holder.__enter__()

    def wait(name):
        started.append(name)
        with slots.slot():
            order.append(name)

    threads = []
    for name in "abcd":
        threads.append(threading.Thread(target=wait, args=(name,)))
        threads[-1].start()
        while slots.waiting < len(threads):  # each is in line before the next comes
            time.sleep(0.001)
    holder.__exit__(None, None, None)
    for thread in threads:
        thread.join(10)
    assert order == list("abcd")


def test_a_second_requests_first_frame_is_not_held_behind_the_first_request():
    """One device slot, request A streaming 8 frames, request B one frame
    asked for while A computes: B's frame is done after at most two of A's,
    not after all eight (a request's first frame goes before later frames)."""
    engine = FeatureEngine(device="cpu", threads=1)
    engine.slots = DeviceSlots(1)
    req = feature_request("resnet18", split=6, batch=2, preset="imagenet-112")
    model = engine.load_model(("resnet18", "seed:0"), "resnet18", req.weights)
    shard = samples(16, size=112)
    done, lock = [], threading.Lock()

    def stream(name, number, batches):
        for index, batch in enumerate(batches):
            engine.extract(model, batch, req, index, number)
            with lock:
                done.append((name, index))

    a = threading.Thread(target=stream,
                         args=("a", 0, [shard[i:i + 2] for i in range(0, 16, 2)]))
    a.start()
    while not done:
        time.sleep(0.001)
    b = threading.Thread(target=stream, args=("b", 1, [shard[:2]]))
    b.start()
    a.join(120)
    b.join(120)
    position = done.index(("b", 0))
    a_before = sum(1 for name, _ in done[:position] if name == "a")
    assert a_before <= 3, done
    assert len(done) == 9


def hold_in_line(slots, asks):
    """With ``slots``' only slot held, line up ``asks`` ((name, priority,
    owner), one after the other), then let the slot go; the names in the
    order they got it."""
    order = []
    holder = slots.slot()
    holder.__enter__()

    def wait(name, priority, owner):
        with slots.slot(priority, owner):
            order.append(name)

    threads = []
    for ask in asks:
        threads.append(threading.Thread(target=wait, args=ask))
        threads[-1].start()
        while slots.waiting < len(threads):
            time.sleep(0.001)
    holder.__exit__(None, None, None)
    for thread in threads:
        thread.join(10)
    return order


def test_first_frames_go_first_then_the_oldest_requests_frames():
    order = hold_in_line(DeviceSlots(1), [
        ("request 5, frame 1", frame_priority(5, 1), 5),
        ("request 3, frame 2", frame_priority(3, 2), 3),
        ("request 7, frame 0", frame_priority(7, 0), 7),
        ("request 3, frame 1", frame_priority(3, 1), 3),
        ("request 8, frame 0", frame_priority(8, 0), 8),
    ])
    assert order == ["request 7, frame 0", "request 8, frame 0", "request 3, frame 1",
                     "request 3, frame 2", "request 5, frame 1"]


def test_a_request_computes_one_frame_at_a_time():
    """Two slots, request 1 holding one: its next frame waits in line for it
    although a slot is free, and a later request's frame takes the free one."""
    slots = DeviceSlots(2)
    got = []

    def next_frame():
        with slots.slot(frame_priority(1, 2), owner=1):
            got.append("request 1, frame 2")

    queued = threading.Thread(target=next_frame)
    with slots.slot(frame_priority(1, 1), owner=1):
        queued.start()
        while slots.waiting < 1:
            time.sleep(0.001)
        with slots.slot(frame_priority(2, 1), owner=2):
            got.append("request 2, frame 1")
        time.sleep(0.05)
        assert got == ["request 2, frame 1"]
    queued.join(10)
    assert got == ["request 2, frame 1", "request 1, frame 2"]


def test_the_older_request_finishes_before_a_newer_ones_later_frames():
    """Two requests of 8 frames on one slot, streamed as the pipeline does
    (each frame's successor in line while it computes), the second starting
    once the first has computed a frame: the second's first frame goes in
    promptly, and then the first request finishes before the second's later
    frames, so the requests in flight finish one after the other, not
    together."""
    engine = FeatureEngine(device="cpu", threads=1)
    engine.slots = DeviceSlots(1)
    req = feature_request("resnet18", split=6, batch=2, preset="imagenet-112")
    model = engine.load_model(("resnet18", "seed:0"), "resnet18", req.weights)
    batches = [samples(16, size=112)[i:i + 2] for i in range(0, 16, 2)]
    done, lock = [], threading.Lock()

    def frame(name, number, index):
        engine.extract(model, batches[index], req, index, number)
        with lock:
            done.append((name, index))

    def stream(name, number):
        with ThreadPoolExecutor(2) as pool:
            frame(name, number, 0)
            pending = [pool.submit(frame, name, number, 1)]
            for index in range(1, len(batches)):
                if index + 1 < len(batches):
                    pending.append(pool.submit(frame, name, number, index + 1))
                pending.pop(0).result()

    a = threading.Thread(target=stream, args=("a", 0))
    a.start()
    while len(done) < 1:
        time.sleep(0.001)
    b = threading.Thread(target=stream, args=("b", 1))
    b.start()
    a.join(120)
    b.join(120)
    assert len(done) == 16
    assert done.index(("b", 0)) <= 4, done
    assert max(done.index(("a", i)) for i in range(8)) < done.index(("b", 1)), done


# The trainer's lookahead -------------------------------------------------------------


class StubSource:
    """Shards of ``samples`` samples, each ``nbytes`` of tensors, loaded in
    ``load_s`` seconds; records when each load started and ended."""

    container = "stub"

    def __init__(self, samples, nbytes, load_s):
        self.samples, self.nbytes, self.load_s = samples, nbytes, load_s
        self.events, self.lock = [], threading.Lock()

    def open_channel(self, conn):
        return data.Channel(conn, conn)

    def describe(self, ref, split):
        return ref.name

    def load(self, channel, ref, split, wire_format=None, on_link=None):
        with self.lock:
            self.events.append(("start", ref.name, time.monotonic()))
        sent_at = time.perf_counter()
        time.sleep(self.load_s)
        done_at = time.perf_counter()
        if on_link is not None:
            on_link(sent_at, done_at, self.nbytes)
        with self.lock:
            self.events.append(("end", ref.name, time.monotonic()))
        return data.ShardData(ref=ref, split=split,
                              inputs=torch.zeros(self.nbytes, dtype=torch.uint8),
                              labels=torch.zeros(ref.samples, dtype=torch.int64),
                              keys=[str(i) for i in range(ref.samples)],
                              transfer=data.Transfer(self.nbytes, sent_at, sent_at, done_at),
                              load_s=self.load_s)


class StubConnection:
    retries = 5

    def close(self):
        pass


class NoRetry:
    def call(self, what, func, reset):
        return func()


def loader(source, depth, lookahead, max_bytes, selector=None):
    return data.ShardLoader(source, StubConnection, depth, selector or data.FixedSplit(3),
                            NoRetry(), lookahead_samples=lookahead, max_buffered_bytes=max_bytes)


class RecordingSplit(data.FixedSplit):
    """A fixed split that keeps what the loader told it, in order."""

    def __init__(self):
        super().__init__(3)
        self.events, self.lock = [], threading.Lock()

    def opened(self):
        request = object()
        with self.lock:
            self.events.append(("opened", request, None))
        return request

    def on_link(self, request, start, end, nbytes):
        with self.lock:
            self.events.append(("part", request, nbytes))

    def closed(self, request, shard):
        with self.lock:
            self.events.append(("closed", request, shard))

    def observe(self, shard):
        with self.lock:
            self.events.append(("observed", None, shard))


def test_a_request_goes_out_when_one_completes_not_when_one_is_consumed():
    source = StubSource(samples=4, nbytes=100, load_s=0.05)
    with loader(source, depth=2, lookahead=1000, max_bytes=1 << 20) as shards:
        stream = shards(refs(6, 4))
        first = next(stream)
        time.sleep(0.6)  # the consumer holds the first shard; the loader goes on
        started = [name for kind, name, _ in source.events if kind == "start"]
        assert started == [f"s{i:02d}" for i in range(6)]
        rest = [first, *stream]
    assert [s.ref.name for s in rest] == [f"s{i:02d}" for i in range(6)]


def refs(n, samples):
    return [data.ShardRef(f"s{i:02d}", samples, 1000, 0, samples) for i in range(n)]


@pytest.mark.parametrize("depth", [0, 3])
def test_the_selector_hears_each_request_its_parts_then_its_end(depth):
    """Every request is opened, then the parts of its body are heard as they
    arrive, then it is closed with its shard, all before the consumer takes
    that shard: the link's clock learns from the bytes, not from the consumer."""
    source = StubSource(samples=4, nbytes=100, load_s=0.02)
    selector = RecordingSplit()
    with loader(source, depth=depth, lookahead=1000, max_bytes=1 << 20,
                selector=selector) as shards:
        names = [shard.ref.name for shard in shards(refs(10, 4))]
    assert names == [f"s{i:02d}" for i in range(10)]
    events = selector.events
    for index, (kind, _, shard) in enumerate(events):
        if kind != "observed":
            continue
        closed = [i for i, (k, _, s) in enumerate(events) if k == "closed" and s is shard]
        assert len(closed) == 1 and closed[0] < index
        request = events[closed[0]][1]
        heard = [k for k, r, _ in events if r is request]
        assert heard == ["opened", "part", "closed"]


def test_lookahead_is_counted_in_samples():
    source = StubSource(samples=4, nbytes=100, load_s=0.01)
    with loader(source, depth=8, lookahead=10, max_bytes=1 << 20) as shards:
        stream = shards(refs(8, 4))
        next(stream)
        time.sleep(0.3)
        started = sum(1 for kind, _, _ in source.events if kind == "start")
        # the one consumed, then shards while fewer than 10 samples are ahead: 4, 8, 12
        assert started == 4
        assert len(list(stream)) == 7


@pytest.mark.parametrize("depth", [1, 3])
def test_buffered_bytes_stay_bounded_under_a_slow_consumer(depth):
    source = StubSource(samples=4, nbytes=1000, load_s=0.005)
    max_bytes = 3000
    with loader(source, depth=depth, lookahead=10_000, max_bytes=max_bytes) as shards:
        names = []
        for shard in shards(refs(20, 4)):
            time.sleep(0.03)
            names.append(shard.ref.name)
        peak = shards.peak_buffered_bytes
    assert names == [f"s{i:02d}" for i in range(20)]
    assert max_bytes <= peak <= max_bytes + depth * 1000


def test_the_storage_batch_streams_every_shard_as_several_frames():
    for shard_samples in (1, 3, 16, 64, 256, 10_000):
        batch = data.streaming_batch(shard_samples)
        assert 1 <= batch <= data.MAX_STREAMING_BATCH
        frames = -(-shard_samples // batch)
        assert frames >= min(shard_samples, data.FRAMES_PER_SHARD)
