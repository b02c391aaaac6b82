"""Overload: 20 trainers at once against one proxy with a small
memory budget and few request slots.

Every trainer is a client/main.py run in a thread of this process (a tiny
job: MobileNetV3-Small at 32 px, 3 shards of 16 digits, split at its freeze
index). The proxy admits at most ``MAX_CONCURRENT`` feature requests and has
memory for about 1.5 of them at the asked batch: the others get a smaller
batch, wait in its queue, or are refused with 503 and Retry-After and come
back. Meanwhile a client reads a small object through the same proxy, plain
Swift traffic, and times each GET: the p50 and p99 are printed.
"""

import itertools
import statistics
import threading
import time
import urllib.request

import pytest
from helpers import feature_request

from hapi import zoo
from hapi.client import main as cli
from hapi.client_setup import datasets
from hapi.client_setup.load import upload_dataset
from hapi.middleware.engine import FeatureEngine

CONTAINER = "hapi-overload-digits"
MODEL, PRESET, WEIGHTS = "mobilenet_v3_small", "resize-32", "seed:0"
FREEZE = zoo.MODELS[MODEL].default_freeze
SAMPLES, SHARD_SIZE, BATCH = 48, 16, 16
TRAINERS = 20
MAX_CONCURRENT = 4
RETRIES = 20  # a shard may be turned away several times while 19 other trainers are served
IDLE_S = 1.0  # plain GETs timed before the storm, for comparison
PLAIN_OBJECT = "plain.txt"
PLAIN_INTERVAL_S = 0.02
FLAGS = ["--dataset", CONTAINER, "--model", MODEL, "--weights", WEIGHTS, "--freeze",
         "--manual_split", "--split_idx", str(FREEZE), "--preset", PRESET,
         "--batch_size", str(BATCH), "--storage_batch", str(BATCH), "--holdout", "0",
         "--threads", "1", "--retries", str(RETRIES), "--no-progress"]


def small_budget():
    """The filter's options: memory for the cached model and 1.5 requests at
    the full batch, from the engine's own cost of the request."""
    engine = FeatureEngine(device="cpu")
    request = feature_request(MODEL, split=FREEZE, batch=BATCH, weights=WEIGHTS, preset=PRESET)
    model = engine.load_model((MODEL, WEIGHTS), MODEL, request.weights)
    memory = engine.resident_bytes + engine.memory_cost(model, request).at(BATCH) * 3 // 2
    return {"threads": "1", "memory_budget": str(memory), "min_batch": "1",
            "max_concurrent": str(MAX_CONCURRENT), "queue_timeout": "1"}


@pytest.fixture(scope="module")
def cluster(swift_cluster_factory):
    cluster = swift_cluster_factory("overload", hapi_conf=small_budget())
    conn = cluster.connection()
    source = datasets.digits()
    upload_dataset(conn, CONTAINER, itertools.islice(source.samples, SAMPLES), source.classes,
                   SHARD_SIZE)
    conn.put_object(CONTAINER, PLAIN_OBJECT, b"plain Swift traffic\n" * 50)
    conn.close()
    return cluster


class PlainReader:
    """GETs one object through the proxy until stopped; each GET's status and seconds."""

    def __init__(self, cluster):
        conn = cluster.connection()
        self.url, self.token = conn.get_auth()
        conn.close()
        self.results = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        request = urllib.request.Request(f"{self.url}/{CONTAINER}/{PLAIN_OBJECT}",
                                         headers={"X-Auth-Token": self.token})
        while not self._stop.wait(PLAIN_INTERVAL_S):
            began = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=30) as resp:
                    resp.read()
                    status = resp.status
            except OSError as err:
                status = getattr(err, "code", repr(err))
            self.results.append((status, time.perf_counter() - began))


def run_trainer(cluster, index, results):
    user, key = cluster.users["tester"]
    lines, keys = [], []
    args = cli.parse_args([*FLAGS, "--seed", str(index), "-A", cluster.auth_url, "-U", user,
                           "-K", key])
    try:
        metrics = cli.run(args, on_step=lambda step: keys.extend(step.keys), log=lines.append)
    except Exception as err:
        results[index] = (err, lines)
    else:
        results[index] = (metrics, keys)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def test_twenty_trainers_finish_and_plain_gets_are_served(cluster):
    proxy_pid = cluster.status()["proxy"]["pid"]
    results = [None] * TRAINERS
    threads = [threading.Thread(target=run_trainer, args=(cluster, i, results))
               for i in range(TRAINERS)]
    with PlainReader(cluster) as idle:
        time.sleep(IDLE_S)
    began = time.perf_counter()
    with PlainReader(cluster) as plain:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    storm_s = time.perf_counter() - began

    failed = [(i, r) for i, r in enumerate(results) if not isinstance(r[0], dict)]
    assert not failed, failed
    for metrics, keys in results:
        assert len(keys) == len(set(keys)) == SAMPLES  # every sample, once
        assert metrics["samples"]["train"] == SAMPLES
    refused = sum(m["retries"]["by_cause"].get("503", 0) for m, _ in results)
    other_retries = sum(m["retries"]["total"] for m, _ in results) - refused
    reduced = sum(m["storage_batch"]["reduced_shards"] for m, _ in results)
    batches = sorted({b for m, _ in results for b in m["storage_batch"]["used"]})
    most = max(m["retries"]["total"] for m, _ in results)

    statuses = [status for status, _ in plain.results]
    latencies = [seconds for _, seconds in plain.results]
    print(f"\n{TRAINERS} trainers x {SAMPLES // SHARD_SIZE} shards in {storm_s:.1f} s: "
          f"{refused} answers 503 (retried after Retry-After), {other_retries} other retries, "
          f"{reduced} shards at a reduced storage batch (batches used {batches}), at most "
          f"{most} retries for one trainer; "
          f"{len(latencies)} plain GETs meanwhile: p50 {percentile(latencies, 0.5) * 1e3:.1f} ms,"
          f" p99 {percentile(latencies, 0.99) * 1e3:.1f} ms, "
          f"max {max(latencies) * 1e3:.1f} ms, mean {statistics.mean(latencies) * 1e3:.1f} ms "
          f"(idle before: p50 {statistics.median(s for _, s in idle.results) * 1e3:.1f} ms)")
    assert refused + reduced > 0
    assert len(statuses) >= 10 and set(statuses) == {200}, statuses
    proxy = cluster.status()["proxy"]
    assert proxy["alive"] and proxy["pid"] == proxy_pid  # never restarted: no crash
