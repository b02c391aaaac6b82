"""Several storage endpoints: which one the next request goes to, and their record.

A trainer may talk to several Swift proxies (or standalone HAPI servers) in
front of the same data. :class:`Endpoints` spreads the requests over them
round robin, one request at a time, and keeps per endpoint the requests
sent and the requests that failed in a way worth retrying (``hapi.client.retry``
decides which). An endpoint that just failed is skipped for a while, longer
after each failure in a row (``BACKOFF_S`` doubling up to ``MAX_BACKOFF_S``),
and tried again after that: a proxy that restarts comes back into use, one
that stays down costs a failed request only now and then. When every
endpoint is backing off, the one whose back-off ends first is used: a
request always goes somewhere, and the retry policy paces the retries.

The endpoint ``None`` stands for where requests went before there were
lists: the storage URL the auth returned (named ``storage_url`` in the
metrics) or, for feature requests with ``--use_intermediate``, the one
standalone HAPI server.
"""

import threading
import time
from dataclasses import dataclass

BACKOFF_S = 1.0  # an endpoint's first back-off; each failure in a row doubles it...
MAX_BACKOFF_S = 30.0  # ... up to this
AUTH_STORAGE_URL = "storage_url"  # the name of endpoint None in the metrics


@dataclass
class _Record:
    requests: int = 0
    failures: int = 0
    failures_in_a_row: int = 0
    skip_until: float = 0.0


class Endpoints:
    """Round robin over ``urls`` (base URLs ``http://host:port``, or None),
    skipping the ones backing off. Shared by the loader's threads.
    ``none_name`` names the endpoint None in the report; ``clock`` is
    injectable."""

    def __init__(self, urls, none_name=AUTH_STORAGE_URL, clock=time.monotonic):
        self.urls = list(dict.fromkeys(urls))
        if not self.urls:
            raise ValueError("Endpoints needs at least one URL")
        self.none_name = none_name
        self.clock = clock
        self._records = {url: _Record() for url in self.urls}
        self._next = 0
        self._lock = threading.Lock()

    def pick(self):
        """The endpoint for the next request (counted as one request to it)."""
        with self._lock:
            now = self.clock()
            count = len(self.urls)
            order = [self.urls[(self._next + i) % count] for i in range(count)]
            url = next((u for u in order if self._records[u].skip_until <= now), None)
            if url is None:
                url = min(order, key=lambda u: self._records[u].skip_until)
            self._next = (self.urls.index(url) + 1) % count
            self._records[url].requests += 1
            return url

    def succeeded(self, url):
        with self._lock:
            record = self._records[url]
            record.failures_in_a_row = 0
            record.skip_until = 0.0

    def failed(self, url):
        """``url``'s request failed: count it and skip ``url`` for a while."""
        with self._lock:
            record = self._records[url]
            record.failures += 1
            record.failures_in_a_row += 1
            backoff = min(BACKOFF_S * 2 ** (record.failures_in_a_row - 1), MAX_BACKOFF_S)
            record.skip_until = self.clock() + backoff

    def report(self):
        """{endpoint: {"requests", "failures"}} for the metrics."""
        with self._lock:
            return {self.name(url): {"requests": record.requests,
                                     "failures": record.failures}
                    for url, record in self._records.items()}

    def name(self, url):
        """An endpoint as the metrics and log lines name it."""
        return self.none_name if url is None else url


def merged_report(*endpoints):
    """The reports of several :class:`Endpoints`, summed per endpoint (a proxy
    asked for raw shards and for features appears once)."""
    merged = {}
    for group in dict.fromkeys(endpoints):
        for key, counts in group.report().items():
            into = merged.setdefault(key, {"requests": 0, "failures": 0})
            into["requests"] += counts["requests"]
            into["failures"] += counts["failures"]
    return merged
