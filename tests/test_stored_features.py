"""The storage-side feature cache, end to end: a real Swift whose filter keeps
features in a container of the shard's account, and the standalone server
with the same option.

Hit, miss, invalidation when the shard is overwritten or deleted, a corrupt
entry, a full cache, cross-account isolation and a reader who may read the
shard but not the cache."""

import http.client
import urllib.parse

import pytest
import torch
from helpers import ServerProcess, feature_request, samples

from hapi import protocol, wire
from hapi.shards import write_shard

CONTAINER = "cached-data"
CACHE = "hapi-feature-cache"
OPTIONS = {"threads": "1", "feature_cache_container": CACHE}
REQUEST = feature_request("alexnet", batch=2)


@pytest.fixture(scope="module")
def cluster(swift_cluster_factory):
    cluster = swift_cluster_factory("stored-features", hapi_conf=OPTIONS)
    conn = cluster.connection()
    conn.put_container(CONTAINER, headers={"X-Container-Read": "test:reader"})
    conn.close()
    return cluster


@pytest.fixture(scope="module")
def conn(cluster):
    connection = cluster.connection()
    connection.get_auth()
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    with ServerProcess(cluster.proxy_url, tmp_path_factory.mktemp("stored-server"),
                       OPTIONS) as process:
        yield process


def get(base, conn, name, req=REQUEST, token=None):
    """A feature request at the proxy (``base`` None) or the server: status,
    X-Hapi-Cache, frames."""
    url = f"{conn.url}/{CONTAINER}/{urllib.parse.quote(name)}"
    if base is not None:
        url = base + urllib.parse.urlsplit(url).path
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        connection.request("GET", parts.path, headers={**protocol.request_headers(req),
                                                       "X-Auth-Token": token or conn.token})
        resp = connection.getresponse()
        body = resp.read()
    finally:
        connection.close()
    if resp.status != 200:
        return resp.status, resp.getheader("X-Hapi-Cache"), body
    frames = [f for f in _frames(body) if f.kind == "batch"]
    return resp.status, resp.getheader("X-Hapi-Cache"), frames


def _frames(body):
    offset = 0
    while offset < len(body):
        (length,) = wire.LENGTH.unpack_from(body, offset)
        offset += wire.LENGTH.size
        yield wire.decode_frame(body[offset:offset + length])
        offset += length


def features(frames):
    return torch.cat([f.features for f in frames]), [k for f in frames for k in f.keys]


def entries(conn, name):
    return [e["name"] for e in conn.get_container(CACHE, prefix=f"{CONTAINER}/{name}/")[1]]


def test_a_second_request_is_served_from_the_cache(conn, server):
    conn.put_object(CONTAINER, "a.tar", write_shard(samples(5)))
    status, state, first = get(None, conn, "a.tar")
    assert (status, state) == (200, "miss")
    assert len(entries(conn, "a.tar")) == 1
    status, state, again = get(None, conn, "a.tar")
    assert (status, state) == (200, "hit")
    assert features(again)[1] == features(first)[1]
    assert torch.equal(features(again)[0], features(first)[0])
    # The standalone server reads the same entry with the same token.
    status, state, via_server = get(server.url, conn, "a.tar")
    assert (status, state) == (200, "hit")
    assert torch.equal(features(via_server)[0], features(first)[0])
    # Another split is another entry.
    other = feature_request("alexnet", split=3, batch=2)
    assert get(None, conn, "a.tar", other)[1] == "miss"
    assert len(entries(conn, "a.tar")) == 2


def test_overwriting_a_shard_invalidates_its_features(conn):
    conn.put_object(CONTAINER, "b.tar", write_shard(samples(4)))
    assert get(None, conn, "b.tar")[1] == "miss"
    assert get(None, conn, "b.tar")[1] == "hit"
    conn.put_object(CONTAINER, "b.tar", write_shard(samples(3, first=100)))
    status, state, frames = get(None, conn, "b.tar")
    assert (status, state) == (200, "miss")
    assert features(frames)[1] == [f"{i:06d}" for i in range(100, 103)]
    etag = conn.head_object(CONTAINER, "b.tar")["etag"]
    assert [name.split("/")[2] for name in entries(conn, "b.tar")] == [etag]
    conn.delete_object(CONTAINER, "b.tar")
    assert get(None, conn, "b.tar")[0] == 404


def test_a_corrupt_entry_is_never_used(conn):
    conn.put_object(CONTAINER, "c.tar", write_shard(samples(4)))
    _, _, fresh = get(None, conn, "c.tar")
    (entry,) = entries(conn, "c.tar")
    headers = conn.head_object(CACHE, entry)
    stored = conn.get_object(CACHE, entry)[1]
    conn.put_object(CACHE, entry, stored[:-40] + b"\0" * 40, headers={
        "X-Object-Meta-Hapi-Response": headers["x-object-meta-hapi-response"]})
    status, state, frames = get(None, conn, "c.tar")
    assert (status, state) == (200, "miss")
    assert torch.equal(features(frames)[0], features(fresh)[0])
    assert get(None, conn, "c.tar")[1] == "hit"


def test_a_caller_who_cannot_read_the_shard_gets_nothing_from_the_cache(cluster, conn):
    conn.put_object(CONTAINER, "d.tar", write_shard(samples(4)))
    assert get(None, conn, "d.tar")[1] == "miss"
    other = cluster.connection("test2:tester2")
    other.get_auth()
    try:
        status, _, body = get(None, conn, "d.tar", token=other.token)
        assert status == 403 and b"__metadata__" not in body
        # The other account's own shard of the same name has its own features.
        other.put_container(CONTAINER)
        other.put_object(CONTAINER, "d.tar", write_shard(samples(2, first=50)))
        status, state, frames = get(None, other, "d.tar")
        assert (status, state) == (200, "miss")
        assert features(frames)[1] == ["000050", "000051"]
    finally:
        other.close()


def test_a_reader_of_the_shard_alone_gets_exact_features_without_the_cache(cluster, conn):
    """test:reader may read the data container (its ACL), not the cache's."""
    conn.put_object(CONTAINER, "e.tar", write_shard(samples(4)))
    _, _, expected = get(None, conn, "e.tar")
    reader = cluster.connection("test:reader")
    reader.get_auth()
    try:
        for _ in range(2):
            status, state, frames = get(None, conn, "e.tar", token=reader.token)
            assert (status, state) == (200, "miss")
            assert torch.equal(features(frames)[0], features(expected)[0])
    finally:
        reader.close()


def test_a_full_cache_writes_no_entry(cluster, conn, tmp_path):
    conn.put_object(CONTAINER, "f.tar", write_shard(samples(4)))
    small = {**OPTIONS, "feature_cache_container": "tiny-cache",
             "feature_cache_max_bytes": "1k"}
    with ServerProcess(cluster.proxy_url, tmp_path, small) as tiny:
        for _ in range(2):
            status, state, _ = get(tiny.url, conn, "f.tar")
            assert (status, state) == (200, "miss")
        log = tiny.log_text()
    assert "features not cached: the cache container is full" in log
    assert conn.get_container("tiny-cache")[1] == []


def test_the_cache_state_is_in_every_response(swift_cluster):
    """Without the option the response says the cache is off."""
    conn = swift_cluster.connection()
    try:
        conn.put_container("no-cache")
        conn.put_object("no-cache", "g.tar", write_shard(samples(2)))
        headers, _ = conn.get_object("no-cache", "g.tar",
                                     headers=protocol.request_headers(REQUEST))
        assert headers["x-hapi-cache"] == "off"
    finally:
        conn.close()
