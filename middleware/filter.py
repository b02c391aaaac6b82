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

The steps of a feature request are :mod:`hapi.middleware.pipeline`'s, the
same as the standalone server's; this module performs their I/O the proxy's
way: subrequests through the rest of the pipeline, ``eventlet.tpool`` for
the torch work, the hub for waits.

Memory (docs/DESIGN.md, "bounded memory"): each request is admitted against
the memory budget (``hapi.middleware.admission``) once its shard is open: at
the batch it asked for, else at the largest smaller batch that fits (down to
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

import json

from eventlet import Timeout, spawn, tpool
from eventlet.event import Event
from eventlet.patcher import original
from swift.common.middleware.tempurl import get_temp_url_info
from swift.common.registry import register_swift_info
from swift.common.swob import HeaderKeyDict, Request, Response, str_to_wsgi, wsgi_quote, wsgi_to_str
from swift.common.utils import close_if_possible, get_logger
from swift.common.wsgi import make_subrequest

from hapi import protocol, zoo
from hapi.middleware import effects
from hapi.middleware.pipeline import Events, StorageTier
from hapi.middleware.responses import RequestError
from hapi.middleware.settings import Settings
from hapi.preprocess import PRESETS

SWIFT_SOURCE = "HAPI"
# tempurl's REMOTE_USER for the requests it authorized.
TEMPURL_USER = ".wsgi.tempurl"


class ProxyEvents(Events):
    """The steps' log lines through the proxy's logger, marked ``HAPI:``
    among the other middlewares' lines, and their statsd metrics."""

    def __init__(self, logger):
        super().__init__(logger, prefix="HAPI: ")
        self.increment = logger.increment
        self.update_stats = logger.update_stats
        self.timing_since = logger.timing_since


class HapiMiddleware:
    def __init__(self, app, conf):
        self.app = app
        # Metrics are hapi.<name>, as tempauth's are tempauth.<name>.
        self.logger = get_logger(conf, log_route="hapi", statsd_tail_prefix="hapi")
        # The engine's locks are taken in tpool's OS threads: they must not be green.
        self.tier = StorageTier(Settings.from_conf(conf), ProxyEvents(self.logger),
                                threading_module=original("threading"))

    def __call__(self, env, start_response):
        if env["REQUEST_METHOD"] == "GET" and env.get("PATH_INFO") == protocol.COSTS_PATH:
            status, doc = self.tier.layer_costs(env.get("QUERY_STRING", ""))
            return Response(status=status, body=json.dumps(doc).encode(),
                            content_type="application/json")(env, start_response)
        if env["REQUEST_METHOD"] != "GET" or "HTTP_X_HAPI_MODEL" not in env:
            return self.app(env, start_response)
        return FeatureResponse(self.app, Request(env), self.tier).respond(start_response)


class FeatureResponse:
    """One feature request driven through the pipeline's steps, the proxy's way."""

    def __init__(self, app, req, tier):
        self.app = app
        self.req = req
        headers = HeaderKeyDict((k, wsgi_to_str(v)) for k, v in req.headers.items())
        # A temp URL's own parameters are all that tempurl left in the query,
        # and they must not reach the backend's logs (in its Referer).
        query = "" if self.tempurl else req.environ.get("QUERY_STRING", "")
        self.steps = tier.feature_request(wsgi_to_str(req.path_info), query, headers)

    @property
    def tempurl(self):
        return self.req.environ.get("REMOTE_USER") == TEMPURL_USER

    def respond(self, start_response):
        """Run the steps up to the answer's status; the WSGI response."""
        value, error = None, None
        while True:
            effect = self.advance(value, error)
            if isinstance(effect, effects.Relay):
                return effect.reply.native(self.req.environ, start_response)
            if isinstance(effect, effects.Respond) and effect.body is not None:
                self.advance(None, None)  # the steps end with their answer
                return Response(status=effect.status, headers=effect.headers,
                                body=effect.body)(self.req.environ, start_response)
            if isinstance(effect, effects.Respond):
                start_response("200 OK", list(effect.headers.items()))
                return self.body()
            value, error = self.perform(effect)

    def body(self):
        """The stream's frames; once the caller is gone (the WSGI server
        closes this iterator), the steps still run to their end, without
        yielding, so that the request gives back what it holds."""
        value, error, gone = None, None, False
        while (effect := self.advance(value, error)) is not None:
            if not isinstance(effect, effects.Send):
                value, error = self.perform(effect)
            elif gone:
                value, error = None, effects.ClientGone()
            else:
                try:
                    yield effect.data
                    value, error = None, None
                except GeneratorExit:
                    gone, value, error = True, None, effects.ClientGone()

    def advance(self, value, error):
        """The steps' next effect, given the last one's result; None at their end."""
        try:
            return self.steps.send(value) if error is None else self.steps.throw(error)
        except StopIteration:
            return None

    def perform(self, effect):
        """(result, None), or (None, the exception to raise into the steps)."""
        try:
            if isinstance(effect, effects.Fetch):
                return self.fetch(effect), None
            if isinstance(effect, effects.NextChunk):
                return self.next_chunk(effect.reply), None
            if isinstance(effect, effects.Run):
                return tpool.execute(effect.func, *effect.args), None
            if isinstance(effect, effects.Start):
                return spawn(tpool.execute, effect.func, *effect.args), None
            if isinstance(effect, effects.Join):
                return effect.handle.wait(), None
            if isinstance(effect, effects.AwaitGrant):
                return self.await_grant(effect), None
            raise TypeError(f"no way to perform {effect!r}")
        except Exception as err:
            return None, err

    def fetch(self, effect):
        """A subrequest through the rest of the pipeline with the caller's authorization."""
        if effect.purpose == "weights" and self.tempurl and not self.tempurl_reaches(effect.path):
            raise RequestError.weights_refused(
                effect.path, 401, "401 Unauthorized (the temp URL does not reach it)")
        path = wsgi_quote(str_to_wsgi(effect.path)) + "?" + effect.query
        headers = {k: str_to_wsgi(v) for k, v in effect.headers.items()}
        resp = make_subrequest(self.req.environ, method=effect.method, path=path,
                               headers=headers, body=effect.body,
                               swift_source=SWIFT_SOURCE).get_response(self.app)
        return effects.Reply(status=resp.status_int, reason=resp.status.partition(" ")[2],
                     headers=resp.headers, native=resp, body=iter(resp.app_iter),
                     release=lambda: close_if_possible(resp.app_iter))

    @staticmethod
    def next_chunk(reply):
        try:
            return next(reply.body, b"")
        except Exception as err:
            raise effects.BodyBroken(f"{type(err).__name__}: {err}") from err

    @staticmethod
    def await_grant(effect):
        """Wait on the hub, not in an OS thread, for the budget's grant."""
        if not effect.signal.fired:
            granted = Event()
            effect.signal.listener = granted.send
            with Timeout(effect.timeout, False):
                granted.wait()

    def tempurl_reaches(self, weights_path):
        """Whether the temp URL that authorized the request also lets a plain
        GET read the weights object at ``weights_path`` (same account): only
        a ``temp_url_prefix`` signature does, for objects of the request's
        container under that prefix (tempurl checked the signature and that
        the requested object is under it)."""
        prefix = get_temp_url_info(self.req.environ)[2]
        if prefix is None:
            return False
        _version, _account, container, _obj = self.req.split_path(4, 4, True)
        _, _, _, weights_container, weights_obj = weights_path.split("/", 4)
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
        encodings=list(protocol.WIRE_ENCODINGS),
        max_batch=limits.max_batch,
        default_batch=limits.default_batch,
        max_concurrent=settings.max_concurrent,
        min_batch=settings.min_batch,
        file_weights=limits.weights_dir_enabled,
        feature_cache=bool(settings.feature_cache_container),
    )

    def hapi_filter(app):
        return HapiMiddleware(app, conf)
    return hapi_filter
