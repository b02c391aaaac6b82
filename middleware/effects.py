"""The effects a feature request's steps (:mod:`hapi.middleware.pipeline`)
ask their front end to perform, the replies they get back, and the
exceptions a front end raises into the steps."""

from dataclasses import dataclass, field


class Effect:
    """Something the steps ask their front end to do."""


@dataclass(frozen=True)
class Fetch(Effect):
    """A request for ``path`` (a native, unquoted string) with the caller's
    access, ``query`` (raw), ``headers`` and ``body`` sent along; the result
    is a :class:`Reply` whose body is still unread. ``purpose`` is
    ``shard``, ``weights`` or ``cache``."""

    method: str
    path: str
    purpose: str
    query: str = ""
    headers: dict = field(default_factory=dict)
    body: bytes | None = None


@dataclass(frozen=True)
class NextChunk(Effect):
    """The next chunk of ``reply``'s body; ``b""`` at its end. A body that
    breaks off raises :class:`BodyBroken` into the steps."""

    reply: "Reply"


@dataclass(frozen=True)
class Run(Effect):
    """``func(*args)`` in a worker thread; its result or its exception."""

    func: object
    args: tuple


@dataclass(frozen=True)
class Start(Effect):
    """``func(*args)`` started in a worker thread; the result is a handle for :class:`Join`."""

    func: object
    args: tuple


@dataclass(frozen=True)
class Join(Effect):
    """The result (or exception) of a :class:`Start`'s call, once it is done."""

    handle: object


@dataclass(frozen=True)
class AwaitGrant(Effect):
    """Wait until ``signal`` fires or ``timeout`` seconds pass, whichever is first."""

    signal: "Signal"
    timeout: float


@dataclass(frozen=True)
class Respond(Effect):
    """Start the response; with ``body`` None, :class:`Send` effects follow."""

    status: int
    headers: dict
    body: bytes | None = None


@dataclass(frozen=True)
class Relay(Effect):
    """Answer with Swift's own response to a :class:`Fetch`, unchanged. Last effect."""

    reply: "Reply"


@dataclass(frozen=True)
class Send(Effect):
    """Write bytes of the response body; a caller that is gone raises :class:`ClientGone`."""

    data: bytes


@dataclass
class Reply:
    """Swift's answer to a :class:`Fetch` as the front end received it:
    ``headers`` any case-insensitive mapping, ``native`` the front end's own
    response object, ``body`` its handle on the unread body (for
    :class:`NextChunk`), ``release`` a plain call that closes the body."""

    status: int
    reason: str
    headers: object
    native: object
    body: object
    release: object

    @property
    def ok(self):
        return 200 <= self.status < 300

    @property
    def status_line(self):
        return f"{self.status} {self.reason}"

    @property
    def content_length(self):
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def etag(self):
        return self.headers.get("Etag", "").strip('"')


class BodyBroken(Exception):
    """Raised into the steps when an object's body fails part-way."""


class ClientGone(Exception):
    """Raised into the steps when the caller left during the stream."""


class StreamEnded(Exception):
    """Raised into the steps by a front end that ends a stream early (the
    server's shutdown): the stream's last frame is an error frame."""

    def __init__(self, status, message, outcome):
        super().__init__(message)
        self.status = status
        self.outcome = outcome


class SwiftRefused(Exception):
    """Swift refused the shard read: its response goes back as it came."""

    def __init__(self, reply):
        super().__init__(reply.status_line)
        self.reply = reply


class Signal:
    """A wake-up from the admission bookkeeping to a front end's wait, on
    the scheduling thread: :meth:`fire` once granted; the front end sets
    ``listener`` while it waits."""

    def __init__(self):
        self.fired = False
        self.listener = None

    def fire(self):
        self.fired = True
        if self.listener is not None:
            self.listener()
