"""Logs and metrics: the filter's statsd metrics (through the proxy's logger)
and log lines for the events that matter to an operator, and the same
events in the standalone server's log.

The cluster's [filter:hapi] sends statsd to a UDP port this module listens
on. Its proxy admits one feature request at a time (so a held stream makes
the next one a 503) under a memory budget that fits the small requests but
not a batch of 32 (so that one is reduced). The standalone server runs with
the same options and answers the same requests.
"""

import http.client
import io
import json
import re
import socket
import threading
import time
import urllib.parse

import pytest
from helpers import ServerProcess, feature_request, png, raw_get, samples, tar_without_label

from hapi import protocol, wire
from hapi.middleware.engine import FeatureEngine
from hapi.middleware.memory import tensor_bytes
from hapi.shards import Sample, write_shard

CONTAINER = "hapi-observability"
MODEL = "mobilenet_v3_small"
GOOD = feature_request(MODEL, weights="seed:0", batch=2)
LARGE = feature_request(MODEL, weights="seed:0", batch=32)
# Held open, unread, to fill the one admission slot: raw 64 px images, 20 MB in all.
HELD = feature_request(MODEL, split=0, weights="seed:0", batch=2)
SHARDS = {
    "small.tar": write_shard(samples(3)),
    "medium.tar": write_shard(samples(32, size=16)),
    "long.tar": write_shard(samples(400, size=16)),
    "no-label.tar": tar_without_label(),
    # The third image's header is whole, its pixels are not: a 200, then an error frame.
    "late-failure.tar": write_shard([*samples(2), Sample("000002", png(2)[:60], "png", 2)]),
}


def memory_budget():
    """Bytes for the mobilenet model, plus a good request's cost at batch 4 (or
    the held request's at 2): a batch of 32 does not fit, 2 does."""
    engine = FeatureEngine(device="cpu")
    model = engine.load_model((MODEL, "seed:0"), MODEL, GOOD.weights)
    return tensor_bytes(model) + max(engine.memory_cost(model, GOOD).at(4),
                                     engine.memory_cost(model, HELD).at(2))


@pytest.fixture(scope="module")
def options():
    return {"threads": "1", "device": "cpu", "max_concurrent": "1",
            "memory_budget": str(memory_budget()), "queue_timeout": "0"}


@pytest.fixture(scope="module")
def statsd():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield Statsd(sock)
    sock.close()


class Statsd:
    """The datagrams sent to a UDP socket, as (name, value, type)."""

    LINE = re.compile(r"^([^:]+):([-0-9.]+)\|(c|ms|g)(?:\|@[0-9.]+)?$")

    def __init__(self, sock):
        self.sock = sock
        self.port = sock.getsockname()[1]

    def drain(self):
        self.sock.settimeout(0)
        try:
            while True:
                self.sock.recv(65536)
        except BlockingIOError:
            pass

    def collect(self, until, timeout=10.0):
        """Metrics received until every name in ``until`` has been seen."""
        seen, deadline = [], time.monotonic() + timeout
        while not set(until) <= {name for name, _, _ in seen}:
            left = deadline - time.monotonic()
            assert left > 0, f"missing {set(until) - {n for n, _, _ in seen}}; got {seen}"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536).decode()
            except TimeoutError:
                continue
            for line in data.splitlines():
                match = self.LINE.match(line)
                assert match, line
                seen.append((match[1], float(match[2]), match[3]))
        return seen


@pytest.fixture(scope="module")
def cluster(swift_cluster_factory, statsd, options):
    return swift_cluster_factory("observability", hapi_conf={
        **options, "log_statsd_host": "127.0.0.1", "log_statsd_port": str(statsd.port)})


@pytest.fixture(scope="module")
def conn(cluster):
    connection = cluster.connection()
    connection.put_container(CONTAINER)
    for name, data in SHARDS.items():
        connection.put_object(CONTAINER, name, data)
    connection.get_auth()
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def server(cluster, options, tmp_path_factory):
    with ServerProcess(cluster.proxy_url, tmp_path_factory.mktemp("observability-server"),
                       options) as process:
        yield process


def url(base, conn, name):
    return f"{base}{urllib.parse.urlsplit(conn.url).path}/{CONTAINER}/{name}"


def hapi_get(base, conn, name, req=GOOD, **overrides):
    return raw_get(url(base, conn, name), {**protocol.request_headers(req),
                                           "X-Auth-Token": conn.token, **overrides})


def held_stream(base, conn):
    """A feature request whose 200 has been read, and not a byte of its body."""
    parts = urllib.parse.urlsplit(url(base, conn, "long.tar"))
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("GET", parts.path, headers={**protocol.request_headers(HELD),
                                                   "X-Auth-Token": conn.token})
    resp = connection.getresponse()
    assert resp.status == 200
    return connection


def until_served(base, conn, timeout=30):
    deadline = time.monotonic() + timeout
    while (status := hapi_get(base, conn, "small.tar")[0]) == 503:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status == 200


def exercise(base, conn):
    """The same requests at the proxy or the server: (name, status, body) of each."""
    results = []

    def record(name, answer):
        results.append((name, *answer))
        return answer

    record("good", hapi_get(base, conn, "small.tar"))
    record("bad parameter", hapi_get(base, conn, "small.tar", **{protocol.SPLIT: "x"}))
    record("bad shard", hapi_get(base, conn, "no-label.tar"))
    record("missing", hapi_get(base, conn, "nothing.tar"))
    record("reduced", hapi_get(base, conn, "medium.tar", LARGE))
    record("late failure", hapi_get(base, conn, "late-failure.tar"))
    held = held_stream(base, conn)
    try:
        record("at capacity", hapi_get(base, conn, "small.tar"))
    finally:
        held.close()
    until_served(base, conn)
    return results


# The filter: metrics and log lines -------------------------------------------------


def test_filter_emits_statsd_metrics(cluster, conn, statsd):
    statsd.drain()
    status, body = hapi_get(cluster.proxy_url, conn, "small.tar")
    assert status == 200
    good = statsd.collect({"hapi.requests", "hapi.bytes_in", "hapi.bytes_out",
                           "hapi.extraction_time"})
    values = {name: (value, kind) for name, value, kind in good}
    assert values["hapi.requests"] == (1, "c")
    assert values["hapi.bytes_in"] == (len(SHARDS["small.tar"]), "c")
    assert values["hapi.bytes_out"] == (len(body), "c")
    assert values["hapi.extraction_time"][1] == "ms" and values["hapi.extraction_time"][0] > 0
    assert not any(name.startswith("hapi.refused") for name in values)

    refusals = {"bad parameter": ({protocol.SPLIT: "x"}, "small.tar", 400),
                "bad shard": ({}, "no-label.tar", 422),
                "missing": ({}, "nothing.tar", 404)}
    for overrides, name, expected in refusals.values():
        statsd.drain()
        assert hapi_get(cluster.proxy_url, conn, name, **overrides)[0] == expected
        names = [n for n, _, _ in statsd.collect({"hapi.requests", f"hapi.refused.{expected}"})]
        assert "hapi.bytes_out" not in names

    statsd.drain()
    status, body = hapi_get(cluster.proxy_url, conn, "medium.tar", LARGE)
    assert status == 200
    assert reduced_samples(body) == 32
    statsd.collect({"hapi.requests", "hapi.batch_reduced", "hapi.bytes_out"})

    statsd.drain()
    assert hapi_get(cluster.proxy_url, conn, "late-failure.tar")[0] == 200
    statsd.collect({"hapi.stream_errors", "hapi.bytes_out"})

    held = held_stream(cluster.proxy_url, conn)
    try:
        statsd.drain()
        status, body = hapi_get(cluster.proxy_url, conn, "small.tar")
        assert status == 503 and json.loads(body)["max_concurrent"] == 1
        statsd.collect({"hapi.requests", "hapi.rejected", "hapi.refused.503"})
    finally:
        held.close()
    until_served(cluster.proxy_url, conn)


def reduced_samples(body):
    frames = list(wire.read_frames(io.BytesIO(body).read))
    assert max(len(f.keys) for f in frames[:-1]) < 32  # the storage batch was reduced
    return sum(len(f.keys) for f in frames[:-1])


REFUSAL = re.compile(r"(/\S+ refused \d+: .*?)(?: \(txn: \S+\))?$", re.M)
SUMMARY = re.compile(r"(/\S+) model=(\S+) split=(\d+) batch=(\d+) \(asked (\d+)\) "
                     r"samples=(\d+) bytes_in=(\d+) bytes_out=(\d+) seconds=([0-9.]+) "
                     r"outcome=(.+?)(?: \(txn: \S+\))?$", re.M)


def test_filter_and_server_log_the_same_events(cluster, conn, server):
    """One log line per feature request as it ends, and one per refusal: the
    proxy's (through its logger, route hapi) and the server's, word for word."""
    proxy_log = cluster.log_path("proxy")
    start = proxy_log.stat().st_size
    for base in (cluster.proxy_url, server.url):
        results = exercise(base, conn)
        assert [status for _, status, _ in results] == [200, 400, 422, 404, 200, 200, 503]
    with open(proxy_log, errors="replace") as log:
        log.seek(start)
        proxy_text = log.read()
    server_text = server.log_text()

    assert "proxy-server: HAPI: " in proxy_text
    for text in (proxy_text, server_text):
        summaries = {m[1].rsplit("/", 1)[1]: m for m in SUMMARY.finditer(text)}
        small = summaries["small.tar"]
        assert (small[2], small[4], small[5], small[6]) == (MODEL, "2", "2", "3")
        assert int(small[7]) == len(SHARDS["small.tar"]) and int(small[8]) > 0
        assert small[10] == "complete"
        reduced = summaries["medium.tar"]
        assert int(reduced[4]) < 32 and reduced[5] == "32" and reduced[10] == "complete"
        assert summaries["late-failure.tar"][10] == "bad member"
        assert summaries["long.tar"][10] == "client disconnected"
    proxy_refusals = REFUSAL.findall(proxy_text)
    server_refusals = REFUSAL.findall(server_text)
    for status in (400, 422, 404, 503):
        assert any(f" refused {status}: " in line for line in proxy_refusals), status
    assert set(server_refusals) == set(proxy_refusals)
    for text in (proxy_text, server_text):
        assert f"{CONTAINER}/medium.tar batch reduced from 32 to" in text


# The FIFO memory queue, end to end -------------------------------------------------


@pytest.fixture(scope="module")
def queue_cluster(swift_cluster_factory, statsd):
    """A proxy whose memory fits one held request at a time (no smaller batch
    allowed), where others wait up to 60 s in the FIFO queue."""
    engine = FeatureEngine(device="cpu")
    model = engine.load_model((MODEL, "seed:0"), MODEL, HELD.weights)
    memory = tensor_bytes(model) + engine.memory_cost(model, HELD).at(2) * 3 // 2
    cluster = swift_cluster_factory("queue", hapi_conf={
        "threads": "1", "device": "cpu", "max_concurrent": "4", "memory_budget": str(memory),
        "min_batch": "2", "queue_timeout": "60",
        "log_statsd_host": "127.0.0.1", "log_statsd_port": str(statsd.port)})
    connection = cluster.connection()
    connection.put_container(CONTAINER)
    for name in ("long.tar", "first.tar", "second.tar"):
        connection.put_object(CONTAINER, name, SHARDS["long.tar"] if name == "long.tar"
                              else write_shard(samples(4, size=16)))
    connection.get_auth()
    yield cluster, connection
    connection.close()


def test_requests_wait_in_a_fifo_queue_for_memory(queue_cluster, statsd):
    """While a stream holds the memory, two more requests queue (hapi.queued,
    a log line each) instead of being refused; once it ends they are served
    in the order they came."""
    cluster, conn = queue_cluster
    proxy_log = cluster.log_path("proxy")
    start = proxy_log.stat().st_size
    statsd.drain()
    held = held_stream(cluster.proxy_url, conn)
    answers = {}

    def fetch(name):
        answers[name] = hapi_get(cluster.proxy_url, conn, name, HELD)

    waiting = []
    try:
        for name in ("first.tar", "second.tar"):
            waiting.append(threading.Thread(target=fetch, args=(name,)))
            waiting[-1].start()
            queued = [n for n, _, _ in statsd.collect({"hapi.queued"}, timeout=30)]
            assert queued.count("hapi.queued") == 1
        time.sleep(0.5)
        assert not answers, "a request was served while the memory was held"
    finally:
        held.close()
    for thread in waiting:
        thread.join(90)
    assert answers["first.tar"][0] == answers["second.tar"][0] == 200
    with open(proxy_log, errors="replace") as log:
        log.seek(start)
        text = log.read()
    assert text.count("queued for memory") == 2
    served = [m[1].rsplit("/", 1)[1] for m in SUMMARY.finditer(text)
              if m[10] == "complete"]
    assert served.index("first.tar") < served.index("second.tar")
