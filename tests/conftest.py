"""Shared fixtures: one-node Swift clusters on free ports for the test session.

Tests that use a cluster fixture are marked ``swift`` (registered in
pyproject.toml) automatically, so ``pytest -m "not swift"`` runs the rest
without starting Swift.
"""

import contextlib
import os
import tempfile

import pytest

from hapi.server_setup.cluster import Cluster

SWIFT_FIXTURES = {"swift_cluster", "swift_cluster_factory", "swift_conn"}


@pytest.fixture(autouse=True, scope="session")
def profile_cache(tmp_path_factory):
    """The trainer's cached layer times go to a folder of the test session,
    never to the user's cache (``hapi.client.autosplit.profilecache``)."""
    folder = tmp_path_factory.mktemp("profiles")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HAPI_PROFILE_CACHE", str(folder))
        yield folder


def pytest_collection_modifyitems(items):
    for item in items:
        if SWIFT_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.swift)


def devices_dir(stack):
    """A fresh devices folder on tmpfs when there is one (room for large xattrs)."""
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        return None
    return stack.enter_context(tempfile.TemporaryDirectory(prefix="hapi-swift-", dir=shm))


@pytest.fixture(scope="session")
def swift_cluster_factory(tmp_path_factory):
    """``make(name, **Cluster kwargs)`` starts a cluster; all stop at session end."""
    with contextlib.ExitStack() as stack:
        def make(name="swift", **kwargs):
            root = tmp_path_factory.mktemp(name)
            cluster = Cluster(root, devices=devices_dir(stack), **kwargs)
            return stack.enter_context(cluster)

        yield make


@pytest.fixture(scope="session")
def swift_cluster(swift_cluster_factory):
    """The session's cluster, HAPI filter in the proxy pipeline.

    One torch thread in the proxy, as on a storage node pinned to its own
    core: the other core stays free for the tests themselves.
    """
    return swift_cluster_factory("swift", hapi_conf={"threads": "1"})


@pytest.fixture
def swift_conn(swift_cluster):
    """python-swiftclient Connection as test:tester (admin of AUTH_test)."""
    conn = swift_cluster.connection()
    yield conn
    conn.close()
