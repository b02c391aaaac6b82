"""The storage tier's frame timings are each request's share of the device."""

import os
import threading
import time
from contextlib import ExitStack

import pytest
import torch
from helpers import feature_request, samples

from hapi import wire
from hapi.middleware.engine import FeatureEngine
from hapi.middleware.shareclock import ShareClock


class FakeWall:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_overlapping_computations_split_the_device():
    """A computes over [0, 4], B over [2, 6], on one device: A alone for 2 s,
    both for 2 s (1 s each), B alone for 2 s."""
    wall = FakeWall()
    clock = ShareClock(wall=wall)
    a, b = ExitStack(), ExitStack()
    a.enter_context(clock.computing())
    a_start = clock.now()
    wall.now = 2.0
    b.enter_context(clock.computing())
    b_start = clock.now()
    wall.now = 4.0
    a_share = clock.now() - a_start
    a.close()
    wall.now = 6.0
    b_share = clock.now() - b_start
    b.close()
    assert a_share == pytest.approx(3.0) and b_share == pytest.approx(3.0)
    assert a_share + b_share == pytest.approx(6.0)  # the device was busy for 6 s


def test_alone_or_within_capacity_it_reads_like_the_wall_clock():
    wall = FakeWall()
    clock = ShareClock(capacity=2, wall=wall)
    with clock.computing(), clock.computing():
        start = clock.now()
        wall.now = 5.0
        assert clock.now() - start == pytest.approx(5.0)  # two computations, two slots
        with clock.computing():
            wall.now = 8.0
            assert clock.now() - start == pytest.approx(5.0 + 3.0 * 2 / 3)
    with pytest.raises(ValueError, match="capacity"):
        ShareClock(capacity=0)


def test_concurrent_extractions_report_at_most_the_busy_time():
    """Two requests' batches computed at once on one device: their frames'
    timings add up to no more than the wall time both took (wall clocks would
    count the shared time twice)."""
    engine = FeatureEngine(device="cpu", threads=len(os.sched_getaffinity(0)))
    assert engine.clock.capacity == 1
    req = feature_request("resnet18", split=8, batch=8, preset="imagenet-224")
    model = engine.load_model((req.model, str(req.weights)), req.model, req.weights)
    batch = samples(8, size=224)
    engine.extract(model, batch, req, 0)  # warm-up
    start, frames, walls = threading.Barrier(2), [], []

    def run():
        start.wait()
        began = time.perf_counter()
        blob = engine.extract(model, batch, req, 0)
        walls.append(time.perf_counter() - began)
        frames.append(wire.decode_frame(blob[wire.LENGTH.size:]))

    began = time.perf_counter()
    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    reported = sum(f.timings["decode_s"] + sum(f.timings["layers_s"]) + f.timings["to_wire_s"]
                   for f in frames)
    assert sum(walls) > 1.3 * elapsed, (walls, elapsed)  # they did overlap
    assert reported <= elapsed
    assert torch.equal(frames[0].features, frames[1].features)
