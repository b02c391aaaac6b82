"""The trainer's running estimates of the two tiers' speeds and the link's.

:class:`OnlineEstimator` folds the ``timings`` of the frames as they arrive,
the transfers' bytes and durations and the trainer's iterations into
per-layer storage-side times, the bandwidth and the trainer's speed, fills
them into a :class:`hapi.client.autosplit.profiling.Profile`, and says when
one has drifted from the values the current split choice was made with (the
selector, ``hapi.client.autosplit.selector``, re-decides then).
:class:`LinkClock` turns the parts of the requests' bodies, as they arrive
over all connections, into the observations of the link's rate that the
estimator counts.
"""

from __future__ import annotations

import bisect
import itertools
import statistics
import threading
import time
from collections import deque

from hapi.client.autosplit.profiling import Profile
from hapi.client.features import BURST_BYTES

__all__ = ["MIN_OBSERVED_S", "MIN_TIMED_BYTES", "MIN_TIMED_S", "SIZE_SPREAD", "LinkClock",
           "OnlineEstimator", "SampleAndByteCost"]

# A part smaller than this crosses the link in a few milliseconds, or at
# once when a shaper's bucket or the socket buffers hold it: it does not make
# the link busy, and a stretch of busy time after an idle moment that carried
# fewer bytes is not timed: its time says more about the hosts' clocks than
# about the link's rate.
MIN_TIMED_BYTES = BURST_BYTES
# A stretch of busy time after an idle moment shorter than this (a fast
# link: loopback, a LAN) is not timed either: a few milliseconds are within
# the jitter of the two hosts' threads and of the storage tier's ready time.
MIN_TIMED_S = 0.005
# One observation of the link's rate pools windows of wall time until their
# busy time adds up to this (or the link has nothing more in flight). A
# window's bytes are spread between the moments each connection reported
# them (every 50 ms or so), and a shaper's bucket lets a body after an idle
# moment go partly at line rate: a window of a few tens of milliseconds
# reads too fast or too slow. Pooled over much longer, profiling ends with
# too few observations (measured on 65 KB frames at 5 and 2.5 Mbit/s:
# docs/DESIGN.md).
MIN_OBSERVED_S = 0.2
# The observations :attr:`LinkClock.observations` keeps for the metrics, the
# last ones: at least 0.2 s of busy link each, over half an hour of it.
LOGGED_OBSERVATIONS = 10_000


# Shards this many times larger per sample than others separate a cost per
# byte from a cost per request (:class:`SampleAndByteCost`).
SIZE_SPREAD = 2.0


class _Series:
    """The last ``window`` observations of one quantity, and how many arrived
    since the last :meth:`OnlineEstimator.mark`."""

    def __init__(self, window):
        self.values = deque(maxlen=window)
        self.since_mark = 0

    def add(self, value):
        self.values.append(value)
        self.since_mark += 1

    def median(self):
        return statistics.median(self.values) if self.values else None

    def recent(self, limit=None):
        """The last ``limit`` observations made since the mark (at most the window)."""
        count = min(self.since_mark, len(self.values), limit or len(self.values))
        return list(self.values)[len(self.values) - count:]


class OnlineEstimator:
    """Storage-side times, bandwidth and the trainer's speed, estimated from
    the stream and the iterations as they come.

    Feed it every frame (:meth:`observe_frame`), every transfer
    (:meth:`observe_transfer`, through a :class:`LinkClock`) and every
    iteration's compute against its prediction (:meth:`observe_trainer`);
    read the estimates (``bandwidth_bytes_per_s``, ``storage_layer_s``,
    ``storage_decode_s``, ``trainer_speed``...) or :meth:`apply` them to a
    :class:`Profile`. Per-sample storage times and the trainer's speed are
    medians over the last ``window`` observations (robust to a frame that
    shared the storage tier with another tenant); the bandwidth is the bytes
    over the seconds of the last ``window`` transfers.

    :meth:`mark` records the estimates a split choice was made with;
    :meth:`drifted` then says whether the bandwidth, the storage tier's
    speed or the trainer's has since moved by more than a relative
    threshold and by more than ``spread_factor`` times the observations'
    own scatter (:meth:`spread`), judged on the last ``drift_window``
    observations made since the mark, once there are at least
    ``min_observations`` of them: a change shows after a few
    observations, without waiting for the long window to fill with it,
    and the noise of a shared host is not taken for one. After a drift,
    :meth:`keep_recent` drops what the change made obsolete.

    A change by ``quick_factor`` or more either way (a link reshaped to half
    or twice its rate) shows after the last ``quick_observations``
    observations alone (default ``min_observations``: no quick path): a
    change that large is not noise, and judging it on a window that still
    holds the old conditions would leave the choice stale for several shards.
    """

    def __init__(self, window: int = 16, min_observations: int = 3,
                 drift_window: int | None = None, spread_factor: float = 2.0,
                 quick_observations: int | None = None, quick_factor: float = 2.0):
        if window < 1 or min_observations < 1:
            raise ValueError("window and min_observations must be >= 1")
        if quick_factor <= 1:
            raise ValueError(f"quick_factor must be above 1, got {quick_factor}")
        self.window = window
        self.min_observations = min_observations
        self.quick_observations = max(min(quick_observations or min_observations,
                                          min_observations), 1)
        self.quick_factor = quick_factor
        self.drift_window = max(drift_window or 4, min_observations)
        self.spread_factor = spread_factor
        self._layers: dict[int, _Series] = {}
        self._decode = _Series(window)
        self._to_wire = _Series(window)
        self._transfers = _Series(window)
        self._latency = _Series(window)
        self._trainer = _Series(window)
        self._baseline: dict | None = None
        self.frames = 0
        self.transfers = 0

    # Feeding ---------------------------------------------------------------

    def observe_frame(self, timings: dict, samples: int, feature_bytes: int | None = None):
        """One frame's ``timings`` (``hapi.wire.Frame.timings``) for ``samples``
        samples; ``layers_s[i]`` is layer ``i`` (the storage tier runs layers
        ``[0, split)``). ``feature_bytes``: the frame's feature tensor size,
        to turn ``to_wire_s`` into a per-byte cost."""
        if samples < 1:
            return
        self.frames += 1
        if "decode_s" in timings:
            self._decode.add(float(timings["decode_s"]) / samples)
        for index, seconds in enumerate(timings.get("layers_s", ())):
            self._layers.setdefault(index, _Series(self.window)).add(float(seconds) / samples)
        if feature_bytes and "to_wire_s" in timings:
            self._to_wire.add(float(timings["to_wire_s"]) / feature_bytes)

    def observe_transfer(self, nbytes: int, seconds: float):
        """``nbytes`` received in ``seconds`` of the link's busy time (a frame,
        or a raw body): the time the bytes were on the way, not the time the
        storage tier spent computing them (see :class:`LinkClock`)."""
        if nbytes > 0 and seconds > 0:
            self._transfers.add((nbytes, seconds))
            self.transfers += 1

    def observe_latency(self, seconds: float):
        """A request's time to its first byte beyond the storage compute."""
        if seconds >= 0:
            self._latency.add(seconds)

    def observe_trainer(self, ratio: float):
        """One iteration's compute on the trainer over the time its profile
        predicts for it (its layers, at the splits its samples came at, and
        its optimizer step)."""
        if ratio > 0:
            self._trainer.add(ratio)

    # Estimates -----------------------------------------------------------

    @property
    def bandwidth_bytes_per_s(self) -> float | None:
        return _rate(self._transfers.values)

    @property
    def storage_decode_s(self) -> float | None:
        return self._decode.median()

    @property
    def storage_to_wire_s_per_byte(self) -> float | None:
        return self._to_wire.median()

    @property
    def request_latency_s(self) -> float | None:
        """The shortest of the recent requests' latencies: what a request
        waits at least. Longer ones waited behind other responses' bytes
        on the link or for admission: queueing, which the cost model
        counts where it happens, not as latency."""
        return min(self._latency.values) if self._latency.values else None

    @property
    def trainer_speed(self) -> float | None:
        """How many times its profile's time the trainer's compute takes."""
        return self._trainer.median()

    def storage_layer_s(self, layers: int) -> list[float | None]:
        """Per-sample storage time of layers ``[0, layers)``; None where no frame ran it."""
        return [self._layers[i].median() if i in self._layers else None for i in range(layers)]

    def apply(self, profile: Profile) -> Profile:
        """``profile`` with the estimates made so far filled in (a copy), at
        the trainer's speed (:meth:`Profile.at_trainer_speed`)."""
        speed = self.trainer_speed
        out = profile.at_trainer_speed(speed) if speed is not None \
            else profile.with_measurements()
        for index, seconds in enumerate(self.storage_layer_s(min(len(out), out.freeze))):
            if seconds is not None:
                out.layers[index].storage_s = seconds
        for name in ("bandwidth_bytes_per_s", "storage_decode_s", "storage_to_wire_s_per_byte",
                     "request_latency_s"):
            value = getattr(self, name)
            if value is not None:
                setattr(out, name, value)
        return out

    # Drift -----------------------------------------------------------------

    def mark(self) -> dict:
        """Record the current estimates as those the current choice was made
        with; later drift is measured against them. Returns the baseline."""
        self._baseline = {"bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
                          "bandwidth_typical": _typical_rate(self._transfers.values),
                          "layers": {i: s.median() for i, s in self._layers.items()},
                          "decode": self._decode.median(),
                          # Before any iteration: the speed the profile says.
                          "trainer": self.trainer_speed or 1.0,
                          "observations": {"bandwidth": len(self._transfers.values),
                                           "storage": len(self._decode.values),
                                           "trainer": len(self._trainer.values)}}
        for series in (self._decode, self._to_wire, self._transfers, self._latency,
                       self._trainer, *self._layers.values()):
            series.since_mark = 0
        return self._baseline

    def keep_recent(self) -> None:
        """After a drift: forget what came before the last mark, for every
        quantity with at least ``min_observations`` new observations (after
        a quick drift: its last ``quick_observations``, and only those), so
        that the estimates describe the new conditions only, not a mix of both.

        A layer the storage tier ran before the mark but not since (the split
        moved below it) keeps its last times, scaled by the storage tier's
        drift on what it still runs: a storage tier that got twice as slow is
        twice as slow on every layer."""
        change = self.drift()["storage"]
        scale = 1.0 + change if change is not None else 1.0
        quick = bool(self._quick_changes())
        enough = self.quick_observations if quick else self.min_observations
        keep = self.quick_observations if quick else self.drift_window
        series = [self._decode, self._to_wire, self._transfers, self._latency,
                  self._trainer, *self._layers.values()]
        for one in series:
            if one.since_mark >= enough:
                recent = one.recent(keep)
                one.values.clear()
                one.values.extend(recent)
        if scale != 1.0:
            for one in self._layers.values():
                if one.since_mark < enough and one.values:
                    # Not run since the mark: rescale by the storage drift (see apply).
                    values = [v * scale for v in one.values]
                    one.values.clear()
                    one.values.extend(values)

    def drift(self, quick: bool = True) -> dict:
        """Relative change since :meth:`mark` (``new / old - 1``) of the
        bandwidth (the median observation's rate: a reader that the
        trainer's work delayed makes one observation slow and the next one
        fast, and the median ignores either), of the storage time per
        sample (decode plus the layers measured both then and now) and of
        the trainer's speed (against the profile's when no iteration had
        measured it), over the last ``drift_window``
        observations since the mark; each None until ``min_observations`` new
        observations of it arrived. With ``quick``, a change by
        ``quick_factor`` or more over the last ``quick_observations`` is
        reported as soon as it shows. Without a mark, both are None."""
        changes = self._changes(self.drift_window, self.min_observations)
        return {**changes, **self._quick_changes()} if quick else changes

    def settled(self, enough: int | None = None) -> set[str]:
        """The quantities whose value at :meth:`mark` rested on ``enough``
        (default ``min_observations``) or more observations (after a quick
        drift it rests on the few observations that showed it)."""
        if self._baseline is None:
            return set()
        enough = self.min_observations if enough is None else enough
        return {name for name, count in self._baseline["observations"].items()
                if count >= enough}

    def _quick_changes(self) -> dict:
        """The changes by ``quick_factor`` or more over the last
        ``quick_observations`` observations since the mark; none when there
        is no quick path (``quick_observations == min_observations``). The
        bandwidth's is a step: the median of those observations against the
        median of the window's observations before them, at least as many
        (the median of fewer would make one noisy observation look like a
        step), whether or not the decision had them: a measured decision
        at the profiling bound may rest on one or two. The storage time's is
        against the mark, when its value there rested on as many."""
        if self.quick_observations >= self.min_observations or self._baseline is None:
            return {}
        quick = self.quick_observations
        changes = self._changes(quick, quick)
        recent = self._transfers.recent(quick)
        before = list(self._transfers.values)[:len(self._transfers.values) - len(recent)]
        changes["bandwidth"] = _typical_rate(recent) / _typical_rate(before) - 1 \
            if len(recent) >= quick and len(before) >= quick else None
        settled = self.settled(quick) | {"bandwidth"}
        return {name: change for name, change in changes.items() if change is not None
                and name in settled
                and (change + 1 >= self.quick_factor or change + 1 <= 1 / self.quick_factor)}

    def _changes(self, limit: int, enough: int) -> dict:
        """:meth:`drift` over the last ``limit`` observations since the mark,
        each None until there are ``enough``."""
        result = {"bandwidth": None, "storage": None, "trainer": None}
        base = self._baseline
        if base is None:
            return result
        recent = self._transfers.recent(limit)
        if base["bandwidth_typical"] and len(recent) >= enough:
            result["bandwidth"] = _typical_rate(recent) / base["bandwidth_typical"] - 1
        pairs = []  # (value at the mark, value since), for decode and each layer seen in both
        for old, series in ((base["decode"], self._decode),
                            *((base["layers"].get(i), s) for i, s in self._layers.items())):
            values = series.recent(limit)
            if old and len(values) >= enough:
                pairs.append((old, statistics.median(values)))
        if pairs:
            result["storage"] = sum(new for _, new in pairs) / sum(old for old, _ in pairs) - 1
        speeds = self._trainer.recent(limit)
        if len(speeds) >= enough:
            result["trainer"] = statistics.median(speeds) / base["trainer"] - 1
        return result

    def spread(self, limit: int | None = None) -> dict:
        """How much one observation since :meth:`mark` strays from the others:
        the median absolute deviation over the median (relative) of the
        per-transfer rates, of the storage times (decode and each layer,
        weighted by their medians) and of the trainer's speeds, over the
        last ``limit`` observations (default ``drift_window``). 0 until there
        are two observations."""
        limit = limit or self.drift_window
        rates = [b / s for b, s in self._transfers.recent(limit)]
        weighted = [(statistics.median(values), _relative_spread(values))
                    for values in (s.recent(limit) for s in (self._decode, *self._layers.values()))
                    if values]
        total = sum(median for median, _ in weighted)
        storage = sum(median * spread for median, spread in weighted) / total if total else 0.0
        return {"bandwidth": _relative_spread(rates), "storage": storage,
                "trainer": _relative_spread(self._trainer.recent(limit))}

    def drifted(self, threshold: float = 0.25) -> bool:
        """Whether the bandwidth, the storage speed or the trainer's moved
        since :meth:`mark` by more than ``threshold`` (relative, either way)
        and by more than ``spread_factor`` times its own :meth:`spread`: on a
        noisy host, a change no larger than the noise is no drift. A quick
        change is judged against the scatter of the observations it rests on."""
        quick = self._quick_changes()
        if quick:
            spread = self.spread(self.quick_observations)
            if any(abs(change) > max(threshold, self.spread_factor * spread[name])
                   for name, change in quick.items()):
                return True
        spread = self.spread()
        return any(change is not None
                   and abs(change) > max(threshold, self.spread_factor * spread[name])
                   for name, change in self._changes(self.drift_window,
                                                     self.min_observations).items())


class SampleAndByteCost:
    """A cost per sample fitted as a part per sample whatever the split plus
    a part per byte on the wire, from shards of different sizes.

    The trainer's receive cost is one: the loader's CPU per sample beyond
    the decode, a part per sample (the request, the frames' headers, keys
    and labels, concatenating the batch) plus a part per received byte. The
    storage tier's compute beyond its own layer costs is the other: its
    decode and what the rest of its work costs the cores that compute, a
    part per sample plus a part per byte sent.

    The loader's, measured on AlexNet's shards of 8 samples on loopback
    (2-core VM): the per-request part is about 2 ms whatever the bytes, the
    per-byte part about 1 ms per MB of float32: at a small boundary the first dominates,
    and CPU divided by bytes there read ten times the cost of a byte at a
    large one. So the two parts are fitted apart (Theil-Sen: the median of
    the slopes between shards at least ``spread`` times apart in bytes per
    sample, then the median intercept) whenever the window holds such
    shards. The cost per byte so measured is kept once the window holds
    shards of one size again; before any such pair, the cost per byte cannot
    be told from the cost per request, and it all counts per sample (a
    boundary that is not yet measured is charged no per-byte cost beyond its
    decode and copy).
    """

    def __init__(self, window, spread=SIZE_SPREAD):
        self._points = deque(maxlen=window)
        self._spread = spread
        self._per_byte = None

    def observe(self, bytes_per_sample: float, seconds_per_sample: float) -> None:
        self._points.append((bytes_per_sample, seconds_per_sample))
        slopes = [(y2 - y1) / (x2 - x1) for (x1, y1), (x2, y2)
                  in itertools.permutations(self._points, 2)
                  if x2 >= self._spread * x1 and x2 > 0]
        if slopes:
            self._per_byte = statistics.median(slopes)

    def __bool__(self):
        return bool(self._points)

    @property
    def separable(self) -> bool:
        """Whether the cost per byte has been told from the cost per request."""
        return self._per_byte is not None

    def costs(self) -> tuple[float, float]:
        """(seconds per sample, seconds per byte); (0, 0) before any shard."""
        if not self._points:
            return 0.0, 0.0
        per_byte = max(self._per_byte or 0.0, 0.0)
        per_sample = statistics.median(y - per_byte * x for x, y in self._points)
        if per_sample < 0:
            # The cost grows faster than the bytes: all of it per byte.
            return 0.0, max(statistics.median(y / x for x, y in self._points if x > 0), 0.0)
        return per_sample, per_byte

    @property
    def bytes_per_sample(self) -> float:
        """The median bytes per sample of the shards in the window (0 before any)."""
        return statistics.median(x for x, _ in self._points) if self._points else 0.0


def _relative_spread(values) -> float:
    if len(values) < 2:
        return 0.0
    middle = statistics.median(values)
    return statistics.median(abs(v - middle) for v in values) / middle if middle > 0 else 0.0


def _typical_rate(transfers) -> float | None:
    """The median of the observations' rates (bytes/s)."""
    rates = [nbytes / seconds for nbytes, seconds in transfers if seconds > 0]
    return statistics.median(rates) if rates else None


def _rate(transfers) -> float | None:
    seconds = sum(s for _, s in transfers)
    return sum(b for b, _ in transfers) / seconds if seconds > 0 else None


class LinkClock:
    """The link's rate, measured on the bodies' bytes as they arrive, over all
    connections at once; and the requests' latency. Thread-safe: the
    loader's threads feed it, and its :attr:`lock` guards the estimator too.

    A request is :meth:`open` before it goes out; each part of its body is
    reported as it arrives (:meth:`on_link`: per frame, from when the storage
    tier had it ready to when its last byte arrived; a raw body as one part),
    and, every few tens of milliseconds, how many bytes of the part still
    arriving are here (``arriving``); then the request is :meth:`close`\\ d.
    A part was on the link from its start, or from when the part before it
    in the same body arrived if that was later (a connection's bytes go in
    order), to its end: a frame still computing is not link time, and
    neither the storage tier's pace nor its queue is taken for the link's.

    The link is busy whenever a part is on it. The clock follows the link in
    windows of wall time: a window is known once every open request has
    reported its parts, or its bytes arriving, up to the window's end. Its
    observation is the bytes that arrived in it over all connections (each
    part's bytes spread between the moments they were seen arriving) over
    the time the link was busy in it. Nothing is divided among the requests:
    a connection that stalls while others' bytes arrive changes neither the
    bytes nor the busy time. Windows are pooled until their busy time adds
    up to :data:`MIN_OBSERVED_S`, or no request is open: one observation of
    the estimator, made moments after its bytes arrived.

    A shaper's bucket or the socket buffers pass a few kilobytes at once
    after an idle moment: a stretch of busy time that began after an idle
    moment and is shorter than :data:`MIN_TIMED_S` or carried fewer than
    :data:`MIN_TIMED_BYTES` is not timed, and a part smaller than
    :data:`MIN_TIMED_BYTES` (a burst, a small frame) does not make the link
    busy: its bytes count only where other parts kept it busy.

    :meth:`observe` takes a whole request at once (the probe before the
    run, alone on the link).
    """

    def __init__(self, estimator: OnlineEstimator):
        self.estimator = estimator
        self.lock = threading.RLock()
        # Open, or closed with parts that end after the link's known time.
        self._requests: list[_OnLink] = []
        # Where the next window starts (None before the first part), and
        # whether the link was busy at that moment in a stretch being timed.
        self._until: float | None = None
        self._continuing = False
        # Bytes and busy time of the windows since the last observation,
        # and when the last of their busy time ended.
        self._pooled_bytes, self._pooled_s, self._pooled_until = 0.0, 0.0, 0.0
        self.observations: deque[dict] = deque(maxlen=LOGGED_OBSERVATIONS)

    def open(self, at: float | None = None) -> _OnLink:
        """A request about to go out (at ``time.perf_counter()``, or ``at``);
        report its parts and close it with what this returns."""
        with self.lock:
            request = _OnLink(time.perf_counter() if at is None else at)
            self._requests.append(request)
            return request

    def on_link(self, request: _OnLink, start: float, end: float, nbytes: int,
                arriving: bool = False) -> bool:
        """A part of ``request``'s body, on the link from ``start`` to ``end``
        (``time.perf_counter()``), of ``nbytes``; with ``arriving``, a part
        whose bytes are still arriving, ``nbytes`` of them by ``end``: its
        whole part follows. Returns whether the estimator got an observation."""
        with self.lock:
            if arriving:
                request.arriving(start, end, nbytes)
            else:
                request.add(start, end, nbytes)
            return self._settle()

    def close(self, request: _OnLink) -> bool:
        """``request`` is over (its body read, or given up). Returns whether
        the estimator got an observation."""
        with self.lock:
            request.closed = True
            return self._settle()

    def observe_latency(self, transfer, queued_s: float = 0.0) -> None:
        """A request's wait for its response headers less the storage tier's
        work before them: the first frame's compute and its wait for a
        device slot (``queued_s``, the frame's ``slot_wait_s``): queueing at
        the storage tier is not the link's latency."""
        with self.lock:
            self.estimator.observe_latency(transfer.answered_at - transfer.sent_at
                                           - transfer.storage_early_s - queued_s)

    def observe(self, transfer, queued_s: float = 0.0) -> None:
        """A whole request (``hapi.client.data.Transfer``) that had the link to
        itself: its latency and its parts."""
        with self.lock:
            self.observe_latency(transfer, queued_s)
            request = _OnLink(transfer.sent_at)
            self._requests.append(request)
            for part in transfer.link_intervals():
                request.add(*part)
            self.close(request)

    def _settle(self) -> bool:
        """Time the link up to where every open request has reported; observe
        the pool whenever it is full, and when the link has nothing in flight."""
        open_requests = [r for r in self._requests if not r.closed]
        parts = [part for r in self._requests for part in r.parts_on_link()]
        if self._until is None:
            self._until = min([r.opened_at for r in self._requests] + [p.start for p in parts],
                              default=None)
        # With no request open, nothing is still to come before the last end.
        horizon = min((r.known_until for r in open_requests),
                      default=max((part.end for part in parts), default=self._until))
        observed = False
        if self._until is not None and horizon > self._until:
            observed = self._time_window(horizon)
        if not open_requests and self._pooled_s > 0:
            observed = self._observe_pool()
        if self._until is not None:
            self._requests = [r for r in self._requests
                              if not r.closed or r.ends_after(self._until)]
            for request in self._requests:
                request.forget_before(self._until)
        return observed

    def _time_window(self, horizon: float) -> bool:
        """Pool the busy stretches from the window's start to ``horizon``; the
        window then starts at ``horizon``, or at a stretch too short to tell
        from a burst that may go on past it."""
        observed = False
        stretches = _union(interval for r in self._requests for interval in r.busy(self._until,
                                                                                   horizon))
        for low, high in stretches:
            nbytes = sum(r.bytes_between(low, high) for r in self._requests)
            going_on = self._continuing and low == self._until
            if not going_on and (high - low < MIN_TIMED_S or nbytes < MIN_TIMED_BYTES):
                if high >= horizon:
                    self._until, self._continuing = low, False
                    return observed
                continue
            self._pooled_bytes += nbytes
            self._pooled_s += high - low
            self._pooled_until = high
            if self._pooled_s >= MIN_OBSERVED_S:
                observed = self._observe_pool()
        self._continuing = bool(stretches) and stretches[-1][1] >= horizon
        self._until = horizon
        return observed

    def _observe_pool(self) -> bool:
        """Give the estimator the pool as one observation, and log it: when
        (``monotonic_s``, the host's ``time.monotonic()``), its bytes, its
        link seconds and how long after its last byte arrived (``lag_s``)."""
        self.estimator.observe_transfer(round(self._pooled_bytes), self._pooled_s)
        self.observations.append({"monotonic_s": time.monotonic(),
                                  "bytes": round(self._pooled_bytes),
                                  "seconds": self._pooled_s,
                                  "lag_s": time.perf_counter() - self._pooled_until})
        self._pooled_bytes, self._pooled_s, self._pooled_until = 0.0, 0.0, 0.0
        return True


def _union(intervals) -> list[tuple[float, float]]:
    """The union of ``(start, end)`` intervals, as disjoint intervals in order."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class _Part:
    """A part of a body on the link from ``start``, and how many of its bytes
    had arrived when: ``points``, ``(time, bytes so far)`` in order, the last
    one its ``end`` and all its ``nbytes`` once it is whole."""

    __slots__ = ("points", "start")

    def __init__(self, start: float, points: list[tuple[float, int]]):
        self.start, self.points = min(start, points[0][0]), points

    @property
    def end(self) -> float:
        return self.points[-1][0]

    @property
    def nbytes(self) -> int:
        return self.points[-1][1]

    def bytes_by(self, moment: float) -> float:
        """Its bytes arrived by ``moment``, spread evenly between the moments
        they were seen arriving (a read's bytes all arrive at its moment)."""
        after = bisect.bisect_right(self.points, moment, key=lambda point: point[0])
        if after == len(self.points):
            return self.nbytes
        since, got = self.points[after - 1] if after else (self.start, 0)
        if moment <= since:
            return got
        until, total = self.points[after]
        return got + (total - got) * (moment - since) / (until - since)


class _OnLink:
    """One request's parts on the link, in order; they never overlap."""

    def __init__(self, opened_at: float):
        self.opened_at = opened_at
        self.parts: list[_Part] = []
        self.closed = False
        self._arriving: _Part | None = None  # the part still arriving, so far
        self._last_end: float | None = None  # the last whole part's

    @property
    def next_from(self) -> float:
        """A part still to come starts after this: the last one's end, or
        for the first, when the request was opened."""
        return self.opened_at if self._last_end is None else self._last_end

    @property
    def known_until(self) -> float:
        """Whether this request was on the link is known up to this time:
        :attr:`next_from`, or later while a part is arriving."""
        return max(self.next_from, self._arriving.end) if self._arriving else self.next_from

    def add(self, start: float, end: float, nbytes: int) -> None:
        """A whole part. Its bytes seen arriving before ``end`` are its own;
        those after (the next part's, when a frame is two parts) stay
        arriving."""
        start, points = self._after_last(start), [(end, nbytes)]
        arriving, self._arriving = self._arriving, None
        if arriving:
            start = min(start, arriving.start)
            points[:0] = [p for p in arriving.points if p[0] < end and p[1] < nbytes]
            rest = [(at, got - nbytes) for at, got in arriving.points if got > nbytes]
            if rest:
                self._arriving = _Part(end, rest)
        self.parts.append(_Part(start, points))
        self._last_end = end

    def arriving(self, start: float, until: float, nbytes: int) -> None:
        """The next part's first ``nbytes`` have arrived, from ``start`` up to ``until``."""
        if self._arriving is None:
            self._arriving = _Part(self._after_last(start), [(until, nbytes)])
        elif until >= self._arriving.end and nbytes >= self._arriving.nbytes:
            self._arriving.points.append((until, nbytes))

    def _after_last(self, start: float) -> float:
        """``start``, or the last whole part's end if later: a connection's
        bytes go in order."""
        return start if self._last_end is None else max(start, self._last_end)

    def parts_on_link(self) -> list[_Part]:
        """Its parts, and the one still arriving."""
        return [*self.parts, self._arriving] if self._arriving else self.parts

    def busy(self, low: float, high: float):
        """The intervals within ``[low, high]`` that it kept the link busy:
        its parts of :data:`MIN_TIMED_BYTES` or more and the one arriving."""
        for part in self.parts_on_link():
            if (part.nbytes >= MIN_TIMED_BYTES or part is self._arriving) and \
                    part.start < high and part.end > low:
                yield max(part.start, low), min(part.end, high)

    def bytes_between(self, low: float, high: float) -> float:
        return sum(part.bytes_by(high) - part.bytes_by(low) for part in self.parts_on_link()
                   if part.start < high and part.end > low)

    def forget_before(self, moment: float) -> None:
        """Drop the whole parts that ended by ``moment``: they are timed."""
        self.parts = [part for part in self.parts if part.end > moment]

    def ends_after(self, moment: float) -> bool:
        return any(part.end > moment for part in self.parts_on_link())
