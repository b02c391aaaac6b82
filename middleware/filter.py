"""Swift proxy filter that runs the frozen layers of a network next to the data.

A GET on an object that carries ``X-Hapi-Model`` is a feature request: the
filter reads the object (a WebDataset tar shard) through a subrequest, so the
caller's own access applies, decodes and preprocesses its images, runs the
requested model's layers [0, split) in eval mode without gradients, and
streams one frame per storage batch back (see ``hapi.wire``). Every other
request passes through untouched.

The torch work runs in real OS threads (``eventlet.tpool``): Swift
monkey-patches threading, so anything else would block the proxy's hub and
every request it serves. Place the filter after the auth middleware::

    [pipeline:main]
    pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats
               tempauth hapi copy dlo slo versioned_writes symlink proxy-logging proxy-server

    [filter:hapi]
    use = egg:hapi-tl#hapi
    # device = auto
    # max_batch = 256
    # default_batch = 32
    # max_concurrent = 4
    # threads = 0
    # weights_dir =
    # max_shard_bytes = 268435456
    # max_image_pixels = 40000000
    # max_cached_models = 4
    # models =
    # memory_budget = auto
    # queue_timeout = 10
    # min_batch = 1

Memory (DESIGN.md invariant 4): each request is admitted against the memory
budget (``hapi.middleware.admission``) once its shard is open: at the batch
it asked for, else at the largest smaller batch that fits (down to
``min_batch``; ``X-Hapi-Batch-Used`` says which), else after waiting in a FIFO
queue up to ``queue_timeout`` seconds, else 503.

Logs and metrics: the filter logs through the proxy's logger (log route
``hapi``): one line per feature request as it ends (model, split, batches,
samples, bytes in and out, seconds, outcome) and one per refusal (status
and JSON body); the log lines are the standalone server's. Its statsd
metrics (``log_statsd_host`` etc. in ``[DEFAULT]`` or ``[filter:hapi]``),
under the prefix ``hapi.``:

    requests            counter: every feature request
    refused.<status>    counter: every one answered with an error status
                        (400, 413, 422, 503, and Swift's own 401, 403, 404...)
    rejected            counter: the 503s (at capacity, or no memory in time)
    queued              counter: requests that waited for memory
    batch_reduced       counter: requests admitted at a smaller storage batch
    bytes_in            counter: bytes of shard objects read
    bytes_out           counter: bytes of frames sent
    extraction_time     timing: from the request to its last frame
    stream_errors       counter: streams ended by an error frame after the 200

Security: the object and a ``swift:`` weights object are read with the
caller's own authorization, so Swift's ACLs apply unchanged. A request
authorized by a temp URL may read ``swift:`` weights only where that temp
URL reaches (a ``temp_url_prefix`` of the same container), as a plain GET
of the weights with the same signature would; elsewhere it gets a 401.

Status codes: 400 with a JSON body naming the bad ``X-Hapi-*`` header; 422
naming the shard member that is invalid or does not decode; 413 for a shard
above ``max_shard_bytes``; 503 with Retry-After when ``max_concurrent``
requests are already in progress (reading, waiting for memory, extracting or
streaming) or when there is no memory for the request in time; Swift's own
statuses (401, 403, 404, ...) of the object read pass through unchanged; a
``swift:`` weights object the caller may not read is Swift's 401 or 403
with a JSON body naming ``X-Hapi-Weights`` (another failure to read it is
a 400 naming it).
"""

import dataclasses
import json
import time

from eventlet import Timeout, spawn, tpool
from eventlet.event import Event
from eventlet.semaphore import Semaphore
from swift.common.http import is_success
from swift.common.middleware.tempurl import get_temp_url_info
from swift.common.registry import register_swift_info
from swift.common.swob import Request, Response, wsgi_quote, wsgi_to_str
from swift.common.utils import close_if_possible, get_logger
from swift.common.wsgi import make_subrequest

from hapi import protocol, zoo
from hapi.middleware.admission import OverBudget
from hapi.middleware.engine import model_key, split_batches
from hapi.middleware.responses import (
    REQUEST_FAILURES,
    RequestError,
    end_frame,
    quote,
    refusal_line,
    stream_error_frame,
    summary_line,
)
from hapi.middleware.settings import Settings
from hapi.preprocess import PRESETS
from hapi.shards import ShardError

SWIFT_SOURCE = "HAPI"
# tempurl's REMOTE_USER for the requests it authorized.
TEMPURL_USER = ".wsgi.tempurl"


class HapiError(Exception):
    """Swift's own answer to a read made with the caller's access: sent as is."""

    def __init__(self, response):
        super().__init__(response.status)
        self.response = response


def error_response(err):
    """The swob Response for a :class:`RequestError`."""
    return Response(status=err.status, body=err.body, headers=err.headers,
                    content_type="application/json")


class HapiMiddleware:
    def __init__(self, app, conf):
        self.app = app
        # Metrics are hapi.<name>, as tempauth's are tempauth.<name>.
        self.logger = get_logger(conf, log_route="hapi", statsd_tail_prefix="hapi")
        settings = Settings.from_conf(conf)
        self.max_concurrent = settings.max_concurrent
        self.max_shard_bytes = settings.max_shard_bytes
        self.limits = settings.limits
        self.engine = settings.make_engine()
        self.budget = settings.make_budget(self.engine)
        self.active = 0
        self.model_lock = Semaphore()

    def __call__(self, env, start_response):
        if env["REQUEST_METHOD"] != "GET" or "HTTP_X_HAPI_MODEL" not in env:
            return self.app(env, start_response)
        req = Request(env)
        self.logger.increment("requests")
        try:
            return self.handle(req, start_response)
        except HapiError as err:
            self.refused(req, err.response.status_int, {"error": "refused by Swift"})
            return err.response(env, start_response)
        except RequestError as err:
            self.refused(req, err.status, err.fields)
            return error_response(err)(env, start_response)
        except Exception as err:
            self.logger.exception("HAPI: feature request %s failed", req.path)
            err = RequestError(500, f"feature extraction failed: {type(err).__name__}")
            self.refused(req, err.status, err.fields)
            return error_response(err)(env, start_response)

    def refused(self, req, status, fields):
        """Log and count a feature request answered with an error status."""
        self.logger.increment(f"refused.{status}")
        self.logger.info("HAPI: %s", refusal_line(wsgi_to_str(req.path_info), status,
                                                  json.dumps(fields)))

    def handle(self, req, start_response):
        try:
            version, account, _container, _obj = req.split_path(4, 4, True)
        except ValueError:
            raise RequestError.not_an_object() from None
        try:
            feature_req = protocol.parse_request(req.headers, self.limits,
                                                 self.engine.layer_count)
        except protocol.BadParameter as err:
            raise RequestError.from_exception(err) from None
        if self.active >= self.max_concurrent:
            self.logger.increment("rejected")
            raise RequestError.at_capacity(self.max_concurrent)
        self.active += 1
        ticket = None
        try:
            started = time.monotonic()
            data = self.read_shard_object(req.environ, shard_path(req))
            self.logger.update_stats("bytes_in", len(data))
            model = self.model_for(req, f"/{version}/{account}", feature_req)
            samples = self.open_shard(data, feature_req.preset)
            ticket = self.reserve(req, model, feature_req, len(samples))
            asked = feature_req.batch
            if ticket.reduced:
                feature_req = dataclasses.replace(feature_req, batch=ticket.batch)
            batches = split_batches(samples, feature_req.batch)
            first = self.first_frame(model, batches[0], feature_req)
        except BaseException:
            if ticket is not None:
                self.budget.release(ticket)
            self.active -= 1
            raise
        start_response("200 OK", list(
            self.engine.response_headers(feature_req, len(samples)).items()))
        summary = {"path": wsgi_to_str(req.path_info), "request": feature_req, "asked": asked,
                   "samples": len(samples), "bytes_in": len(data)}
        return self.stream(model, batches, feature_req, first, started, ticket, summary)

    def reserve(self, req, model, feature_req, samples):
        """Admit the request against the memory budget, waiting on the hub
        (not in an OS thread) while it is queued; the granted ticket. Logs
        (as the server does) and counts each decision but a plain grant."""
        cost = tpool.execute(self.engine.memory_cost, model, feature_req)
        granted = Event()
        path = quote(wsgi_to_str(req.path_info))
        try:
            ticket = self.budget.admit(cost, min(feature_req.batch, samples), granted.send)
            if not ticket.granted:
                self.logger.increment("queued")
                self.logger.info("HAPI: %s queued for memory: %d bytes at batch %d, %d "
                                 "request(s) waiting", path, cost.at(ticket.wanted),
                                 ticket.wanted, self.budget.queued)
                self.wait_in_queue(ticket, granted)
            ticket = self.budget.settle(ticket)
        except OverBudget as err:
            self.logger.increment("rejected")
            raise RequestError.from_exception(err) from None
        if ticket.reduced:
            self.logger.increment("batch_reduced")
            self.logger.info("HAPI: %s batch reduced from %d to %d to fit the memory budget",
                             path, ticket.wanted, ticket.batch)
        return ticket

    def wait_in_queue(self, ticket, granted):
        """Wait up to queue_timeout for the budget to grant ``ticket``; a
        greenthread killed meanwhile leaves the queue."""
        try:
            with Timeout(self.budget.queue_timeout, False):
                granted.wait()
        except BaseException:
            self.budget.release(ticket)
            raise

    def read_object(self, env, path):
        """GET ``path`` (quoted) with the caller's own authorization; the
        failed swob response or the object's bytes. An object above
        max_shard_bytes is a 413, whether its length is declared (checked
        before reading) or not (a chunked body, read up to the limit)."""
        resp = make_subrequest(env, method="GET", path=path,
                               swift_source=SWIFT_SOURCE).get_response(self.app)
        if not is_success(resp.status_int):
            return resp, None
        limit = self.max_shard_bytes
        length = resp.content_length
        body = resp.app_iter
        name = path.partition("?")[0]
        try:
            if length is not None and length > limit:
                raise RequestError.too_large(name, length, limit)
            chunks, size = [], 0
            for chunk in body:
                size += len(chunk)
                if size > limit:
                    raise RequestError.too_large(name, size, limit)
                chunks.append(chunk)
        finally:
            close_if_possible(body)
        return resp, b"".join(chunks)

    def read_shard_object(self, env, path):
        """The shard's bytes; Swift's own failure (401, 403, 404...) passes through."""
        resp, data = self.read_object(env, path)
        if data is None:
            raise HapiError(resp)
        return data

    @staticmethod
    def weights_failure(resp, name):
        if resp.status_int in (401, 403):
            return RequestError.weights_refused(name, resp.status_int, resp.status)
        return RequestError.weights_unreadable(name, resp.status)

    def model_for(self, req, account_path, feature_req):
        """The cached model for this request, built in an OS thread on first use.

        A ``swift:`` weights object is checked with a HEAD under the caller's
        own access on every request and identified by its ETag, so replacing
        the object replaces the model; its bytes are read only to build.
        """
        env = req.environ
        ref = feature_req.weights
        key = model_key(feature_req)
        fetched = None
        with self.model_lock:
            if ref.kind == "swift":
                name = wsgi_to_str(f"{account_path}/{ref.value}")
                # The reference is an object name, never a query or an escape;
                # nothing of the caller's query string applies to it.
                path = wsgi_quote(f"{account_path}/{ref.value}") + "?"
                if env.get("REMOTE_USER") == TEMPURL_USER and \
                        not tempurl_reaches(req, ref.value):
                    raise RequestError.weights_refused(name, 401, "401 Unauthorized (the temp "
                                                       "URL does not reach it)")
                head = make_subrequest(env, method="HEAD", path=path,
                                       swift_source=SWIFT_SOURCE).get_response(self.app)
                if not is_success(head.status_int):
                    raise self.weights_failure(head, name)
                key = model_key(feature_req, name, head.etag)
                if self.engine.cached_model(key) is None:
                    resp, fetched = self.read_object(env, path)
                    if fetched is None:
                        raise self.weights_failure(resp, name)
            try:
                return tpool.execute(self.engine.load_model, key, feature_req.model, ref, fetched)
            except REQUEST_FAILURES as err:
                raise RequestError.from_exception(err) from None

    def open_shard(self, data, preset):
        try:
            return tpool.execute(self.engine.open_shard, data, preset)
        except ShardError as err:
            raise RequestError.from_exception(err) from None

    def first_frame(self, model, batch, feature_req):
        """Compute batch 0 before the status goes out, so a bad member there is a 422."""
        try:
            return tpool.execute(self.engine.extract, model, batch, feature_req, 0)
        except ShardError as err:
            raise RequestError.from_exception(err) from None

    def stream(self, model, batches, feature_req, first, started, ticket, summary):
        """Yield frames; batch i+1 is computed in an OS thread while batch i is
        sent. The memory reservation ``ticket`` is released when the stream
        ends, however it ends; then the request's summary line is logged."""

        def compute(index):
            if index < len(batches):
                return spawn(tpool.execute, self.engine.extract, model, batches[index],
                             feature_req, index)
            return None

        pending = compute(1)
        sent, outcome = 0, "client disconnected"
        try:
            sent += len(first)
            yield first
            for index in range(1, len(batches)):
                # Once waited on, a failed batch must not be waited on again below.
                current, pending = pending, None
                frame = current.wait()
                pending = compute(index + 1)
                sent += len(frame)
                yield frame
            frame = end_frame(sum(map(len, batches)), len(batches), time.monotonic() - started)
            sent += len(frame)
            outcome = "complete"
            yield frame
        except ShardError as err:
            self.logger.warning("HAPI: shard member %s failed mid-stream: %s", err.member, err)
            self.logger.increment("stream_errors")
            outcome = "bad member"
            yield stream_error_frame(err)
        except Exception as err:
            self.logger.exception("HAPI: feature extraction failed")
            self.logger.increment("stream_errors")
            outcome = f"error {type(err).__name__}"
            yield stream_error_frame(err)
        finally:
            if pending is not None:
                pending.wait()
            self.budget.release(ticket)
            self.active -= 1
            self.logger.update_stats("bytes_out", sent)
            self.logger.timing_since("extraction_time", started)
            self.logger.info("HAPI: %s", summary_line(
                **summary, bytes_out=sent, seconds=time.monotonic() - started, outcome=outcome))


def shard_path(req):
    """The path of the subrequest that reads the shard: the request's, with
    its query string (``version-id``...), except tempurl's parameters, which
    Swift would carry into the object server's log (in the backend request's
    Referer) once tempurl has checked them."""
    if req.environ.get("REMOTE_USER") == TEMPURL_USER:
        return req.path + "?"  # tempurl left only its own parameters there
    return req.path_qs


def tempurl_reaches(req, weights_ref):
    """Whether the temp URL that authorized ``req`` also lets a plain GET read
    the weights object ``<container>/<object>`` (``weights_ref``) of the same
    account: only a ``temp_url_prefix`` signature does, for objects of the
    request's container under that prefix (tempurl checked the signature and
    that the requested object is under it)."""
    prefix = get_temp_url_info(req.environ)[2]
    if prefix is None:
        return False
    _version, _account, container, _obj = req.split_path(4, 4, True)
    weights_container, _, weights_obj = wsgi_to_str(weights_ref).partition("/")
    return weights_container == wsgi_to_str(container) and weights_obj.startswith(prefix)


def filter_factory(global_conf, **local_conf):
    conf = global_conf.copy()
    conf.update(local_conf)
    settings = Settings.from_conf(conf)
    limits = settings.limits
    register_swift_info(
        "hapi",
        models={name: {"default_freeze": zoo.MODELS[name].default_freeze}
                for name in limits.models},
        presets=sorted(PRESETS),
        dtypes=list(protocol.WIRE_DTYPES),
        max_batch=limits.max_batch,
        default_batch=limits.default_batch,
        max_concurrent=settings.max_concurrent,
        min_batch=settings.min_batch,
        file_weights=limits.weights_dir_enabled,
    )

    def hapi_filter(app):
        return HapiMiddleware(app, conf)
    return hapi_filter
