"""Swift's object versioning (X-Versions-Enabled, ?version-id=) in the one-node
cluster's pipeline, through the HAPI filter and through the standalone
server: a feature request reads the version it names."""

import http.client
import io
import urllib.parse

from helpers import ServerProcess, feature_request, png

from hapi import protocol, wire
from hapi.shards import Sample, write_shard

CONTAINER = "test-versioning"
REQUEST = feature_request("mobilenet_v3_small")


def shard(keys, label):
    return write_shard([Sample(key, png(index), "png", label) for index, key in enumerate(keys)])


def features_get(conn, name, query="", base_url=None):
    """A feature request for ``name`` (with ``query``) to the proxy, or to
    ``base_url`` (the server's): its frames."""
    parts = urllib.parse.urlsplit(f"{conn.url}/{CONTAINER}/{name}")
    if base_url is not None:
        parts = urllib.parse.urlsplit(base_url + parts.path)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        connection.request("GET", parts.path + (f"?{query}" if query else ""),
                           headers={**protocol.request_headers(REQUEST),
                                    "X-Auth-Token": conn.token})
        resp = connection.getresponse()
        body = resp.read()
    finally:
        connection.close()
    assert resp.status == 200, body
    return list(wire.read_frames(io.BytesIO(body).read))


def keys_and_labels(frames):
    keys = [key for frame in frames if frame.kind == "batch" for key in frame.keys]
    labels = [label for frame in frames if frame.kind == "batch"
              for label in frame.labels.tolist()]
    return keys, labels


def test_feature_request_reads_the_version_it_names(swift_conn, swift_cluster, tmp_path):
    assert "object_versioning" in swift_conn.get_capabilities()
    swift_conn.put_container(CONTAINER, headers={"X-Versions-Enabled": "true"})
    old, new = {}, {}
    swift_conn.put_object(CONTAINER, "data.tar", shard(["a0", "a1"], 3), response_dict=old)
    swift_conn.put_object(CONTAINER, "data.tar", shard(["b0", "b1", "b2"], 7), response_dict=new)
    old_id = old["headers"]["x-object-version-id"]
    assert old_id != new["headers"]["x-object-version-id"]
    swift_conn.get_auth()

    with ServerProcess(swift_cluster.proxy_url, tmp_path, {"threads": "1"}) as server:
        for base_url in (None, server.url):
            assert keys_and_labels(features_get(swift_conn, "data.tar", base_url=base_url)) == (
                ["b0", "b1", "b2"], [7] * 3)
            assert keys_and_labels(features_get(swift_conn, "data.tar", f"version-id={old_id}",
                                                base_url)) == (["a0", "a1"], [3, 3])

