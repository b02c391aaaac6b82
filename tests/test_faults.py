"""Faults a training job survives, and the retry policy behind it.

Without Swift: which failures the policy retries and how long it waits, and
a shard whose stream is cut half way delivered once, whole.

Against a Swift cluster of this module's own (its servers are killed here,
which must not disturb the other tests): the proxy, the standalone HAPI
server, the network and an object server fail in the middle of an epoch,
and the trainer is killed and resumed. The data set is the first 240 of
scikit-learn's digits in 10 shards of 24; EfficientNet-Lite0 with its
pre-trained weights at 32 px, split at its freeze index. Every fault is
judged against an uninterrupted run: the same samples in the same steps,
each exactly once, the same losses.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
import urllib3
from helpers import ServerProcess, upload_digits
from swiftclient import ClientException

from hapi import protocol, wire
from hapi.client import data
from hapi.client import main as cli
from hapi.client.checkpoint import load_checkpoint
from hapi.client.retry import (
    BACKOFF_S,
    JITTER,
    MAX_BACKOFF_S,
    MAX_RETRY_AFTER_S,
    RetriesExhausted,
    RetryPolicy,
    transient,
)
from hapi.stores import DirectoryStore

# The retry policy, without Swift ----------------------------------------------------


def http_error(status, headers=None):
    return ClientException("Object GET failed", http_status=status, http_reason="Reason",
                           http_response_headers=headers or {})


@pytest.mark.parametrize(("err", "cause", "retry_after"), [
    (http_error(503, {"Retry-After": "3"}), "503", 3.0),
    (http_error(429, {"retry-after": "1"}), "429", 1.0),
    (http_error(503), "503", None),
    (http_error(503, {"Retry-After": "Fri, 31 Dec 1999 23:59:59 GMT"}), "503", None),
    (http_error(500), "500", None),
    (http_error(502), "502", None),
    (ConnectionRefusedError(111, "Connection refused"), "connection", None),
    (urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead"), "connection", None),
    (wire.FrameError("stream cut short: 10 of 100 bytes"), "stream", None),
    (wire.StreamError({"status": "503", "message": "shutting down"}), "stream", None),
])
def test_transient_failures_are_retried(err, cause, retry_after):
    failure = transient(err)
    assert (failure.cause, failure.retry_after) == (cause, retry_after)
    assert "\n" not in failure.reason


@pytest.mark.parametrize("err", [
    http_error(400), http_error(401), http_error(403), http_error(404), http_error(422),
    ClientException("no status"), wire.StreamError({"status": "422", "message": "bad member"}),
    data.DataError("shard holds 3 samples, its manifest says 4"), ValueError("a bug"),
])
def test_other_failures_are_not(err):
    assert transient(err) is None


def test_a_connection_failure_is_logged_by_its_root_cause():
    with pytest.raises(requests.exceptions.ConnectionError) as refused:
        requests.get("http://127.0.0.1:1/", timeout=5)  # nothing listens on port 1
    assert transient(refused.value).reason == \
        "connection failed: ConnectionRefusedError: [Errno 111] Connection refused"


def policy(retries=3):
    waits, lines = [], []
    return RetryPolicy(retries, log=lines.append, sleep=waits.append, jitter=lambda: 1.0), \
        waits, lines


def failing(*errors, result="done"):
    """A callable that raises ``errors`` one per call, then returns ``result``."""
    pending = list(errors)

    def attempt():
        if pending:
            raise pending.pop(0)
        return result
    return attempt


def test_retry_after_is_waited_capped_and_jittered():
    retry, waits, lines = policy()
    busy = [http_error(503, {"Retry-After": "2"}), http_error(503, {"Retry-After": "3600"})]
    assert retry.call("features of c/s", failing(*busy)) == "done"
    assert waits == [2 * (1 + JITTER), MAX_RETRY_AFTER_S * (1 + JITTER)]
    assert lines[0] == ("features of c/s: 503 Reason (Retry-After 2 s); retry 1/3 in "
                        f"{2 * (1 + JITTER):.1f} s")
    assert retry.report() == {"total": 2, "by_cause": {"503": 2}}


def test_backoff_doubles_up_to_its_cap_and_resets_the_connection():
    retry, waits, _ = policy(retries=6)
    resets = []
    errors = [ConnectionResetError(104, "reset")] * 6
    assert retry.call("raw shard c/s", failing(*errors), reset=lambda: resets.append(1)) == "done"
    expected = [min(BACKOFF_S * 2 ** i, MAX_BACKOFF_S) * (1 + JITTER) for i in range(6)]
    assert waits == pytest.approx(expected)
    assert max(waits) == MAX_BACKOFF_S * (1 + JITTER) and len(resets) == 6


def test_the_retries_run_out_with_one_clear_line():
    retry, waits, _ = policy(retries=2)
    with pytest.raises(RetriesExhausted) as info:
        retry.call("features of c/shard-000003.tar", failing(*[http_error(503)] * 3))
    assert str(info.value) == ("features of c/shard-000003.tar failed 3 times, giving up: "
                               "503 Reason")
    assert len(waits) == 2


def test_a_client_error_fails_at_once():
    retry, waits, _ = policy()
    with pytest.raises(ClientException):
        retry.call("features of c/s", failing(http_error(404)))
    assert waits == [] and retry.report()["total"] == 0


# A stream cut half way, without Swift ---------------------------------------------------


class CutOnce:
    """A stand-in for swiftclient's Connection serving feature streams; the
    first stream of each shard in ``cut`` stops after half its bytes, with a
    broken connection (``reset``) or a clean end (``eof``)."""

    def __init__(self, streams, cut, how):
        self.streams = streams
        self.cut = set(cut)
        self.how = how
        self.retries = 5
        self.closed = 0

    def get_object(self, container, name, resp_chunk_size=None, headers=None):
        body = self.streams[name]
        headers = {protocol.SAMPLES.lower(): "4", protocol.BATCH_USED.lower(): "2",
                   protocol.DEVICE.lower(): "cpu"}
        if name in self.cut:
            self.cut.discard(name)
            return headers, self._cut(body[:len(body) // 2])
        return headers, iter([body[i:i + 100] for i in range(0, len(body), 100)])

    def _cut(self, prefix):
        yield prefix
        if self.how == "reset":
            raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")

    def close(self):
        self.closed += 1


def stream_of(name, samples=4, batch=2):
    """A feature stream of ``samples`` samples, keys ``name-i``, in frames of ``batch``."""
    frames = []
    for index, first in enumerate(range(0, samples, batch)):
        part = range(first, min(first + batch, samples))
        frames.append(wire.encode_frame(
            "batch", {"index": index, "keys": [f"{name}-{i}" for i in part]},
            features=torch.full((len(part), 3), float(first)), labels=torch.tensor(list(part))))
    return b"".join(frames) + wire.encode_frame("end", {"samples": str(samples)})


@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize(("how", "cause"), [("reset", "connection"), ("eof", "stream")])
def test_a_shard_cut_half_way_is_fetched_again_and_delivered_once(depth, how, cause):
    names = [f"s{i}" for i in range(5)]
    conn = CutOnce({name: stream_of(name) for name in names}, cut=["s1", "s3"], how=how)
    source = data.ShardSource("c", protocol.FeatureRequest(
        model="resnet18", split=4, freeze=4, batch=2, weights=protocol.parse_weights(
            "seed:0", protocol.Limits()), preset="imagenet-64", dtype="float32"))
    retry, waits, lines = policy()
    refs = [data.ShardRef(name, 4, 1000, 0, 4) for name in names]
    with data.ShardLoader(source, lambda: conn, depth, data.FixedSplit(4), retry) as loader:
        shards = list(loader(refs))
    assert [shard.ref.name for shard in shards] == names
    assert [shard.keys for shard in shards] == [[f"{n}-{i}" for i in range(4)] for n in names]
    assert all(len(shard.inputs) == len(shard.labels) == 4 for shard in shards)
    assert retry.report() == {"total": 2, "by_cause": {cause: 2}}
    assert conn.retries == 0  # swiftclient does not retry on top of the policy
    assert len(lines) == len(waits) == 2 and conn.closed >= 2


# Against Swift ------------------------------------------------------------------------

CONTAINER = "hapi-faults-digits"
SAMPLES, SHARD_SIZE, BATCH = 240, 24, 20
FLAGS = ["--dataset", CONTAINER, "--model", "myefficientnet_lite0", "--freeze",
         "--manual_split", "--split_idx", "21", "--preset", "resize-32", "--batch_size",
         str(BATCH), "--storage_batch", "7", "--lr", "0.05", "--threads", "1", "--holdout", "0"]
KILL_AT_STEP = 2
DOWN_FOR_S = 1.5  # how long a killed server stays down
# A restarted proxy or HAPI server imports torch first: seconds, more on a busy
# machine. Retries enough to wait ~40 s for it (backoff 0.5, 1, 2, 4, 8, 8...).
RESTART_RETRIES = "8"
STEP_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def cluster(swift_cluster_factory):
    cluster = swift_cluster_factory("faults", hapi_conf={"threads": "1"})
    upload_digits(cluster, CONTAINER, SAMPLES, SHARD_SIZE)
    return cluster


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    with ServerProcess(cluster.proxy_url, tmp_path_factory.mktemp("hapi-server"),
                       {"threads": "1"}) as server:
        yield server


def credentials(cluster):
    user, key = cluster.users["tester"]
    return ["-A", cluster.auth_url, "-U", user, "-K", key]


def train(cluster, *flags, on_step=None):
    """Run client/main.py in this process: its metrics, step records and log lines."""
    records, lines = [], []

    def record(step):
        records.append(step)
        if on_step is not None:
            on_step(step)

    args = cli.parse_args([*FLAGS, *flags, *credentials(cluster)])
    return cli.run(args, on_step=record, log=lines.append), records, lines


@pytest.fixture(scope="module")
def reference(cluster):
    """The uninterrupted run every fault is compared with."""
    metrics, records, _ = train(cluster)
    return metrics, records


def assert_same_as_uninterrupted(metrics, records, reference):
    """Every sample exactly once, in the same steps, with the same losses."""
    keys = [key for record in records for key in record.keys]
    assert len(keys) == len(set(keys)) == SAMPLES
    ref_metrics, ref_records = reference
    assert [r.keys for r in records] == [r.keys for r in ref_records]
    assert metrics["epochs"][0]["step_loss"] == \
        pytest.approx(ref_metrics["epochs"][0]["step_loss"], rel=1e-6)


def wait_until(check, what, timeout=STEP_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def answers(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def accepts(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def kill(cluster, server):
    os.kill(cluster.status()[server]["pid"], signal.SIGKILL)


def restart(cluster, server):
    """Start one of the cluster's servers again as the cluster starts it (same
    binary, conf and log) and record its pid where the cluster's stop() finds
    it; a thread reaps it when it exits. Returns once it serves."""
    binary = Path(sys.executable).parent / f"swift-{server}-server"
    with open(cluster.log_path(server), "ab") as log:
        proc = subprocess.Popen([str(binary), str(cluster.conf_path(server)), "-v"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=cluster.root, start_new_session=True)
    cluster.pid_path(server).write_text(f"{proc.pid}\n")
    threading.Thread(target=proc.wait, daemon=True).start()
    if server == "proxy":
        wait_until(lambda: answers(f"{cluster.proxy_url}/healthcheck"), "the proxy")
    else:
        wait_until(lambda: accepts(cluster.host, cluster.ports[server]), f"the {server} server")


def restart_standalone(server):
    """Start the killed standalone server again, on the same port."""
    server.proc.wait()
    server.__enter__()


def later(pool, seconds, fn, *args):
    def run():
        time.sleep(seconds)
        fn(*args)
    return pool.submit(run)


def assert_retried(metrics, lines, *causes):
    retries = metrics["retries"]
    assert retries["total"] > 0 and set(retries["by_cause"]) <= set(causes), retries
    assert sum("; retry " in line for line in lines) == retries["total"]


def test_the_proxy_killed_mid_epoch_and_restarted(cluster, reference):
    with ThreadPoolExecutor(1) as pool:
        restarted = []

        def kill_proxy(step):
            if step.global_step == KILL_AT_STEP:
                kill(cluster, "proxy")
                restarted.append(later(pool, DOWN_FOR_S, restart, cluster, "proxy"))

        metrics, records, lines = train(cluster, "--retries", RESTART_RETRIES,
                                        on_step=kill_proxy)
        restarted[0].result()
    assert_same_as_uninterrupted(metrics, records, reference)
    assert_retried(metrics, lines, "connection", "stream")


def test_the_standalone_server_killed_mid_epoch_and_restarted(cluster, server, reference):
    with ThreadPoolExecutor(1) as pool:
        restarted = []

        def kill_server(step):
            if step.global_step == KILL_AT_STEP:
                server.proc.kill()
                restarted.append(later(pool, DOWN_FOR_S, restart_standalone, server))

        metrics, records, lines = train(cluster, "--use_intermediate", "--intermediate_url",
                                        server.url, "--retries", RESTART_RETRIES,
                                        on_step=kill_server)
        restarted[0].result()
    assert metrics["storage_endpoint"] == server.url
    assert_same_as_uninterrupted(metrics, records, reference)
    assert_retried(metrics, lines, "connection", "stream")


class CuttingRelay:
    """A TCP relay to 127.0.0.1:``port`` that cuts its first connection once
    ``cut_after`` bytes of the response went through: the network failing in
    the middle of a stream."""

    def __init__(self, port, cut_after):
        self.port = port
        self.cut_after = cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.listener.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            limit = self.cut_after if self.connections == 1 else None
            upstream = socket.create_connection(("127.0.0.1", self.port))
            for source, sink, cut in ((client, upstream, None), (upstream, client, limit)):
                threading.Thread(target=self._pump, args=(source, sink, cut),
                                 daemon=True).start()

    def _pump(self, source, sink, limit):
        sent = 0
        try:
            while chunk := source.recv(1 << 16):
                if limit is not None and sent + len(chunk) >= limit:
                    sink.sendall(chunk[:limit - sent])
                    self.cuts += 1
                    break
                sink.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        for sock in (source, sink):  # also wakes the other direction's recv
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_a_stream_cut_mid_shard_is_fetched_again_whole(cluster, server, reference):
    relay = CuttingRelay(server.port, cut_after=60_000)  # a shard's features: ~127 kB
    try:
        metrics, records, lines = train(cluster, "--use_intermediate", "--intermediate_url",
                                        relay.url)
    finally:
        relay.close()
    assert relay.cuts == 1
    assert_same_as_uninterrupted(metrics, records, reference)
    assert_retried(metrics, lines, "connection", "stream")


def final_checkpoint(path):
    ckpt = load_checkpoint(DirectoryStore(path))
    return ckpt.state["step"], ckpt.tensors


def test_the_trainer_killed_mid_epoch_resumes_to_the_same_model(cluster, tmp_path):
    flags = ["--num_epochs", "2", "--checkpoint_every", "2"]
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "reference"
    script = Path(__file__).resolve().parents[1] / "client" / "main.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), *FLAGS, *flags, "--sequential", "--checkpoint_dir",
         str(killed_dir), "--no-progress", *credentials(cluster)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: (killed_dir / "latest.json").exists() or proc.poll() is not None,
                   "the first checkpoint", timeout=120)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    killed_at, _ = final_checkpoint(killed_dir)

    resumed, records, _ = train(cluster, *flags, "--checkpoint_dir", str(killed_dir),
                                "--resume")
    per_epoch = -(-SAMPLES // BATCH)
    steps = 2 * per_epoch
    assert 0 < killed_at < steps
    epochs_done, step = divmod(killed_at, per_epoch)
    assert resumed["resumed_from"] == {"epoch": epochs_done + 1, "step": step}  # from 1
    assert records[0].global_step == killed_at + 1 and records[-1].global_step == steps
    train(cluster, *flags, "--checkpoint_dir", str(reference_dir))
    step, tensors = final_checkpoint(killed_dir)
    reference_step, reference_tensors = final_checkpoint(reference_dir)
    assert step == reference_step == steps
    assert tensors.keys() == reference_tensors.keys()
    assert any(name.startswith("optimizer.") for name in tensors)
    for name, tensor in tensors.items():
        assert torch.allclose(tensor, reference_tensors[name], rtol=0, atol=1e-6), name


# Last: an object server error-limited by the proxy stays so for a minute.


def test_an_object_server_back_after_a_while_loses_no_sample(cluster, reference):
    with ThreadPoolExecutor(1) as pool:
        restarted = []

        def kill_object_server(step):
            if step.global_step == KILL_AT_STEP:
                kill(cluster, "object")
                restarted.append(later(pool, DOWN_FOR_S, restart, cluster, "object"))

        metrics, records, lines = train(cluster, on_step=kill_object_server)
        restarted[0].result()
    assert_same_as_uninterrupted(metrics, records, reference)
    assert_retried(metrics, lines, "503")


def test_an_object_server_that_stays_down_is_one_clear_error(cluster):
    def kill_object_server(step):
        if step.global_step == KILL_AT_STEP:
            kill(cluster, "object")

    try:
        with pytest.raises(RetriesExhausted) as info:
            train(cluster, "--retries", "1", on_step=kill_object_server)
    finally:
        restart(cluster, "object")
    assert f"features of {CONTAINER}/shard-" in str(info.value)
    assert str(info.value).endswith("failed 2 times, giving up: 503 Service Unavailable")
