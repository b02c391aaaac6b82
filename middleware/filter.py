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

Status codes: 400 with a JSON body naming the bad ``X-Hapi-*`` header; 422
naming the shard member that is invalid or does not decode; 413 for a shard
above ``max_shard_bytes``; 503 with Retry-After when ``max_concurrent``
requests are already extracting; Swift's own statuses (401, 403, 404, ...)
of the object read pass through unchanged.
"""

import json
import time

from eventlet import spawn, tpool
from eventlet.semaphore import Semaphore
from swift.common.http import is_success
from swift.common.registry import register_swift_info
from swift.common.swob import Request, Response
from swift.common.utils import (
    close_if_possible,
    config_positive_int_value,
    get_logger,
    list_from_csv,
)
from swift.common.wsgi import make_subrequest

from hapi import protocol, zoo
from hapi.middleware.engine import FeatureEngine, WeightsNotFound, end_frame, error_frame
from hapi.preprocess import PRESETS
from hapi.shards import ShardError
from hapi.weights import WeightsError

SWIFT_SOURCE = "HAPI"


class HapiError(Exception):
    """An answer decided before the stream starts: a swob Response to send."""

    def __init__(self, response):
        super().__init__(response.status)
        self.response = response


def json_error(status, message, **fields):
    body = json.dumps({"error": message, **fields}).encode()
    headers = {"Retry-After": "1"} if status == 503 else {}
    return HapiError(Response(status=status, body=body, headers=headers,
                              content_type="application/json"))


def limits_from_conf(conf):
    models = tuple(zoo.canonical_name(m) for m in list_from_csv(conf.get("models", "")))
    return protocol.Limits(
        max_batch=config_positive_int_value(conf.get("max_batch", 256)),
        default_batch=config_positive_int_value(conf.get("default_batch", 32)),
        models=models or tuple(zoo.MODELS),
        weights_dir_enabled=bool(conf.get("weights_dir")),
    )


class HapiMiddleware:
    def __init__(self, app, conf, engine=None):
        self.app = app
        self.logger = get_logger(conf, log_route="hapi")
        self.max_concurrent = config_positive_int_value(conf.get("max_concurrent", 4))
        self.max_shard_bytes = config_positive_int_value(conf.get("max_shard_bytes", 1 << 28))
        self.limits = limits_from_conf(conf)
        self.engine = engine or FeatureEngine(
            device=conf.get("device", "auto"),
            threads=int(conf.get("threads", 0)),
            max_image_pixels=config_positive_int_value(conf.get("max_image_pixels", 40_000_000)),
            weights_dir=conf.get("weights_dir", ""),
            max_cached_models=config_positive_int_value(conf.get("max_cached_models", 4)))
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

    def handle(self, req, start_response):
        try:
            version, account, _container, _obj = req.split_path(4, 4, True)
        except ValueError:
            raise json_error(400, "HAPI requests must GET an object",
                             parameter=protocol.MODEL) from None
        try:
            feature_req = protocol.parse_request(req.headers, self.limits,
                                                 self.engine.layer_count)
        except protocol.BadParameter as err:
            raise json_error(400, err.message, parameter=err.parameter) from None
        if self.active >= self.max_concurrent:
            self.logger.increment("rejected")
            raise json_error(503, "HAPI is at capacity; retry later",
                             max_concurrent=self.max_concurrent)
        self.active += 1
        try:
            started = time.monotonic()
            data = self.read_shard_object(req.environ, req.path)
            model = self.model_for(req.environ, f"/{version}/{account}", feature_req)
            samples = self.open_shard(data)
            batches = [samples[i:i + feature_req.batch]
                       for i in range(0, len(samples), feature_req.batch)]
            first = self.first_frame(model, batches[0], feature_req)
        except BaseException:
            self.active -= 1
            raise
        self.logger.increment("requests")
        self.logger.update_stats("bytes_in", len(data))
        start_response("200 OK", [
            ("Content-Type", protocol.CONTENT_TYPE),
            (protocol.DEVICE, str(self.engine.device)),
            (protocol.BATCH_USED, str(feature_req.batch)),
            (protocol.SAMPLES, str(len(samples))),
            (protocol.SPLIT, str(feature_req.split)),
            (protocol.MODEL, feature_req.model),
        ])
        return self.stream(model, batches, feature_req, first, started)

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
            raise json_error(413, f"{path} is {length} bytes, above max_shard_bytes "
                             f"{self.max_shard_bytes}")
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
        return json_error(400, f"weights object {path} could not be read: {resp.status}",
                          parameter=protocol.WEIGHTS)

    def model_for(self, env, account_path, feature_req):
        """The cached model for this request, built in an OS thread on first use.

        A ``swift:`` weights object is checked with a HEAD under the caller's
        own access on every request and identified by its ETag, so replacing
        the object replaces the model; its bytes are read only to build.
        """
        ref = feature_req.weights
        key = (feature_req.model, str(ref))
        fetched = None
        with self.model_lock:
            if ref.kind == "swift":
                path = f"{account_path}/{ref.value}"
                head = make_subrequest(env, method="HEAD", path=path,
                                       swift_source=SWIFT_SOURCE).get_response(self.app)
                if not is_success(head.status_int):
                    raise self.weights_failure(head, path)
                key = (feature_req.model, f"{path}@{head.etag}")
                if self.engine.cached_model(key) is None:
                    resp, fetched = self.read_object(env, path)
                    if fetched is None:
                        raise self.weights_failure(resp, path)
            try:
                return tpool.execute(self.engine.load_model, key, feature_req.model, ref, fetched)
            except (WeightsError, WeightsNotFound) as err:
                raise json_error(400, str(err), parameter=protocol.WEIGHTS) from None

    def open_shard(self, data):
        try:
            return tpool.execute(self.engine.open_shard, data)
        except ShardError as err:
            raise json_error(422, str(err), member=err.member) from None

    def first_frame(self, model, batch, feature_req):
        """Compute batch 0 before the status goes out, so a bad member there is a 422."""
        try:
            return tpool.execute(self.engine.extract, model, batch, feature_req, 0)
        except ShardError as err:
            raise json_error(422, str(err), member=err.member) from None

    def stream(self, model, batches, feature_req, first, started):
        """Yield frames; batch i+1 is computed in an OS thread while batch i is sent."""

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
                frame = pending.wait()
                pending = compute(index + 1)
                sent += len(frame)
                yield frame
            yield end_frame(sum(map(len, batches)), len(batches), time.monotonic() - started)
        except ShardError as err:
            self.logger.warning("HAPI: shard member %s failed mid-stream: %s", err.member, err)
            yield error_frame(422, str(err), err.member)
        except Exception as err:
            self.logger.exception("HAPI: feature extraction failed")
            yield error_frame(500, f"feature extraction failed: {type(err).__name__}")
        finally:
            if pending is not None:
                pending.wait()
            self.active -= 1
            self.logger.update_stats("bytes_out", sent)
            self.logger.timing_since("extraction_time", started)


def filter_factory(global_conf, **local_conf):
    conf = global_conf.copy()
    conf.update(local_conf)
    limits = limits_from_conf(conf)
    register_swift_info(
        "hapi",
        models={name: {"default_freeze": zoo.MODELS[name].default_freeze}
                for name in limits.models},
        presets=sorted(PRESETS),
        dtypes=list(protocol.WIRE_DTYPES),
        max_batch=limits.max_batch,
        default_batch=limits.default_batch,
        max_concurrent=config_positive_int_value(conf.get("max_concurrent", 4)),
        file_weights=limits.weights_dir_enabled,
    )

    def hapi_filter(app):
        return HapiMiddleware(app, conf)
    return hapi_filter
