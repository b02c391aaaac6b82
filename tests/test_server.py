"""The standalone HAPI server in front of a real Swift, compared with the filter.

The server runs as a subprocess through its own CLI and config file, on a free
port, reading from the session's Swift (whose proxy also runs the filter, so
every answer can be compared with the filter's for the same request).
"""

import asyncio
import io
import json
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import aiohttp
import pytest
import torch
import torchvision
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet
from helpers import (
    BAD_PARAMETERS,
    BAD_SHARDS,
    ServerProcess,
    bad_shard_objects,
    feature_request,
    free_port,
    raw_get,
    samples,
)
from safetensors.torch import save as st_save
from swiftclient import ClientException

from hapi import protocol, wire
from hapi.client.features import fetch_features, intermediate_connection
from hapi.middleware.options import OPTION_DEFAULTS, OPTION_HELP
from hapi.middleware.server import SERVER_DEFAULTS, load_config, main
from hapi.middleware.server_app import HapiServer
from hapi.shards import Sample, write_shard

CONTAINER = "hapi-server-tests"
# As the session proxy's filter (conftest): one torch thread, so that the two
# compute bit for bit the same tensors.
MAX_CONCURRENT = 4
HAPI_CONF = {"threads": "1", "max_concurrent": str(MAX_CONCURRENT)}
TOKEN_LIFE = 86400  # tempauth's default
# A shard whose features at split 0 (the preprocessed 224 px images) are much
# larger than any frame: 256 samples in frames of 8, 4.8 MB each, 154 MB in all.
BIG = "big.tar"
BIG_REQUEST = feature_request("mobilenet_v3_small", split=0, batch=8, preset="imagenet-224")
BIG_SAMPLES = 256
FRAME_BYTES = 8 * 3 * 224 * 224 * 4


@pytest.fixture(scope="module")
def conn(swift_cluster):
    connection = swift_cluster.connection()
    connection.put_container(CONTAINER)
    connection.put_object(CONTAINER, "small.tar", write_shard(samples(5)))
    connection.put_object(CONTAINER, BIG, write_shard(samples(BIG_SAMPLES, size=16)))
    for name, data in bad_shard_objects().items():
        connection.put_object(CONTAINER, name, data)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def server(swift_cluster, tmp_path_factory):
    with ServerProcess(swift_cluster.proxy_url, tmp_path_factory.mktemp("hapi-server"),
                       HAPI_CONF) as process:
        yield process


@pytest.fixture(scope="module")
def via_server(conn, server):
    """The admin's connection, pointed at the server instead of the proxy."""
    connection = intermediate_connection(conn, server.url)
    yield connection
    connection.close()


def fetch(connection, name, req):
    stream = fetch_features(connection, CONTAINER, name, req)
    return stream, list(stream)


def error_of(connection, name, headers):
    """Status and body of a refused GET."""
    with pytest.raises(ClientException) as err:
        connection.get_object(CONTAINER, name, headers=headers)
    return err.value.http_status, err.value.http_response_content


def object_url(base_url, conn, name=None):
    """The URL of ``name`` (or of the container) in ``conn``'s account at
    ``base_url``: the proxy's or the server's ``http://host:port``."""
    url = f"{base_url}{urllib.parse.urlsplit(conn.url).path}/{CONTAINER}"
    return f"{url}/{name}" if name else url


def good_request_works(connection):
    _, frames = fetch(connection, "small.tar", feature_request("alexnet"))
    assert sum(len(f.labels) for f in frames) == 5


async def read_stream(resp, frame_delay=0.0):
    """The frames of a HAPI response body up to its end or error frame."""
    frames = []
    while True:
        (length,) = wire.LENGTH.unpack(await resp.content.readexactly(wire.LENGTH.size))
        frames.append(wire.decode_frame(await resp.content.readexactly(length)))
        if frames[-1].kind != "batch":
            return frames
        await asyncio.sleep(frame_delay)


def hapi_headers(conn, req):
    return {**protocol.request_headers(req), "X-Auth-Token": conn.token}


# Configuration ----------------------------------------------------------------


def test_config_file_then_flags(tmp_path):
    conf = tmp_path / "server.conf"
    conf.write_text("[server]\nswift_url = http://swift-proxy.invalid:8080/\nbind_port = 9000\n"
                    "[hapi]\nmax_batch = 64\nmodels = resnet18, alexnet\n")
    config = load_config(["--config", str(conf), "--bind-port", "9001", "--max-batch", "8",
                          "--default-batch", "4"])
    assert (config.swift_url, config.bind_ip, config.bind_port) == (
        "http://swift-proxy.invalid:8080", "127.0.0.1", 9001)
    assert config.hapi.limits.max_batch == 8 and config.hapi.limits.default_batch == 4
    assert config.hapi.limits.models == ("resnet18", "alexnet")
    assert config.hapi.max_concurrent == 4 and config.shutdown_grace == 30
    conf.write_text("[hapi]\nmax_bach = 64\n")
    with pytest.raises(ValueError, match="max_bach"):
        load_config(["--config", str(conf)])
    with pytest.raises(ValueError, match="max_batch"):
        load_config(["--max-batch", "0"])


def test_bad_configuration_exits_with_a_message(tmp_path, capsys):
    assert main(["--models", "lenet"]) == 2
    assert main(["--config", str(tmp_path / "missing.conf")]) == 2
    assert main(["--default-batch", "64", "--max-batch", "32"]) == 2
    errors = capsys.readouterr().err
    assert "lenet" in errors and "missing.conf" in errors and "default_batch" in errors


@pytest.mark.parametrize("url", ["notaurl", "ftp://host/x", "http://", "http://h:8080/?q=1"])
def test_a_swift_url_that_is_not_one_is_refused(url, capsys):
    assert main(["--swift-url", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "swift_url must be" in err and repr(url) in err


def test_help_answers_without_torch_and_explains_every_option():
    """--help imports neither torch nor aiohttp (it answers at once), shows
    examples and says what each filter option means."""
    code = ("import contextlib, io, sys\n"
            "from hapi.middleware import server\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            "    server.main(['--help'])\n"
            "print(sorted(m for m in ('torch', 'aiohttp') if m in sys.modules))\n"
            "print(out.getvalue())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded, _, text = out.partition("\n")
    assert loaded == "[]"
    assert "examples:" in text and "hapi-server --swift-url http://127.0.0.1:8080" in text
    for name, meaning in OPTION_HELP.items():
        flag_text = " ".join(text.split())
        assert f"--{name.replace('_', '-')}" in flag_text
        assert " ".join(meaning.split())[:30] in flag_text, name


def test_the_example_config_holds_the_defaults():
    example = Path(__file__).parents[1] / "middleware" / "server.conf.example"
    text = example.read_text()
    for name, default in {**SERVER_DEFAULTS, **OPTION_DEFAULTS}.items():
        assert f"# {name} = {default}".rstrip() + "\n" in text, name
    assert load_config(["--config", str(example)]) == load_config([])


@pytest.mark.asyncio
async def test_swift_unreachable_is_a_502():
    """In process, with aiohttp's test utilities: nothing listens at swift_url."""
    app = HapiServer(load_config(["--swift-url", f"http://127.0.0.1:{free_port()}"])).make_app()
    async with TestClient(TestServer(app)) as client:
        headers = {**protocol.request_headers(feature_request("alexnet")), "X-Auth-Token": "t"}
        resp = await client.get("/v1/AUTH_test/c/o.tar", headers=headers)
        assert resp.status == 502
        assert (await resp.json())["error"] == "no answer from Swift: ClientConnectorError"
        resp = await client.get("/healthcheck")
        assert resp.status == 200 and await resp.text() == "OK"


# Same answers as the filter ---------------------------------------------------


def assert_same_streams(a, b):
    (stream_a, frames_a), (stream_b, frames_b) = a, b
    for header in ("content-type", *(h.lower() for h in (
            protocol.DEVICE, protocol.BATCH_USED, protocol.SAMPLES, protocol.SPLIT,
            protocol.MODEL))):
        assert stream_a.headers[header] == stream_b.headers[header], header
    assert len(frames_a) == len(frames_b)
    for x, y in zip(frames_a, frames_b, strict=True):
        assert x.keys == y.keys and torch.equal(x.labels, y.labels)
        assert x.features.dtype == y.features.dtype and torch.equal(x.features, y.features)
    assert stream_a.end.meta["samples"] == stream_b.end.meta["samples"]


@pytest.mark.parametrize("req", [
    feature_request("alexnet"),
    feature_request("resnet18", split=3, batch=4, dtype="float16"),
    feature_request("mobilenet_v3_small", split=5, batch=3, dtype="bfloat16"),
], ids=["alexnet", "resnet18-fp16", "mobilenet-bf16"])
def test_same_tensors_as_the_filter(conn, via_server, req):
    assert_same_streams(fetch(conn, "small.tar", req), fetch(via_server, "small.tar", req))


def test_object_names_are_forwarded_exactly(conn, via_server):
    name = "a dir/50% of ü+?.tar"
    conn.put_object(CONTAINER, name, write_shard(samples(3)))
    req = feature_request("alexnet")
    assert_same_streams(fetch(conn, name, req), fetch(via_server, name, req))


def test_weights_from_a_swift_object_follow_its_etag(conn, via_server):
    """The weights object is read with the caller's token; replacing it replaces the model."""
    req = feature_request("mobilenet_v3_small", weights=f"swift:{CONTAINER}/w/m.safetensors")
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        state = torchvision.models.mobilenet_v3_small().state_dict()
        conn.put_object(CONTAINER, "w/m.safetensors", st_save(state))
        expected = fetch(conn, "small.tar", req)
        got = fetch(via_server, "small.tar", req)
        assert_same_streams(expected, got)
        results.append(torch.cat([f.features for f in got[1]]))
    assert not torch.equal(*results)


# Tokens and accounts: Swift's answers come back -------------------------------


def reissued(cluster, token, issued_at):
    """``token`` as tempauth would have issued it at ``issued_at`` (a fernet token)."""
    prefix = "AUTH_zftk" if token.startswith("AUTH_zftk") else "AUTH_ftk"
    fernet = Fernet(cluster.state["fernet_key"])
    payload = fernet.decrypt(token[len(prefix):].encode())
    return prefix + fernet.encrypt_at_time(payload, int(issued_at)).decode()


@pytest.mark.parametrize("token", ["missing", "invalid", "expired"])
def test_bad_token_gets_swifts_401(swift_cluster, conn, via_server, server, token):
    headers = protocol.request_headers(feature_request("alexnet"))
    if token == "invalid":
        headers["X-Auth-Token"] = "AUTH_ftk-not-a-valid-token"
    elif token == "expired":
        conn.get_auth()
        headers["X-Auth-Token"] = reissued(swift_cluster, conn.token,
                                           time.time() - 2 * TOKEN_LIFE)
    proxy_status, proxy_body = raw_get(
        object_url(swift_cluster.proxy_url, conn, "small.tar"), headers)
    status, body = raw_get(object_url(server.url, conn, "small.tar"), headers)
    assert status == proxy_status == 401
    assert body == proxy_body and b"__metadata__" not in body
    good_request_works(via_server)


def test_reissued_token_is_otherwise_valid(swift_cluster, conn, server):
    """The control for the expired token: the same token issued now is accepted."""
    conn.get_auth()
    headers = {**protocol.request_headers(feature_request("alexnet")),
               "X-Auth-Token": reissued(swift_cluster, conn.token, time.time())}
    status, _ = raw_get(object_url(server.url, conn, "small.tar"), headers)
    assert status == 200


def test_another_accounts_token_cannot_read_the_shard(swift_cluster, conn, server):
    other = swift_cluster.connection("test2:tester2")
    other.get_auth()
    try:
        headers = hapi_headers(other, feature_request("alexnet"))
        proxy_status, proxy_body = raw_get(
            object_url(swift_cluster.proxy_url, conn, "small.tar"), headers)
        status, body = raw_get(object_url(server.url, conn, "small.tar"), headers)
        assert status == proxy_status == 403
        assert body == proxy_body
    finally:
        other.close()


def test_intermediate_connection_logs_in_again_with_swift(swift_cluster, conn, server):
    """An expired token: swiftclient gets a new one from Swift's auth and
    keeps talking to the server."""
    connection = intermediate_connection(conn, server.url)
    try:
        expired = reissued(swift_cluster, connection.token, time.time() - 2 * TOKEN_LIFE)
        connection.token = expired
        good_request_works(connection)
        assert connection.token != expired and connection.url.startswith(server.url)
    finally:
        connection.close()


# Bad input: the filter's statuses and bodies, and the server keeps serving ----


@pytest.mark.parametrize(("override", "parameter"), BAD_PARAMETERS)
def test_bad_parameter_as_the_filter(conn, via_server, override, parameter):
    headers = {**protocol.request_headers(feature_request("alexnet")), **override}
    status, body = error_of(via_server, "small.tar", headers)
    assert (status, body) == error_of(conn, "small.tar", headers)
    assert status == 400 and json.loads(body)["parameter"] == parameter
    good_request_works(via_server)


@pytest.mark.parametrize(("name", "member", "message"), BAD_SHARDS)
def test_bad_shard_as_the_filter(conn, via_server, name, member, message):
    headers = protocol.request_headers(feature_request("alexnet"))
    status, body = error_of(via_server, name, headers)
    assert (status, body) == error_of(conn, name, headers)
    doc = json.loads(body)
    assert status == 422 and doc["member"] == member and message in doc["error"]
    good_request_works(via_server)


def test_member_failing_mid_stream_as_the_filter(conn, via_server):
    """Batch 0 is fine, so the status is 200; batch 1 then ends the stream with
    an error frame naming the member."""
    images = samples(4)
    broken = Sample(images[3].key, images[3].image[:len(images[3].image) // 2], "png", 3)
    conn.put_object(CONTAINER, "late-failure.tar", write_shard([*images[:3], broken]))
    outcomes = []
    for connection in (conn, via_server):
        stream = fetch_features(connection, CONTAINER, "late-failure.tar",
                                feature_request("alexnet"))
        received = []
        with pytest.raises(wire.StreamError) as err:
            received.extend(len(frame.labels) for frame in stream)
        outcomes.append((received, err.value.status, err.value.member, str(err.value)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[1][:3] == ([2], 422, "000003.png")
    good_request_works(via_server)


def test_missing_object_is_swifts_404(conn, via_server):
    headers = protocol.request_headers(feature_request("alexnet"))
    status, body = error_of(via_server, "no-such-shard.tar", headers)
    assert (status, body) == error_of(conn, "no-such-shard.tar", headers)
    assert status == 404
    good_request_works(via_server)


def test_a_container_is_not_a_shard(swift_cluster, conn, server):
    conn.get_auth()
    headers = hapi_headers(conn, feature_request("alexnet"))
    status, body = raw_get(object_url(server.url, conn), headers)
    assert (status, body) == raw_get(object_url(swift_cluster.proxy_url, conn), headers)
    assert status == 400 and json.loads(body)["parameter"] == protocol.MODEL


def test_plain_gets_are_refused_naming_the_header(conn, via_server, server):
    conn.get_auth()
    status, body = raw_get(object_url(server.url, conn, "small.tar"),
                           {"X-Auth-Token": conn.token})
    assert status == 400 and json.loads(body)["parameter"] == protocol.MODEL
    good_request_works(via_server)


# Concurrency, backpressure, shutdown --------------------------------------------


def features_of(server_url, conn, name, req):
    connection = intermediate_connection(conn, server_url)
    try:
        _, frames = fetch(connection, name, req)
        return torch.cat([f.features for f in frames])
    finally:
        connection.close()


@pytest.mark.asyncio
async def test_concurrent_streams_complete(conn, server):
    """Concurrent first requests for a model not built yet: one build, all served."""
    req = feature_request("densenet121", batch=2, weights="seed:3")
    _, frames = fetch(conn, "small.tar", req)
    expected = torch.cat([f.features for f in frames])
    results = await asyncio.gather(*(
        asyncio.to_thread(features_of, server.url, conn, "small.tar", req)
        for _ in range(MAX_CONCURRENT)))
    assert all(torch.equal(r, expected) for r in results)


@pytest.mark.asyncio
async def test_at_capacity_then_free_again_when_readers_leave(conn, server, via_server):
    conn.get_auth()
    url = object_url(server.url, conn, BIG)
    headers = hapi_headers(conn, BIG_REQUEST)
    async with aiohttp.ClientSession() as session:
        held = [await session.get(url, headers=headers) for _ in range(MAX_CONCURRENT)]
        assert [r.status for r in held] == [200] * MAX_CONCURRENT
        async with session.get(url, headers=headers) as refused:
            assert refused.status == 503 and refused.headers["Retry-After"] == "1"
            assert await refused.json() == {"error": "HAPI is at capacity; retry later",
                                            "max_concurrent": MAX_CONCURRENT}
        for resp in held:  # readers that leave mid-stream
            resp.close()
    deadline = time.monotonic() + 30
    while True:
        try:
            await asyncio.to_thread(good_request_works, via_server)
            break
        except ClientException as err:
            assert err.http_status == 503 and time.monotonic() < deadline
            await asyncio.sleep(0.2)


async def poll_rss(server, peak, stop):
    while not stop.is_set():
        peak[0] = max(peak[0], server.rss_bytes())
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_slow_reader_does_not_grow_server_memory(conn, server):
    """A reader far slower than the server: the server's memory stays a few
    frames above its idle level, not the stream's size. A few: the frame being
    written and its copy in the socket's buffer, the next one being computed
    with its temporaries, and what the allocator keeps in each worker
    thread's arena."""
    conn.get_auth()
    url = object_url(server.url, conn, BIG)
    headers = hapi_headers(conn, BIG_REQUEST)
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=headers) as warm_up:  # same sizes, full speed
            total = len(await warm_up.read())
        baseline = server.rss_bytes()
        peak, stop = [baseline], asyncio.Event()
        poller = asyncio.create_task(poll_rss(server, peak, stop))
        async with session.get(url, headers=headers) as resp:
            body, slow_until = bytearray(), time.monotonic() + 4.0
            while time.monotonic() < slow_until:  # ~3 MB/s, the server makes > 50 MB/s
                body += await resp.content.read(64 << 10)
                await asyncio.sleep(0.02)
            slow_read, slow_peak = len(body), peak[0]
            body += await resp.read()  # the rest at full speed
        stop.set()
        await poller
    frames = list(wire.read_frames(io.BytesIO(body).read))
    growth = peak[0] - baseline
    print(f"\nstream {total / 1e6:.1f} MB in frames of {FRAME_BYTES / 1e6:.1f} MB; "
          f"read slowly {slow_read / 1e6:.1f} MB in 4 s; server RSS idle "
          f"{baseline / 1e6:.1f} MB, growth while slow {(slow_peak - baseline) / 1e6:.1f} MB, "
          f"peak growth {growth / 1e6:.1f} MB")
    assert frames[-1].kind == "end" and frames[-1].meta["samples"] == str(BIG_SAMPLES)
    assert slow_read < total / 10
    # While the reader is slow: a few frames. Afterwards, at full speed, the
    # worker threads' arenas may keep a few more; never the stream's size.
    assert slow_peak - baseline < 8 * FRAME_BYTES < total / 4
    assert growth < total / 3


def frames_via(server_url, conn, name, req):
    connection = intermediate_connection(conn, server_url)
    try:
        return fetch(connection, name, req)[1]
    finally:
        connection.close()


@pytest.mark.asyncio
async def test_torch_work_does_not_stall_other_requests(conn, server):
    """/healthcheck answers in about its idle time while frames compute; were
    the loop blocked by a frame, a probe would wait for most of that frame."""
    conn.put_object(CONTAINER, "long.tar", write_shard(samples(12, size=256, first=500)))
    req = feature_request("resnet50", batch=4, preset="imagenet-224")

    async def probe(session):
        t0 = time.perf_counter()
        async with session.get(f"{server.url}/healthcheck") as resp:
            assert resp.status == 200 and await resp.text() == "OK"
        return time.perf_counter() - t0

    async with aiohttp.ClientSession() as session:
        idle = [await probe(session) for _ in range(5)]
        extraction = asyncio.create_task(
            asyncio.to_thread(frames_via, server.url, conn, "long.tar", req))
        latencies = []
        await asyncio.sleep(0.5)
        while not extraction.done():
            latencies.append(await probe(session))
            await asyncio.sleep(0.1)
    frames = await extraction
    assert sum(len(f.labels) for f in frames) == 12
    assert len(latencies) >= 5, "extraction finished before the server could be probed"
    frame_s = min(f.timings["decode_s"] + sum(f.timings["layers_s"]) for f in frames)
    assert max(latencies) < frame_s / 2, (latencies, frame_s)
    assert statistics.median(latencies) < 20 * statistics.median(idle) + 0.02, (latencies, idle)


@pytest.mark.asyncio
async def test_sigterm_lets_streams_finish_then_ends_the_rest(swift_cluster, conn,
                                                             tmp_path):
    """In-flight streams get the grace period; one still running after it ends
    with a 503 error frame; the server stops listening at once and exits 0."""
    conn.get_auth()
    headers = hapi_headers(conn, BIG_REQUEST)
    with ServerProcess(swift_cluster.proxy_url, tmp_path, HAPI_CONF,
                       shutdown_grace=3) as process:
        url = object_url(process.url, conn, BIG)
        async with aiohttp.ClientSession() as session:
            fast = await session.get(url, headers=headers)
            stalled = await session.get(url, headers=headers)
            assert fast.status == stalled.status == 200
            process.terminate()
            stopped_at = time.monotonic()

            async def read_later():
                await asyncio.sleep(5.0)  # past the grace period, before the cancel
                return await read_stream(stalled)

            async def new_connection_refused():
                await asyncio.sleep(1.0)
                with pytest.raises(aiohttp.ClientConnectionError):
                    await session.get(f"{process.url}/healthcheck")

            fast_frames, stalled_frames, _ = await asyncio.gather(
                read_stream(fast, frame_delay=0.02), read_later(), new_connection_refused())
        returncode = await asyncio.to_thread(process.proc.wait, 30)
    assert fast_frames[-1].kind == "end"
    assert sum(len(f.labels) for f in fast_frames[:-1]) == BIG_SAMPLES
    assert stalled_frames[-1].kind == "error" and stalled_frames[-1].meta["status"] == "503"
    assert sum(len(f.labels) for f in stalled_frames[:-1]) < BIG_SAMPLES
    assert returncode == 0 and time.monotonic() - stopped_at < 20
    log = process.log_text()
    assert "outcome=complete" in log and "outcome=shutdown" in log
