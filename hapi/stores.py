"""Named objects in a Swift container or a local folder: where hapi-load puts
data sets and the trainer its checkpoints.

Both stores have the same methods: ``put(name, data, content_type=None)``,
``get(name)`` (None when missing), ``delete(name)`` (missing is fine) and
``names(prefix)``. The container or folder is created by the first ``put``.
"""

import hashlib
import os
from pathlib import Path

from swiftclient.client import ClientException


class SwiftStore:
    """Objects in a Swift container of the connection's account."""

    def __init__(self, conn, container):
        self.conn = conn
        self.container = container
        self._created = False

    def __str__(self):
        return f"swift:{self.container}"

    def put(self, name, data, content_type=None):
        """Upload ``data``; Swift checks it against its MD5 (a 422 if it arrived damaged)."""
        if not self._created:
            self.conn.put_container(self.container)
            self._created = True
        etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
        self.conn.put_object(self.container, name, data, content_type=content_type, etag=etag)

    def get(self, name):
        try:
            return self.conn.get_object(self.container, name)[1]
        except ClientException as err:
            if err.http_status == 404:
                return None
            raise

    def delete(self, name):
        try:
            self.conn.delete_object(self.container, name)
        except ClientException as err:
            if err.http_status != 404:
                raise

    def names(self, prefix):
        try:
            _, objects = self.conn.get_container(self.container, prefix=prefix,
                                                 full_listing=True)
        except ClientException as err:
            if err.http_status == 404:
                return []
            raise
        return [obj["name"] for obj in objects]


class DirectoryStore:
    """Objects as files in a local folder; a file appears whole or not at all."""

    def __init__(self, path):
        self.path = Path(path)

    def __str__(self):
        return str(self.path)

    def put(self, name, data, content_type=None):
        self.path.mkdir(parents=True, exist_ok=True)
        partial = self.path / f".{name}.partial"
        partial.write_bytes(data)
        os.replace(partial, self.path / name)

    def get(self, name):
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, name):
        (self.path / name).unlink(missing_ok=True)

    def names(self, prefix):
        return sorted(p.name for p in self.path.glob(f"{prefix}*"))
