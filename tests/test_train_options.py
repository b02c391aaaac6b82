"""What README promises of the trainer's options, against a real one-node Swift:
``--wire_dtype float16``, ``--timeout`` on a storage tier that stalls
mid-stream, ``--freeze_idx``, the optimizer's flags, ``--start``/``--end``.

The data set is the first 48 of scikit-learn's digits in 4 shards of 12;
ResNet-18 with ``seed:0`` weights at 32 px, one epoch, nothing held out:
each run takes seconds.
"""

import itertools
import math
import socket
import threading
import time

import pytest
import torch
from helpers import upload_digits
from pytest import approx
from swiftclient import ClientException

from hapi import protocol, wire, zoo
from hapi.client import data
from hapi.client import main as cli
from hapi.client import train as training
from hapi.client.checkpoint import load_checkpoint
from hapi.client_setup import datasets
from hapi.stores import DirectoryStore

CONTAINER = "hapi-options-digits"
SAMPLES, SHARD_SIZE, CLASSES = 48, 12, 10
FREEZE = zoo.MODELS["resnet18"].default_freeze
FLAGS = ["--dataset", CONTAINER, "--model", "resnet18", "--weights", "seed:0",
         "--preset", "resize-32", "--batch_size", "8", "--storage_batch", "12",
         "--holdout", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def cluster(swift_cluster):
    upload_digits(swift_cluster, CONTAINER, SAMPLES, SHARD_SIZE)
    return swift_cluster


def credentials(cluster):
    user, key = cluster.users["tester"]
    return ["-A", cluster.auth_url, "-U", user, "-K", key]


def train(cluster, *flags):
    """Run client/main.py in this process; return its metrics and StepRecords."""
    steps = []
    args = cli.parse_args([*FLAGS, *flags, *credentials(cluster)])
    return cli.run(args, on_step=steps.append, log=lambda line: None), steps


def test_float16_features_train_like_float32(cluster, monkeypatch):
    """Features cross the network as float16 (half the bytes); the trainer
    computes in float32 from them, and the losses stay close to float32's."""
    dtypes = []
    load = data.ShardSource.load

    def recording_load(self, channel, ref, split, wire_format=None, on_link=None):
        shard = load(self, channel, ref, split, wire_format, on_link)
        dtypes.append(shard.inputs.dtype)
        return shard

    monkeypatch.setattr(data.ShardSource, "load", recording_load)
    runs = {}
    for dtype in ("float32", "float16"):
        dtypes.clear()
        metrics, _ = train(cluster, "--freeze", "--split_idx", str(FREEZE), "--wire_dtype", dtype)
        runs[dtype] = metrics, set(dtypes)
    (full, full_dtypes), (half, half_dtypes) = runs["float32"], runs["float16"]
    assert (full_dtypes, half_dtypes) == ({torch.float32}, {torch.float16})
    assert half["bytes_received"] < 0.6 * full["bytes_received"]
    half_loss, full_loss = half["epochs"][0]["step_loss"], full["epochs"][0]["step_loss"]
    assert all(math.isfinite(loss) for loss in half_loss)
    assert half_loss == approx(full_loss, rel=0.02)


def test_zstd_features_train_exactly_like_raw_ones_with_fewer_bytes(cluster):
    """--wire_encoding zstd: lossless, so the same loss at every step; the
    ReLU features compress, so fewer bytes cross the network."""
    runs = {encoding: train(cluster, "--freeze", "--split_idx", str(FREEZE),
                            "--wire_encoding", encoding)[0]
            for encoding in ("raw", "zstd")}
    assert runs["zstd"]["epochs"][0]["step_loss"] == runs["raw"]["epochs"][0]["step_loss"]
    assert runs["zstd"]["bytes_received"] < runs["raw"]["bytes_received"]


def test_a_freeze_index_reaches_the_storage_tier_and_sets_the_trained_layers(
        cluster, swift_conn, tmp_path):
    """ResNet-18's layers 12 (avgpool) and 13 (flatten) have no parameters:
    frozen below 12, only its head (layer 14) trains. The storage tier runs
    a split only up to the freeze index it is sent: without X-Hapi-Freeze
    (the model's default, 11) it refuses split 12, so a run at split 12
    shows that the trainer's freeze index reached it."""
    with pytest.raises(ClientException) as refused:
        swift_conn.get_object(CONTAINER, "shard-000000.tar", headers={
            protocol.MODEL: "resnet18", protocol.SPLIT: "12", protocol.WEIGHTS: "seed:0"})
    assert refused.value.http_status == 400

    metrics, _ = train(cluster, "--freeze_idx", "12", "--split_idx", "12",
                       "--checkpoint_dir", str(tmp_path))
    assert (metrics["freeze"], metrics["split"], metrics["mode"]) == (12, 12, "split")
    assert metrics["devices"]["storage"] == ["cpu"]
    ckpt = load_checkpoint(DirectoryStore(tmp_path))
    assert ckpt.state["first_layer"] == 12
    assert {key.split(".")[1] for key in ckpt.tensors if key.startswith("layers.")} == {"14"}


@pytest.mark.parametrize(("flags", "kind", "expected"), [
    (["--optimizer", "adam", "--lr", "0.002", "--weight_decay", "0.01"], torch.optim.Adam,
     {"lr": 0.002, "weight_decay": 0.01}),
    (["--momentum", "0.5", "--weight_decay", "0.001"], torch.optim.SGD,
     {"lr": 0.01, "momentum": 0.5, "weight_decay": 0.001}),
])
def test_the_optimizer_flags_reach_the_torch_optimizer(cluster, monkeypatch, flags, kind,
                                                       expected):
    made = []
    make_optimizer = training.make_optimizer

    def recording_make_optimizer(model, config):
        made.append(make_optimizer(model, config))
        return made[-1]

    monkeypatch.setattr(training, "make_optimizer", recording_make_optimizer)
    train(cluster, "--freeze", "--split_idx", str(FREEZE), *flags)
    [optimizer] = made
    assert type(optimizer) is kind
    [group] = optimizer.param_groups
    assert {key: group[key] for key in expected} == expected
    reference = zoo.build_model("resnet18", seed=0)
    reference.replace_head(CLASSES)
    reference.freeze(FREEZE)
    trainable = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert sum(p.numel() for p in group["params"]) == trainable
    assert len(optimizer.state) == len(group["params"])  # every one of them was stepped


def test_start_and_end_select_the_sample_range(cluster):
    """Samples [5, 29): the end of the first shard, the second, the start of the third."""
    keys = [sample.key for sample in itertools.islice(datasets.digits().samples, SAMPLES)]
    metrics, steps = train(cluster, "--freeze", "--split_idx", str(FREEZE),
                           "--start", "5", "--end", "29")
    assert sorted(key for step in steps for key in step.keys) == keys[5:29]
    assert metrics["samples"] == {"train": 24, "holdout": 0}


def test_a_last_batch_of_one_sample_that_batchnorm_cannot_train_is_one_line(cluster, capsys):
    """Samples [5, 30) in batches of 8 leave 1 for the last batch, and
    ResNet-18's trained layer4.1 has BatchNorm: refused before any step."""
    status = cli.main([*FLAGS, "--freeze", "--split_idx", str(FREEZE), "--start", "5",
                       "--end", "30", *credentials(cluster)])
    captured = capsys.readouterr()
    assert status == 1
    assert "epoch 1/1" not in captured.out
    assert captured.err == (
        "error: the last batch of each epoch would hold 1 of the 25 training samples, and the "
        f"trained layers of resnet18 (from {FREEZE}) have BatchNorm, which cannot train on one "
        "sample: change --batch_size, --start/--end or --holdout, or freeze more layers\n")


class StallingServer:
    """A storage tier that hangs mid-stream: every GET gets a 200 with a
    feature stream's headers and the first bytes of a frame, then nothing
    more until the test ends."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = 0
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._answer, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _answer(self, conn):
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            self.requests += 1
            body = wire.encode_frame("end", {"samples": str(SHARD_SIZE)})
            conn.sendall(b"HTTP/1.1 200 OK\r\n"
                         + f"Content-Length: {len(body)}\r\n".encode()
                         + f"{protocol.SAMPLES}: {SHARD_SIZE}\r\n".encode()
                         + f"{protocol.BATCH_USED}: {SHARD_SIZE}\r\n".encode()
                         + f"{protocol.DEVICE}: cpu\r\n\r\n".encode() + body[:12])
            self.done.wait(60)

    def close(self):
        self.done.set()
        self.sock.close()
        for thread in self.threads:
            thread.join(5)


def test_a_stalled_stream_times_out_and_is_retried(cluster, capsys):
    """With --timeout 1, a request whose stream stops is given up after a
    second without a byte and retried; when the retries run out, the run
    ends with one line naming the shard and the timeout."""
    server = StallingServer()
    try:
        began = time.monotonic()
        status = cli.main([*FLAGS, "--freeze", "--split_idx", str(FREEZE), "--sequential",
                           "--use_intermediate", "--intermediate_url", server.url,
                           "--timeout", "1", "--retries", "1", *credentials(cluster)])
        elapsed = time.monotonic() - began
    finally:
        server.close()
    captured = capsys.readouterr()
    assert status == 1
    assert server.requests == 2
    assert f"from the HAPI server at {server.url}: connection failed: " in captured.out
    assert "retry 1/1 in " in captured.out
    [error] = captured.err.splitlines()
    assert error.startswith(f"error: features of {CONTAINER}/shard-")
    assert "failed 2 times, giving up: connection failed: " in error
    assert "timed out" in error
    assert elapsed < 60  # two 1 s timeouts and a backoff, not the default 120 s each
