"""Retrying a shard's request: which failures are worth another try, and when.

The trainer fetches a shard whole or not at all: ``ShardSource.load``
returns only once the shard's stream has completed, and the loader hands a
shard to training only then. Retrying a failed request therefore fetches
the whole shard again, and no sample is ever delivered twice or in part.

Worth retrying (:func:`transient`):

- 503 and 429 (the storage tier at capacity, Swift throttling): after the
  Retry-After it names (delta-seconds), capped at ``MAX_RETRY_AFTER_S``, or
  after the backoff when it names none;
- the connection failing (refused, reset, timed out), any other 5xx, and a
  stream cut short (a truncated frame, or an error frame of a 5xx status,
  as a server sends when it shuts down): after an exponential backoff from
  ``BACKOFF_S``, doubling up to ``MAX_BACKOFF_S``.

Each wait is lengthened by up to ``JITTER`` of itself, at random, so that
trainers refused together do not come back together. Anything else (a 4xx,
a shard that does not decode) fails at once. A shard's request is tried at
most ``retries + 1`` times; the last failure then ends the run with the
request and the reason in one line.
"""

import http.client
import itertools
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

import urllib3
from requests.exceptions import RequestException
from swiftclient import ClientException

DEFAULT_RETRIES = 5
BACKOFF_S = 0.5  # the first backoff; each further retry doubles it...
MAX_BACKOFF_S = 8.0  # ... up to this
MAX_RETRY_AFTER_S = 30.0  # a longer Retry-After is waited this long
JITTER = 0.25  # each wait is lengthened by up to this fraction of itself
AT_CAPACITY = (429, 503)
REASON_CHARS = 200  # of an exception's message, in a log line
MAX_WRAPPERS = 8  # exceptions wrapped in one another, looked through for the reason

# A connection refused, reset or timed out, as the socket, http.client,
# urllib3 or requests (which swiftclient uses) raise it.
CONNECTION_ERRORS = (ConnectionError, TimeoutError, http.client.HTTPException,
                     urllib3.exceptions.HTTPError, RequestException)


class RetriesExhausted(RuntimeError):
    """A request failed, and kept failing after every retry it was allowed."""


@dataclass(frozen=True)
class Failure:
    """A failure worth retrying: ``cause`` is counted in the metrics ("503",
    "connection", "stream"...), ``reason`` goes to the log, ``retry_after``
    is the wait the server asked for (seconds), if it named one."""

    cause: str
    reason: str
    retry_after: float | None = None


def transient(err):
    """The :class:`Failure` that ``err`` is, or None when retrying cannot help."""
    from hapi import wire  # here, not above: the trainer's --help imports this module, not torch

    if isinstance(err, ClientException):
        return _http_failure(err)
    if isinstance(err, wire.StreamError):
        return Failure("stream", f"stream failed: {err}") if err.status >= 500 else None
    if isinstance(err, wire.FrameError):
        return Failure("stream", f"stream cut short: {err}")
    if isinstance(err, CONNECTION_ERRORS):
        root = _innermost(err)
        return Failure("connection", f"connection failed: {type(root).__name__}: "
                                     f"{_one_line(root)}")
    return None


def _http_failure(err):
    status = err.http_status
    if status is None or (status < 500 and status not in AT_CAPACITY):
        return None
    reason = f"{status} {err.http_reason}".strip()
    if status in AT_CAPACITY:
        retry_after = _retry_after(err.http_response_headers)
        if retry_after is not None:
            reason += f" (Retry-After {retry_after:g} s)"
        return Failure(str(status), reason, retry_after)
    return Failure(str(status), reason)


def _retry_after(headers):
    """Retry-After's delta-seconds, or None (absent, or an HTTP date)."""
    value = next((v for k, v in (headers or {}).items() if k.lower() == "retry-after"), None)
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return None


def _innermost(err):
    """The exception at the bottom of what requests and urllib3 wrap around a
    socket's error (``ConnectionRefusedError``, ``RemoteDisconnected``...)."""
    for _ in range(MAX_WRAPPERS):
        reason = getattr(err, "reason", None)
        inner = next((e for e in (err.__cause__, reason, *reversed(err.args))
                      if isinstance(e, BaseException)), None)
        if inner is None:
            break
        err = inner
    return err


def _one_line(err):
    text = " ".join(str(err).split())
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."


class RetryPolicy:
    """Calls a request again after transient failures (module docstring).

    Shared by the loader's threads; ``counts`` holds the retries made, by
    cause. ``sleep`` and ``jitter`` (a number in [0, 1)) are injectable.
    """

    def __init__(self, retries=DEFAULT_RETRIES, log=print, sleep=time.sleep,
                 jitter=random.random):
        self.retries = retries
        self.log = log
        self.sleep = sleep
        self.jitter = jitter
        self.counts = Counter()
        self._lock = threading.Lock()

    def delay(self, failure, retry):
        """Seconds to wait before retry number ``retry`` (1 for the first)."""
        if failure.retry_after is not None:
            base = min(failure.retry_after, MAX_RETRY_AFTER_S)
        else:
            base = min(BACKOFF_S * 2 ** (retry - 1), MAX_BACKOFF_S)
        return base * (1 + JITTER * self.jitter())

    def call(self, what, attempt, reset=None):
        """``attempt()``'s result, retried after transient failures; ``reset()``
        runs before each retry (to drop a broken connection). Other failures
        propagate at once; RetriesExhausted when the retries ran out."""
        for retry in itertools.count(1):
            try:
                return attempt()
            except Exception as err:
                wait = self._retry_or_raise(what, err, retry)
            if reset is not None:
                reset()
            self.sleep(wait)

    def _retry_or_raise(self, what, err, retry):
        """Count and log retry number ``retry`` after ``err``, and return its
        wait; re-raise ``err`` when it is not worth a retry."""
        failure = transient(err)
        if failure is None:
            raise err
        if retry > self.retries:
            raise RetriesExhausted(f"{what} failed {retry} times, giving up: "
                                   f"{failure.reason}") from err
        wait = self.delay(failure, retry)
        with self._lock:
            self.counts[failure.cause] += 1
        self.log(f"{what}: {failure.reason}; retry {retry}/{self.retries} in {wait:.1f} s")
        return wait

    def report(self):
        """The retries made, in total and by cause, for the metrics."""
        with self._lock:
            return {"total": sum(self.counts.values()),
                    "by_cause": dict(sorted(self.counts.items()))}
