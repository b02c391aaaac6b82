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
queue up to ``queue_timeout`` seconds, else 503. Counters (statsd):
``batch_reduced``, ``queued``, ``rejected``.

Status codes: 400 with a JSON body naming the bad ``X-Hapi-*`` header; 422
naming the shard member that is invalid or does not decode; 413 for a shard
above ``max_shard_bytes``; 503 with Retry-After when ``max_concurrent``
requests are already in progress (reading, waiting for memory, extracting or
streaming) or when there is no memory for the request in time; Swift's own
statuses (401, 403, 404, ...) of the object read pass through unchanged.
"""

import dataclasses
import time

from eventlet import Timeout, spawn, tpool
from eventlet.event import Event
from eventlet.semaphore import Semaphore
from swift.common.http import is_success
from swift.common.registry import register_swift_info
from swift.common.swob import Request, Response
from swift.common.utils import close_if_possible, get_logger
from swift.common.wsgi import make_subrequest

from hapi import protocol, zoo
from hapi.middleware.admission import OverBudget
from hapi.middleware.engine import (
    REQUEST_FAILURES,
    RequestError,
    Settings,
    end_frame,
    model_key,
    split_batches,
    stream_error_frame,
)
from hapi.preprocess import PRESETS
from hapi.shards import ShardError

SWIFT_SOURCE = "HAPI"


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
        self.logger = get_logger(conf, log_route="hapi")
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
        try:
            return self.handle(req, start_response)
        except HapiError as err:
            return err.response(env, start_response)
        except RequestError as err:
            return error_response(err)(env, start_response)

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
            data = self.read_shard_object(req.environ, req.path)
            model = self.model_for(req.environ, f"/{version}/{account}", feature_req)
            samples = self.open_shard(data)
            ticket = self.reserve(model, feature_req, len(samples))
            if ticket.reduced:
                feature_req = dataclasses.replace(feature_req, batch=ticket.batch)
            batches = split_batches(samples, feature_req.batch)
            first = self.first_frame(model, batches[0], feature_req)
        except BaseException:
            if ticket is not None:
                self.budget.release(ticket)
            self.active -= 1
            raise
        self.logger.increment("requests")
        self.logger.update_stats("bytes_in", len(data))
        start_response("200 OK", list(
            self.engine.response_headers(feature_req, len(samples)).items()))
        return self.stream(model, batches, feature_req, first, started, ticket)

    def reserve(self, model, feature_req, samples):
        """Admit the request against the memory budget, waiting on the hub
        (not in an OS thread) while it is queued; the granted ticket."""
        cost = tpool.execute(self.engine.memory_cost, model, feature_req)
        granted = Event()
        try:
            ticket = self.budget.admit(cost, min(feature_req.batch, samples), granted.send)
            if not ticket.granted:
                self.logger.increment("queued")
                self.wait_in_queue(ticket, granted)
            ticket = self.budget.settle(ticket)
        except OverBudget as err:
            self.logger.increment("rejected")
            raise RequestError.from_exception(err) from None
        if ticket.reduced:
            self.logger.increment("batch_reduced")
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
        """GET ``path`` with the caller's own authorization; the failed swob
        response or the object's bytes."""
        resp = make_subrequest(env, method="GET", path=path,
                               swift_source=SWIFT_SOURCE).get_response(self.app)
        if not is_success(resp.status_int):
            return resp, None
        length = resp.content_length
        if length is not None and length > self.max_shard_bytes:
            close_if_possible(resp.app_iter)
            raise RequestError.too_large(path, length, self.max_shard_bytes)
        return resp, resp.body

    def read_shard_object(self, env, path):
        """The shard's bytes; Swift's own failure (401, 403, 404...) passes through."""
        resp, data = self.read_object(env, path)
        if data is None:
            raise HapiError(resp)
        return data

    def weights_failure(self, resp, path):
        if resp.status_int in (401, 403):
            return HapiError(resp)
        return RequestError.weights_unreadable(path, resp.status)

    def model_for(self, env, account_path, feature_req):
        """The cached model for this request, built in an OS thread on first use.

        A ``swift:`` weights object is checked with a HEAD under the caller's
        own access on every request and identified by its ETag, so replacing
        the object replaces the model; its bytes are read only to build.
        """
        ref = feature_req.weights
        key = model_key(feature_req)
        fetched = None
        with self.model_lock:
            if ref.kind == "swift":
                path = f"{account_path}/{ref.value}"
                head = make_subrequest(env, method="HEAD", path=path,
                                       swift_source=SWIFT_SOURCE).get_response(self.app)
                if not is_success(head.status_int):
                    raise self.weights_failure(head, path)
                key = model_key(feature_req, path, head.etag)
                if self.engine.cached_model(key) is None:
                    resp, fetched = self.read_object(env, path)
                    if fetched is None:
                        raise self.weights_failure(resp, path)
            try:
                return tpool.execute(self.engine.load_model, key, feature_req.model, ref, fetched)
            except REQUEST_FAILURES as err:
                raise RequestError.from_exception(err) from None

    def open_shard(self, data):
        try:
            return tpool.execute(self.engine.open_shard, data)
        except ShardError as err:
            raise RequestError.from_exception(err) from None

    def first_frame(self, model, batch, feature_req):
        """Compute batch 0 before the status goes out, so a bad member there is a 422."""
        try:
            return tpool.execute(self.engine.extract, model, batch, feature_req, 0)
        except ShardError as err:
            raise RequestError.from_exception(err) from None

    def stream(self, model, batches, feature_req, first, started, ticket):
        """Yield frames; batch i+1 is computed in an OS thread while batch i is
        sent. The memory reservation ``ticket`` is released when the stream
        ends, however it ends."""

        def compute(index):
            if index < len(batches):
                return spawn(tpool.execute, self.engine.extract, model, batches[index],
                             feature_req, index)
            return None

        pending = compute(1)
        sent = len(first)
        try:
            yield first
            for index in range(1, len(batches)):
                # Once waited on, a failed batch must not be waited on again below.
                current, pending = pending, None
                frame = current.wait()
                pending = compute(index + 1)
                sent += len(frame)
                yield frame
            yield end_frame(sum(map(len, batches)), len(batches), time.monotonic() - started)
        except ShardError as err:
            self.logger.warning("HAPI: shard member %s failed mid-stream: %s", err.member, err)
            yield stream_error_frame(err)
        except Exception as err:
            self.logger.exception("HAPI: feature extraction failed")
            yield stream_error_frame(err)
        finally:
            if pending is not None:
                pending.wait()
            self.budget.release(ticket)
            self.active -= 1
            self.logger.update_stats("bytes_out", sent)
            self.logger.timing_since("extraction_time", started)


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
