"""The storage-side feature cache: a shard's frames kept as a Swift object.

With a deterministic preset (every preset is one) the frozen layers in eval
mode are a pure function of the shard's content and the request: the same
(shard ETag, model, weights identity, freeze, split, preset, dtype, encoding,
storage batch) always gives the same frames. With ``feature_cache_container``
set, the storage tier keeps the whole frame stream of a feature request as
an object of that container in the shard's own account, and answers a later
request with the same key from it, with no extraction.

Access is that of the shard, always checked first: a request on a cache hit
still HEADs the shard with the caller's access (its conditional headers and
query string included), so a caller who may not read the shard gets Swift's
refusal, and the key holds the ETag that HEAD returned. The cache object is
then read, and written, with the caller's own access too: nothing crosses
accounts, and a caller who may not read the cache container just misses.
Whoever may write that container can also plant entries in it, which is
why it is an operator's choice and belongs to the account, like the data.

An entry is checked before use: its MD5 must be its ETag, its frames must
parse to their end frame, and its stored response headers must be there;
otherwise it is a miss, and the fresh result replaces it. Overwriting a
shard changes its ETag, so its old entries are never served again; they are
deleted when the new ones are written. Entries are written after the
stream's last frame was sent, and only while the container holds less than
``feature_cache_max_bytes``.
"""

import hashlib
import json
import urllib.parse

from hapi import wire
from hapi.middleware.effects import Fetch

# The response headers kept with an entry (as JSON in this object metadata).
META_RESPONSE = "X-Object-Meta-Hapi-Response"

class StoredFeatures:
    def __init__(self, container, max_bytes):
        self.container = container
        self.max_bytes = max_bytes

    def entry_path(self, account_path, shard_path, etag, feature_req, weights_id):
        """The cache object of a request: under the shard's own name, then its
        ETag, then a hash of everything else the frames depend on."""
        params = {**{k: str(v) for k, v in vars(feature_req).items()}, "weights": weights_id}
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:32]
        return f"{account_path}/{self.container}/{self.prefix(shard_path)}{etag}/{digest}"

    @staticmethod
    def prefix(shard_path):
        """``<container>/<object>/`` of a shard path ``/<v>/<account>/<container>/<object>``."""
        return shard_path.split("/", 3)[3] + "/"

    def lookup(self, read, path):
        """The verified (response headers, frames' bytes) at ``path``, or None.
        ``read`` is the job's body reader (a generator of effects)."""
        reply = yield Fetch("HEAD", path, "cache")
        reply.release()
        if not reply.ok:
            return None
        try:
            headers = json.loads(reply.headers.get(META_RESPONSE, ""))
        except ValueError:
            return None
        try:
            body = yield from read(Fetch("GET", path, "cache"))
        except Exception:
            return None
        if hashlib.md5(body).hexdigest() != reply.etag or not whole_stream(body):
            return None
        return headers, body

    def store(self, read, account_path, shard_path, path, headers, body):
        """Write an entry: make room rules, drop the shard's entries of other
        ETags, PUT. Returns why it was not stored, or None. Any Swift refusal
        means no entry, never a failed request."""
        container = f"{account_path}/{self.container}"
        head = yield Fetch("HEAD", container, "cache")
        head.release()
        if head.status == 404:
            made = yield Fetch("PUT", container, "cache")
            made.release()
            if not made.ok:
                return f"cannot create the cache container: {made.status_line}"
            used = 0
        elif not head.ok:
            return f"cannot read the cache container: {head.status_line}"
        else:
            used = int(head.headers.get("X-Container-Bytes-Used", "0") or 0)
        if used + len(body) > self.max_bytes:
            return f"the cache container is full ({used} of {self.max_bytes} bytes)"
        prefix = self.prefix(shard_path)
        query = urllib.parse.urlencode({"format": "json", "prefix": prefix})
        listing = yield from read(Fetch("GET", container, "cache", query))
        current = path[len(container) + 1:].rsplit("/", 1)[0] + "/"
        for entry in json.loads(listing):
            if not entry["name"].startswith(current):
                gone = yield Fetch("DELETE", f"{container}/{entry['name']}", "cache")
                gone.release()
        put = yield Fetch("PUT", path, "cache", headers={META_RESPONSE: json.dumps(headers)},
                          body=body)
        put.release()
        return None if put.ok else f"cannot write the entry: {put.status_line}"


def whole_stream(body):
    """Whether ``body`` is frames up to and including an end frame, nothing after."""
    offset = 0
    while offset + wire.LENGTH.size <= len(body):
        (length,) = wire.LENGTH.unpack_from(body, offset)
        start, offset = offset + wire.LENGTH.size, offset + wire.LENGTH.size + length
        if offset > len(body):
            return False
        try:
            frame = wire.decode_frame(body[start:offset])
        except wire.FrameError:
            return False
        if frame.kind == "end":
            return offset == len(body)
    return False
