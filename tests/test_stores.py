"""The one store of data sets and checkpoints: a Swift container or a local folder."""

import pytest

from hapi.client_setup import load
from hapi.stores import DirectoryStore, SwiftStore


@pytest.fixture(params=["folder", "swift"])
def store(request, tmp_path):
    if request.param == "folder":
        return DirectoryStore(tmp_path / "store")
    conn = request.getfixturevalue("swift_conn")
    return SwiftStore(conn, "test-stores-round-trip")


def test_store_round_trip(store):
    assert store.names("obj-") == [] and store.get("obj-1") is None
    store.delete("obj-1")  # missing is fine, before and after the first put
    store.put("obj-1", b"one", "application/octet-stream")
    store.put("obj-2", b"two")
    store.put("other", b"x")
    assert store.get("obj-1") == b"one"
    assert sorted(store.names("obj-")) == ["obj-1", "obj-2"]
    store.delete("obj-1")
    assert store.get("obj-1") is None and store.names("obj-") == ["obj-2"]


def test_swift_store_keeps_the_content_type(swift_conn):
    SwiftStore(swift_conn, "test-stores-type").put("a.tar", b"tar", "application/x-tar")
    assert swift_conn.head_object("test-stores-type", "a.tar")["content-type"] == \
        "application/x-tar"


def test_hapi_load_uses_the_shared_stores():
    assert load.SwiftStore is SwiftStore and load.DirectoryStore is DirectoryStore
