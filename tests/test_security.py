"""Access control: a feature request gets exactly what a plain GET of the same
object would, through the filter and through the standalone server; names
in requests cannot reach outside what the operator configured; nothing from
the network is unpickled; tokens and temp URL signatures never reach a log.

Every check asks the three doors of the session's Swift the same question:
a plain GET at the proxy, a feature request at the proxy (the filter), and
the same feature request at the standalone server, which forwards the
caller's token to that proxy.
"""

import asyncio
import hashlib
import hmac
import http.client
import io
import json
import logging
import os
import secrets
import time
import urllib.parse
import uuid

import pytest
import torch
import torchvision
from aiohttp.test_utils import TestClient, TestServer
from helpers import ServerProcess, feature_request, samples
from safetensors.torch import save as st_save

from hapi import protocol, wire
from hapi.middleware.server import load_config
from hapi.middleware.server_app import HapiServer
from hapi.shards import write_shard

MODEL = "mobilenet_v3_small"
REQUEST = feature_request(MODEL, weights="seed:0")
SHARD = write_shard(samples(2))
# Containers of AUTH_test and who may read them (X-Container-Read).
CONTAINERS = {
    "sec-private": None,
    "sec-reader": "test:reader",
    "sec-test2": "test2:tester2",
    "sec-public": ".r:*",
}
TEMPURL_KEY = secrets.token_hex(16)


def mobilenet_weights(seed):
    """A torchvision-keyed state dict of mobilenet_v3_small, as safetensors bytes."""
    torch.manual_seed(seed)
    return st_save(torchvision.models.mobilenet_v3_small().state_dict())


WEIGHTS = mobilenet_weights(1)


# Fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin(swift_cluster):
    """test:tester, admin of AUTH_test: the containers, their shard and weights."""
    conn = swift_cluster.connection()
    for container, reader in CONTAINERS.items():
        conn.put_container(container, headers={"X-Container-Read": reader or ""})
        conn.put_object(container, "s.tar", SHARD)
        conn.put_object(container, "w.safetensors", WEIGHTS)
    conn.post_account({"X-Account-Meta-Temp-URL-Key": TEMPURL_KEY})
    conn.get_auth()
    yield conn
    conn.close()


def token_of(cluster, user):
    conn = cluster.connection(user)
    try:
        return conn.get_auth()[1]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def tokens(swift_cluster, admin):
    return {"admin": admin.token, "reader": token_of(swift_cluster, "test:reader"),
            "test2": token_of(swift_cluster, "test2:tester2"), "anonymous": None}


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """The standalone server's weights_dir: one file, and a symlink out of it."""
    root = tmp_path_factory.mktemp("security-weights")
    inside = root / "weights"
    inside.mkdir()
    (inside / "ok.safetensors").write_bytes(WEIGHTS)
    (root / "secret.safetensors").write_bytes(WEIGHTS)
    os.symlink("../secret.safetensors", inside / "escape.safetensors")
    return inside


@pytest.fixture(scope="module")
def server(swift_cluster, weights_dir, tmp_path_factory):
    conf = {"threads": "1", "weights_dir": str(weights_dir)}
    with ServerProcess(swift_cluster.proxy_url, tmp_path_factory.mktemp("security-server"),
                       conf) as process:
        yield process


@pytest.fixture(scope="module")
def doors(swift_cluster, server, admin):
    return Doors(swift_cluster.proxy_url, server.url,
                 urllib.parse.urlsplit(admin.url).path)


class Doors:
    """Ask the same question at the three doors; object paths are relative
    to AUTH_test, the account of every object here."""

    def __init__(self, proxy_url, server_url, account_path):
        self.proxy_url, self.server_url, self.account_path = proxy_url, server_url, account_path

    def path(self, obj, query=""):
        return f"{self.account_path}/{obj}" + (f"?{query}" if query else "")

    def plain(self, obj, token=None, query=""):
        return raw_get(self.proxy_url + self.path(obj, query), auth(token))

    def filter(self, obj, token=None, req=REQUEST, query="", **overrides):
        return raw_get(self.proxy_url + self.path(obj, query), hapi(token, req, overrides))

    def server(self, obj, token=None, req=REQUEST, query="", **overrides):
        return raw_get(self.server_url + self.path(obj, query), hapi(token, req, overrides))

    def all(self, obj, token=None, req=REQUEST, query="", **overrides):
        return {"plain": self.plain(obj, token, query),
                "filter": self.filter(obj, token, req, query, **overrides),
                "server": self.server(obj, token, req, query, **overrides)}


def raw_get(url, headers):
    """A GET of ``url``, query string included, with exactly ``headers``: status, body."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("GET", f"{parts.path}?{parts.query}" if parts.query else parts.path,
                           headers=headers)
        resp = connection.getresponse()
        return resp.status, resp.read()
    finally:
        connection.close()


def auth(token):
    return {"X-Auth-Token": token} if token else {}


def hapi(token, req, overrides):
    return {**auth(token), **protocol.request_headers(req), **overrides}


def samples_in(body):
    frames = list(wire.read_frames(io.BytesIO(body).read))
    assert frames[-1].kind == "end"
    return sum(len(f.keys) for f in frames[:-1])


def assert_access(answers, status):
    """Every door answered ``status``; a refusal is Swift's own, word for word."""
    assert {door: s for door, (s, _) in answers.items()} == dict.fromkeys(answers, status)
    if status == 200:
        assert answers["plain"][1] == SHARD
        assert samples_in(answers["filter"][1]) == samples_in(answers["server"][1]) == 2
    else:
        bodies = {body for _, body in answers.values()}
        assert len(bodies) == 1 and b"__metadata__" not in bodies.pop()


def weights(obj):
    return {protocol.WEIGHTS: f"swift:{obj}"}


def assert_weights_refused(body, status):
    doc = json.loads(body)
    assert doc["parameter"] == protocol.WEIGHTS and f"{status} " in doc["error"], doc


# Container ACLs, accounts, anonymous callers -----------------------------------------


def test_reader_gets_in_exactly_when_the_container_acl_says(admin, doors, tokens):
    container = f"sec-acl-{uuid.uuid4().hex[:8]}"
    admin.put_container(container)
    admin.put_object(container, "s.tar", SHARD)
    obj = f"{container}/s.tar"
    assert_access(doors.all(obj, tokens["reader"]), 403)
    admin.post_container(container, {"X-Container-Read": "test:reader"})
    assert_access(doors.all(obj, tokens["reader"]), 200)
    admin.post_container(container, {"X-Container-Read": ""})  # the model stays cached
    assert_access(doors.all(obj, tokens["reader"]), 403)


@pytest.mark.parametrize(("user", "container", "status"), [
    ("test2", "sec-private", 403),
    ("test2", "sec-reader", 403),
    ("test2", "sec-test2", 200),
    ("reader", "sec-test2", 403),
    ("anonymous", "sec-private", 401),
    ("anonymous", "sec-reader", 401),
    ("anonymous", "sec-public", 200),
    ("reader", "sec-public", 200),
    ("admin", "sec-private", 200),
])
def test_same_access_as_a_plain_get(doors, tokens, user, container, status):
    """Other accounts, users without rights, anonymous callers, public containers."""
    assert_access(doors.all(f"{container}/s.tar", tokens[user]), status)


def test_a_symlink_does_not_widen_access(admin, doors, tokens):
    admin.put_object("sec-reader", "link.tar", b"",
                     headers={"X-Symlink-Target": "sec-private/s.tar"})
    reader = doors.all("sec-reader/link.tar", tokens["reader"])
    assert reader["plain"][0] in (401, 403)
    assert_access(reader, reader["plain"][0])
    assert_access(doors.all("sec-reader/link.tar", tokens["admin"]), 200)


# Weights are read with the caller's access -----------------------------------------


@pytest.mark.parametrize(("user", "shard", "weights_obj", "status"), [
    ("reader", "sec-reader", "sec-private/w.safetensors", 403),
    ("reader", "sec-reader", "sec-reader/w.safetensors", 200),
    ("test2", "sec-test2", "sec-private/w.safetensors", 403),
    ("test2", "sec-test2", "sec-test2/w.safetensors", 200),
    ("anonymous", "sec-public", "sec-private/w.safetensors", 401),
    ("anonymous", "sec-public", "sec-public/w.safetensors", 200),
])
def test_weights_are_read_with_the_callers_access(doors, tokens, user, shard, weights_obj,
                                                  status):
    token = tokens[user]
    assert doors.plain(weights_obj, token)[0] == status  # what a plain GET of them gets
    answers = {door: getattr(doors, door)(f"{shard}/s.tar", token, **weights(weights_obj))
               for door in ("filter", "server")}
    assert {door: s for door, (s, _) in answers.items()} == dict.fromkeys(answers, status)
    if status == 200:
        assert all(samples_in(body) == 2 for _, body in answers.values())
    else:
        assert answers["filter"][1] == answers["server"][1]
        assert_weights_refused(answers["filter"][1], status)


# Temp URLs ---------------------------------------------------------------------------


def temp_url_query(doors, obj, expires=None, method="GET", prefix=None, key=TEMPURL_KEY):
    """Swift's temp URL query for ``obj`` (or, with ``prefix``, for the
    objects of its container under that prefix), signed with HMAC-SHA256."""
    expires = int(time.time() + 300) if expires is None else expires
    container = obj.partition("/")[0]
    signed = doors.path(obj) if prefix is None else \
        f"prefix:{doors.path(container)}/{prefix}"
    sig = hmac.new(key.encode(), f"{method}\n{expires}\n{signed}".encode(),
                   hashlib.sha256).hexdigest()
    query = {"temp_url_sig": sig, "temp_url_expires": str(expires)}
    if prefix is not None:
        query["temp_url_prefix"] = prefix
    return urllib.parse.urlencode(query)


def test_a_valid_temp_url_works_through_the_filter(doors):
    query = temp_url_query(doors, "sec-private/s.tar")
    assert doors.plain("sec-private/s.tar", query=query) == (200, SHARD)
    status, body = doors.filter("sec-private/s.tar", query=query)
    assert status == 200 and samples_in(body) == 2


def test_the_server_takes_tokens_not_temp_urls(doors):
    """The server forwards the caller's token only: a temp URL opens nothing
    through it (Swift would see the server's address, not the caller's)."""
    query = temp_url_query(doors, "sec-private/s.tar")
    status, body = doors.server("sec-private/s.tar", query=query)
    assert status == 401 and b"__metadata__" not in body


@pytest.mark.parametrize("flaw", ["wrong signature", "expired", "signed for PUT", "other key",
                                  "other object"])
def test_an_invalid_temp_url_gets_tempurls_401(doors, flaw):
    obj = "sec-private/s.tar"
    query = {
        "wrong signature": lambda: temp_url_query(doors, obj).replace("temp_url_sig=",
                                                                      "temp_url_sig=0"),
        "expired": lambda: temp_url_query(doors, obj, expires=int(time.time()) - 10),
        "signed for PUT": lambda: temp_url_query(doors, obj, method="PUT"),
        "other key": lambda: temp_url_query(doors, obj, key="not-the-key"),
        "other object": lambda: temp_url_query(doors, "sec-private/w.safetensors"),
    }[flaw]()
    plain = doors.plain(obj, query=query)
    assert plain[0] == 401 and b"Temp URL invalid" in plain[1]
    assert doors.filter(obj, query=query) == plain


@pytest.mark.parametrize(("prefix", "weights_obj", "status"), [
    (None, "sec-private/w.safetensors", 401),  # signed for the shard only
    ("", "sec-private/w.safetensors", 200),    # signed for the whole container
    ("s", "sec-private/w.safetensors", 401),   # a prefix the weights are not under
    ("", "sec-reader/w.safetensors", 401),     # another container
    ("", "sec-public/w.safetensors", 401),     # another container, even a public one
])
def test_temp_url_weights_reach_only_where_the_signature_does(doors, prefix, weights_obj,
                                                              status):
    """A feature request with a temp URL reads ``swift:`` weights exactly when
    a plain GET of the weights with the same signature would succeed."""
    query = temp_url_query(doors, "sec-private/s.tar", prefix=prefix)
    assert doors.plain("sec-private/s.tar", query=query)[0] == 200
    plain = doors.plain(weights_obj, query=query)
    assert plain[0] == status
    got, body = doors.filter("sec-private/s.tar", query=query, **weights(weights_obj))
    assert got == status
    if status == 200:
        assert samples_in(body) == 2
    else:
        assert_weights_refused(body, status)


# Names cannot reach outside what the operator configured -----------------------------


@pytest.mark.parametrize(("header", "value"), [
    (protocol.MODEL, "../../etc/passwd"),
    (protocol.MODEL, "/etc/passwd"),
    (protocol.MODEL, "alexnet/../vgg11"),
    (protocol.PRESET, "../../etc/passwd"),
    (protocol.PRESET, "imagenet-64/../../x"),
    (protocol.DTYPE, "../float32"),
    (protocol.WEIGHTS, "file:../secret.safetensors"),
    (protocol.WEIGHTS, "file:/etc/passwd"),
    (protocol.WEIGHTS, "file:sub/../ok.safetensors"),
    (protocol.WEIGHTS, "file:escape.safetensors"),  # a symlink out of weights_dir
    (protocol.WEIGHTS, "file:.hidden"),
    (protocol.WEIGHTS, "swift:../../AUTH_test2/sec-test2/w.safetensors"),
    (protocol.WEIGHTS, "swift:sec-public/../../AUTH_test2/w.safetensors"),
    (protocol.WEIGHTS, "swift:/AUTH_test2/sec-test2/w.safetensors"),
    (protocol.WEIGHTS, "swift:%2e%2e/AUTH_test2/sec-test2/w.safetensors"),
    (protocol.WEIGHTS, "swift:sec-public/w.safetensors?multipart-manifest=get"),
    (protocol.WEIGHTS, "pretrained/../../x"),
])
def test_names_cannot_escape(doors, tokens, header, value):
    """400 naming the header, at both doors; the filter has no weights_dir,
    the server has one (holding ok.safetensors and a symlink out of it)."""
    for door in (doors.filter, doors.server):
        status, body = door("sec-private/s.tar", tokens["admin"], **{header: value})
        assert status == 400, (door.__name__, body)
        assert json.loads(body)["parameter"] == header, (door.__name__, body)


def test_the_servers_weights_dir_serves_its_own_files(doors, tokens):
    """The control for the file: cases above."""
    status, body = doors.server("sec-private/s.tar", tokens["admin"],
                                **{protocol.WEIGHTS: "file:ok.safetensors"})
    assert status == 200 and samples_in(body) == 2


class Payload:
    """Pickles to a call of os.system: what a hostile weights object carries."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_nothing_from_the_network_is_unpickled(admin, doors, tmp_path):
    marker = tmp_path / "unpickled"
    buf = io.BytesIO()
    torch.save({"features.0.0.weight": Payload(f"touch {marker}")}, buf)
    admin.put_object("sec-private", "evil.pth", buf.getvalue())
    for door in (doors.filter, doors.server):
        status, body = door("sec-private/s.tar", admin.token,
                            **weights("sec-private/evil.pth"))
        assert status == 400 and json.loads(body)["parameter"] == protocol.WEIGHTS
    assert not marker.exists()


# Logs ----------------------------------------------------------------------------------


def cluster_logs(cluster):
    return {path.name: path.read_text(errors="replace") for path in cluster.log_dir.glob("*.log")}


def test_tokens_never_reach_a_log(swift_cluster, server, doors, tokens):
    """Requests that succeed and fail, with every caller's token and a forged
    one, at the three doors; then no log of the cluster or the server holds
    a token. (Swift's proxy-logging shows a token's first 16 characters,
    its reveal_sensitive_prefix.)"""
    forged = "AUTH_ftk" + secrets.token_hex(40)
    used = [t for t in tokens.values() if t] + [forged]
    for token in used:
        for obj in ("sec-private/s.tar", "sec-test2/s.tar", "sec-private/nothing.tar"):
            doors.all(obj, token)
            doors.filter(obj, token, **weights("sec-private/w.safetensors"))
            doors.server(obj, token, **weights("sec-private/w.safetensors"))
            doors.server(obj, token, **{protocol.SPLIT: "x"})
    logs = cluster_logs(swift_cluster)
    logs["server.log"] = server.log_text()
    assert "outcome=complete" in logs["proxy.log"] and "refused 403" in logs["proxy.log"]
    assert "outcome=complete" in logs["server.log"] and "refused 400" in logs["server.log"]
    for token in used:
        for name, text in logs.items():
            assert token not in text and token[16:] not in text, name


def test_feature_requests_keep_temp_url_signatures_out_of_logs(swift_cluster, server, doors):
    """Swift's proxy-logging shortens a temp URL's signature, but its backend
    requests carry the full query string in their Referer, which the object
    server logs (for any plain GET with a temp URL). The filter's reads of
    the shard and weights leave the signature out; the server logs no query."""
    signatures = []
    expires = int(time.time()) + 3000  # signatures no other test used
    for prefix in (None, ""):
        query = temp_url_query(doors, "sec-private/s.tar", expires=expires, prefix=prefix)
        signatures.append(urllib.parse.parse_qs(query)["temp_url_sig"][0])
        for extra in ({}, weights("sec-private/w.safetensors"), {protocol.BATCH: "0"}):
            doors.filter("sec-private/s.tar", query=query, **extra)
            doors.server("sec-private/s.tar", query=query, **extra)
    logs = cluster_logs(swift_cluster)
    logs["server.log"] = server.log_text()
    assert "outcome=complete" in logs["proxy.log"]
    for signature in signatures:
        for name, text in logs.items():
            assert signature not in text and signature[16:] not in text, name


@pytest.mark.asyncio
async def test_a_broken_swift_answer_does_not_log_the_token(caplog):
    """A malformed HTTP answer from Swift (or anything between) is a 502; its
    log line names the error, not the request that carried the token."""
    async def broken_swift(reader, writer):
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n")
        await writer.drain()
        writer.close()

    swift = await asyncio.start_server(broken_swift, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{swift.sockets[0].getsockname()[1]}"
    token = "AUTH_tk" + secrets.token_hex(32)
    caplog.set_level(logging.INFO)
    app = HapiServer(load_config(["--swift-url", url, "--models", MODEL])).make_app()
    try:
        async with TestClient(TestServer(app)) as client:
            resp = await client.get("/v1/AUTH_test/c/o.tar",
                                    headers={**protocol.request_headers(REQUEST),
                                             "X-Auth-Token": token})
            assert resp.status == 502
            assert (await resp.json())["error"] == "no answer from Swift: ClientResponseError"
    finally:
        swift.close()
        await swift.wait_closed()
    assert "no answer from Swift: ClientResponseError" in caplog.text
    assert token not in caplog.text and token[8:] not in caplog.text
