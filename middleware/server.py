"""Standalone HAPI server: the filter's protocol in its own process beside Swift.

Operators who want the proxy's workers to stay light run the feature
extraction here instead of in the proxy pipeline. The server answers the same
requests as the filter, at the same URLs, so a client only swaps the storage
URL's scheme, host and port::

    GET /v1/<account>/<container>/<object>
    X-Auth-Token: <the caller's Swift token>
    X-Hapi-Model: resnet18          (and the other X-Hapi-* headers)

The steps of a feature request are :mod:`hapi.middleware.pipeline`'s, the
same as the filter's, so both answer every request with the same status,
JSON body, headers and frames; this module performs their I/O the asyncio
way: requests to Swift's proxy with aiohttp, the torch work in an executor,
waits on the event loop.

It reads the shard (and a ``swift:`` weights object) from Swift's proxy with
the caller's own token and holds no credentials of its own: Swift's 401, 403,
404, 304 and 412 of the shard come back unchanged, and a caller sees through
the server exactly what Swift lets it see. The caller's query string goes
with the shard read, as in the filter (``?version-id=``,
``?multipart-manifest=get``, ``?symlink=get`` mean what they mean to Swift),
and so do the conditional headers; only the token headers are forwarded
otherwise, never the ``X-Hapi-*`` ones, so a proxy that also runs the filter
just serves the object. A temp URL's parameters (``temp_url_*``) are the one
part of the query left out: the server forwards tokens, not signatures, as
Swift would check a temp URL's address range against the server's address,
not the caller's; a temp URL alone gets Swift's 401 through the server.
A GET without ``X-Hapi-Model`` is a 400 naming that header: this is not a
general Swift proxy, plain object traffic goes to Swift itself (other methods
get 405). One status is the server's own: 502 with a JSON body when Swift
cannot be reached or does not answer in time.
``GET /healthcheck`` answers ``OK``.

Each stream computes at most one batch ahead of the frame being written, and
a write waits until the socket has drained, so a slow reader holds about two
frames in the server's memory whatever the shard's size. An HTTP/1.1 response
is chunked; an HTTP/1.0 one ends by closing the connection.

On SIGTERM or SIGINT the server stops accepting connections; in-flight
streams get ``shutdown_grace`` seconds to finish, then end with an error frame
of status 503 at their next frame boundary.

Logs (standard logging, to stderr): the filter's lines, in the filter's
words: one per feature request as it ends (model, split, batch used and
asked, samples, bytes in and out, seconds, outcome), one per refusal (status
and JSON body, Swift's refusals included), each batch reduction, wait in the
memory queue and 503; and an access log line per HTTP request
(``aiohttp.access``: client, method, path, status, bytes, seconds, user
agent). No line holds a token or a query string (where temp URL signatures
travel). The filter's statsd counters are kept in memory
(``HapiServer.events.counts``).

Configuration: an INI file (``--config``) with a ``[server]`` section and a
``[hapi]`` section taking the filter's options (see server.conf.example);
command-line flags override the file::

    hapi-server --config /etc/hapi/server.conf
    python -m hapi.middleware.server --swift-url http://127.0.0.1:8080 --bind-port 8090
"""

import argparse
import configparser
import logging
import sys
import urllib.parse
from dataclasses import dataclass

from hapi.middleware.options import OPTION_DEFAULTS, OPTION_HELP

SERVER_DEFAULTS = {
    "swift_url": "http://127.0.0.1:8080",
    "bind_ip": "127.0.0.1",
    "bind_port": "8090",
    "shutdown_grace": "30",
    "log_level": "INFO",
}

@dataclass(frozen=True)
class ServerConfig:
    """The ``[server]`` options, and ``hapi``: the ``[hapi]`` ones as
    :class:`hapi.middleware.settings.Settings`."""

    swift_url: str
    bind_ip: str
    bind_port: int
    shutdown_grace: float
    log_level: str
    hapi: object


# Configuration and CLI -------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="hapi-server",
        description="Standalone HAPI feature-extraction server in front of a Swift proxy. "
                    "Flags override the --config file; unset options take the defaults shown.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        hapi.add_argument(flag(name), dest=name,
                          help=f"{OPTION_HELP[name]} (default {default!r})".replace("%", "%%"))
    return parser.parse_args(argv)


EXAMPLES = """examples:
  hapi-server --swift-url http://127.0.0.1:8080 --bind-port 8090
  hapi-server --config /etc/hapi/server.conf --device cuda:0 --max-concurrent 8
  hapi-server --swift-url http://proxy:8080 --models resnet18,alexnet --memory-budget 8G

Trainers reach it with: client/main.py --use_intermediate --intermediate_url http://HOST:8090
"""


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
    url = urllib.parse.urlsplit(server["swift_url"])
    if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
        raise ValueError(f"swift_url must be the http:// or https:// URL of a Swift proxy, "
                         f"such as http://127.0.0.1:8080; got {server['swift_url']!r}")
    level = server["log_level"].upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"unknown log_level {server['log_level']!r}")
    from hapi.middleware.settings import Settings  # torch: after the arguments

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
    from hapi.middleware.server_app import serve  # torch and aiohttp: after the arguments

    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
