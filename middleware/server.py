"""Standalone HAPI server: the filter's protocol in its own process beside Swift.

Operators who want the proxy's workers to stay light run the feature
extraction here instead of in the proxy pipeline. The server answers the same
requests as the filter, at the same URLs, so a client only swaps the storage
URL's scheme, host and port::

    GET /v1/<account>/<container>/<object>
    X-Auth-Token: <the caller's Swift token>
    X-Hapi-Model: resnet18          (and the other X-Hapi-* headers)

It reads the shard (and a ``swift:`` weights object) from Swift's proxy with
the caller's own token and holds no credentials of its own: Swift's 401, 403
and 404 of the shard come back unchanged (of a weights object: Swift's 401
or 403 with the filter's JSON body naming ``X-Hapi-Weights``), and a caller
sees through the server exactly what Swift lets it see. Only the token
headers are forwarded, never the ``X-Hapi-*`` ones, so a proxy that also
runs the filter just serves the object; nor is the query string, so temp
URLs do not work through the server (Swift would check a temp URL's address
range against the server's address, not the caller's). A GET without
``X-Hapi-Model`` is a 400 naming that header: this is not a general Swift
proxy, plain object traffic goes to Swift itself (other methods get 405).
Status codes, JSON error bodies, response headers and frames are the
filter's: the shared engine (``hapi.middleware.engine``) builds all of them.
One status is the server's own: 502 with a JSON body when Swift cannot be
reached or does not answer in time.
``GET /healthcheck`` answers ``OK``.

Torch work runs in a thread pool, off the event loop. Each stream computes at
most one batch ahead of the frame being written, and a write waits until the
socket has drained, so a slow reader holds about two frames in the server's
memory whatever the shard's size.

Memory is admitted as in the filter (``hapi.middleware.admission``): the
asked batch, else the largest smaller one that fits the memory budget, else a
wait of up to ``queue_timeout`` seconds in a FIFO queue, else 503 with
Retry-After; each decision that is not a plain grant is logged.

On SIGTERM or SIGINT the server stops accepting connections; in-flight
streams get ``shutdown_grace`` seconds to finish, then end with an error frame
of status 503 at their next frame boundary.

Logs (standard logging, to stderr): the events the filter logs and counts
in statsd, in the filter's words: one line per feature request as it ends
(model, split, batch used and asked, samples, bytes in and out, seconds,
outcome), one per refusal (status and JSON body, Swift's refusals
included), each batch reduction, wait in the memory queue and 503; and an
access log line per HTTP request (``aiohttp.access``: client, method,
path, status, bytes, seconds, user agent). No line holds a token or a
query string (where temp URL signatures travel).

Configuration: an INI file (``--config``) with a ``[server]`` section and a
``[hapi]`` section taking the filter's options (see server.conf.example);
command-line flags override the file::

    hapi-server --config /etc/hapi/server.conf
    python -m hapi.middleware.server --swift-url http://127.0.0.1:8080 --bind-port 8090
"""

import argparse
import asyncio
import collections
import configparser
import contextlib
import dataclasses
import logging
import re
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
import yarl
from aiohttp import web
from multidict import CIMultiDict

from hapi import protocol
from hapi.middleware.admission import OverBudget
from hapi.middleware.engine import model_key, split_batches
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
from hapi.middleware.settings import OPTION_DEFAULTS, Settings
from hapi.shards import ShardError

log = logging.getLogger("hapi.server")

SERVER_DEFAULTS = {
    "swift_url": "http://127.0.0.1:8080",
    "bind_ip": "127.0.0.1",
    "bind_port": "8090",
    "shutdown_grace": "30",
    "log_level": "INFO",
}

# The caller's credentials, forwarded to Swift as they came; nothing else is.
TOKEN_HEADERS = ("X-Auth-Token", "X-Storage-Token", "X-Service-Token")
# Headers of Swift's refusals that are about the hop, not the answer.
HOP_HEADERS = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Date", "Server"))
# /<version>/<account>/<container>/<object>, the object possibly with slashes.
OBJECT_PATH = re.compile(r"^/([^/]+)/([^/]+)/[^/]+/.+$")
READ_CHUNK = 1 << 20
# After the grace period, how long streams get to write their error frame
# before aiohttp cancels what is left (a reader that stopped reading).
FINAL_FRAME_S = 5.0


@dataclass(frozen=True)
class ServerConfig:
    swift_url: str
    bind_ip: str
    bind_port: int
    shutdown_grace: float
    log_level: str
    hapi: Settings


class SwiftRefused(Exception):
    """Swift refused a read made with the caller's token: its answer goes back as is."""

    def __init__(self, response):
        super().__init__(response.status)
        self.response = response


class ShuttingDown(Exception):
    """The shutdown grace period is over: the stream ends with an error frame."""


class KeyedLocks:
    """One asyncio.Lock per key, forgotten once no task holds or awaits it."""

    def __init__(self):
        self._locks = {}
        self._users = collections.Counter()

    @contextlib.asynccontextmanager
    async def hold(self, key):
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] += 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]


def error_response(err):
    """The aiohttp response for a :class:`RequestError`: the filter's status and body."""
    return web.Response(status=err.status, body=err.body, headers=err.headers,
                        content_type="application/json")


def refuse(request, err):
    """Log a refused feature request (the filter's line) and answer it."""
    log.info("%s", refusal_line(request.path, err.status, err.body.decode()))
    return error_response(err)


@contextlib.contextmanager
def swift_answers(path):
    """Failing to reach Swift, or Swift not answering in time, is a 502.

    The log line names the error without its repr: a ClientResponseError's
    repr holds the request's headers, the caller's token among them."""
    try:
        yield
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
        detail = err.message if isinstance(err, aiohttp.ClientResponseError) else str(err)
        log.warning("%s: no answer from Swift: %s: %s", quote(path), type(err).__name__,
                    " ".join(str(detail).split()))
        raise RequestError(502, f"no answer from Swift: {type(err).__name__}") from err


class AccessLogger(web.AbstractAccessLogger):
    """One line per HTTP request, as aiohttp's but with the path in place of
    the request line: the query string, where a temp URL signature travels,
    is never logged, and no header but the User-Agent is."""

    def log(self, request, response, time):
        self.logger.info('%s "%s %s" %d %d %.3f "%s"', request.remote, request.method,
                         quote(request.path), response.status, response.body_length, time,
                         request.headers.get("User-Agent", "-"))


async def relayed(resp):
    """Swift's response, status, headers and body, to send back unchanged."""
    headers = CIMultiDict((k, v) for k, v in resp.headers.items()
                          if k.lower() not in HOP_HEADERS)
    return web.Response(status=resp.status, reason=resp.reason, headers=headers,
                        body=await resp.read())


class HapiServer:
    """One server process: the engine, its executor, the session to Swift,
    admission and the in-flight streams."""

    def __init__(self, config):
        self.config = config
        self.settings = config.hapi
        self.engine = self.settings.make_engine()
        self.budget = self.settings.make_budget(self.engine)
        # One worker per admitted request: each runs one torch job at a time.
        self.executor = ThreadPoolExecutor(max_workers=self.settings.max_concurrent,
                                           thread_name_prefix="hapi-torch")
        self.model_locks = KeyedLocks()
        self.session = None
        self.streams = set()
        self.expired = False

    def make_app(self):
        app = web.Application()
        app.router.add_get("/healthcheck", self.healthcheck, allow_head=False)
        app.router.add_get("/{path:.*}", self.handle, allow_head=False)
        app.on_startup.append(self.start)
        app.on_shutdown.append(self.drain)
        app.on_cleanup.append(self.close)
        return app

    # Lifecycle ---------------------------------------------------------

    async def start(self, _app):
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60))
        # Layer counts need a (weightless) build of each model: do it now, off
        # the loop, so that parsing a request never blocks the loop.
        await self.run(self.warm_layer_counts)
        log.info("HAPI server for %s on device %s, models %s", self.config.swift_url,
                 self.engine.device, ", ".join(self.settings.limits.models))

    def warm_layer_counts(self):
        for name in self.settings.limits.models:
            self.engine.layer_count(name)

    async def drain(self, _app):
        """Give in-flight streams the grace period, then end them with an error frame."""
        if self.streams:
            log.info("shutting down: waiting up to %.1f s for %d stream(s)",
                     self.config.shutdown_grace, len(self.streams))
            await asyncio.wait(self.streams, timeout=self.config.shutdown_grace)
        self.expired = True
        if self.streams:
            log.warning("shutting down: ending %d stream(s) with an error frame",
                        len(self.streams))
            await asyncio.wait(self.streams, timeout=FINAL_FRAME_S)

    async def close(self, _app):
        await self.session.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def run(self, func, *args):
        """Start ``func(*args)`` in an executor thread now; a future of its result."""
        return asyncio.get_running_loop().run_in_executor(self.executor, func, *args)

    def swift_url(self, path):
        """Swift's URL for ``path``, decoded as aiohttp's ``request.path`` is."""
        return yarl.URL(self.config.swift_url + urllib.parse.quote(path), encoded=True)

    # Requests ----------------------------------------------------------

    async def healthcheck(self, _request):
        return web.Response(text="OK")

    async def handle(self, request):
        """A feature request: the filter's answers, statuses and frames."""
        try:
            account_path, feature_req = self.parse(request)
            if len(self.streams) >= self.settings.max_concurrent:
                raise RequestError.at_capacity(self.settings.max_concurrent)
        except RequestError as err:
            return refuse(request, err)
        task = asyncio.current_task()
        self.streams.add(task)
        try:
            return await self.serve(request, account_path, feature_req)
        except SwiftRefused as err:
            log.info("%s", refusal_line(request.path, err.response.status,
                                        '{"error": "refused by Swift"}'))
            return err.response
        except RequestError as err:
            return refuse(request, err)
        except REQUEST_FAILURES as err:
            return refuse(request, RequestError.from_exception(err))
        finally:
            self.streams.discard(task)

    def parse(self, request):
        """The account path (``/v1/AUTH_x``) and the validated feature request."""
        if protocol.MODEL not in request.headers:
            raise RequestError(400, f"this server only answers HAPI feature requests: "
                               f"{protocol.MODEL} is required", parameter=protocol.MODEL)
        match = OBJECT_PATH.match(request.path)
        if match is None:
            raise RequestError.not_an_object()
        try:
            feature_req = protocol.parse_request(request.headers, self.settings.limits,
                                                 self.engine.layer_count)
        except protocol.BadParameter as err:
            raise RequestError.from_exception(err) from None
        return f"/{match[1]}/{match[2]}", feature_req

    async def serve(self, request, account_path, feature_req):
        """Read the shard, compute batch 0 (a bad member there is still a 422),
        then send the 200 and stream the frames."""
        started = time.monotonic()
        auth = {h: request.headers[h] for h in TOKEN_HEADERS if h in request.headers}
        data = await self.read_object(request.path, auth)
        model = await self.model_for(account_path, feature_req, auth)
        samples = await self.run(self.engine.open_shard, data, feature_req.preset)
        ticket = await self.reserve(request.path, model, feature_req, len(samples))
        asked = feature_req.batch
        try:
            if ticket.reduced:
                feature_req = dataclasses.replace(feature_req, batch=ticket.batch)
            batches = split_batches(samples, feature_req.batch)
            first = await self.run(self.engine.extract, model, batches[0], feature_req, 0)
            resp = web.StreamResponse(headers=self.engine.response_headers(feature_req,
                                                                           len(samples)))
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            sent, outcome = await self.stream(resp, model, batches, feature_req, first, started)
        finally:
            self.budget.release(ticket)
        log.info("%s", summary_line(request.path, feature_req, asked, len(samples), len(data),
                                    sent, time.monotonic() - started, outcome))
        return resp

    async def reserve(self, path, model, feature_req, samples):
        """Admit the request against the memory budget, waiting on the event
        loop while it is queued; the granted ticket."""
        cost = await self.run(self.engine.memory_cost, model, feature_req)
        granted = asyncio.get_running_loop().create_future()

        def wake():
            if not granted.done():
                granted.set_result(None)

        try:
            ticket = self.budget.admit(cost, min(feature_req.batch, samples), wake)
            if not ticket.granted:
                log.info("%s queued for memory: %d bytes at batch %d, %d request(s) waiting",
                         quote(path), cost.at(ticket.wanted), ticket.wanted, self.budget.queued)
                await self.wait_in_queue(ticket, granted)
            ticket = self.budget.settle(ticket)
        except OverBudget as err:
            log.warning("%s refused for memory (503, Retry-After %d): %s",
                        quote(path), err.retry_after, err)
            raise
        if ticket.reduced:
            log.info("%s batch reduced from %d to %d to fit the memory budget",
                     quote(path), ticket.wanted, ticket.batch)
        return ticket

    async def wait_in_queue(self, ticket, granted):
        """Wait up to queue_timeout for the budget to grant ``ticket``; a
        request cancelled meanwhile (its client left) leaves the queue."""
        try:
            await asyncio.wait_for(granted, self.budget.queue_timeout)
        except asyncio.TimeoutError:
            pass
        except BaseException:
            self.budget.release(ticket)
            raise

    async def read_object(self, path, auth):
        """The object's bytes, read with the caller's token; Swift's refusal
        passes through, an object above max_shard_bytes is a 413."""
        limit = self.settings.max_shard_bytes
        with swift_answers(path):
            async with self.session.get(self.swift_url(path), headers=auth,
                                        allow_redirects=False) as resp:
                if not 200 <= resp.status < 300:
                    raise SwiftRefused(await relayed(resp))
                if resp.content_length is not None and resp.content_length > limit:
                    raise RequestError.too_large(path, resp.content_length, limit)
                data = bytearray()
                async for chunk in resp.content.iter_chunked(READ_CHUNK):
                    data += chunk
                    if len(data) > limit:
                        raise RequestError.too_large(path, len(data), limit)
                return bytes(data)

    async def weights_etag(self, path, auth):
        """HEAD a ``swift:`` weights object with the caller's token: its ETag."""
        with swift_answers(path):
            async with self.session.head(self.swift_url(path), headers=auth,
                                         allow_redirects=False) as resp:
                if resp.status in (401, 403):
                    raise RequestError.weights_refused(path, resp.status,
                                                       f"{resp.status} {resp.reason}")
                if not 200 <= resp.status < 300:
                    raise RequestError.weights_unreadable(path, f"{resp.status} {resp.reason}")
                return resp.headers.get("Etag", "").strip('"')

    async def read_weights(self, path, auth):
        try:
            return await self.read_object(path, auth)
        except SwiftRefused as err:
            status_line = f"{err.response.status} {err.response.reason}"
            if err.response.status in (401, 403):
                raise RequestError.weights_refused(path, err.response.status,
                                                   status_line) from None
            raise RequestError.weights_unreadable(path, status_line) from None

    async def model_for(self, account_path, feature_req, auth):
        """The cached model for this request, built in a worker thread on first
        use; concurrent requests for the same model wait for one build."""
        path = etag = None
        if feature_req.weights.kind == "swift":
            path = f"{account_path}/{feature_req.weights.value}"
            etag = await self.weights_etag(path, auth)
        key = model_key(feature_req, path, etag)
        async with self.model_locks.hold(key):
            model = self.engine.cached_model(key)
            if model is None:
                fetched = await self.read_weights(path, auth) if path else None
                model = await self.run(self.engine.load_model, key, feature_req.model,
                                       feature_req.weights, fetched)
        return model

    # Streaming ---------------------------------------------------------

    async def stream(self, resp, model, batches, feature_req, first, started):
        """Write the frames, batch i+1 computed while batch i is written, never
        further ahead. Returns the bytes sent and how the stream ended."""
        sent, pending = 0, None

        async def send(frame):
            nonlocal sent
            if self.expired:
                raise ShuttingDown
            await resp.write(frame)  # waits while the reader's socket is full
            sent += len(frame)

        try:
            frame = first
            for index in range(1, len(batches)):
                pending = self.run(self.engine.extract, model, batches[index], feature_req, index)
                await send(frame)
                frame = await asyncio.shield(pending)
                pending = None
            await send(frame)
            await send(end_frame(sum(map(len, batches)), len(batches),
                                 time.monotonic() - started))
            return sent, "complete"
        except ConnectionError:
            return sent, "client disconnected"
        except ShuttingDown:
            await self.last_frame(resp, error_frame(503, "HAPI server is shutting down; retry"))
            return sent, "shutdown"
        except ShardError as err:
            log.warning("shard member %s failed mid-stream: %s", err.member, err)
            await self.last_frame(resp, stream_error_frame(err))
            return sent, "bad member"
        except Exception as err:
            log.exception("feature extraction failed mid-stream")
            await self.last_frame(resp, stream_error_frame(err))
            return sent, f"error {type(err).__name__}"
        finally:
            if pending is not None:
                # The thread runs on regardless: keep the admission slot until it is done.
                await asyncio.wait([pending])

    @staticmethod
    async def last_frame(resp, frame):
        with contextlib.suppress(ConnectionError):
            await resp.write(frame)


# Configuration and CLI -------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="hapi-server",
        description="Standalone HAPI feature-extraction server in front of a Swift proxy. "
                    "Flags override the --config file; unset options take the defaults shown.")
    parser.add_argument("--config", metavar="FILE",
                        help="INI file with [server] and [hapi] sections")
    server = parser.add_argument_group("[server] options")
    helps = {
        "swift_url": "Swift proxy that shards are read from, with the caller's token",
        "bind_ip": "address to listen on",
        "bind_port": "port to listen on",
        "shutdown_grace": "seconds in-flight streams get to finish on SIGTERM",
        "log_level": "DEBUG, INFO, WARNING or ERROR",
    }
    for name, default in SERVER_DEFAULTS.items():
        server.add_argument(flag(name), dest=name, help=f"{helps[name]} (default {default})")
    hapi = parser.add_argument_group("[hapi] options (those of the filter's [filter:hapi])")
    for name, default in OPTION_DEFAULTS.items():
        hapi.add_argument(flag(name), dest=name, help=f"default {default!r}")
    return parser.parse_args(argv)


def flag(name):
    return "--" + name.replace("_", "-")


def read_config_file(path):
    parser = configparser.ConfigParser(interpolation=None)
    if not parser.read(path):
        raise ValueError(f"cannot read config file {path}")
    unknown = set(parser.sections()) - {"server", "hapi"}
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; "
                         "expected [server] and [hapi]")
    sections = {name: dict(parser[name]) if parser.has_section(name) else {}
                for name in ("server", "hapi")}
    for name, known in (("server", SERVER_DEFAULTS), ("hapi", OPTION_DEFAULTS)):
        extra = set(sections[name]) - set(known)
        if extra:
            raise ValueError(f"{path}: unknown option(s) {sorted(extra)} in [{name}]")
    return sections


def load_config(argv=None):
    """The server's configuration from ``--config`` and flags (flags win).
    Raises ValueError naming a bad file, section or option."""
    args = parse_args(argv)
    sections = read_config_file(args.config) if args.config else {"server": {}, "hapi": {}}
    flags = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    server = {**SERVER_DEFAULTS, **sections["server"],
              **{k: v for k, v in flags.items() if k in SERVER_DEFAULTS}}
    hapi = {**sections["hapi"], **{k: v for k, v in flags.items() if k in OPTION_DEFAULTS}}
    try:
        port = int(server["bind_port"])
        grace = float(server["shutdown_grace"])
    except ValueError as err:
        raise ValueError(f"bad bind_port or shutdown_grace: {err}") from None
    if not 1 <= port <= 65535 or grace < 0:
        raise ValueError("bind_port must be 1..65535 and shutdown_grace >= 0")
    level = server["log_level"].upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"unknown log_level {server['log_level']!r}")
    return ServerConfig(swift_url=server["swift_url"].rstrip("/"), bind_ip=server["bind_ip"],
                        bind_port=port, shutdown_grace=grace, log_level=level,
                        hapi=Settings.from_conf(hapi))


def main(argv=None):
    try:
        config = load_config(argv)
    except ValueError as err:
        print(f"hapi-server: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = HapiServer(config).make_app()
    # aiohttp turns SIGTERM/SIGINT into a graceful stop: the listener closes,
    # on_shutdown (HapiServer.drain) waits out the grace period, then handlers
    # still running after shutdown_timeout are cancelled.
    try:
        web.run_app(app, host=config.bind_ip, port=config.bind_port, print=log.info,
                    access_log=logging.getLogger("aiohttp.access"),
                    access_log_class=AccessLogger,
                    shutdown_timeout=FINAL_FRAME_S)
    except OSError as err:
        log.error("cannot listen on %s:%d: %s", config.bind_ip, config.bind_port, err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
