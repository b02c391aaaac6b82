"""Plain Swift traffic is unaffected by the HAPI filter (docs/DESIGN.md, "Swift is untouched").

Each case runs the same requests against the session's cluster (filter in the
pipeline) and against a cluster without the filter, and compares status,
headers and body of every response, once the per-request values (transaction
ids, dates, timestamps, multipart boundaries) are taken out. Each case works
in its own container; account-wide headers are compared only for the
metadata these tests set, as other tests share the account.
"""

import hashlib
import json
import re
from typing import NamedTuple
from urllib.parse import quote

import pytest
from swiftclient.client import http_connection

VOLATILE_HEADERS = {
    "x-trans-id", "x-openstack-request-id", "date", "last-modified", "x-timestamp",
    "x-put-timestamp", "x-copied-from-last-modified",
    "x-manifest-etag",  # hash of the stored SLO manifest, which holds segment dates
}
OWN_ACCOUNT_META = "x-account-meta-passthrough"
BOUNDARY = re.compile(rb"boundary=([0-9a-f]+)")
XML_LAST_MODIFIED = re.compile(rb"<last_modified>[^<]*</last_modified>")

BODY = bytes(range(256)) * 4
BODY_ETAG = hashlib.md5(BODY).hexdigest()
SEGMENTS = {"seg/1": b"a" * 10, "seg/2": b"b" * 7}


class Step(NamedTuple):
    """One request; ``{c}`` in path or body stands for the case's container."""

    method: str
    path: str
    status: int
    headers: dict | None = None
    body: bytes | str | None = None


def put_segments():
    return [Step("PUT", f"{{c}}/{name}", 201, body=data) for name, data in SEGMENTS.items()]


SLO_MANIFEST = json.dumps([
    {"path": f"/{{c}}/{name}", "etag": hashlib.md5(data).hexdigest(), "size_bytes": len(data)}
    for name, data in SEGMENTS.items()
])

CASES = {
    "object_lifecycle": [
        Step("PUT", "{c}", 201),
        Step("PUT", "{c}/obj", 201, {"Content-Type": "text/plain",
                                     "X-Object-Meta-Color": "blue"}, BODY),
        Step("GET", "{c}/obj", 200),
        Step("HEAD", "{c}/obj", 200),
        Step("DELETE", "{c}/obj", 204),
        Step("GET", "{c}/obj", 404),
        Step("HEAD", "{c}/obj", 404),
        Step("DELETE", "{c}/obj", 404),
        Step("DELETE", "{c}", 204),
        Step("HEAD", "{c}", 404),
    ],
    "conditional": [
        Step("PUT", "{c}", 201),
        Step("PUT", "{c}/obj", 201, {"ETag": BODY_ETAG}, BODY),
        Step("PUT", "{c}/bad-etag", 422, {"ETag": "0" * 32}, BODY),
        Step("GET", "{c}/obj", 304, {"If-None-Match": BODY_ETAG}),
        Step("GET", "{c}/obj", 412, {"If-Match": "0" * 32}),
        Step("GET", "{c}/obj", 200, {"If-Match": BODY_ETAG}),
    ],
    "ranges": [
        Step("PUT", "{c}", 201),
        Step("PUT", "{c}/obj", 201, body=BODY),
        Step("GET", "{c}/obj", 206, {"Range": "bytes=0-9"}),
        Step("GET", "{c}/obj", 206, {"Range": "bytes=-5"}),
        Step("GET", "{c}/obj", 206, {"Range": "bytes=1000-"}),
        Step("GET", "{c}/obj", 206, {"Range": "bytes=0-1,5-6,1020-"}),
        Step("GET", "{c}/obj", 416, {"Range": "bytes=5000-6000"}),
        Step("HEAD", "{c}/obj", 200, {"Range": "bytes=0-9"}),
    ],
    "listings": [
        Step("PUT", "{c}", 201),
        *[Step("PUT", f"{{c}}/{name}", 201, body=name.encode())
          for name in ("a", "b/1", "b/2", "c", "ünïcode")],
        Step("GET", "{c}", 200),
        Step("GET", "{c}?format=json", 200),
        Step("GET", "{c}?format=xml", 200),
        Step("GET", "{c}", 200, {"Accept": "application/json"}),
        Step("GET", "{c}?prefix=b/&delimiter=/&format=json", 200),
        Step("GET", "{c}?delimiter=/", 200),
        Step("GET", "{c}?limit=2&marker=a", 200),
        Step("GET", "{c}?reverse=on&format=json", 200),
        Step("GET", "?prefix={c}", 200),
        Step("GET", "?prefix={c}&format=json", 200),
        Step("HEAD", "{c}", 204),
    ],
    "metadata": [
        Step("PUT", "{c}", 201, {"X-Container-Meta-Owner": "alice"}),
        Step("POST", "{c}", 204, {"X-Container-Meta-Extra": "1"}),
        Step("HEAD", "{c}", 204),
        Step("PUT", "{c}/obj", 201, {"X-Object-Meta-First": "1",
                                     "Content-Disposition": "inline"}, BODY),
        Step("POST", "{c}/obj", 202, {"X-Object-Meta-Second": "2",
                                      "Content-Type": "image/png"}),
        Step("HEAD", "{c}/obj", 200),
        Step("GET", "{c}/obj", 200),
        Step("POST", "", 204, {f"{OWN_ACCOUNT_META}-color": "green"}),
        Step("HEAD", "", 204),
    ],
    "copy": [
        Step("PUT", "{c}", 201),
        Step("PUT", "{c}/src", 201, {"X-Object-Meta-Origin": "src",
                                     "Content-Type": "text/csv"}, BODY),
        Step("COPY", "{c}/src", 201, {"Destination": "{c}/dst"}),
        Step("GET", "{c}/dst", 200),
        Step("PUT", "{c}/dst2", 201, {"X-Copy-From": "{c}/src", "X-Fresh-Metadata": "true",
                                      "X-Object-Meta-New": "yes"}),
        Step("HEAD", "{c}/dst2", 200),
        Step("COPY", "{c}/missing", 404, {"Destination": "{c}/dst3"}),
        Step("GET", "{c}?format=json", 200),
    ],
    "large_objects": [
        Step("PUT", "{c}", 201),
        *put_segments(),
        Step("PUT", "{c}/dlo", 201, {"X-Object-Manifest": "{c}/seg/"}, b""),
        Step("GET", "{c}/dlo", 200),
        Step("HEAD", "{c}/dlo", 200),
        Step("GET", "{c}/dlo", 206, {"Range": "bytes=8-12"}),
        Step("PUT", "{c}/slo?multipart-manifest=put", 201, body=SLO_MANIFEST),
        Step("GET", "{c}/slo", 200),
        Step("GET", "{c}/slo", 206, {"Range": "bytes=8-12"}),
        Step("GET", "{c}/slo?multipart-manifest=get", 200),
        Step("DELETE", "{c}/slo?multipart-manifest=delete", 200),
        Step("GET", "{c}?format=json", 200),
    ],
    "symlink": [
        Step("PUT", "{c}", 201),
        Step("PUT", "{c}/target", 201, body=BODY),
        Step("PUT", "{c}/link", 201, {"X-Symlink-Target": "{c}/target"}, b""),
        Step("GET", "{c}/link", 200),
        Step("HEAD", "{c}/link?symlink=get", 200),
        Step("PUT", "{c}/dangling", 201, {"X-Symlink-Target": "{c}/nothing"}, b""),
        Step("GET", "{c}/dangling", 404),
    ],
    "errors": [
        Step("GET", "{c}", 404),
        Step("PUT", "{c}/obj", 404, body=BODY),
        Step("PUT", "{c}" + "x" * 256, 400),
        Step("GET", "{c}", 401, {"X-Auth-Token": "AUTH_ftkbogus"}),
        Step("GET", "{c}", 401, {"X-Auth-Token": "bogus"}),
        Step("PUT", "{c}", 201),
        Step("PUT", "{c}/obj", 400, {"X-Object-Meta-Big": "x" * 300}, BODY),
        Step("PUT", "{c}/obj", 400, {"X-Delete-At": "soon"}, BODY),
        Step("MERGE", "{c}/obj", 405),
    ],
}


@pytest.fixture(scope="module")
def endpoints(swift_cluster, swift_cluster_factory):
    """(storage URL, token) of test:tester on the HAPI cluster and a plain one."""
    plain = swift_cluster_factory("swift-plain", with_hapi=False)
    return [cluster.connection().get_auth() for cluster in (swift_cluster, plain)]


def send(endpoint, step, container):
    """Run one step; the normalised (method, path, status, headers, body)."""
    url, token = endpoint
    parsed, conn = http_connection(url)
    path, _, query = step.path.replace("{c}", container).partition("?")
    full_path = parsed.path + (f"/{quote(path)}" if path else "") + (f"?{query}" if query else "")
    headers = {"X-Auth-Token": token,
               **{k: v.replace("{c}", container) for k, v in (step.headers or {}).items()}}
    body = step.body.replace("{c}", container) if isinstance(step.body, str) else step.body
    try:
        conn.request(step.method, full_path, data=body, headers=headers)
        resp = conn.getresponse()
        status, resp_headers, resp_body = resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()
    resp_headers, resp_body = normalise(resp_headers, resp_body)
    return step.method, step.path, status, resp_headers, resp_body


def normalise(headers, body):
    """Take out what differs between any two identical requests."""
    kept = {}
    for name, value in headers.items():
        name = name.lower()
        if name in VOLATILE_HEADERS:
            continue
        if name.startswith("x-account-") and not name.startswith(OWN_ACCOUNT_META):
            continue
        if name == "allow":  # built from a set: order differs between processes
            value = ", ".join(sorted(value.split(", ")))
        kept[name] = value
    content_type = kept.get("content-type", "")
    boundary = BOUNDARY.search(content_type.encode())
    if boundary:
        kept["content-type"] = content_type.replace(boundary[1].decode(), "BOUNDARY")
        body = body.replace(boundary[1], b"BOUNDARY")
    if content_type.startswith("application/json") and body:
        body = without_last_modified(json.loads(body))
        kept.pop("etag", None)  # an SLO manifest's: it hashes the dates taken out
    elif "xml" in content_type:
        body = XML_LAST_MODIFIED.sub(b"", body)
    return kept, body


def without_last_modified(listing):
    if isinstance(listing, list):
        return [without_last_modified(item) for item in listing]
    if isinstance(listing, dict):
        return {k: without_last_modified(v) for k, v in listing.items() if k != "last_modified"}
    return listing


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_responses_with_and_without_hapi(case, endpoints):
    container = f"passthrough-{case}"
    with_hapi, without = ([send(endpoint, step, container) for step in CASES[case]]
                          for endpoint in endpoints)
    assert [r[2] for r in with_hapi] == [step.status for step in CASES[case]]
    assert with_hapi == without
