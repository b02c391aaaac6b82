"""The standalone server's aiohttp application: the pipeline's steps
(:mod:`hapi.middleware.pipeline`) performed the asyncio way. The command
line and configuration are :mod:`hapi.middleware.server`."""

import asyncio
import collections
import contextlib
import logging
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import yarl
from aiohttp import web
from multidict import CIMultiDict

from hapi import protocol
from hapi.middleware import effects
from hapi.middleware.pipeline import Events, StorageTier
from hapi.middleware.responses import RequestError, quote, refusal_line

log = logging.getLogger("hapi.server")

# The caller's credentials, forwarded to Swift as they came; nothing else is.
TOKEN_HEADERS = ("X-Auth-Token", "X-Storage-Token", "X-Service-Token")
# Headers of Swift's refusals that are about the hop, not the answer.
HOP_HEADERS = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "Date", "Server"))
READ_CHUNK = 1 << 20
# After the grace period, how long streams get to write their error frame
# before aiohttp cancels what is left (a reader that stopped reading).
FINAL_FRAME_S = 5.0


class ServerEvents(Events):
    """The steps' log lines through standard logging; their statsd metrics
    counted in :attr:`counts`."""

    def __init__(self, logger):
        super().__init__(logger)
        self.counts = collections.Counter()

    def increment(self, name):
        self.counts[name] += 1

    def update_stats(self, name, amount):
        self.counts[name] += amount

    def timing_since(self, name, _started):
        self.counts[name + ".count"] += 1


def without_temp_url(query):
    """The raw ``query`` less a temp URL's parameters, which stay out of
    everything the server sends to Swift (and so of every log)."""
    return "&".join(part for part in query.split("&")
                    if part and not urllib.parse.unquote(part).startswith("temp_url_"))


def error_response(err):
    """The aiohttp response for a :class:`RequestError`: the filter's status and body."""
    return web.Response(status=err.status, body=err.body, headers=err.headers,
                        content_type="application/json")


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
    """One server process: the storage tier's engine and admission, its
    executor, the session to Swift and the in-flight streams."""

    def __init__(self, config):
        self.config = config
        self.settings = config.hapi
        self.events = ServerEvents(log)
        self.tier = StorageTier(self.settings, self.events)
        self.engine = self.tier.engine
        # Two workers per admitted request: one frame computing, the next in
        # line for the device behind it (hapi.middleware.device).
        self.executor = ThreadPoolExecutor(max_workers=2 * self.settings.max_concurrent,
                                           thread_name_prefix="hapi-torch")
        self.session = None
        self.streams = set()
        self.expired = False

    def make_app(self):
        app = web.Application()
        app.router.add_get("/healthcheck", self.healthcheck, allow_head=False)
        app.router.add_get(protocol.COSTS_PATH, self.layer_costs, allow_head=False)
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

    def swift_url(self, path, query=""):
        """Swift's URL for ``path`` (decoded, as aiohttp's ``request.path``)
        and ``query`` (raw, as it came)."""
        return yarl.URL(self.config.swift_url + urllib.parse.quote(path)
                        + (f"?{query}" if query else ""), encoded=True)

    # Requests ----------------------------------------------------------

    async def healthcheck(self, _request):
        return web.Response(text="OK")

    async def layer_costs(self, request):
        status, doc = self.tier.layer_costs(request.rel_url.raw_query_string)
        return web.json_response(doc, status=status)

    async def handle(self, request):
        """A feature request: the pipeline's steps, performed the asyncio way."""
        if protocol.MODEL not in request.headers:
            err = RequestError(400, f"this server only answers HAPI feature requests: "
                               f"{protocol.MODEL} is required", parameter=protocol.MODEL)
            log.info("%s", refusal_line(request.path, err.status, err.body.decode()))
            return error_response(err)
        steps = self.tier.feature_request(
            request.path, without_temp_url(request.rel_url.raw_query_string), request.headers)
        task = asyncio.current_task()
        self.streams.add(task)
        try:
            return await FeatureResponse(self, request, steps).respond()
        finally:
            self.streams.discard(task)


class FeatureResponse:
    """One feature request driven through the pipeline's steps, the asyncio way."""

    def __init__(self, server, request, steps):
        self.server = server
        self.request = request
        self.steps = steps
        self.auth = {h: request.headers[h] for h in TOKEN_HEADERS if h in request.headers}
        self.response = None
        self.shutdown_told = False

    async def respond(self):
        """Run the steps to their end; the response they made."""
        value, error = None, None
        try:
            while True:
                try:
                    effect = (self.steps.send(value) if error is None
                              else self.steps.throw(error))
                except StopIteration:
                    return self.response
                value, error = await self.perform(effect)
        except BaseException:
            self.steps.close()
            raise

    async def perform(self, effect):
        """(result, None), or (None, the exception to raise into the steps)."""
        try:
            if isinstance(effect, effects.Send):
                return await self.send(effect.data), None
            if isinstance(effect, effects.Respond):
                return await self.start_response(effect), None
            if isinstance(effect, effects.Relay):
                self.response = await relayed(effect.reply.native)
                effect.reply.release()
                return None, None
            if isinstance(effect, effects.Fetch):
                return await self.fetch(effect), None
            if isinstance(effect, effects.NextChunk):
                return await self.next_chunk(effect.reply), None
            if isinstance(effect, effects.Run):
                return await self.server.run(effect.func, *effect.args), None
            if isinstance(effect, effects.Start):
                return self.server.run(effect.func, *effect.args), None
            if isinstance(effect, effects.Join):
                # A cancelled request cannot stop the thread: the steps wait for it.
                return await asyncio.shield(effect.handle), None
            if isinstance(effect, effects.AwaitGrant):
                return await self.await_grant(effect), None
            raise TypeError(f"no way to perform {effect!r}")
        except ConnectionError:
            return None, effects.ClientGone()
        except Exception as err:
            return None, err

    async def start_response(self, effect):
        if effect.body is not None:
            self.response = web.Response(status=effect.status, headers=effect.headers,
                                         body=effect.body)
            return
        # Chunked over HTTP/1.1; over HTTP/1.0 aiohttp ends the body by closing.
        self.response = web.StreamResponse(status=effect.status, headers=effect.headers)
        await self.response.prepare(self.request)

    async def send(self, data):
        if self.server.expired and not self.shutdown_told:
            self.shutdown_told = True
            raise effects.StreamEnded(503, "HAPI server is shutting down; retry", "shutdown")
        await self.response.write(data)  # waits while the reader's socket is full

    async def fetch(self, effect):
        """The caller's token, and what the steps send along, to Swift's proxy."""
        url = self.server.swift_url(effect.path, effect.query)
        with swift_answers(effect.path):
            resp = await self.server.session.request(
                effect.method, url, headers={**self.auth, **effect.headers},
                data=effect.body, allow_redirects=False)
        return effects.Reply(status=resp.status, reason=resp.reason or "", headers=resp.headers,
                     native=resp, body=resp.content, release=resp.release)

    @staticmethod
    async def next_chunk(reply):
        with swift_answers(reply.native.url.path):
            try:
                return await reply.body.read(READ_CHUNK)
            except aiohttp.ClientPayloadError as err:
                raise effects.BodyBroken(str(err)) from err

    @staticmethod
    async def await_grant(effect):
        """Wait on the event loop for the budget's grant, up to the timeout."""
        if effect.signal.fired:
            return
        granted = asyncio.get_running_loop().create_future()
        effect.signal.listener = lambda: granted.done() or granted.set_result(None)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(granted, effect.timeout)


def serve(config):
    """Run the server until SIGTERM or SIGINT; the exit status."""
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
