"""Set up and run a one-node OpenStack Swift with the HAPI filter in its proxy.

Everything lives in one folder chosen by the user (nothing is written to
/etc)::

    ROOT/cluster.json   bind address, ports, devices folder, tempauth fernet key
    ROOT/etc/           swift.conf (hash path prefix/suffix), server confs, rings
    ROOT/srv/d1/        the single storage device (unless ``devices`` is given)
    ROOT/log/NAME.log   each server's output (there is no syslog here)
    ROOT/run/NAME.pid   each server's pid

Each server (account, container, object, proxy) runs as its own process with
``workers = 0``, so SIGTERM stops it at once. With ``proxies=N`` (``--proxies``)
N proxy servers run, named proxy, proxy2, proxy3... (conf, log and pid file
each), on consecutive ports from ``--proxy-port`` (else free ones), each with
the same pipeline, tempauth fernet key and rings over the same account,
container and object servers: a token from one is good at all of them.

The confs and rings are written again on every start from the current
options; data, the hash path settings and the fernet key are created once and
kept.

Known limits, all from Swift itself:

* ``swift_dir`` only moves the hash path settings: storage policies and
  constraints are still read from /etc/swift/swift.conf (Swift's defaults when
  that file does not exist). The folder's swift.conf declares the same single
  default policy.
* Only the four servers run (no updaters, replicators, expirer): account-level
  object/byte counts stay at 0 and expired objects are hidden, not deleted.
* No memcached: the pipeline's ``cache`` is a cache that always misses
  (:mod:`hapi.server_setup.nullcache`), so that nothing logs its absence;
  tempauth runs on fernet tokens, and the proxy reads account/container info
  per request.

Versioning: both Swift's legacy ``X-Versions-Location`` and current object
versioning (``X-Versions-Enabled``, ``?version-id=``) are enabled.

CLI (``hapi-swift`` or ``python -m hapi.server_setup.cluster``)::

    hapi-swift start DIR [--proxies N] [--proxy-port N] [--host ADDR] [--devices D]
                         [--without-hapi] [--hapi-option KEY=VALUE ...]
    hapi-swift stop DIR
    hapi-swift status DIR
    hapi-swift env DIR
"""

import argparse
import errno
import hashlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from cryptography.fernet import Fernet
from swift.common.ring import RingBuilder
from swift.common.utils import Timestamp
from swiftclient.client import Connection

SERVERS = ("account", "container", "object", "proxy")  # of a cluster with one proxy
BACKENDS = ("account", "container", "object")
HOST = "127.0.0.1"
DEVICE = "d1"
PART_POWER = 8
CLI_PROXY_PORT = 8080
ADMIN_USER = "test:tester"

# name -> (account:user, key, tempauth groups)
_TEMPAUTH_USERS = {
    "tester": ("test:tester", "testing", ".admin"),
    "tester2": ("test2:tester2", "testing2", ".admin"),
    "reader": ("test:reader", "reading", ""),
}

PIPELINE = (
    "catch_errors gatekeeper healthcheck proxy-logging cache listing_formats tempurl"
    " tempauth hapi copy slo dlo versioned_writes symlink proxy-logging proxy-server"
)

# Filters of the proxy pipeline that need no options: name -> egg entry point.
_SIMPLE_FILTERS = {
    "catch_errors": "catch_errors",
    "gatekeeper": "gatekeeper",
    "healthcheck": "healthcheck",
    "proxy-logging": "proxy_logging",
    "listing_formats": "listing_formats",
    "tempurl": "tempurl",
    "copy": "copy",
    "slo": "slo",
    "dlo": "dlo",
    "symlink": "symlink",
}

# Servers still running after SIGTERM for this long get SIGKILL.
STOP_TIMEOUT = 15.0
LOG_TAIL_LINES = 25

# Servers this process started, so that they are reaped here and a dead one is
# never mistaken for a live zombie.
_children: dict[int, subprocess.Popen] = {}


class ClusterError(RuntimeError):
    """The cluster could not be set up, started or reached."""


class Cluster:
    """A one-node Swift on ``host`` (default 127.0.0.1) kept in the folder ``root``.

    ``proxy_port`` fixes the proxy's port; otherwise the port stored in the
    folder is reused when free, or a free one is chosen. ``with_hapi=False``
    leaves the HAPI filter out of the proxy pipeline (for comparisons);
    ``hapi_conf`` adds options to its ``[filter:hapi]`` section. ``devices``
    is the folder holding the storage device (default ``ROOT/srv``); its file
    system must support user xattrs, and large object metadata needs more than
    ext4's 4 KiB per file (tmpfs, e.g. /dev/shm, has room). ``host`` is the
    address every server binds and the rings name (default: the folder's,
    else 127.0.0.1); it must be local to the network namespace that starts
    the cluster, e.g. a veth address inside a namespace of its own, where
    the cluster is then started (see benchmarks/shaped.py). ``proxies`` is
    the number of proxy servers (default: the folder's, else 1); the first
    is ``proxy_port``'s, the others follow it.
    """

    def __init__(self, root, *, proxy_port=None, with_hapi=True, hapi_conf=None,
                 devices=None, host=None, proxies=None):
        if proxies is not None and proxies < 1:
            raise ClusterError(f"proxies={proxies}: a cluster needs at least 1 proxy")
        self.root = Path(root).absolute()
        self.with_hapi = with_hapi
        self.hapi_conf = dict(hapi_conf or {})
        self._requested_proxy_port = proxy_port
        self._requested_devices = devices
        self._requested_host = host
        self._requested_proxies = proxies
        self.state = self._load_state()
        self.users = {name: (user, key) for name, (user, key, _) in _TEMPAUTH_USERS.items()}

    # -- paths and addresses ------------------------------------------------

    @property
    def etc_dir(self):
        return self.root / "etc"

    @property
    def log_dir(self):
        return self.root / "log"

    @property
    def run_dir(self):
        return self.root / "run"

    @property
    def state_file(self):
        return self.root / "cluster.json"

    @property
    def devices(self):
        return Path(self.state["devices"])

    @property
    def ports(self):
        return self.state.get("ports", {})

    @property
    def host(self):
        return self._requested_host or self.state.get("host") or HOST

    @property
    def proxies(self):
        """How many proxy servers run (or will run at the next start)."""
        return self._requested_proxies or self.state.get("proxies") or 1

    @property
    def proxy_names(self):
        """The proxy servers' names: proxy, proxy2, proxy3..."""
        return _proxy_names(self.proxies)

    @property
    def servers(self):
        """Every server of the cluster, backends first."""
        return [*BACKENDS, *self.proxy_names]

    @property
    def proxy_url(self):
        """The first proxy's base URL (where auth_url is)."""
        return self.proxy_urls[0]

    @property
    def proxy_urls(self):
        """Every proxy's base URL, ``http://host:port``, the first proxy first."""
        return [f"http://{self.host}:{self._port(name)}" for name in self.proxy_names]

    @property
    def auth_url(self):
        return f"{self.proxy_url}/auth/v1.0"

    def conf_path(self, server):
        return self.etc_dir / f"{server}-server.conf"

    def log_path(self, server):
        return self.log_dir / f"{server}.log"

    def pid_path(self, server):
        return self.run_dir / f"{server}.pid"

    def is_set_up(self):
        return self.state_file.exists()

    def _port(self, server):
        try:
            return self.ports[server]
        except KeyError:
            raise ClusterError(f"{self.root} is not set up: run start first") from None

    # -- public API ----------------------------------------------------------

    def start(self, timeout=60):
        """Set up the folder if needed, start all servers, wait until usable.

        Safe to call again: a running cluster is left alone (options given
        now apply at its next start; a proxy port other than its own is
        refused), a stopped one is restarted on its data. On failure the
        servers it started are stopped and ClusterError carries the tails of
        their logs.
        """
        began = time.monotonic()
        running = self._running()
        alive = [name for name, info in self.status().items() if info["alive"]]
        if alive and all(info["alive"] for info in running.values()):
            self._check_running_matches()
            print(f"already running: {self.auth_url}", flush=True)
            return
        if alive:
            raise ClusterError(
                f"cluster in {self.root} is partly running ({', '.join(alive)} alive); "
                f"run stop first, then start. Logs: {self.log_dir}"
            )
        self.set_up()
        try:
            self._launch_all()
            self._wait_until_ready(began + timeout)
            self._create_accounts()
        except BaseException:
            self.stop(quiet=True)
            raise
        print(f"ready in {time.monotonic() - began:.1f} s: {self.auth_url}", flush=True)

    def _running(self):
        """status() of the servers the folder was last started with."""
        started = [*BACKENDS, *_proxy_names(self.state.get("proxies") or 1)]
        return {name: info for name, info in self.status().items() if name in started}

    def _check_running_matches(self):
        """A running cluster cannot move its proxies or change their number."""
        proxies = self.state.get("proxies") or 1
        if self._requested_proxies and self._requested_proxies != proxies:
            raise ClusterError(
                f"cluster in {self.root} is already running with {proxies} proxies, not "
                f"{self._requested_proxies}; stop it first to change that")
        running = self.ports["proxy"]
        if self._requested_proxy_port and int(self._requested_proxy_port) != running:
            raise ClusterError(
                f"cluster in {self.root} is already running with its proxy on port "
                f"{running}, not {self._requested_proxy_port}; stop it first to move it")

    def stop(self, quiet=False):
        """SIGTERM every running server (proxies first) and wait for it to exit."""
        stopped = 0
        for server in reversed(self._known_servers()):
            pid = self._live_pid(server)
            if pid is not None:
                _terminate(pid)
                stopped += 1
                if not quiet:
                    print(f"stopped {server}-server (pid {pid})", flush=True)
            self.pid_path(server).unlink(missing_ok=True)
        if not stopped and not quiet:
            print(f"not running: {self.root}", flush=True)

    def status(self):
        """Return {server: {"pid", "alive", "port", "log"}} for every server
        (account, container, object, proxy, then proxy2... with several)."""
        return {
            server: {
                "pid": _read_pid(self.pid_path(server)),
                "alive": self._live_pid(server) is not None,
                "port": self.ports.get(server),
                "log": str(self.log_path(server)),
            }
            for server in self._known_servers()
        }

    def _known_servers(self):
        """This cluster's servers, and any proxy the folder has a pid file for
        (left from a start with more proxies)."""
        servers = self.servers
        extra = sorted(path.stem for path in self.run_dir.glob("proxy*.pid")
                       if path.stem not in servers)
        return servers + extra

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop(quiet=True)

    def connection(self, user=ADMIN_USER, **kwargs):
        """A python-swiftclient Connection for ``user`` (``account:user``)."""
        keys = dict(self.users.values())
        if user not in keys:
            raise ClusterError(f"unknown user {user!r}; known: {sorted(keys)}")
        return Connection(authurl=self.auth_url, user=user, key=keys[user], **kwargs)

    # -- set-up ---------------------------------------------------------------

    def _load_state(self):
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ClusterError(f"{self.state_file} is not valid JSON: {exc}") from None

    def set_up(self):
        """Write the folder (state, swift.conf, rings, confs); start() calls it.

        Data, the hash path settings and the fernet key are kept if present.
        The ports are checked before anything is written; a first set-up
        that fails removes the folder again when it made it.
        """
        new = not self.is_set_up()
        ports = self._choose_ports()
        made_root = not self.root.exists()
        try:
            self._write_folder(ports)
        except BaseException:
            if new and made_root:
                shutil.rmtree(self.root, ignore_errors=True)
            raise
        print(f"{'set up' if new else 'reusing'} {self.root} (devices {self.devices})",
              flush=True)

    def _write_folder(self, ports):
        for folder in (self.etc_dir, self.log_dir, self.run_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.state["devices"] = str(
            Path(self._requested_devices or self.state.get("devices") or self.root / "srv")
            .absolute()
        )
        (self.devices / DEVICE).mkdir(parents=True, exist_ok=True)
        _check_xattrs(self.devices / DEVICE)
        self.state["host"] = self.host
        self.state["ports"] = ports
        self.state["proxies"] = self.proxies
        self.state.setdefault("fernet_key", _new_fernet_key())
        _write_private(self.state_file, json.dumps(self.state, indent=2) + "\n")
        self._write_swift_conf()
        self._write_rings()
        for server in self.servers:
            _write_private(self.conf_path(server), self._server_conf(server))

    def _choose_ports(self):
        """The requested proxy port and the ones after it for the other
        proxies, else stored ports still free, else new free ones."""
        ports = {}
        for index, server in enumerate([*self.proxy_names, *BACKENDS]):
            stored = self.ports.get(server)
            if _kind(server) == "proxy" and self._requested_proxy_port:
                port = int(self._requested_proxy_port) + index
                if not _port_free(self.host, port):
                    raise ClusterError(f"proxy port {port} is already in use")
            elif stored and _port_free(self.host, stored) and stored not in ports.values():
                port = stored
            else:
                port = _free_port(self.host, exclude=ports.values())
            ports[server] = port
        return ports

    def _write_swift_conf(self):
        path = self.etc_dir / "swift.conf"
        if path.exists():
            return
        path.write_text(
            "[swift-hash]\n"
            f"swift_hash_path_prefix = {secrets.token_hex(16)}\n"
            f"swift_hash_path_suffix = {secrets.token_hex(16)}\n"
            "\n"
            "# Swift reads storage policies from /etc/swift/swift.conf whatever\n"
            "# swift_dir says; this is its built-in default, written out.\n"
            "[storage-policy:0]\n"
            "name = Policy-0\n"
            "default = yes\n"
        )

    def _hash_path_settings(self):
        settings = {}
        for line in (self.etc_dir / "swift.conf").read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip().startswith("swift_hash_path_"):
                settings[key.strip()] = value.strip()
        return settings["swift_hash_path_prefix"], settings["swift_hash_path_suffix"]

    def _write_rings(self):
        """One replica on one device per ring; cheap enough to redo each start."""
        for server in BACKENDS:
            builder = RingBuilder(PART_POWER, 1, 1)
            builder.add_dev({
                "id": 0, "region": 1, "zone": 1, "ip": self.host, "port": self.ports[server],
                "device": DEVICE, "weight": 100, "meta": "",
            })
            builder.rebalance()
            builder.get_ring().save(str(self.etc_dir / f"{server}.ring.gz"))

    def _server_conf(self, server):
        default = {
            "swift_dir": self.etc_dir,
            "bind_ip": self.host,
            "bind_port": self.ports[server],
            "workers": 0,
            "log_name": f"{server}-server",
        }
        if _kind(server) != "proxy":
            default.update(devices=self.devices, mount_check="false")
            return _ini([
                ("DEFAULT", default),
                ("pipeline:main", {"pipeline": f"{server}-server"}),
                (f"app:{server}-server", {"use": f"egg:swift#{server}"}),
            ])
        return _ini([("DEFAULT", default), *self._proxy_sections()])

    def _proxy_sections(self):
        pipeline = PIPELINE if self.with_hapi else PIPELINE.replace(" hapi ", " ")
        tempauth = {"use": "egg:swift#tempauth",
                    "fernet_key_1": self.state["fernet_key"],
                    "active_fernet_key_id": "1"}
        for user, key, groups in _TEMPAUTH_USERS.values():
            account, name = user.split(":")
            tempauth[f"user_{account}_{name}"] = f"{key} {groups}".strip()
        sections = [
            ("pipeline:main", {"pipeline": pipeline}),
            ("app:proxy-server", {"use": "egg:swift#proxy", "account_autocreate": "true"}),
            ("filter:tempauth", tempauth),
            ("filter:cache", {"paste.filter_factory":
                              "hapi.server_setup.nullcache:filter_factory"}),
            # Object versioning needs symlink later in the pipeline (loaded first).
            ("filter:versioned_writes", {"use": "egg:swift#versioned_writes",
                                         "allow_versioned_writes": "true",
                                         "allow_object_versioning": "true"}),
        ]
        sections += [(f"filter:{name}", {"use": f"egg:swift#{entry}"})
                     for name, entry in _SIMPLE_FILTERS.items()]
        if self.with_hapi:
            sections.append(("filter:hapi", {"use": "egg:hapi-tl#hapi", **self.hapi_conf}))
        return sections

    # -- running ----------------------------------------------------------------

    def _launch_all(self):
        for server in self.servers:
            binary = _server_binary(_kind(server))
            log_path = self.log_path(server)
            with open(log_path, "ab") as log:
                log.write(f"==== hapi-swift start {time.ctime()} ====\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    [str(binary), str(self.conf_path(server)), "-v"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=self.root, start_new_session=True,
                )
            _children[proc.pid] = proc
            self.pid_path(server).write_text(f"{proc.pid}\n")
            print(f"started {server}-server pid {proc.pid} port {self.ports[server]}",
                  flush=True)

    def _wait_until_ready(self, deadline):
        """Backends accept connections, /healthcheck answers, tempauth logs in."""
        checks = [(f"{b}-server port {self.ports[b]}", _port_check(self.host, self.ports[b]))
                  for b in BACKENDS]
        checks += [(f"{name} /healthcheck", _http_check(f"{url}/healthcheck"))
                   for name, url in zip(self.proxy_names, self.proxy_urls, strict=True)]
        user, key = self.users["tester"]
        checks.append((f"tempauth login as {user}", _http_check(
            self.auth_url, {"X-Auth-User": user, "X-Auth-Key": key})))
        for what, check in checks:
            while not check():
                dead = [s for s in self.servers if self._live_pid(s) is None]
                if dead:
                    raise ClusterError(self._failure(f"{', '.join(dead)} exited"))
                if time.monotonic() > deadline:
                    raise ClusterError(self._failure(f"timed out waiting for {what}"))
                time.sleep(0.05)

    def _create_accounts(self):
        """PUT the tempauth accounts so they exist before any test relies on them.

        Without this, Swift answers a HEAD on a never-written account as if it
        existed (account_autocreate), which hides mistakes in tests.
        """
        prefix, suffix = self._hash_path_settings()
        for account in sorted({u.split(":")[0] for u, _ in self.users.values()}):
            name = f"AUTH_{account}"
            part = _partition(prefix, suffix, name)
            conn = http.client.HTTPConnection(self.host, self.ports["account"], timeout=10)
            try:
                conn.request("PUT", f"/{DEVICE}/{part}/{name}",
                             headers={"X-Timestamp": Timestamp.now().internal})
                status = conn.getresponse().status
            finally:
                conn.close()
            if status not in (201, 202):
                raise ClusterError(self._failure(f"account server answered {status} "
                                                 f"to PUT {name}"))

    def _live_pid(self, server):
        """The server's pid if that process is alive and runs this folder's conf."""
        pid = _read_pid(self.pid_path(server))
        if pid is None or not _pid_alive(pid):
            return None
        if pid in _children or _runs_conf(pid, self.conf_path(server)):
            return pid
        return None

    def _failure(self, reason):
        parts = [f"Swift cluster in {self.root}: {reason}. Server logs:"]
        for server in self.servers:
            path = self.log_path(server)
            parts.append(f"--- {path} (last {LOG_TAIL_LINES} lines) ---")
            parts.append(_tail(path, LOG_TAIL_LINES))
        return "\n".join(parts)


# -- helpers ---------------------------------------------------------------------


def _proxy_names(count):
    return ["proxy"] + [f"proxy{index}" for index in range(2, count + 1)]


def _kind(server):
    """The Swift server a name runs: proxy2 is a proxy server."""
    return "proxy" if server.startswith("proxy") else server


def _write_private(path, text):
    """Write a file only its owner can read: it holds keys or passwords."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)


def _ini(sections):
    lines = ["# Written by hapi-swift at every start: edits here are lost.", ""]
    for name, options in sections:
        lines.append(f"[{name}]")
        lines += [f"{key} = {value}" for key, value in options.items()]
        lines.append("")
    return "\n".join(lines)


def _new_fernet_key():
    return Fernet.generate_key().decode("ascii")


def _partition(prefix, suffix, account):
    """Swift's Ring.get_part() for an account, with this cluster's hash settings.

    Swift's own function reads the hash settings from process-wide globals,
    which would tie this process to one cluster.
    """
    digest = hashlib.md5(f"{prefix}/{account}{suffix}".encode(), usedforsecurity=False).digest()
    return struct.unpack_from(">I", digest)[0] >> (32 - PART_POWER)


def _check_xattrs(folder):
    """Fail early where Swift's object server could not store its metadata."""
    with tempfile.NamedTemporaryFile(dir=folder) as probe:
        try:
            os.setxattr(probe.name, "user.hapi.probe", b"x")
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM):
                raise ClusterError(
                    f"{folder} does not support user xattrs, which Swift's object server "
                    "needs; pass another devices folder (e.g. under /dev/shm)"
                ) from None
            raise


def _server_binary(server):
    path = Path(sys.executable).parent / f"swift-{server}-server"
    if not path.exists():
        raise ClusterError(f"{path} not found: install swift into this Python environment")
    return path


def _port_free(host, port):
    """Whether a server could bind the port (as Swift does, with SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host, exclude=()):
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in exclude:
            return port


def _port_check(host, port):
    def check():
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            return False
        return True
    return check


def _http_check(url, headers=None):
    def check():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                        timeout=5) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError, http.client.HTTPException):
            return False
    return check


def _read_pid(path):
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _pid_alive(pid):
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _runs_conf(pid, conf):
    """Guards against a stale pid file whose pid now belongs to another process.

    Without /proc, or while the kernel shows an empty command line (seen here
    for a moment right after exec), the pid is trusted.
    """
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return not cmdline or str(conf).encode() in cmdline.split(b"\0")


def _terminate(pid):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            print(f"pid {pid} ignored SIGTERM for {STOP_TIMEOUT:.0f} s: sending SIGKILL",
                  file=sys.stderr, flush=True)
            os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.02)
    _children.pop(pid, None)


def _tail(path, lines):
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# -- CLI ---------------------------------------------------------------------------


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="hapi-swift", description="Run a one-node Swift with the HAPI filter.")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="set up (first time) and start the cluster")
    start.add_argument("dir", help="folder for the cluster's confs, data, logs")
    start.add_argument("--proxies", type=_positive, metavar="N",
                       help="proxy servers to run, on consecutive ports from the first "
                            "(default: the folder's, else 1)")
    start.add_argument("--proxy-port", type=int,
                       help=f"the first proxy's port (default: the folder's, else "
                            f"{CLI_PROXY_PORT})")
    start.add_argument("--host", help=f"address the servers bind (default: the folder's, "
                       f"else {HOST})")
    start.add_argument("--devices", help="folder for the storage device "
                       "(default DIR/srv; needs user xattrs)")
    start.add_argument("--without-hapi", action="store_true",
                       help="leave the HAPI filter out of the proxy pipeline")
    start.add_argument("--hapi-option", action="append", default=[], type=_option,
                       metavar="KEY=VALUE", help="an option of the filter's [filter:hapi] "
                       "section, e.g. threads=1 (repeatable)")
    start.add_argument("--timeout", type=float, default=60, help="seconds to wait for start")
    for name, text in (("stop", "stop all servers"), ("status", "show servers"),
                       ("env", "print ST_AUTH/ST_USER/ST_KEY/HAPI_STORAGE_URLS exports")):
        commands.add_parser(name, help=text).add_argument("dir")
    return parser.parse_args(argv)


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _option(text):
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _print_status(cluster):
    if not cluster.is_set_up():
        raise ClusterError(f"{cluster.root} is not set up: run start first")
    for server, info in cluster.status().items():
        state = "alive" if info["alive"] else "dead"
        print(f"{server + '-server':<17} pid {info['pid'] or '-':<8} {state:<6} "
              f"port {info['port'] or '-':<6} log {info['log']}")


def _start(args):
    """Start from the CLI: the proxy port defaults to the folder's, else 8080."""
    port = args.proxy_port
    if port is None and not Cluster(args.dir).is_set_up():
        port = CLI_PROXY_PORT
    cluster = Cluster(args.dir, proxy_port=port, devices=args.devices, host=args.host,
                      with_hapi=not args.without_hapi, hapi_conf=dict(args.hapi_option),
                      proxies=args.proxies)
    cluster.start(timeout=args.timeout)


def _print_env(cluster):
    """Exports for swiftclient (the first proxy's auth) and for the trainer's
    --storage_urls (every proxy)."""
    user, key = cluster.users["tester"]
    print(f"export ST_AUTH={cluster.auth_url} ST_USER={user} ST_KEY={key} "
          f"HAPI_STORAGE_URLS={','.join(cluster.proxy_urls)}")


def main(argv=None):
    args = _parse_args(argv)
    commands = {
        "stop": lambda: Cluster(args.dir).stop(),
        "status": lambda: _print_status(Cluster(args.dir)),
        "env": lambda: _print_env(Cluster(args.dir)),
        "start": lambda: _start(args),
    }
    try:
        commands[args.command]()
    except ClusterError as exc:
        print(f"hapi-swift: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
