"""The filter and the standalone server give the same status and body for the
same request, on the corners of the protocol where they once differed: seeds
torch cannot take, seeded models built concurrently, a body Swift cuts short,
HTTP/1.0, digits of other scripts, conditional and range headers, and query
strings that change what Swift serves.

Both read from the session's Swift, whose proxy runs the filter; the server
runs as a subprocess in front of it.
"""

import concurrent.futures
import http.client
import json
import socket
import urllib.parse

import pytest
import torch
from helpers import ServerProcess, feature_request, samples, small_shard_connection

from hapi import protocol, wire, zoo
from hapi.preprocess import preprocess
from hapi.shards import read_shard, write_shard

CONTAINER = "hapi-same-answers"
HAPI_CONF = {"threads": "1", "max_concurrent": "8"}


@pytest.fixture(scope="module")
def conn(swift_cluster):
    yield from small_shard_connection(swift_cluster, CONTAINER)


@pytest.fixture(scope="module")
def server(swift_cluster, tmp_path_factory):
    with ServerProcess(swift_cluster.proxy_url, tmp_path_factory.mktemp("same-answers"),
                       HAPI_CONF) as process:
        yield process


def url_of(base_url, conn, name, query=""):
    path = urllib.parse.urlsplit(conn.url).path
    url = f"{base_url}{path}/{CONTAINER}/{urllib.parse.quote(name)}"
    return f"{url}?{query}" if query else url


def exchange(url, headers):
    """GET ``url`` with exactly ``headers`` (values may be bytes, sent as
    they are): status, headers, body."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        connection.putrequest("GET", parts.path + (f"?{parts.query}" if parts.query else ""),
                              skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        resp = connection.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        connection.close()


def both(swift_cluster, server, conn, name, headers, query=""):
    """(status, body) from the filter and from the server for the same request."""
    answers = []
    for base in (swift_cluster.proxy_url, server.url):
        status, _, body = exchange(url_of(base, conn, name, query),
                                   {**headers, "X-Auth-Token": conn.token})
        answers.append((status, body))
    return answers


def hapi(req=None, **extra):
    return {**protocol.request_headers(req or feature_request("alexnet")), **extra}


def frames_of(body):
    """The frames of a whole response body."""
    offset, frames = 0, []
    while offset < len(body):
        (length,) = wire.LENGTH.unpack_from(body, offset)
        offset += wire.LENGTH.size
        frames.append(wire.decode_frame(body[offset:offset + length]))
        offset += length
    return frames


def test_a_seed_torch_cannot_take_is_a_400_naming_the_weights(swift_cluster, server, conn):
    for seed in (str(2**64), "9" * 30, "-1"):
        filter_answer, server_answer = both(swift_cluster, server, conn, "small.tar",
                                            hapi(**{protocol.WEIGHTS: f"seed:{seed}"}))
        assert filter_answer == server_answer
        status, body = filter_answer
        assert status == 400 and json.loads(body)["parameter"] == protocol.WEIGHTS


@pytest.mark.parametrize("value", ["\uff13", "\u0663", "+3", "1_0"])
def test_integers_follow_one_rule_in_both(swift_cluster, server, conn, value):
    """Fullwidth and Arabic-Indic digits (sent as UTF-8), a sign, an
    underscore: the same 400 from both, naming the header."""
    headers = hapi(**{protocol.SPLIT: value.encode("utf-8")})
    filter_answer, server_answer = both(swift_cluster, server, conn, "small.tar", headers)
    assert filter_answer == server_answer
    status, body = filter_answer
    assert status == 400 and json.loads(body)["parameter"] == protocol.SPLIT


def test_leading_zeros_are_the_same_number(swift_cluster, server, conn):
    filter_answer, server_answer = both(swift_cluster, server, conn, "small.tar",
                                        hapi(**{protocol.SPLIT: "0003"}))
    assert filter_answer[0] == server_answer[0] == 200
    assert frames_of(filter_answer[1])[0].features.shape == \
        frames_of(server_answer[1])[0].features.shape


def test_conditional_headers_answer_as_swift_does(swift_cluster, server, conn):
    etag = conn.head_object(CONTAINER, "small.tar")["etag"]
    cases = [({"If-Match": '"0123456789abcdef0123456789abcdef"'}, 412),
             ({"If-None-Match": f'"{etag}"'}, 304),
             ({"If-Match": f'"{etag}"'}, 200),
             ({"If-Modified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"}, 200),
             ({"If-Unmodified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"}, 412)]
    for extra, expected in cases:
        filter_answer, server_answer = both(swift_cluster, server, conn, "small.tar",
                                            hapi(**extra))
        assert filter_answer[0] == server_answer[0] == expected, extra
        if expected != 200:
            assert filter_answer[1] == server_answer[1]
            assert b"__metadata__" not in filter_answer[1]


def test_a_range_is_a_400_naming_it(swift_cluster, server, conn):
    filter_answer, server_answer = both(swift_cluster, server, conn, "small.tar",
                                        hapi(Range="bytes=0-99"))
    assert filter_answer == server_answer
    status, body = filter_answer
    assert status == 400 and json.loads(body)["parameter"] == "Range"


def put_slo(conn, name, shard):
    """A static large object ``name`` of three segments holding ``shard``."""
    third = len(shard) // 3
    parts = [shard[:third], shard[third:2 * third], shard[2 * third:]]
    manifest = []
    for i, part in enumerate(parts):
        segment = f"segments/{name}/{i:02d}"
        conn.put_object(CONTAINER, segment, part)
        manifest.append({"path": f"/{CONTAINER}/{segment}", "etag": None, "size_bytes": None})
    conn.put_object(CONTAINER, name, json.dumps(manifest),
                    query_string="multipart-manifest=put")
    return name


@pytest.fixture(scope="module")
def slo(conn):
    return put_slo(conn, "slo.tar", write_shard(samples(6, size=24)))


def test_a_manifest_asked_for_as_itself_is_no_shard_in_both(swift_cluster, server, conn, slo):
    """``?multipart-manifest=get`` serves the SLO's JSON manifest, not its
    content: both front ends read that, and both refuse it as a shard."""
    plain = both(swift_cluster, server, conn, slo, hapi())
    assert plain[0][0] == plain[1][0] == 200
    filter_answer, server_answer = both(swift_cluster, server, conn, slo, hapi(),
                                        query="multipart-manifest=get")
    assert filter_answer == server_answer
    assert filter_answer[0] == 422


def test_a_symlink_asked_for_as_itself_is_no_shard_in_both(swift_cluster, server, conn):
    conn.put_object(CONTAINER, "link.tar", b"", content_type="application/symlink",
                    headers={"X-Symlink-Target": f"{CONTAINER}/small.tar"})
    followed = both(swift_cluster, server, conn, "link.tar", hapi())
    assert followed[0][0] == followed[1][0] == 200
    filter_answer, server_answer = both(swift_cluster, server, conn, "link.tar", hapi(),
                                        query="symlink=get")
    assert filter_answer == server_answer
    assert filter_answer[0] == 422


def test_a_body_cut_short_by_swift_is_a_storage_failure(swift_cluster, server, conn):
    """An SLO whose middle segment is gone: Swift sends the first segment and
    stops. That is a 502 (retried by the trainer), not a 422 for the shard."""
    put_slo(conn, "cut.tar", write_shard(samples(6, size=24)))
    conn.delete_object(CONTAINER, "segments/cut.tar/01")
    filter_answer, server_answer = both(swift_cluster, server, conn, "cut.tar", hapi())
    assert filter_answer == server_answer
    status, body = filter_answer
    assert status == 502 and "broke off" in json.loads(body)["error"]


def http10_get(url, headers):
    """A GET over HTTP/1.0, read until the server closes: status line, body."""
    parts = urllib.parse.urlsplit(url)
    lines = [f"GET {parts.path} HTTP/1.0", f"Host: {parts.hostname}:{parts.port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((parts.hostname, parts.port), timeout=120) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), head.decode().lower(), body


def test_http_1_0_gets_a_whole_stream_ended_by_closing(swift_cluster, server, conn):
    headers = {**hapi(feature_request("alexnet", batch=2)), "X-Auth-Token": conn.token}
    results = []
    for base in (swift_cluster.proxy_url, server.url):
        status_line, head, body = http10_get(url_of(base, conn, "small.tar"), headers)
        assert " 200 " in status_line, (base, status_line, body[:300])
        assert "transfer-encoding: chunked" not in head
        frames = frames_of(body)
        assert [f.kind for f in frames] == ["batch"] * 3 + ["end"]
        results.append(torch.cat([f.features for f in frames[:-1]]))
    assert torch.equal(*results)


SEEDED = [("resnet18", 51), ("alexnet", 52), ("mobilenet_v3_small", 53), ("densenet121", 54)]


def test_seeded_models_built_concurrently_are_exact(swift_cluster, conn, tmp_path):
    """Eight requests at once, two per (model, seed), each model built for
    the first time in a fresh server: every frame equals torch.manual_seed(n)
    and the model built alone, and so does a later request (the cache)."""
    images = read_shard(conn.get_object(CONTAINER, "small.tar")[1])
    with ServerProcess(swift_cluster.proxy_url, tmp_path, HAPI_CONF) as fresh:
        def features(model, seed):
            req = feature_request(model, split=2, batch=5, weights=f"seed:{seed}")
            status, _, body = exchange(url_of(fresh.url, conn, "small.tar"),
                                       {**hapi(req), "X-Auth-Token": conn.token})
            assert status == 200, body[:300]
            return frames_of(body)[0].features

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda case: features(*case), SEEDED * 2))
        later = [features(model, seed) for model, seed in SEEDED]
    for (model, seed), first, second, cached in zip(SEEDED, got[:4], got[4:], later,
                                                     strict=True):
        expected = zoo.build_model(model, seed=seed)(
            preprocess([s.image for s in images], "imagenet-64", model), 0, 2)
        for tensor in (first, second, cached):
            torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6)


def test_layer_costs_are_served_once_a_model_has_run(swift_cluster, server, conn):
    """Each front end measures the layers on its own device the first time
    a model runs at a preset size and storage batch, and serves the figures
    at /hapi/costs, so a trainer can choose its split before it asks for
    features. Bad parameters are 400s naming them."""
    req = feature_request("resnet18", batch=3, preset="imagenet-64")
    query = "model=resnet18&preset=imagenet-64&batch=3"
    for base in (swift_cluster.proxy_url, server.url):
        status, _, body = exchange(f"{base}{protocol.COSTS_PATH}?{query}", {})
        assert status == 404 and "has not run" in json.loads(body)["error"]
        for bad, parameter in (("model=lenet&batch=3", "model"),
                               ("model=resnet18&batch=0", "batch"),
                               ("model=resnet18&batch=3&preset=huge", "preset")):
            status, _, body = exchange(f"{base}{protocol.COSTS_PATH}?{bad}", {})
            assert status == 400 and json.loads(body)["parameter"] == parameter
        status, _, body = exchange(url_of(base, conn, "small.tar"),
                                   {**hapi(req), "X-Auth-Token": conn.token})
        assert status == 200
        status, _, body = exchange(f"{base}{protocol.COSTS_PATH}?{query}", {})
        doc = json.loads(body)
        assert status == 200 and doc["device"] == "cpu"
        assert len(doc["layers_s_per_sample"]) == len(zoo.build_model("resnet18", seed=0))
        assert all(seconds > 0 for seconds in doc["layers_s_per_sample"])
