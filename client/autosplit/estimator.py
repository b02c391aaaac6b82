"""The trainer's running estimates of the storage tier's speed and the link's.

:class:`OnlineEstimator` folds the ``timings`` of the frames as they arrive
and the transfers' bytes and durations into per-layer storage-side times and
the bandwidth, fills them into a
:class:`hapi.client.autosplit.profiling.Profile`, and says when either has
drifted from the values the current split choice was made with (the
selector, ``hapi.client.autosplit.selector``, re-decides then).
:class:`LinkClock` turns the requests' transfers into the link's busy time
that the estimator counts.
"""

from __future__ import annotations

import statistics
from collections import deque

from hapi.client.autosplit.profiling import Profile

__all__ = ["MIN_TIMED_BYTES", "LinkClock", "OnlineEstimator"]

# A frame smaller than this crosses the link in a few milliseconds, or at
# once when a shaper's bucket (tens of KiB) or the socket buffers hold it:
# its time says more about the hosts' clocks than about the link's rate.
MIN_TIMED_BYTES = 64 * 1024


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
    """Storage-side times and bandwidth, estimated from the stream as it arrives.

    Feed it every frame (:meth:`observe_frame`) and every transfer
    (:meth:`observe_transfer`, through a :class:`LinkClock`); read the
    estimates (``bandwidth_bytes_per_s``, ``storage_layer_s``, ``storage_decode_s``...)
    or :meth:`apply` them to a :class:`Profile`. Per-sample storage times
    are medians over the last ``window`` frames (robust to a frame that
    shared the storage tier with another tenant); the bandwidth is the bytes
    over the seconds of the last ``window`` transfers.

    :meth:`mark` records the estimates a split choice was made with;
    :meth:`drifted` then says whether the bandwidth or the storage tier's
    speed has since moved by more than a relative threshold and by more than
    ``spread_factor`` times the observations' own scatter (:meth:`spread`),
    judged on the last ``drift_window`` observations made since the mark,
    once there are at least ``min_observations`` of them: a change shows
    after a few observations, without waiting for the long window to fill
    with it, and the noise of a shared host is not taken for one.
    After a drift, :meth:`keep_recent` drops what the change made obsolete.

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
        """``nbytes`` received in ``seconds`` of the link's busy time: the time
        the bytes were on the way, not the time the storage tier spent
        computing them (see :class:`LinkClock`)."""
        if nbytes > 0 and seconds > 0:
            self._transfers.add((nbytes, seconds))
            self.transfers += 1

    def observe_latency(self, seconds: float):
        """A request's time to its first byte beyond the storage compute."""
        if seconds >= 0:
            self._latency.add(seconds)

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

    def storage_layer_s(self, layers: int) -> list[float | None]:
        """Per-sample storage time of layers ``[0, layers)``; None where no frame ran it."""
        return [self._layers[i].median() if i in self._layers else None for i in range(layers)]

    def apply(self, profile: Profile) -> Profile:
        """``profile`` with the estimates made so far filled in (a copy)."""
        out = profile.with_measurements()
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
                          "layers": {i: s.median() for i, s in self._layers.items()},
                          "decode": self._decode.median(),
                          "observations": {"bandwidth": len(self._transfers.values),
                                           "storage": len(self._decode.values)}}
        for series in (self._decode, self._to_wire, self._transfers, self._latency,
                       *self._layers.values()):
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
                  *self._layers.values()]
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
        bandwidth and of the storage time per sample (decode plus the layers
        measured both then and now), over the last ``drift_window``
        observations since the mark; each None until ``min_observations`` new
        observations of it arrived. With ``quick``, a change by
        ``quick_factor`` or more over the last ``quick_observations`` is
        reported as soon as it shows. Without a mark, both are None."""
        changes = self._changes(self.drift_window, self.min_observations)
        return {**changes, **self._quick_changes()} if quick else changes

    def _quick_changes(self) -> dict:
        """The changes by ``quick_factor`` or more over the last
        ``quick_observations`` observations since the mark, for the
        quantities whose value at the mark rested on ``min_observations`` or
        more (a baseline of a few noisy observations would make noise look
        like a quick change); none when there is no quick path
        (``quick_observations == min_observations``)."""
        if self.quick_observations >= self.min_observations or self._baseline is None:
            return {}
        changes = self._changes(self.quick_observations, self.quick_observations)
        settled = self._baseline["observations"]
        return {name: change for name, change in changes.items() if change is not None
                and settled[name] >= self.min_observations
                and (change + 1 >= self.quick_factor or change + 1 <= 1 / self.quick_factor)}

    def _changes(self, limit: int, enough: int) -> dict:
        """:meth:`drift` over the last ``limit`` observations since the mark,
        each None until there are ``enough``."""
        result = {"bandwidth": None, "storage": None}
        base = self._baseline
        if base is None:
            return result
        recent = self._transfers.recent(limit)
        if base["bandwidth_bytes_per_s"] and len(recent) >= enough:
            result["bandwidth"] = _rate(recent) / base["bandwidth_bytes_per_s"] - 1
        pairs = []  # (value at the mark, value since), for decode and each layer seen in both
        for old, series in ((base["decode"], self._decode),
                            *((base["layers"].get(i), s) for i, s in self._layers.items())):
            values = series.recent(limit)
            if old and len(values) >= enough:
                pairs.append((old, statistics.median(values)))
        if pairs:
            result["storage"] = sum(new for _, new in pairs) / sum(old for old, _ in pairs) - 1
        return result

    def spread(self, limit: int | None = None) -> dict:
        """How much one observation since :meth:`mark` strays from the others:
        the median absolute deviation over the median (relative) of the
        per-transfer rates, and of the storage times (decode and each layer,
        weighted by their medians), over the last ``limit`` observations
        (default ``drift_window``). 0 until there are two observations."""
        limit = limit or self.drift_window
        rates = [b / s for b, s in self._transfers.recent(limit)]
        weighted = [(statistics.median(values), _relative_spread(values))
                    for values in (s.recent(limit) for s in (self._decode, *self._layers.values()))
                    if values]
        total = sum(median for median, _ in weighted)
        storage = sum(median * spread for median, spread in weighted) / total if total else 0.0
        return {"bandwidth": _relative_spread(rates), "storage": storage}

    def drifted(self, threshold: float = 0.25) -> bool:
        """Whether the bandwidth or the storage speed moved since :meth:`mark`
        by more than ``threshold`` (relative, either way) and by more than
        ``spread_factor`` times its own :meth:`spread`: on a noisy host, a
        change no larger than the noise is no drift. A quick change is judged
        against the scatter of the observations it rests on."""
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


def _relative_spread(values) -> float:
    if len(values) < 2:
        return 0.0
    middle = statistics.median(values)
    return statistics.median(abs(v - middle) for v in values) / middle if middle > 0 else 0.0


def _rate(transfers) -> float | None:
    seconds = sum(s for _, s in transfers)
    return sum(b for b, _ in transfers) / seconds if seconds > 0 else None


class LinkClock:
    """Feeds the requests' :class:`hapi.client.data.Transfer` to an estimator,
    in the order they were sent: their latency, and the link's rate while it
    had something to carry.

    A request's latency is its wait for the response headers less the
    storage tier's work before them: the first frame's compute and its wait
    for a device slot (``queued_s``, the frame's ``slot_wait_s``): queueing
    at the storage tier is not the link's latency.

    The link's rate is bytes over busy time, over all connections at once.
    Each part of a body was on the link from when the storage tier had it
    ready to when its last byte arrived (``Transfer.link_intervals``: per
    frame; a raw body from its headers on). The link was busy over the union
    of those intervals, whichever request they belong to: requests in flight
    together share it, and a frame still computing was not on it, so neither
    the storage tier's pace nor its queue is taken for the link's. Each
    transfer adds its bytes and the time its intervals add to the union of
    those counted before; bytes whose intervals lie within time already
    counted (another request's frames had the link then) go with the next
    transfer that adds time. Summed over the estimator's window, that is
    the bytes over the busy time. Parts smaller than :data:`MIN_TIMED_BYTES`
    are not timed: with only those (small features), the estimate stays
    what larger transfers, the probe's at least, made it.
    """

    def __init__(self, estimator: OnlineEstimator):
        self.estimator = estimator
        self._busy: list[tuple[float, float]] = []  # disjoint, in order: link time counted
        self._carried = 0  # bytes of transfers that added no time yet

    def observe(self, transfer, queued_s: float = 0.0) -> None:
        self.estimator.observe_latency(
            transfer.answered_at - transfer.sent_at - transfer.storage_early_s - queued_s)
        timed = [part for part in transfer.link_intervals() if part[2] >= MIN_TIMED_BYTES]
        added = sum(self._cover(start, end) for start, end, _ in timed)
        # Later transfers were sent after this one: nothing of theirs falls
        # before it was sent.
        self._busy = [span for span in self._busy if span[1] > transfer.sent_at]
        self._carried += sum(nbytes for _, _, nbytes in timed)
        if added > 0:
            self.estimator.observe_transfer(self._carried, added)
            self._carried = 0

    def _cover(self, start: float, end: float) -> float:
        """Add ``[start, end]`` to the busy time; return how much of it is new."""
        if end <= start:
            return 0.0
        new, merged, kept = end - start, [start, end], []
        for span in self._busy:
            if span[1] < start or span[0] > end:
                kept.append(span)
            else:
                new -= min(span[1], end) - max(span[0], start)
                merged = [min(merged[0], span[0]), max(merged[1], span[1])]
        self._busy = sorted([*kept, tuple(merged)])
        return max(new, 0.0)
