"""Memory admission (docs/DESIGN.md, "bounded memory"): the budget's bookkeeping on its
own, the engine's memory costs, then concurrent requests over budget through
a real Swift proxy and through the standalone server."""

import json
import threading
import time

import pytest
import torch
from helpers import ServerProcess, feature_request, raw_get, samples
from swiftclient import ClientException

from hapi.client.features import fetch_features, intermediate_connection
from hapi.middleware import engine as engine_module
from hapi.middleware.admission import MemoryBudget, MemoryCost, OverBudget
from hapi.middleware.engine import FeatureEngine
from hapi.middleware.memory import trace_splits
from hapi.middleware.responses import RequestError
from hapi.middleware.settings import Settings, parse_memory_budget
from hapi.shards import write_shard

# The budget's bookkeeping ---------------------------------------------------------

COST = MemoryCost(fixed=10, per_sample=10)  # 10 + 10 b bytes at batch b


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def budget(capacity=200, min_batch=1, clock=None):
    return MemoryBudget(lambda: capacity, min_batch=min_batch, queue_timeout=1.0,
                        clock=clock or Clock())


def test_a_request_that_fits_gets_its_batch():
    b = budget()
    ticket = b.admit(COST, 8)
    assert ticket.granted and ticket.batch == 8 and not ticket.reduced
    assert b.reserved == COST.at(8) == 90


def test_over_budget_shrinks_to_the_largest_batch_that_fits():
    b = budget(capacity=150)
    b.admit(COST, 8)                    # 90 of 150
    ticket = b.admit(COST, 8)           # 60 left: 10 + 10 * 5
    assert ticket.granted and ticket.reduced and ticket.batch == 5
    assert b.reserved == 150


def test_never_below_min_batch_then_queued():
    b = budget(capacity=150, min_batch=6)
    b.admit(COST, 8)
    ticket = b.admit(COST, 8)           # 5 would fit, 6 does not
    assert not ticket.granted and b.queued == 1
    small = b.admit(COST, 4)            # asks below min_batch: its own batch is its floor
    assert not small.granted, "FIFO: a newcomer waits behind the queue even if it fits"


def test_the_queue_is_first_in_first_out():
    b = budget(capacity=100)
    woken = []
    first = b.admit(COST, 9)            # all 100
    big = b.admit(COST, 9, wake=lambda: woken.append("big"))
    small = b.admit(COST, 1, wake=lambda: woken.append("small"))
    assert not big.granted and not small.granted
    b.release(first)
    assert woken == ["big"] and big.batch == 9 and not small.granted
    b.release(big)
    assert woken == ["big", "small"] and small.batch == 1 and b.reserved == 20


def test_a_queued_request_leaving_lets_the_next_one_in():
    b = budget(capacity=100)
    b.admit(COST, 5)                    # 60
    big = b.admit(COST, 8)              # 40 left: would be 3, but...
    assert big.granted and big.batch == 3
    waiting = b.admit(COST, 8)
    behind = b.admit(COST, 1)
    b.release(waiting)                  # gave up: out of the queue
    assert not behind.granted and b.queued == 1
    b.release(big)
    assert behind.granted and b.queued == 0


def test_a_wait_that_runs_out_is_a_503_with_retry_after():
    clock = Clock()
    b = budget(capacity=100, clock=clock)
    held = b.admit(COST, 9)
    clock.now = 4.0
    b.release(held)                     # held for 4 s: the mean hold time
    held = b.admit(COST, 9)
    ticket = b.admit(COST, 9)
    clock.now += 1.0
    with pytest.raises(OverBudget) as err:
        b.settle(ticket)
    assert b.queued == 0 and b.reserved == 100
    # One request ahead (itself) and one holder: one mean hold time.
    assert err.value.retry_after == 4
    answer = RequestError.from_exception(err.value)
    assert answer.status == 503 and answer.headers == {"Retry-After": "4"}
    body = json.loads(answer.body)
    assert "out of memory" in body["error"] and body["waited_s"] == 1.0
    assert body["needed_bytes"] == COST.at(1)


def test_a_request_too_large_for_an_idle_budget_is_refused_at_once():
    b = budget(capacity=100, min_batch=4)
    with pytest.raises(OverBudget) as err:
        b.admit(MemoryCost(fixed=90, per_sample=5), 8)
    assert err.value.retry_after >= 1 and b.queued == 0
    assert err.value.fields == {"needed_bytes": 110, "budget_bytes": 100}


def test_release_gives_back_once():
    b = budget()
    ticket = b.admit(COST, 8)
    b.release(ticket)
    b.release(ticket)
    assert b.reserved == 0 and b.holders == 0


def test_cost_lines_and_largest_batches():
    assert MemoryCost.fit({4: 450, 1: 150}) == MemoryCost(fixed=50, per_sample=100)
    assert MemoryCost.fit({1: 150, 4: 120}) == MemoryCost(fixed=150, per_sample=0)
    assert COST.largest_batch(95, limit=32) == 8
    assert COST.largest_batch(5, limit=32) == 0
    assert MemoryCost(10, 0).largest_batch(10, limit=7) == 7


# Options and the engine's costs ----------------------------------------------------


def test_memory_options():
    assert parse_memory_budget("auto") is None
    assert parse_memory_budget("512M") == 512 << 20
    assert parse_memory_budget("1.5GiB") == 3 << 29 and parse_memory_budget("4096") == 4096
    settings = Settings.from_conf({"memory_budget": "2g", "queue_timeout": "2.5",
                                   "min_batch": "4"})
    assert (settings.memory_budget, settings.queue_timeout, settings.min_batch) == (
        2 << 30, 2.5, 4)
    defaults = Settings.from_conf({})
    assert (defaults.memory_budget, defaults.queue_timeout, defaults.min_batch) == (None, 10, 1)
    for conf, name in (({"memory_budget": "lots"}, "memory_budget"),
                       ({"memory_budget": "0"}, "memory_budget"),
                       ({"queue_timeout": "-1"}, "queue_timeout"),
                       ({"min_batch": "300"}, "min_batch")):
        with pytest.raises(ValueError, match=name):
            Settings.from_conf(conf)


def test_a_forward_trace_counts_every_live_tensor():
    full = trace_splits("alexnet", 64, "float32", batches=(2,))
    trace = full[1][2]  # the first conv
    conv_out = 2 * 64 * 15 * 15 * 4
    assert trace.input == 2 * 3 * 64 * 64 * 4 and trace.output == trace.wire == conv_out
    assert trace.peak == trace.input + conv_out
    half = trace_splits("alexnet", 64, "float16", batches=(2,))[1][2]
    # The cast happens once the input is freed: the conv's output and its copy.
    assert half.wire == conv_out // 2 and half.peak == max(trace.peak, conv_out + half.wire)
    deeper = full[3][2]  # conv, ReLU_, pool
    assert deeper.peak == trace.peak and deeper.output < conv_out


def test_one_pass_traces_each_split_without_the_casts_before_it():
    floats = trace_splits("alexnet", 64, "float32", batches=(2,))
    quantized = trace_splits("alexnet", 64, "uint8", batches=(2,))
    assert len(floats) == len(quantized) == 23  # splits 0..22
    # uint8 at the first conv holds a float32 temporary besides the features...
    assert quantized[1][2].peak > floats[1][2].peak
    # ...which is gone by the pool's small features: the layers' peak counts there.
    assert quantized[3][2].peak == floats[3][2].peak


def test_requests_arriving_together_trace_a_model_once(monkeypatch):
    calls = []

    def counting_trace(*args):
        calls.append(args)
        time.sleep(0.05)
        return trace_splits(*args)

    monkeypatch.setattr(engine_module, "trace_splits", counting_trace)
    engine = FeatureEngine(device="cpu", memory_budget=1 << 30)
    model = engine.load_model(("alexnet", "seed:0"), "alexnet", feature_request("alexnet").weights)
    requests = [feature_request("alexnet", split=split, preset="imagenet-112")
                for split in (3, 3, 6, 6)]
    threads = [threading.Thread(target=engine.memory_cost, args=(model, req)) for req in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [("alexnet", 112, "float32")]
    # Each split still has its own cost, from its own trace.
    assert engine.memory_cost(model, requests[0]) != engine.memory_cost(model, requests[2])


def test_cpu_cost_is_linear_in_the_batch_and_the_models_leave_the_budget():
    engine = FeatureEngine(device="cpu", memory_budget=1 << 30)
    req = feature_request("resnet18", batch=16, preset="imagenet-112")
    model = engine.load_model(("resnet18", "seed:0"), "resnet18", req.weights)
    cost = engine.memory_cost(model, req)
    assert cost.per_sample > 0 and cost is engine.memory_cost(model, req)
    assert trace_splits("resnet18", 112, "float32", (16,))[req.split][16].peak <= cost.at(16)
    params = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    assert engine.resident_bytes == params
    assert engine.memory_capacity() == (1 << 30) - params


# Concurrent requests over budget, end to end ---------------------------------------

CONTAINER = "hapi-admission-tests"
REQUEST = feature_request("resnet18", batch=16, preset="imagenet-112")
SHARD_SAMPLES = 32
CONCURRENT = 6
RETRY_DEADLINE_S = 60


def budget_conf():
    """Options whose memory budget holds the model and 1.5 requests at the full
    batch, from the engine's own cost of the request."""
    engine = FeatureEngine(device="cpu")
    model = engine.load_model(("resnet18", "seed:0"), "resnet18", REQUEST.weights)
    cost = engine.memory_cost(model, REQUEST)
    memory = engine.resident_bytes + cost.at(REQUEST.batch) * 3 // 2
    return {"threads": "1", "memory_budget": str(memory), "max_concurrent": "16",
            "queue_timeout": "1"}


@pytest.fixture(scope="module")
def hapi_conf():
    return budget_conf()


@pytest.fixture(scope="module")
def cluster(swift_cluster_factory, hapi_conf):
    cluster = swift_cluster_factory("admission", hapi_conf=hapi_conf)
    conn = cluster.connection()
    conn.put_container(CONTAINER)
    conn.put_object(CONTAINER, "shard.tar", write_shard(samples(SHARD_SAMPLES)))
    conn.close()
    return cluster


def features_with_retries(connection):
    """Fetch the shard, retrying 503s after their Retry-After: the features,
    the batch used and the number of 503s."""
    refused = 0
    deadline = time.monotonic() + RETRY_DEADLINE_S
    while True:
        try:
            stream = fetch_features(connection, CONTAINER, "shard.tar", REQUEST)
            frames = list(stream)
        except ClientException as err:
            assert err.http_status == 503 and time.monotonic() < deadline, err
            refused += 1
            retry_after = int(err.http_response_headers["Retry-After"])
            assert retry_after >= 1 and "error" in json.loads(err.http_response_content)
            time.sleep(retry_after)
            continue
        assert len(frames[0].labels) == stream.batch_used
        assert all(len(f.labels) <= stream.batch_used for f in frames)
        return torch.cat([f.features for f in frames]), stream.batch_used, refused


def concurrently(make_connection):
    """CONCURRENT fetches from threads, each on its own connection."""
    results = [None] * CONCURRENT

    def fetch(i):
        connection = make_connection()
        try:
            results[i] = features_with_retries(connection)
        finally:
            connection.close()

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(CONCURRENT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def check_adapted(results, expected):
    """All complete with the unadapted features; memory made some adapt or retry."""
    assert all(r is not None for r in results), "a request did not complete"
    for features, _, _ in results:
        assert features.shape == expected.shape
        assert relative_error(features, expected) <= 1e-6
    batches = [batch for _, batch, _ in results]
    refused = sum(r for _, _, r in results)
    assert any(b < REQUEST.batch for b in batches) or refused > 0, (batches, refused)


def alone(connection):
    """The unadapted features: one request at a time fits the budget."""
    features, batch, refused = features_with_retries(connection)
    assert batch == REQUEST.batch and refused == 0
    return features


def test_concurrent_requests_over_budget_through_the_proxy(cluster):
    def connect():
        return cluster.connection(retries=0)  # swiftclient would retry 503s itself

    conn = connect()
    try:
        expected = alone(conn)
    finally:
        conn.close()
    check_adapted(concurrently(connect), expected)
    status, body = raw_get(f"{cluster.proxy_url}/healthcheck", {})
    assert (status, body) == (200, b"OK")


def test_concurrent_requests_over_budget_through_the_server(cluster, hapi_conf, tmp_path):
    with ServerProcess(cluster.proxy_url, tmp_path, hapi_conf) as server:
        def connect():
            conn = cluster.connection(retries=0)
            try:
                return intermediate_connection(conn, server.url)
            finally:
                conn.close()

        via_server = connect()
        try:
            expected = alone(via_server)
        finally:
            via_server.close()
        check_adapted(concurrently(connect), expected)
        status, _ = raw_get(f"{server.url}/healthcheck", {})
        assert status == 200
        log = server.log_text()
    assert "batch reduced" in log or "refused for memory" in log
