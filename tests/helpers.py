"""Helpers shared by the tests of the filter and of the standalone server:
small images and shards, requests, the bad inputs both must refuse alike,
and the standalone server as a subprocess."""

import http.client
import io
import itertools
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from hapi import protocol, zoo
from hapi.client_setup import datasets
from hapi.client_setup.load import upload_dataset
from hapi.shards import Sample, write_shard

# Images and shards -------------------------------------------------------------


def png(seed, size=40):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def samples(n, size=40, first=0):
    return [Sample(key=f"{i:06d}", image=png(i, size), ext="png", label=i % 10)
            for i in range(first, first + n)]


def feature_request(model, split=None, batch=2, weights="seed:0", preset="imagenet-64",
                    dtype="float32"):
    freeze = zoo.MODELS[model].default_freeze
    return protocol.FeatureRequest(model=model, split=freeze if split is None else split,
                                   freeze=freeze, batch=batch,
                                   weights=protocol.parse_weights(weights, protocol.Limits()),
                                   preset=preset, dtype=dtype)


def huge_png_header(width=100_000, height=100_000):
    """A valid PNG header declaring 10 giga-pixels: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def tar_without_label():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("000001.png")
        data = png(1)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# Bad input: the same answers from the filter and the server ---------------------

# Header overrides of a good request, and the parameter the 400 must name.
BAD_PARAMETERS = [
    ({protocol.MODEL: "lenet"}, protocol.MODEL),
    ({protocol.SPLIT: "999"}, protocol.SPLIT),
    ({protocol.SPLIT: "two"}, protocol.SPLIT),
    ({protocol.FREEZE: "999"}, protocol.FREEZE),
    ({protocol.BATCH: "0"}, protocol.BATCH),
    ({protocol.BATCH: "100000"}, protocol.BATCH),
    ({protocol.PRESET: "fancy"}, protocol.PRESET),
    ({protocol.DTYPE: "int4"}, protocol.DTYPE),
    ({protocol.WEIGHTS: "swift:no-such-container/w.safetensors"}, protocol.WEIGHTS),
    ({protocol.WEIGHTS: "file:w.safetensors"}, protocol.WEIGHTS),
]

# Objects that are not valid shards: (name, member the 422 names, words of its message).
BAD_SHARDS = [
    ("not-a-tar", None, "not a valid tar"),
    ("truncated.tar", "000001.png", "truncated"),
    ("not-an-image.tar", "000001.jpg", "not a decodable image"),
    ("bomb.tar", "000001.png", "pixel limit"),
    ("no-label.tar", "000001.png", "no .cls label"),
]


def bad_shard_objects():
    """The bytes of each object of :data:`BAD_SHARDS`, by name."""
    good = write_shard(samples(2))
    return {
        "not-a-tar": b"this is not a tar archive at all" * 10,
        "truncated.tar": good[:len(good) // 2 + 100],
        "not-an-image.tar": write_shard([Sample("000001", b"plain text", "jpg", 1)]),
        "bomb.tar": write_shard([Sample("000001", huge_png_header(), "png", 1)]),
        "no-label.tar": tar_without_label(),
    }


def upload_digits(cluster, container, samples, shard_size):
    """The first ``samples`` scikit-learn digits, as shards of ``shard_size``
    in ``container`` of the test account."""
    conn = cluster.connection()
    try:
        source = datasets.digits()
        upload_dataset(conn, container, itertools.islice(source.samples, samples),
                       source.classes, shard_size)
    finally:
        conn.close()


def small_shard_connection(cluster, container):
    """The admin's authenticated connection, with ``container`` holding
    ``small.tar`` (5 samples); closed when the generator ends (for a fixture)."""
    connection = cluster.connection()
    connection.put_container(container)
    connection.put_object(container, "small.tar", write_shard(samples(5)))
    connection.get_auth()
    yield connection
    connection.close()


def raw_get(url, headers):
    """A GET with exactly ``headers`` (swiftclient would add a token): status, body."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("GET", parts.path, headers=headers)
        resp = connection.getresponse()
        return resp.status, resp.read()
    finally:
        connection.close()


# The standalone server as a subprocess -------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m hapi.middleware.server`` on a free port, configured by a file
    in ``workdir`` (``[hapi]`` options from ``hapi_conf``), its output in
    ``workdir/server.log``. A context manager: starts, waits for /healthcheck,
    and on exit stops it with SIGTERM (SIGKILL if it lingers)."""

    START_TIMEOUT = 120
    STOP_TIMEOUT = 30

    def __init__(self, swift_url, workdir, hapi_conf=None, shutdown_grace=30):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf_path = self.workdir / "server.conf"
        self.log_path = self.workdir / "server.log"
        lines = ["[server]", f"swift_url = {swift_url}", "bind_ip = 127.0.0.1",
                 f"shutdown_grace = {shutdown_grace}", "", "[hapi]"]
        lines += [f"{k} = {v}" for k, v in (hapi_conf or {}).items()]
        self.conf_path.write_text("\n".join(lines) + "\n")
        self.proc = None

    def __enter__(self):
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hapi.middleware.server", "--config",
                 str(self.conf_path), "--bind-port", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def pid(self):
        return self.proc.pid

    def log_text(self):
        return self.log_path.read_text(errors="replace")

    def _wait_until_healthy(self):
        deadline = time.monotonic() + self.START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hapi server exited with {self.proc.returncode}:\n"
                                   f"{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthcheck", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"hapi server not healthy after {self.START_TIMEOUT} s:\n"
                           f"{self.log_text()[-3000:]}")

    def terminate(self):
        """Send SIGTERM (a graceful stop) without waiting."""
        self.proc.send_signal(signal.SIGTERM)

    def stop(self):
        """SIGTERM, wait; SIGKILL after STOP_TIMEOUT. Returns the exit status."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(self.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def rss_bytes(self):
        """The server's resident set size now."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {self.pid}")
