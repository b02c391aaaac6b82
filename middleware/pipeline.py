"""One feature request, from its headers to its last frame, written once.

The Swift filter (:mod:`hapi.middleware.filter`, eventlet) and the standalone
server (:mod:`hapi.middleware.server`, asyncio) answer the same requests with
the same statuses, bodies and frames because they run the same steps, here:

1. parse and validate the path, query and ``X-Hapi-*`` headers
   (:func:`hapi.protocol.parse_request`); refuse a request over
   ``max_concurrent``;
2. read the shard with the caller's own access (the request's query string
   and conditional headers go with that read, so ``?version-id=``,
   ``?multipart-manifest=get``, ``If-Match``... mean what they mean to Swift);
3. get the model: a ``swift:`` weights object is checked with a HEAD under the
   caller's access and identified by its ETag; the engine builds each model
   once (:mod:`hapi.middleware.model_cache`);
4. open the shard (every image header checked), admit the request against the
   memory budget (:mod:`hapi.middleware.admission`), compute the first frame;
   bad input up to here gets a 4xx, never a 200;
5. send the 200 and stream the frames, batch i+1 computing while batch i is
   sent, then the end frame; a failure after the 200 ends the stream with an
   error frame;
6. finish: give back the memory and the concurrency slot, log one line.

The steps have no I/O of their own. :meth:`FeatureJob.steps` is a generator
that yields *effects* (the :class:`Effect` subclasses below) and receives
their results, or has the front end's exception thrown in. A front end
drives it from its one scheduling thread (the eventlet hub, the asyncio
loop) and performs each effect with its own means::

    effect        filter (eventlet)                 server (asyncio)
    Fetch         make_subrequest in the pipeline    aiohttp request to Swift
    NextChunk     next(app_iter)                     resp.content.read
    Run           tpool.execute                      run_in_executor, awaited
    Start, Join   spawn(tpool.execute), .wait()      run_in_executor, await
    AwaitGrant    eventlet Event with a Timeout      future with wait_for
    Respond       start_response, then the body      web.Response / StreamResponse
    Relay         Swift's response, as it came       Swift's response, as it came
    Send          yield to the WSGI server           await resp.write

All shared state (admission, the concurrency count) changes only on that
scheduling thread; the worker threads run the engine's blocking calls.
"""

import dataclasses
import itertools
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass

from hapi import names, protocol
from hapi.middleware.admission import OverBudget
from hapi.middleware.effects import (
    AwaitGrant,
    BodyBroken,
    ClientGone,
    Fetch,
    Join,
    NextChunk,
    Relay,
    Respond,
    Run,
    Send,
    Signal,
    Start,
    StreamEnded,
    SwiftRefused,
)
from hapi.middleware.responses import (
    REQUEST_FAILURES,
    RequestError,
    end_frame,
    error_frame,
    quote,
    refusal_line,
    stream_error_frame,
    summary_line,
)
from hapi.middleware.stored_features import StoredFeatures
from hapi.shards import ShardError

# A cached stream is sent in pieces of this size.
REPLAY_CHUNK = 1 << 20
# /<version>/<account>/<container>/<object>, the object possibly with slashes.
OBJECT_PATH = re.compile(r"^/([^/]+)/([^/]+)/[^/]+/.+$")


@dataclass(frozen=True)
class CacheHit:
    """A feature request answered from the feature cache: the stored response
    headers and frames."""

    headers: dict
    body: bytes


def model_key(feature_req, swift_path=None, swift_etag=None):
    """Cache key of a request's model: its name and an identity of its weights.

    A ``swift:`` weights object is identified by its path and ETag (from a
    HEAD made with the caller's access), so replacing the object replaces
    the model; other references identify themselves.
    """
    if feature_req.weights.kind == "swift":
        return feature_req.model, f"{swift_path}@{swift_etag}"
    return feature_req.model, str(feature_req.weights)


def split_batches(samples, batch):
    return [samples[i:i + batch] for i in range(0, len(samples), batch)]


class Events:
    """Where the steps' log lines go: ``logger``, each line after ``prefix``.
    A front end adds the statsd metrics: ``increment``, ``update_stats`` and
    ``timing_since``."""

    def __init__(self, logger, prefix=""):
        self.logger = logger
        self.prefix = prefix

    def info(self, message):
        self.logger.info("%s%s", self.prefix, message)

    def warning(self, message):
        self.logger.warning("%s%s", self.prefix, message)

    def exception(self, message):
        self.logger.exception("%s%s", self.prefix, message)


class StorageTier:
    """What the feature requests of one front end share: the operator's
    settings, the engine, the memory budget, the count of requests in
    progress, and ``events`` (:class:`Events`), where log lines and statsd
    metrics go."""

    def __init__(self, settings, events, threading_module=threading):
        self.settings = settings
        self.limits = settings.limits
        self.engine = settings.make_engine(threading_module)
        self.budget = settings.make_budget(self.engine)
        self.events = events
        self.active = 0
        self.request_numbers = itertools.count()  # the requests in progress, as they came
        self.stored_features = StoredFeatures(settings.feature_cache_container,
                                              settings.feature_cache_max_bytes) \
            if settings.feature_cache_container else None

    def layer_costs(self, query):
        """The answer to ``GET /hapi/costs?model=M&preset=P&batch=B``
        (:data:`hapi.protocol.COSTS_PATH`): (status,
        JSON body). 200 with the per-sample seconds of each layer measured on
        this tier's device, 404 when no request has used that model at that
        preset and storage batch yet, 400 naming a bad parameter."""
        params = dict(urllib.parse.parse_qsl(query))
        model = params.get("model", "")
        if model not in self.limits.models:
            return 400, {"error": f"unknown model {model[:40]!r}", "parameter": "model"}
        preset = params.get("preset", protocol.DEFAULT_PRESET)
        if preset not in names.PRESETS:
            return 400, {"error": f"unknown preset {preset[:40]!r}", "parameter": "preset"}
        batch = protocol.parse_integer(params.get("batch", ""), protocol.INT_DIGITS)
        if batch is None or not 1 <= batch <= self.limits.max_batch:
            return 400, {"error": f"batch must be 1..{self.limits.max_batch}",
                         "parameter": "batch"}
        costs = self.engine.known_layer_costs(model, preset, batch)
        if costs is None:
            return 404, {"error": f"{model} has not run at {preset}, batch {batch} here yet"}
        return 200, {"model": model, "preset": preset, "batch": batch,
                     "device": str(self.engine.device), "layers_s_per_sample": costs}

    def feature_request(self, path, query, headers):
        """The steps of one feature request (a generator of effects):
        ``path`` the request's path, native and unquoted; ``query`` its raw
        query string; ``headers`` a case-insensitive mapping of native strings."""
        return FeatureJob(self, path, query, headers).steps()


class FeatureJob:
    """One feature request's state through its steps."""

    def __init__(self, tier, path, query, headers):
        self.tier = tier
        self.engine = tier.engine
        self.events = tier.events
        self.path = path
        self.query = query
        self.headers = headers
        self.started = time.monotonic()
        self.entered = False
        self.number = 0  # this request's place among the requests, once in progress
        self.ticket = None
        self.bytes_in = 0
        self.shard_etag = ""
        self.cache_path = None  # the feature cache's entry to write, on a miss
        match = OBJECT_PATH.match(path)
        self.account_path = f"/{match[1]}/{match[2]}" if match else ""

    # The whole request ---------------------------------------------------

    def steps(self):
        self.events.increment("requests")
        try:
            feature_req = self.parse()
            self.enter()
            prepared = yield from self.prepare(feature_req)
        except SwiftRefused as refused:
            self.leave()
            self.refused(refused.reply.status, '{"error": "refused by Swift"}')
            yield Relay(refused.reply)
            return
        except (RequestError, *REQUEST_FAILURES) as err:
            self.leave()
            yield from self.refuse(err)
            return
        except Exception as err:
            self.leave()
            self.events.exception(f"feature request {self.quoted} failed")
            yield from self.refuse(RequestError(
                500, f"feature extraction failed: {type(err).__name__}"))
            return
        except BaseException:
            self.leave()
            raise
        if isinstance(prepared, CacheHit):
            yield from self.replay(prepared)
        else:
            yield from self.stream(*prepared)

    def parse(self):
        if OBJECT_PATH.match(self.path) is None:
            raise RequestError.not_an_object()
        return protocol.parse_request(self.headers, self.tier.limits, self.engine.layer_count)

    def enter(self):
        """Count the request as in progress, or refuse it over max_concurrent."""
        limit = self.tier.settings.max_concurrent
        if self.tier.active >= limit:
            self.events.increment("rejected")
            raise RequestError.at_capacity(limit)
        self.tier.active += 1
        self.entered = True
        self.number = next(self.tier.request_numbers)

    def leave(self):
        """Give back the memory and the concurrency slot; harmless twice."""
        if self.ticket is not None:
            self.tier.budget.release(self.ticket)
            self.ticket = None
        if self.entered:
            self.tier.active -= 1
            self.entered = False

    def prepare(self, feature_req):
        """Steps 2-4: the model, the batches and the first frame, computed
        before the status goes out so that bad input there is still a 4xx;
        or, from the feature cache, a :class:`CacheHit`."""
        conditions = {name: self.headers[name] for name in protocol.CONDITIONAL_HEADERS
                      if name in self.headers}
        key, weights_path = yield from self.weights_key(feature_req)
        cache = self.tier.stored_features
        if cache is not None:
            # The shard's ETag, read with the caller's access; a refusal here is
            # answered by the GET below, as without the cache.
            head = yield Fetch("HEAD", self.path, "shard", self.query, conditions)
            head.release()
            if head.ok:
                path = cache.entry_path(self.account_path, self.path, head.etag, feature_req,
                                        key[1])
                found = yield from cache.lookup(self.read, path)
                if found is not None:
                    return CacheHit(*found)
        data = yield from self.read(Fetch("GET", self.path, "shard", self.query, conditions))
        self.bytes_in = len(data)
        self.events.update_stats("bytes_in", len(data))
        if cache is not None:
            self.cache_path = cache.entry_path(self.account_path, self.path, self.shard_etag,
                                               feature_req, key[1])
        model = yield from self.model_for(feature_req, key, weights_path)
        if self.engine.known_layer_costs(feature_req.model, feature_req.preset,
                                         feature_req.batch) is None:
            yield Run(self.engine.layer_costs, (model, feature_req))
        samples = yield Run(self.engine.open_shard, (data, feature_req.preset))
        asked = feature_req.batch
        granted = yield from self.admit(model, feature_req, len(samples))
        if granted != asked:
            feature_req = dataclasses.replace(feature_req, batch=granted)
        batches = split_batches(samples, feature_req.batch)
        first = yield Run(self.engine.extract,
                          (model, batches[0], feature_req, 0, self.number, self.started))
        return model, feature_req, asked, batches, first

    # Reading from Swift --------------------------------------------------

    def read(self, fetch, limit=None):
        """The body of ``fetch``'s object, whole. Swift's refusal raises
        :class:`SwiftRefused` (its body unread); an object above
        max_shard_bytes is a 413, whether its length is declared (checked
        before reading) or not (read up to the limit); a body that breaks off
        or ends short of its Content-Length is a 502, a storage failure the
        trainer retries (a 422 is for objects that arrived whole and are
        malformed)."""
        reply = yield fetch
        if not reply.ok:
            raise SwiftRefused(reply)
        if fetch.purpose == "shard":
            self.shard_etag = reply.etag
        limit = limit or self.tier.settings.max_shard_bytes
        length = reply.content_length
        chunks, size = [], 0
        try:
            if length is not None and length > limit:
                raise RequestError.too_large(fetch.path, length, limit)
            while True:
                try:
                    chunk = yield NextChunk(reply)
                except BodyBroken:
                    chunk = None
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise RequestError.too_large(fetch.path, size, limit)
                chunks.append(chunk)
        finally:
            reply.release()
        if chunk is None or (length is not None and size != length):
            raise RequestError.body_broken(fetch.path, size, length)
        return b"".join(chunks)

    def weights_key(self, feature_req):
        """The model's cache key and, for ``swift:`` weights, their path. A
        ``swift:`` weights object is checked with a HEAD under the caller's
        access on every request and identified by its ETag."""
        ref = feature_req.weights
        if ref.kind != "swift":
            return model_key(feature_req), None
        path = f"{self.account_path}/{ref.value}"
        head = yield Fetch("HEAD", path, "weights")
        head.release()
        if not head.ok:
            raise weights_failure(head, path)
        return model_key(feature_req, path, head.etag), path

    def model_for(self, feature_req, key, weights_path):
        """The cached model, built in a worker thread on first use; the bytes
        of ``swift:`` weights are read only to build."""
        fetched = None
        if weights_path is not None and self.engine.cached_model(key) is None:
            try:
                fetched = yield from self.read(Fetch("GET", weights_path, "weights"))
            except SwiftRefused as refused:
                refused.reply.release()
                raise weights_failure(refused.reply, weights_path) from None
        return (yield Run(self.engine.load_model,
                          (key, feature_req.model, feature_req.weights, fetched)))

    # Admission -----------------------------------------------------------

    def admit(self, model, feature_req, samples):
        """Reserve memory for the request; the storage batch granted. Logs
        and counts each decision but a plain grant."""
        budget = self.tier.budget
        cost = yield Run(self.engine.memory_cost, (model, feature_req))
        signal = Signal()
        try:
            self.ticket = budget.admit(cost, min(feature_req.batch, samples), signal.fire)
            if not self.ticket.granted:
                self.events.increment("queued")
                self.events.info(f"{self.quoted} queued for memory: "
                                 f"{cost.at(self.ticket.wanted)} bytes at batch "
                                 f"{self.ticket.wanted}, {budget.queued} request(s) waiting")
                yield AwaitGrant(signal, budget.queue_timeout)
            budget.settle(self.ticket)
        except OverBudget as err:
            self.ticket = None
            self.events.increment("rejected")
            self.events.warning(f"{self.quoted} refused for memory (503, Retry-After "
                                f"{err.retry_after}): {err}")
            raise
        if self.ticket.reduced:
            self.events.increment("batch_reduced")
            self.events.info(f"{self.quoted} batch reduced from {self.ticket.wanted} to "
                             f"{self.ticket.batch} to fit the memory budget")
        return self.ticket.batch

    # Answers -------------------------------------------------------------

    @property
    def quoted(self):
        return quote(self.path)

    def refused(self, status, body):
        """Log and count a feature request answered with an error status."""
        self.events.increment(f"refused.{status}")
        self.events.info(refusal_line(self.path, status, body))

    def refuse(self, err):
        if not isinstance(err, RequestError):
            err = RequestError.from_exception(err)
        self.refused(err.status, json.dumps(err.fields))
        yield Respond(err.status, {"Content-Type": "application/json", **err.headers},
                      err.body)

    def stream(self, model, feature_req, asked, batches, first):
        """Step 5 and 6: the 200, the frames, the end frame; then give back
        what the request holds and log its line, however the stream ended."""
        sent, outcome, pending = 0, "client disconnected", []
        samples = sum(map(len, batches))
        headers = self.engine.response_headers(feature_req, samples)
        kept = [] if self.cache_path is not None else None

        def start(index):
            return Start(self.engine.extract,
                         (model, batches[index], feature_req, index, self.number, self.started))

        try:
            yield Respond(200, {**headers, protocol.CACHE: "off" if kept is None else "miss"})
            frame = first
            if len(batches) > 1:
                pending.append((yield start(1)))
            for index in range(1, len(batches)):
                yield Send(frame)
                sent += len(frame)
                if kept is not None:
                    kept.append(frame)
                # Frame ``index`` computes; the next one gets in line behind
                # it now, so that it goes on with this request when that one
                # is done (see frame_priority). It is asked for only once
                # the frame before is sent: a slow reader holds at most one
                # frame computed ahead, as before.
                if index + 1 < len(batches):
                    pending.append((yield start(index + 1)))
                frame = yield Join(pending.pop(0))
            last = end_frame(samples, len(batches), time.monotonic() - self.started)
            for tail in (frame, last):
                yield Send(tail)
                sent += len(tail)
                if kept is not None:
                    kept.append(tail)
            outcome = "complete"
            if kept is not None:
                yield from self.keep(headers, b"".join(kept))
        except ClientGone:
            pass
        except StreamEnded as err:
            outcome = err.outcome
            sent += yield from self.last_frame(error_frame(err.status, str(err)))
        except ShardError as err:
            self.events.warning(f"shard member {err.member} failed mid-stream: {err}")
            self.events.increment("stream_errors")
            outcome = "bad member"
            sent += yield from self.last_frame(stream_error_frame(err))
        except Exception as err:
            self.events.exception("feature extraction failed mid-stream")
            self.events.increment("stream_errors")
            outcome = f"error {type(err).__name__}"
            sent += yield from self.last_frame(stream_error_frame(err))
        except BaseException:
            # Closed or cancelled: nothing more can be waited on here.
            pending = []
            raise
        finally:
            for handle in pending:
                # The worker runs on regardless: hold the memory until it is done.
                yield from self.settle(handle)
            self.leave()
            self.events.update_stats("bytes_out", sent)
            self.events.timing_since("extraction_time", self.started)
            self.events.info(summary_line(self.path, feature_req, asked, samples, self.bytes_in,
                                          sent, time.monotonic() - self.started, outcome))

    def replay(self, hit):
        """A cache hit: the stored frames, with the stored headers; no extraction."""
        self.events.increment("cache_hit")
        sent, outcome = 0, "client disconnected"
        try:
            yield Respond(200, {**hit.headers, protocol.CACHE: protocol.CACHE_HIT})
            for start in range(0, len(hit.body), REPLAY_CHUNK):
                chunk = hit.body[start:start + REPLAY_CHUNK]
                yield Send(chunk)
                sent += len(chunk)
            outcome = "complete from the feature cache"
        except ClientGone:
            pass
        finally:
            self.leave()
            self.events.update_stats("bytes_out", sent)
            self.events.info(f"{self.quoted} served from the feature cache: bytes_out={sent} "
                             f"seconds={time.monotonic() - self.started:.3f} outcome={outcome}")

    def keep(self, headers, body):
        """Write the stream just sent to the feature cache (never failing the request)."""
        self.events.increment("cache_miss")
        cache = self.tier.stored_features
        try:
            why_not = yield from cache.store(
                lambda fetch: self.read(fetch, limit=cache.max_bytes), self.account_path,
                self.path, self.cache_path, headers, body)
        except (RequestError, SwiftRefused) as err:
            why_not = str(err)
        if why_not is None:
            self.events.increment("cache_stored")
        else:
            self.events.info(f"{self.quoted} features not cached: {why_not}")

    @staticmethod
    def last_frame(frame):
        """Send a stream's last (error) frame if the caller is still there; bytes sent."""
        try:
            yield Send(frame)
        except ClientGone:
            return 0
        return len(frame)

    @staticmethod
    def settle(pending):
        try:
            yield Join(pending)
        except Exception:
            pass


def weights_failure(reply, path):
    """The answer to a ``swift:`` weights object Swift would not serve."""
    if reply.status in (401, 403):
        return RequestError.weights_refused(path, reply.status, reply.status_line)
    return RequestError.weights_unreadable(path, reply.status_line)

