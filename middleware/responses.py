"""What the filter and the server answer alike: a refused request's status and
JSON body (:class:`RequestError`), the frames that end a stream, and their
log lines."""

import json
import urllib.parse

from hapi import protocol, wire
from hapi.middleware.admission import OverBudget
from hapi.shards import ShardError
from hapi.weights import WeightsError


def summary_line(path, request, asked, samples, bytes_in, bytes_out, seconds, outcome):
    """The log line of a feature request that was answered with a stream, the
    same in the filter's and the server's logs. ``path`` is quoted, so an
    object name cannot forge log lines."""
    return (f"{quote(path)} model={request.model} split={request.split} "
            f"batch={request.batch} (asked {asked}) samples={samples} bytes_in={bytes_in} "
            f"bytes_out={bytes_out} seconds={seconds:.3f} outcome={outcome}")


def refusal_line(path, status, body):
    """The log line of a feature request refused with ``status`` and the JSON
    ``body`` (or Swift's own refusal), the same in the filter and the server."""
    return f"{quote(path)} refused {status}: {body}"


def quote(path):
    """``path`` (a native string) %-encoded for a log line."""
    return urllib.parse.quote(path.encode("utf-8", "surrogateescape"), safe="/")



class RequestError(Exception):
    """A feature request refused before its stream starts: an HTTP status and
    the fields of its JSON body (``error`` plus the culprit: ``parameter``,
    ``member``...). The filter and the server each turn it into a response of
    their framework, so both answer every failure with the same status and body.
    """

    def __init__(self, status, message, retry_after=1, **fields):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.fields = {"error": message, **fields}

    @property
    def body(self):
        return json.dumps(self.fields).encode()

    @property
    def headers(self):
        return {"Retry-After": str(self.retry_after)} if self.status == 503 else {}

    @classmethod
    def from_exception(cls, err):
        """The answer to one of :data:`REQUEST_FAILURES` raised before the stream."""
        if isinstance(err, protocol.BadParameter):
            return cls(400, err.message, parameter=err.parameter)
        if isinstance(err, WeightsError):
            return cls(400, str(err), parameter=protocol.WEIGHTS)
        if isinstance(err, ShardError):
            return cls(422, str(err), member=err.member)
        if isinstance(err, OverBudget):
            return cls(503, str(err), retry_after=err.retry_after, **err.fields)
        raise TypeError(f"no HAPI answer for {type(err).__name__}") from err

    @classmethod
    def not_an_object(cls):
        return cls(400, "HAPI requests must GET an object", parameter=protocol.MODEL)

    @classmethod
    def at_capacity(cls, max_concurrent):
        return cls(503, "HAPI is at capacity; retry later", max_concurrent=max_concurrent)

    @classmethod
    def too_large(cls, path, length, max_shard_bytes):
        return cls(413, f"{path} is {length} bytes, above max_shard_bytes {max_shard_bytes}")

    @classmethod
    def body_broken(cls, path, received, length):
        """Swift's body of an object broke off, or ended short of its
        Content-Length: a storage failure (502), which the trainer retries."""
        of = f" of its {length}" if length is not None else ""
        return cls(502, f"Swift's body of {path} broke off after {received}{of} bytes")

    @classmethod
    def weights_refused(cls, path, status, status_line):
        """Swift refused the caller's own read of a ``swift:`` weights object
        (401 or 403): Swift's status, with a body that names the parameter
        (the refusal of a HEAD has no body of its own to pass on)."""
        return cls(status, f"weights object {path} is not readable by this caller: "
                   f"{status_line}", parameter=protocol.WEIGHTS)

    @classmethod
    def weights_unreadable(cls, path, status_line):
        """A ``swift:`` weights object Swift would not serve for a reason
        other than the caller's access (401 and 403 pass through)."""
        return cls(400, f"weights object {path} could not be read: {status_line}",
                   parameter=protocol.WEIGHTS)


# What bad input raises before a stream starts; RequestError.from_exception maps them.
REQUEST_FAILURES = (protocol.BadParameter, WeightsError, ShardError, OverBudget)


def stream_error_frame(err):
    """The last frame of a stream that failed after its 200 status went out."""
    if isinstance(err, ShardError):
        return error_frame(422, str(err), err.member)
    return error_frame(500, f"feature extraction failed: {type(err).__name__}")


def end_frame(samples, batches, elapsed_s):
    return wire.encode_frame("end", {"samples": str(samples), "batches": str(batches),
                                     "elapsed_s": json.dumps(elapsed_s)})


def error_frame(status, message, member=None):
    meta = {"status": str(status), "message": message}
    if member:
        meta["member"] = member
    return wire.encode_frame("error", meta)
