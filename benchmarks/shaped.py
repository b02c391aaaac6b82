"""Two tiers on one machine with a real bandwidth limit between them.

The storage tier (a one-node Swift with the HAPI filter in its proxy) runs in
a network namespace of its own, the trainer tier in a second one, and a veth
pair joins them: the first two addresses of the ``link`` subnet (an option,
:data:`DEFAULT_LINK` by default) go to storage and trainer. Each end's
egress is shaped with ``tc qdisc ... tbf`` to the same rate, so both
directions are limited (what matters is storage -> trainer). Nothing is added
to the host's own namespace: its routes and addresses are untouched, and no
traffic but the benchmark's crosses the veth, so its byte counters are the
benchmark's bytes.

Each tier is pinned to a core of its own (``taskset``), every process it
starts included, and runs its torch work with the same thread count (the
filter's ``threads`` option, the trainer's ``--threads``): on a machine with
few cores the tiers must not steal each other's time, or the figures would
measure the scheduler.

Namespaces need root. Elsewhere (or with ``network="loopback"``) the same
set-up runs unshaped on 127.0.0.1 and says so: the pinning still holds, but
there is no link to count bytes on and no rate limit.

Cleanup: :class:`TwoTier` is a context manager; on leaving it, also through
SIGINT, SIGTERM or SIGHUP, it stops Swift, ends the processes left in its
namespaces and deletes the namespaces (which deletes the veth pair) and the
tmpfs folder of Swift's data. Names carry the owning pid
(``hapib-<pid>-s``), so a run also removes what a killed earlier run left
behind, and never touches a live one's.

    with TwoTier("bench-out", rate_mbit=50) as tiers:
        run = tiers.measure(tiers.trainer_command(["python", "client/main.py", ...]),
                            "bench-out/run.json", "bench-out/run.log")
        tiers.set_rate(10)

:meth:`TwoTier.measure` runs a command that writes ``--metrics`` and measures
it from the outside: wall time, bytes across the link, CPU of each tier.
"""

import contextlib
import ipaddress
import itertools
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hapi.server_setup.cluster import HOST, Cluster, ClusterError

PREFIX = "hapib"
# The private subnet of the veth pair; it exists only inside the two
# namespaces, so it must only not clash with the host's own routes.
DEFAULT_LINK = "10.77.0.0/24"
STORAGE_DEV = "hapi-s"
TRAINER_DEV = "hapi-t"
NETWORKS = ("auto", "shaped", "loopback")

# tbf: the queue may hold this much delay before it drops; the bucket holds at
# least one large GSO packet's worth, and about 2 ms at high rates.
TBF_LATENCY = "100ms"
TBF_MIN_BURST = 32 * 1024
TBF_BURST_S = 0.002

SWIFT_START_TIMEOUT = 120
NETNS_PROXY_PORT = 8080
SHM = Path("/dev/shm")
_STALE_NAME = re.compile(rf"{PREFIX}-(\d+)-")
_CLEANUP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ShapingError(RuntimeError):
    """The namespaces, the link or the storage tier could not be set up."""


class CommandFailed(RuntimeError):
    """A measured command exited with an error; the message ends with its log's tail."""


@dataclass
class Measured:
    """What a command cost, seen from outside, and the metrics it wrote.

    ``to_trainer``/``to_storage``: bytes across the link (None unshaped);
    ``storage_cpu_s``: CPU of the Swift servers meanwhile; ``command_cpu_s``:
    CPU of the command itself, in whichever tier it ran.
    """

    run_s: float
    to_trainer: int | None
    to_storage: int | None
    storage_cpu_s: float
    command_cpu_s: float
    metrics: dict


@dataclass(frozen=True)
class Tier:
    """Where a tier's commands run: its core, address and namespace (None: this one)."""

    core: int
    address: str
    netns: str | None

    def command(self, argv):
        """``argv`` run in this tier's namespace, pinned to its core."""
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*prefix, "taskset", "--cpu-list", str(self.core), *map(str, argv)]


def add_two_tier_arguments(parser):
    """The command-line flags of the two-tier set-up that the benchmarks share:
    ``--threads``, ``--network`` and ``--link`` (:class:`TwoTier`'s settings)."""
    parser.add_argument("--threads", type=int, default=1, help="torch threads per tier")
    parser.add_argument("--network", choices=NETWORKS, default="auto",
                        help="shaped needs root; auto falls back to loopback (default: auto)")
    parser.add_argument("--link", default=DEFAULT_LINK, metavar="SUBNET",
                        help=f"private subnet of the shaped link (default: {DEFAULT_LINK})")


def default_cores():
    """(storage core, trainer core): the first two cores this process may use.

    With a single core both tiers share it, which the caller should report.
    """
    cores = sorted(os.sched_getaffinity(0))
    return cores[0], cores[1] if len(cores) > 1 else cores[0]


def tbf_burst(rate_mbit):
    return max(TBF_MIN_BURST, int(rate_mbit * 1e6 / 8 * TBF_BURST_S))


def link_addresses(subnet):
    """(storage address, trainer address, prefix length) of a private IPv4
    subnet: its first two host addresses."""
    network = ipaddress.ip_network(subnet, strict=False)
    if network.version != 4 or not network.is_private or network.num_addresses < 4:
        raise ValueError(f"link {subnet!r} must be a private IPv4 subnet of /30 or larger")
    first, second = list(itertools.islice(network.hosts(), 2))
    return str(first), str(second), network.prefixlen


class TwoTier:
    """The storage tier (Swift) and the trainer tier, joined by a shaped link.

    ``workdir`` holds Swift's confs and logs; its data lives on tmpfs when
    there is one. ``rate_mbit`` is the initial rate in Mbit/s (change it with
    :meth:`set_rate`); ``network`` is ``"shaped"`` (namespaces, or fail),
    ``"loopback"`` (unshaped) or ``"auto"`` (shaped where possible). ``cores``
    is ``(storage, trainer)``; ``threads`` the torch threads of each tier.
    """

    def __init__(self, workdir, rate_mbit, *, network="auto", cores=None, threads=1,
                 link=DEFAULT_LINK, log=print):
        if network not in NETWORKS:
            raise ValueError(f"network must be one of {NETWORKS}, not {network!r}")
        self.link = link_addresses(link)
        self.workdir = Path(workdir).absolute()
        self.rate_mbit = rate_mbit
        self.requested_network = network
        self.cores = tuple(cores or default_cores())
        self.threads = threads
        self.log = log
        self.shaped = False
        self.note = ""
        tag = f"{PREFIX}-{os.getpid()}"
        self._netns = {"storage": f"{tag}-s", "trainer": f"{tag}-t"}
        self._tag = tag
        self._devices = None
        self._cluster = None
        self._link_begun = False
        self._saved_handlers = {}
        self.storage = self.trainer = None

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self):
        self._trap_signals()
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info):
        self.close()

    def start(self):
        """Remove earlier runs' leftovers, build the link, start Swift in its tier."""
        remove_leftovers(self.log)
        self.shaped = self._want_namespaces() and self._try_link()
        storage_ns, trainer_ns = ((self._netns["storage"], self._netns["trainer"])
                                  if self.shaped else (None, None))
        storage_addr, trainer_addr, _ = self.link
        self.storage = Tier(self.cores[0], storage_addr if self.shaped else HOST, storage_ns)
        self.trainer = Tier(self.cores[1], trainer_addr if self.shaped else HOST, trainer_ns)
        if self.shaped:
            self.set_rate(self.rate_mbit)
        else:
            self.log(f"UNSHAPED: both tiers on loopback ({self.note}); rates are not "
                     "applied and there is no link to count bytes on")
        if self.cores[0] == self.cores[1]:
            self.log(f"only core {self.cores[0]} is available: both tiers share it")
        self._start_swift()

    def close(self):
        """Stop Swift, end what is left in the namespaces, delete them. Idempotent."""
        with self._signals_ignored():
            if self._cluster is not None:
                with contextlib.suppress(ClusterError, OSError):
                    self._cluster.stop(quiet=True)
                self._cluster = None
            if self._link_begun:
                self._delete_link()
            if self._devices is not None:
                shutil.rmtree(self._devices, ignore_errors=True)
                self._devices = None
        self._restore_signals()

    # -- the link -----------------------------------------------------------------

    def _want_namespaces(self):
        if self.requested_network == "loopback":
            self.note = "asked for loopback"
            return False
        missing = [tool for tool in ("ip", "tc", "taskset") if shutil.which(tool) is None]
        reason = ("namespaces need root" if os.geteuid() != 0
                  else f"{', '.join(missing)} not found" if missing else "")
        if reason and self.requested_network == "shaped":
            raise ShapingError(f"cannot shape the link: {reason}")
        self.note = reason
        return not reason

    def _try_link(self):
        """Build the namespaces and the veth pair; on failure, fall back or raise."""
        try:
            self._make_link()
        except ShapingError as err:
            self._delete_link()
            if self.requested_network == "shaped":
                raise
            self.note = f"namespaces unavailable: {err}"
            return False
        return True

    def _make_link(self):
        storage, trainer = self._netns["storage"], self._netns["trainer"]
        self._link_begun = True
        for netns in (storage, trainer):
            _ip("netns", "add", netns)
            _ip("-n", netns, "link", "set", "lo", "up")
        _ip("link", "add", "name", STORAGE_DEV, "netns", storage, "type", "veth",
            "peer", "name", TRAINER_DEV, "netns", trainer)
        storage_addr, trainer_addr, prefix = self.link
        for netns, dev, addr in ((storage, STORAGE_DEV, storage_addr),
                                 (trainer, TRAINER_DEV, trainer_addr)):
            _ip("-n", netns, "addr", "add", f"{addr}/{prefix}", "dev", dev)
            _ip("-n", netns, "link", "set", dev, "up")

    def _delete_link(self):
        """Delete both namespaces, which deletes the veth pair with them."""
        for netns in self._netns.values():
            _delete_netns(netns)
        self._link_begun = False

    def set_rate(self, rate_mbit):
        """Shape both directions of the link to ``rate_mbit`` Mbit/s (no-op unshaped)."""
        self.rate_mbit = rate_mbit
        if not self.shaped:
            return
        for netns, dev in ((self._netns["storage"], STORAGE_DEV),
                           (self._netns["trainer"], TRAINER_DEV)):
            _run(["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", "tbf",
                  "rate", f"{rate_mbit}mbit", "burst", str(tbf_burst(rate_mbit)),
                  "latency", TBF_LATENCY])

    def link_bytes(self):
        """Bytes the storage end of the veth has sent and received so far.

        These are the counters of ``/sys/class/net/hapi-s/statistics`` inside
        the storage namespace (read over netlink, which needs no remount).
        None when unshaped: loopback also carries Swift's own internal
        traffic and every other process's.
        """
        if not self.shaped:
            return None
        out = _run(["ip", "-n", self._netns["storage"], "-s", "-j", "link", "show", "dev",
                    STORAGE_DEV])
        stats = json.loads(out)[0]["stats64"]
        return {"to_trainer": stats["tx"]["bytes"], "to_storage": stats["rx"]["bytes"]}

    # -- the storage tier -----------------------------------------------------------

    def _start_swift(self):
        """Start Swift from inside the storage tier, so that it binds there.

        The cluster CLI runs in the namespace under ``taskset``, and the four
        servers it launches inherit both. Swift's data goes to tmpfs (room
        for Swift's xattrs), in a folder named for cleanup. The namespace has
        every port free; on loopback the proxy takes any free one.
        """
        parent = SHM if SHM.is_dir() else None
        self._devices = Path(tempfile.mkdtemp(prefix=f"{self._tag}-", dir=parent))
        root = self.workdir / "swift"
        command = self.storage.command([
            sys.executable, "-m", "hapi.server_setup.cluster", "start", root,
            "--host", self.storage.address, "--devices", self._devices,
            "--proxy-port", NETNS_PROXY_PORT if self.shaped else _free_port(HOST),
            "--hapi-option", f"threads={self.threads}",
            "--timeout", SWIFT_START_TIMEOUT])
        self._cluster = Cluster(root)  # close() can stop what a failed start left
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode:
            raise ShapingError(f"Swift did not start in the storage tier:\n{result.stderr}")
        self._cluster = Cluster(root)  # the state (ports, host) the start has written
        self.log(f"storage tier: Swift at {self._cluster.auth_url} on core "
                 f"{self.storage.core}; trainer tier on core {self.trainer.core}; "
                 + (f"link shaped to {self.rate_mbit} Mbit/s" if self.shaped else "unshaped"))

    @property
    def auth_url(self):
        return self._cluster.auth_url

    def env(self):
        """The environment for either tier's commands: Swift credentials included."""
        user, key = self._cluster.users["tester"]
        return {**os.environ, "ST_AUTH": self.auth_url, "ST_USER": user, "ST_KEY": key}

    def storage_cpu_s(self):
        """CPU seconds (user + system) the Swift servers have used so far."""
        pids = [info["pid"] for info in self._cluster.status().values() if info["alive"]]
        return sum(_cpu_seconds(pid) for pid in pids)

    def measure(self, command, metrics_file, log_file, timeout_s=None):
        """Run ``command --metrics metrics_file``, output to ``log_file``; a :class:`Measured`.

        The command's CPU comes from this process's children counters (``ip
        netns exec`` and ``taskset`` exec, they do not fork), so run one
        command at a time. Raises :class:`CommandFailed` when it fails, and
        ``subprocess.TimeoutExpired`` when it ran past ``timeout_s`` (it is
        killed then).
        """
        command = [*map(str, command), "--metrics", str(metrics_file)]
        link, storage_cpu, own_cpu = self.link_bytes(), self.storage_cpu_s(), _children_cpu_s()
        began = time.perf_counter()
        with open(log_file, "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            result = subprocess.run(command, env=self.env(), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, check=False,
                                    timeout=timeout_s)
        run_s = time.perf_counter() - began
        if result.returncode:
            raise CommandFailed(f"exit {result.returncode}, log {log_file}:\n"
                                + _tail(log_file))
        after = self.link_bytes()
        return Measured(
            run_s=run_s,
            to_trainer=after["to_trainer"] - link["to_trainer"] if link else None,
            to_storage=after["to_storage"] - link["to_storage"] if link else None,
            storage_cpu_s=self.storage_cpu_s() - storage_cpu,
            command_cpu_s=_children_cpu_s() - own_cpu,
            metrics=json.loads(Path(metrics_file).read_text()))

    def storage_command(self, argv):
        return self.storage.command(argv)

    def trainer_command(self, argv):
        return self.trainer.command(argv)

    def describe(self):
        """The set-up, for results files."""
        return {"shaped": self.shaped, "note": self.note,
                "storage": {"core": self.storage.core, "address": self.storage.address,
                            "netns": self.storage.netns},
                "trainer": {"core": self.trainer.core, "address": self.trainer.address,
                            "netns": self.trainer.netns},
                "threads_per_tier": self.threads,
                "tbf": {"latency": TBF_LATENCY, "min_burst_bytes": TBF_MIN_BURST}
                if self.shaped else None}

    # -- signals ---------------------------------------------------------------------

    def _trap_signals(self):
        """Turn SIGTERM and SIGHUP into SystemExit, so that ``close`` runs."""
        if not _main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGHUP):
            self._saved_handlers[signum] = signal.signal(signum, _exit_on_signal)

    def _restore_signals(self):
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler)
        self._saved_handlers = {}

    @contextlib.contextmanager
    def _signals_ignored(self):
        """A second Ctrl-C must not cut the cleanup short."""
        if not _main_thread():
            yield
            return
        saved = {signum: signal.signal(signum, signal.SIG_IGN) for signum in _CLEANUP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in saved.items():
                signal.signal(signum, handler)


def _exit_on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def _main_thread():
    return threading.current_thread() is threading.main_thread()


# -- leftovers ---------------------------------------------------------------------------


def remove_leftovers(log=print):
    """Delete namespaces and tmpfs folders of earlier runs whose process is gone.

    Processes still running in such a namespace (Swift of a killed run) are
    ended by pid first; a namespace outlives its name while they run.
    """
    if os.geteuid() == 0 and shutil.which("ip"):
        for netns in _list_netns():
            if _stale(netns):
                log(f"removing namespace {netns} left by an earlier run")
                _delete_netns(netns)
    if SHM.is_dir():
        for folder in SHM.glob(f"{PREFIX}-*"):
            if _stale(folder.name):
                shutil.rmtree(folder, ignore_errors=True)


def _stale(name):
    match = _STALE_NAME.match(name)
    return bool(match) and not _pid_alive(int(match.group(1)))


def _list_netns():
    result = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True,
                            check=False)
    if result.returncode or not result.stdout.strip():
        return []
    return [entry["name"] for entry in json.loads(result.stdout)]


def _delete_netns(netns):
    """End the processes in ``netns`` (ours: SIGTERM, then SIGKILL), delete it."""
    if netns not in _list_netns():
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _netns_pids(netns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if pids:
            _wait_gone(pids)
    subprocess.run(["ip", "netns", "delete", netns], capture_output=True, check=False)


def _netns_pids(netns):
    result = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                            check=False)
    return [int(pid) for pid in result.stdout.split()]


def _wait_gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_pid_alive(pid) for pid in pids):
        time.sleep(0.05)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- helpers ------------------------------------------------------------------------------


def _run(command):
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise ShapingError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result.stdout


def _ip(*args):
    return _run(["ip", *args])


def _children_cpu_s():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tail(path, lines=15):
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def _free_port(host):
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _cpu_seconds(pid):
    """utime + stime of ``pid`` from /proc (0 once it has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
