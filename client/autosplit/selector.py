"""The automatic split selector: measurements in, a split out, over a training run.

:class:`AutomaticSplit` is the trainer's split selector when no split is
fixed (``hapi.client.data.FixedSplit`` is the other). It starts from what
the trainer measured on its own before the first request
(:func:`hapi.client.autosplit.profiling.measure_profile`) and, when the
storage tier has already run the model, from its layer costs
(``hapi.client.autosplit.storagecosts``); learns from every loaded shard
(its frames' timings and its transfer) and from every iteration (its
compute, its optimizer step), decides with the cost model
(``hapi.client.autosplit.costmodel``) and re-decides when the bandwidth,
the storage tier's speed or the trainer's drifts beyond
the noise of their measurements, at most once an epoch unless the change
is large.
"""

import math
import statistics
import time
from collections import deque

from tqdm import tqdm

from hapi.client.autosplit.costmodel import (
    Decision,
    choose_split,
    storage_encode_s,
    storage_layer_times,
    trainer_layers_s,
)
from hapi.client.autosplit.estimator import (
    LOGGED_OBSERVATIONS,
    SIZE_SPREAD,
    LinkClock,
    OnlineEstimator,
    SampleAndByteCost,
)
from hapi.client.autosplit.plot import plot_decision
from hapi.client.autosplit.profilecache import TrainerTimesCache
from hapi.client.autosplit.profiling import Profile, measure_profile
from hapi.client.autosplit.storagecosts import (
    fetch_layer_costs,
    storage_base_url,
    with_storage_costs,
)
from hapi.client.autosplit.wireformats import WireFormat
from hapi.names import SPLIT_TIE

__all__ = ["AutomaticSplit", "SplitSelectionError"]


class SplitSelectionError(RuntimeError):
    """The cost model cannot choose a split for this run."""


PROFILE_FRAMES = 4  # frame observations (one per shard) before the first decision ...
MAX_PROFILE_SHARDS = 4  # ... or at the latest after this many shards
DRIFT_THRESHOLD = 0.25  # relative change of bandwidth or storage speed that re-decides
DRIFT_SPREAD_FACTOR = 2.0  # ... if also this many times the observations' own scatter
MARGIN = 0.05  # a new split must be predicted this much faster to replace the one in use,
# and more than NOISE_FACTOR times the measured scatter of the time left (one
# request's relative scatter over the square root of the requests left):
# late in a short job a few percent is within what the next requests vary by.
NOISE_FACTOR = 2.0
DRIFT_WINDOW = 8  # drift is judged on up to this many observations since the last decision
DRIFT_MIN_OBSERVATIONS = 4  # ... once there are at least this many
DRIFT_QUICK_OBSERVATIONS = 3  # ... a change by LARGE_DRIFT_FACTOR on the last this many
STEP_SAMPLES = 16  # optimizer steps timed for the profile's trainer_step_s
# A drift by this factor either way shows on the last DRIFT_QUICK_OBSERVATIONS
# alone, and within an epoch of the last change re-decides once
# DRIFT_MIN_OBSERVATIONS confirm it: a link reshaped to half its rate reads 1.8-2.1x.
LARGE_DRIFT_FACTOR = 1.6
HOST_WINDOW = 16  # shards whose loader CPU gives the trainer's receive cost
# Requests that measure a split's bytes before the choice rests on them:
# two, so that no one shard's noise makes the fit. The first decision, from
# the storage tier's layer costs, sends them (after the first request) at the
# split with the most bytes among those predicted within EXPLORE_WITHIN of
# the best, when it has SIZE_SPREAD times the chosen one's bytes.
MEASURING_REQUESTS = 2
EXPLORE_WITHIN = 0.25


def default_estimator() -> OnlineEstimator:
    """The estimator a run uses: drift judged as the constants above say."""
    return OnlineEstimator(min_observations=DRIFT_MIN_OBSERVATIONS, drift_window=DRIFT_WINDOW,
                           spread_factor=DRIFT_SPREAD_FACTOR,
                           quick_observations=DRIFT_QUICK_OBSERVATIONS,
                           quick_factor=LARGE_DRIFT_FACTOR)


class AutomaticSplit:
    """Chooses the split of each request while the run trains.

    ``profile`` holds what the trainer measured before the first request
    (per-layer trainer times, boundary sizes, decode costs, memory).
    ``link`` (a :class:`LinkClock` around the estimator that the
    measurements before the run already fed) passes to the selector, which
    feeds it from then on. The run starts at ``start`` (default: the freeze
    index, so that the first frames report the storage time of every
    frozen layer and nothing is estimated); nothing is thrown away: those
    iterations train like any other.

    The public API is what the trainer calls: :attr:`split` (the split for
    the requests still to send), :meth:`opened`, :meth:`on_link` and
    :meth:`closed` (a request and the parts of its body as they arrive, in
    the loader's threads), :meth:`observe` (a loaded shard, in the
    consumer's),
    :attr:`wants_step_times` and :meth:`observe_step` (an optimizer step's
    time), :meth:`observe_iteration` (an iteration's compute),
    :meth:`report` and :meth:`plot`; :attr:`decisions` and
    :attr:`history` are there to read.

    When the profile already holds the storage tier's time of every frozen
    layer (its ``/hapi/costs``), :meth:`measured` takes a first decision
    (:meth:`decide_now`) before any request. Either way, the measured
    decision comes once ``profile_frames`` shards with frames and the
    estimator's ``min_observations`` transfers have arrived, and at the
    latest after ``max_profile_shards`` shards. After it, a drift of the
    bandwidth, the storage speed or the trainer's beyond ``drift_threshold``
    and beyond the noise of the observations (``OnlineEstimator.drifted``)
    re-evaluates the choice, as soon as the drift shows: as frames arrive
    (the link), as the consumer takes a shard (the storage tier's times)
    or as an iteration ends (the trainer's compute against its profile:
    the trainer's layer times are measured before the run, or read from a
    cache, at a moment's speed of a host that may share its cores);
    with hysteresis: once the split changed, it changes again only after
    ``epoch_shards`` more shards (an epoch's requests), unless the drift is
    a factor of ``LARGE_DRIFT_FACTOR`` or more either way, as a reshaped
    link makes it; a large drift of the storage speed alone not even then
    once a change went back to the split the change before it left, within
    an epoch's requests: a storage tier whose speed swings back and forth
    (a shared host) would otherwise be chased. Requests already sent keep
    their split, so a decision ranks the samples still to request, then
    the passes of the job's ``epochs`` still to come after them
    (``epoch_samples`` each); once all of an epoch's requests are sent,
    one decision chooses for the next epoch, if the job has one, a new
    pass from an empty pipeline. That
    decision, and one on a newly measured cost per byte, wait for the same
    hysteresis: a split that a measured decision changed mid-epoch is not
    changed again within an epoch's requests by the ranking of a fresh
    pass. Every decision, the first one too (the split in use is then the
    start), moves the split only when the new best is predicted more than
    ``margin`` faster, and more than the measured scatter of the time left
    allows (:meth:`_margin_for`): predictions a few percent apart are within
    the noise of the measurements they come from, a few requests left vary
    by more, and the start, ``f``, is the split the user's freeze index
    names. Splits and wire formats predicted within
    ``tie`` of the fastest are ties, won by the fewest bytes on the link
    (:func:`choose_split`): the default only breaks ties within the noise;
    a larger one trades that much predicted time for fewer bytes. A choice
    that would send :data:`SIZE_SPREAD` times the most bytes per sample any
    shard has sent keeps the split in use and sends the next
    :data:`MEASURING_REQUESTS` requests at it; the first of them to arrive
    widens the range the costs per byte are fitted on, and the split is
    chosen again (:meth:`decide_now` says why).

    ``log`` gets the decisions, one line per call, written so that they do
    not mix with tqdm progress bars: the first decision's whole table, a
    one-line summary for each re-decision (every decision's table is in
    :meth:`report`).
    """

    automatic = True

    def __init__(self, profile: Profile, *, link: LinkClock | None = None,
                 start: int | None = None, profile_frames: int = PROFILE_FRAMES,
                 max_profile_shards: int = MAX_PROFILE_SHARDS,
                 drift_threshold: float = DRIFT_THRESHOLD, margin: float = MARGIN,
                 tie: float = SPLIT_TIE,
                 epoch_samples: int | None = None, epoch_shards: int | None = None,
                 epochs: int = 1, profiling: dict | None = None,
                 storage_costs: list[float] | None = None, log=print):
        self._profile = profile
        self._split = profile.freeze if start is None else start
        if not 0 <= self._split <= profile.freeze:
            raise ValueError(f"start split {self._split} outside [0, {profile.freeze}]")
        # Until the first decision: the measured format with the fewest bytes
        # at the start split (the link is not known yet; few bytes are cheap
        # on a slow one and cost little on a fast one).
        self._format = min(profile.wire_formats, default=None,
                           key=lambda name: profile.wire_formats[name].bytes[self._split])
        self._link = link or LinkClock(default_estimator())
        self._estimator = self._link.estimator
        # The loader's threads feed the link's clock as the bytes arrive; the
        # consumer's thread feeds the storage tier's times. Both decide.
        self._lock = self._link.lock
        self._profile_frames = profile_frames
        self._max_profile_shards = max_profile_shards
        self._drift_threshold = drift_threshold
        self._margin = margin
        self._tie = tie
        self._epoch_samples = epoch_samples
        self._epoch_shards = epoch_shards
        self._epochs = epochs
        self._last_change = -math.inf  # the shard after which the split last changed
        self._left: int | None = None  # the split the last change left
        # Whether the last change went back to the split the one before it
        # left, within an epoch's requests: the drift it followed came and went.
        self._returned = False
        self._profiled = False
        self._profiling = profiling or {}
        self._log = log
        self._step_times: list[float] = []
        self._iterations = 0
        self._receive_cost = SampleAndByteCost(HOST_WINDOW)
        # The storage tier's own layer costs, when it served them: what its
        # frames take beyond them, per sample and per byte sent.
        self._storage_costs = list(storage_costs) if storage_costs else None
        self._storage_ratio = storage_layer_times(profile)[1]  # scales the encode times
        self._send_cost = SampleAndByteCost(HOST_WINDOW)
        self._frame_s = deque(maxlen=HOST_WINDOW)  # the same shards' frames, s per sample
        # Routes of the next requests that measure bytes (None: the split in
        # use), and the most bytes a sample of a shard with frames has sent.
        self._measuring: deque[tuple[int, str | None] | None] = deque()
        self._routes = 0  # requests routed so far
        self._most_bytes = 0.0
        self._frame_overhead_bytes = profile.frame_overhead_bytes
        self._shards = 0
        self._samples = 0
        self._pending = 0  # requests sent, not yet observed (nor failed, nor cached)
        self._on_the_way = 0  # ... of which not yet loaded
        self._chosen_for = -1  # the last epoch whose successor a decision was for
        self._trained_from: int | None = None  # the lowest split of a shard taken
        self._observed_at: list[float] = []  # time.monotonic() of each shard observed
        self._completed_at: list[float] = []  # ... of each request heard as it completed
        # What each shard's frames said of the storage tier (the estimator's
        # input), the last LOGGED_OBSERVATIONS of them, for the metrics.
        self._storage_observations: deque[dict] = deque(maxlen=LOGGED_OBSERVATIONS)
        # ... and what each iteration said of the trainer's.
        self._trainer_observations: deque[dict] = deque(maxlen=LOGGED_OBSERVATIONS)
        self._decisions: list[Decision] = []
        self._history: list[dict] = []

    @classmethod
    def measured(cls, model, config, plan, conn, log=print, *,
                 cache: TrainerTimesCache | None = None, optimizer=None,
                 fetch_costs=fetch_layer_costs) -> "AutomaticSplit":
        """The selector of a training run: measures the trainer (or reads its
        times from ``cache``, default :class:`TrainerTimesCache`; with
        ``optimizer``, the run's optimizer over given parameters, its step
        too) and one probe shard first (:func:`measure_profile`), then asks the storage
        tier for its layer costs (``fetch_costs``, with the arguments of
        :func:`fetch_layer_costs`). When it knows them, the first decision
        is taken here, before any feature request; else the run starts at
        the freeze index. The log says which."""
        began = time.perf_counter()
        link = LinkClock(default_estimator())
        profile, probe = measure_profile(model, config, plan, conn, link,
                                         cache or TrainerTimesCache(), optimizer=optimizer)
        costs = fetch_costs(storage_base_url(conn, config.intermediate_url), config.model,
                            config.preset, config.storage_batch, len(model))
        if costs.known:
            profile = with_storage_costs(profile, costs)
        probe["storage_costs"] = {"url": costs.url, "known": costs.known,
                                  "device": costs.device, "note": costs.note}
        # The selector is shown every shard of an epoch, held-out ones too.
        selector = cls(profile, link=link,
                       epoch_samples=plan.train_samples + plan.holdout_samples,
                       epoch_shards=len(plan.train) + len(plan.holdout),
                       epochs=config.epochs, log=log,
                       tie=config.split_tie,
                       profiling={**probe, "seconds": time.perf_counter() - began},
                       storage_costs=costs.layers_s_per_sample)
        if probe["trainer_times"] == "cached":
            selector._write([f"split selection: the trainer's layers take "
                             f"{probe['trainer_speed']:.2f}x their cached times now; the "
                             "profile is scaled to that"])
        where = f"the storage tier ({costs.url.split('?')[0]})"
        if costs.known:
            selector._write([f"split selection: {where} knows {config.model}'s layer costs "
                             f"on {costs.device or 'its device'}; deciding before the first "
                             "feature request"])
            selector.decide_now("the storage tier's layer costs")
        else:
            selector._write([f"split selection: {where} has no layer costs of "
                             f"{config.model} at {config.preset}, storage batch "
                             f"{config.storage_batch} ({costs.note}); starting at the freeze "
                             f"index {profile.freeze}"])
        return selector

    # What the trainer calls ----------------------------------------------------------

    @property
    def split(self) -> int:
        """The split for the requests still to send."""
        return self._split

    @property
    def wire_format(self) -> str | None:
        """The wire format (``dtype[+encoding]``) for the requests still to
        send; None when the profile measured none (the request's own)."""
        return self._format

    @property
    def route(self) -> tuple[int, WireFormat | None]:
        """The split and the wire format for the next request, read together
        once a request: requests that measure bytes (:meth:`decide_now`,
        and a decision whose choice sends more bytes than any shard yet)
        go at the split they measure."""
        with self._lock:
            self._routes += 1
            split, name = self._split, self._format
            if self._measuring and (measured := self._measuring.popleft()) is not None:
                split, name = measured
        return split, WireFormat.parse(name) if name else None

    @property
    def wants_step_times(self) -> bool:
        return len(self._step_times) < STEP_SAMPLES

    def observe_step(self, seconds: float) -> None:
        """One iteration's loss and optimizer step, besides the layers."""
        self._step_times.append(seconds)

    def observe_iteration(self, parts, seconds: float) -> None:
        """One iteration took ``seconds`` of the trainer's compute (its
        layers, from each part's split, its loss and optimizer step) on
        ``parts``, ``(split, samples)`` for each part of its batch: the
        trainer's speed against its profile. The first iteration is not
        counted: it allocates what the next ones reuse (autograd's buffers,
        the optimizer's state)."""
        with self._lock:
            self._iterations += 1
            predicted = self._predicted_compute_s(parts) if self._iterations > 1 else 0.0
            if predicted <= 0:
                return
            self._estimator.observe_trainer(seconds / predicted)
            self._trainer_observations.append(
                {"monotonic_s": time.monotonic(), "parts": [list(part) for part in parts],
                 "seconds": seconds, "predicted_s": predicted})
            if self._profiled:
                self._follow_drift()

    def resumed(self, epochs: int, samples: int) -> None:
        """The job resumes from a checkpoint after ``epochs`` whole epochs
        and ``samples`` samples of the next: the rest of the job is ranked
        from there. A decision taken before any request (from the storage
        tier's layer costs) is taken again."""
        with self._lock:
            if self._epoch_samples:
                self._samples = epochs * self._epoch_samples + samples
            if self._decisions and not self._shards:
                self._decide(f"resumed at epoch {epochs + 1} after {samples} samples")

    def decide_now(self, why: str) -> None:
        """Decide from the profile as it stands, before any request (the
        start, not a change of split: the measured decision still comes).

        With the storage tier's layer costs known, the choice may rest on
        bytes no frame has measured: what a byte costs the two tiers beyond
        the encoding and the decoding is fitted from shards of different
        sizes (:class:`SampleAndByteCost`), and shards of the split chosen
        alone have one size. So when a split predicted within
        :data:`EXPLORE_WITHIN` of the choice sends :data:`SIZE_SPREAD` times
        its bytes or more, the :data:`MEASURING_REQUESTS` after the first
        go at the one of them with the most bytes: the measured decision
        after the first shards then knows both costs over the range of the
        candidates. Those requests train like any other; the split in use
        does not change."""
        self._decide(why)
        if self._storage_costs is None or self._routes or not self.decision.split:
            return
        chosen = self.decision.chosen
        limit = _predicted(chosen) * (1 + EXPLORE_WITHIN)
        heavier = [row for row in self.decision.rows if row.feasible and row.split and
                   row.wire_bytes >= SIZE_SPREAD * chosen.wire_bytes and
                   _predicted(row) <= limit]
        if heavier:
            row = max(heavier, key=lambda row: row.wire_bytes)
            route = self._measure(row)
            self._measuring.appendleft(None)  # after the first request
            self._profiling["measuring_request"] = {"split": row.split,
                                                    "wire_format": route[1]}
            numbers = " and ".join(map(str, range(2, MEASURING_REQUESTS + 2)))
            self._write([f"split selection: requests {numbers} go at split "
                         f"{row.split} ({row.wire_bytes / chosen.wire_bytes:.1f}x the bytes of "
                         f"split {chosen.split}, predicted within {EXPLORE_WITHIN:.0%}) to "
                         "measure what a byte costs both tiers"])

    def _measure(self, row) -> tuple[int, str | None]:
        """Send the next :data:`MEASURING_REQUESTS` requests at ``row``'s
        split and format; returns that route."""
        route = (row.split, row.wire_format if row.wire_format in self._profile.wire_formats
                 else self._format)
        self._measuring = deque([route] * MEASURING_REQUESTS)
        return route

    def opened(self):
        """A request is about to go out (in a loader's thread); returns what
        :meth:`on_link` and :meth:`closed` take for it."""
        with self._lock:
            self._pending += 1
            self._on_the_way += 1
            return self._link.open()

    def on_link(self, request, start: float, end: float, nbytes: int,
                arriving: bool = False) -> None:
        """A part of ``request``'s body arrived (a frame; a raw body whole),
        on the link from ``start`` to ``end`` (``time.perf_counter()``); with
        ``arriving``, its first ``nbytes`` arrived by ``end`` and the rest is
        still to come. A reshaped link shows here first: a few frames after
        it changed, while the consumer may still be taking shards loaded before."""
        with self._lock:
            if self._link.on_link(request, start, end, nbytes, arriving) and self._profiled:
                self._follow_drift()

    def closed(self, request, shard) -> None:
        """``request`` is over: ``shard`` (a ``hapi.client.data.ShardData``)
        loaded, or None when it failed or nothing crossed the link."""
        with self._lock:
            observed = self._link.close(request)
            self._on_the_way = max(self._on_the_way - 1, 0)
            if shard is None:
                self._pending = max(self._pending - 1, 0)  # failed, or from the cache
            else:
                # The storage tier's queue wait for its device before the first
                # frame came before the headers too: queueing, not latency.
                queued = shard.frames[0].timings.get("slot_wait_s", 0.0) if shard.frames else 0.0
                self._link.observe_latency(shard.transfer, queued_s=queued)
                self._completed_at.append(time.monotonic())
            if observed and self._profiled:
                self._follow_drift()

    def observe(self, shard) -> None:
        """Learn from a loaded shard (``hapi.client.data.ShardData``), then
        decide or re-decide when it is time."""
        with self._lock:
            self._observe(shard)

    def _observe(self, shard) -> None:
        learnt = ""
        if shard.frames:
            # One observation per shard: per-sample times over all its frames,
            # so that a small last frame does not weigh like a full one.
            features = sum(frame.feature_bytes for frame in shard.frames)
            samples = sum(frame.samples for frame in shard.frames)
            timings = _summed_timings(shard.frames)
            self._estimator.observe_frame(timings, samples, features)
            self._storage_observations.append(
                {"monotonic_s": time.monotonic(), "split": shard.split,
                 "wire_format": shard.wire_format, "samples": samples, **timings})
            # Frame headers, keys, labels, timings: what a frame adds to its
            # features (compressed features count as features).
            self._frame_overhead_bytes = max(shard.bytes_received - features, 0) / samples
            costs = {"receive": self._receive_cost, "storage": self._send_cost}
            separable = {name for name, cost in costs.items() if cost.separable}
            self._observe_host(shard, samples)
            self._observe_storage(shard, samples, timings)
            separated = [name for name, cost in costs.items()
                         if cost.separable and name not in separable]
            if separated:
                learnt = f"{' and '.join(separated)} cost per byte measured"
            per_sample = shard.bytes_received / samples
            if self._most_bytes and per_sample >= SIZE_SPREAD * self._most_bytes:
                learnt = learnt or (f"costs per byte measured up to {per_sample:.0f} bytes a "
                                    f"sample, split {shard.split}")
            self._most_bytes = max(self._most_bytes, per_sample)
        self._samples += len(shard.keys)
        self._pending = max(self._pending - 1, 0)
        if self._trained_from is None or shard.split < self._trained_from:
            self._trained_from = shard.split
        self._observed_at.append(time.monotonic())
        try:
            if learnt and self._profiled and not (self._settling() or self._all_requested()):
                # Shards of another size now tell a cost per byte from the
                # cost per request: new knowledge of every split's trainer or
                # storage stage (the next decision uses it when the split
                # just changed).
                self._decide(learnt)
            self._update()
        except ValueError as err:
            raise SplitSelectionError(f"automatic split selection: {err} (choose a split "
                                      "with --manual_split --split_idx N)") from None

    def _predicted_compute_s(self, parts) -> float:
        """The profile's compute for an iteration on ``parts`` (see
        :meth:`observe_iteration`), at the speed it was measured at."""
        step = statistics.median(self._step_times) if self._step_times \
            else self._profile.trainer_step_s
        return step + sum(samples * trainer_layers_s(self._profile, split)
                          for split, samples in parts)

    def _observe_host(self, shard, samples) -> None:
        """The loader's CPU for the shard beyond the decode the profile
        predicts for its split and format: the trainer's receive cost."""
        formats = self._profile.wire_formats
        if shard.split == 0 or shard.host_cpu_s <= 0 or shard.bytes_received <= 0:
            return
        if shard.wire_format in formats:
            decode = formats[shard.wire_format].decode_s[shard.split]
        else:
            decode = self._profile.trainer_copy_s_per_byte * \
                self._profile.boundary_bytes[shard.split]
        beyond = max(shard.host_cpu_s - decode * samples, 0.0)
        self._receive_cost.observe(shard.bytes_received / samples, beyond / samples)

    def _observe_storage(self, shard, samples, timings) -> None:
        """The storage tier's compute for the shard beyond its own layer costs
        and the encoding the profile predicts: its decode and the rest of its
        work, a part per sample and a part per byte sent (``timings``: the
        shard's frames' timings, added up)."""
        if self._storage_costs is None or shard.split == 0 or shard.bytes_received <= 0:
            return
        measured = timings["decode_s"] + sum(timings["layers_s"]) + timings["to_wire_s"]
        fmt = shard.wire_format if shard.wire_format in self._profile.wire_formats else None
        expected = sum(self._storage_costs[:shard.split]) + \
            storage_encode_s(self._profile, shard.split, fmt, self._storage_ratio)
        self._send_cost.observe(shard.bytes_received / samples, measured / samples - expected)
        self._frame_s.append(measured / samples)

    def report(self) -> dict:
        """The decision (its table too), how it came about, and what it was made from."""
        decision = self.decision
        return {"automatic": True, "split": self._split, "wire_format": self._format,
                "tie": self._tie, "decision": decision.to_dict() if decision else None,
                "table": decision.format_table() if decision else None,
                "history": [dict(step) for step in self._history],
                "observed_at": list(self._observed_at),
                "completed_at": list(self._completed_at),
                "link_observations": [dict(one) for one in self._link.observations],
                "storage_observations": [dict(one) for one in self._storage_observations],
                "trainer_observations": [dict(one) for one in self._trainer_observations],
                "profiling": self._profiling, "profile": self.current_profile().to_dict()}

    def plot(self, path) -> bool:
        """Draw the last decision to ``path``; False when none was made yet."""
        if self.decision is None:
            return False
        plot_decision(self.decision, path, self.current_profile())
        return True

    # To read ------------------------------------------------------------------------------

    @property
    def decision(self) -> Decision | None:
        return self._decisions[-1] if self._decisions else None

    @property
    def decisions(self) -> tuple[Decision, ...]:
        return tuple(self._decisions)

    @property
    def history(self) -> tuple[dict, ...]:
        """Per decision: after which shard, when (``monotonic_s``, the host's
        ``time.monotonic()``), why (and, for a drift, ``drift``: the relative
        change of the bandwidth and the storage time), from and to which
        split and format, the reason and the whole table."""
        return tuple(dict(step) for step in self._history)

    def current_profile(self) -> Profile:
        """The profile with everything the stream and the steps measured so far."""
        measured = {"frame_overhead_bytes": self._frame_overhead_bytes}
        if self._step_times:
            measured["trainer_step_s"] = statistics.median(self._step_times)
        if self._receive_cost:
            (measured["trainer_receive_s_per_sample"],
             measured["trainer_receive_s_per_byte"]) = self._receive_cost.costs()
        with self._lock:
            profile = self._estimator.apply(self._profile.with_measurements(**measured))
            if self._send_cost.separable:
                self._without_recent_bytes(profile)
            return profile

    def _without_recent_bytes(self, profile: Profile) -> None:
        """Move what a byte sent costs the storage tier from its frames'
        times to every split's own bytes (``storage_send_s_per_byte``).

        The frames' times include what the recent shards' bytes cost the
        cores that computed them, spread over the whole frame: their
        decode and every layer they ran. That share of them, the cost of
        the recent shards' bytes over their frames' time, per sample, comes
        off the decode and off every layer time the frames measured; left
        in, a split would pay for the bytes it sends twice, the recent
        shards' bytes in its layer times and its own on top."""
        per_byte = self._send_cost.costs()[1]
        profile.storage_send_s_per_byte = per_byte
        frame_s = statistics.median(self._frame_s)
        if frame_s <= 0:
            return
        # The cost per byte is never below 0 (SampleAndByteCost.costs): keep <= 1.
        keep = max(1.0 - per_byte * self._send_cost.bytes_per_sample / frame_s, 0.0)
        profile.storage_decode_s *= keep
        measured = self._estimator.storage_layer_s(min(len(profile), profile.freeze))
        for layer, seconds in zip(profile.layers[:len(measured)], measured, strict=True):
            if seconds is not None:
                layer.storage_s *= keep

    # Deciding -------------------------------------------------------------------------

    def _update(self) -> None:
        """Account one more shard; decide or re-decide when it is time."""
        self._shards += 1
        est = self._estimator
        if not self._profiled:
            measured = est.frames >= self._profile_frames and \
                est.transfers >= est.min_observations
            if measured or self._shards >= self._max_profile_shards:
                self._profiled = True
                self._decide("profiled" if measured else
                             f"profiling bound reached ({self._shards} shards)")
        elif self._next_epoch_due():
            self._decide("the epoch's requests are all sent: choosing for the next epoch")
        else:
            self._follow_drift()

    def _next_epoch_due(self) -> bool:
        """Whether to choose for the next epoch now: all of this epoch's
        requests are sent, none chose for it yet, there is a next epoch, and
        the split did not change within an epoch's requests."""
        return self._routable()[1] and self._chosen_for != self._epoch() and \
            self._epoch() + 1 < self._epochs and not self._settling()

    def _epoch(self) -> int:
        """The epoch the consumer is in (from 0)."""
        return self._samples // self._epoch_samples if self._epoch_samples else 0

    def _follow_drift(self) -> None:
        """Re-decide when the bandwidth, the storage speed or the trainer's
        drifted, unless the job's last request is sent (nothing to route)."""
        est = self._estimator
        if self._all_requested() or not est.drifted(self._drift_threshold):
            return
        change = est.drift()
        # After a return to the split the change before left, the storage
        # tier's speed swings back and forth (a shared host): not chased.
        steady = est.settled() - ({"storage"} if self._returned else set())
        if self._settling() and not _large(est.drift(quick=False), steady):
            # Hysteresis: the drift re-decides once the epoch is over, or
            # sooner if min_observations confirm a large one against a
            # baseline of as many (a few quick observations could be noise,
            # and the split just changed).
            return
        est.keep_recent()
        self._decide("drift: " + ", ".join(f"{name} {value:+.0%}"
                                           for name, value in change.items()
                                           if value is not None), drift=change)

    def _all_requested(self) -> bool:
        """Whether the job's last request is sent: the samples taken and those
        of the requests on their way make all its epochs."""
        epoch = self._epoch_samples
        return bool(epoch) and self._samples + self._pending * \
            self._profile.samples_per_request >= self._epochs * epoch

    def _routable(self) -> tuple[int | None, bool, tuple[int, int], int]:
        """The samples a decision now can still route, whether they start
        from an empty pipeline, the samples sent before them (on their
        way, loaded and waiting; ``samples_per_request`` a request), and the
        epochs still to come after them. Requests already sent keep their
        split, so this epoch's samples count less those; once all of them are
        out, the choice is the next epoch's, a new pass that starts empty."""
        epoch, per_request = self._epoch_samples, self._profile.samples_per_request
        backlog = (self._on_the_way * per_request,
                   (self._pending - self._on_the_way) * per_request)
        if epoch is None:
            return None, self._shards == 0, backlog, 0
        later = max(self._epochs - 1 - self._epoch(), 0)
        left = epoch - self._samples % epoch - sum(backlog)
        if left <= 0:
            return epoch, True, (0, 0), max(later - 1, 0)
        return left, self._shards == 0, backlog, later

    def _decide(self, why: str, drift: dict | None = None) -> None:
        """Choose again, with the split in use as the incumbent, and log it
        (``drift``: the relative changes that made it choose, if a drift did)."""
        rest, fresh, backlog, later = self._routable()
        if fresh and self._shards:
            self._chosen_for = self._epoch()
        decision = choose_split(self.current_profile(), epoch_samples=self._epoch_samples,
                                current=self._split, current_format=self._format,
                                rest_samples=rest, fresh=fresh, backlog_samples=backlog,
                                trained_from=self._trained_from, later_epochs=later,
                                margin=self._margin_for(rest, later), tie=self._tie)
        self._estimator.mark()
        chosen_format = decision.wire_format if decision.split else self._format
        to, reason = decision.split, decision.reason
        if self._unmeasured(decision.chosen) and \
                (decision.split, chosen_format) != (self._split, self._format):
            # Measure first: what a byte costs the two tiers is fitted on
            # the bytes seen so far, and this choice would rest on more.
            if not self._measuring:
                self._measure(decision.chosen)
            to, chosen_format = self._split, self._format
            reason = (f"measuring first: split {decision.split} would send "
                      f"{decision.chosen.wire_bytes / self._most_bytes:.1f}x the most bytes a "
                      f"sample has sent yet; {MEASURING_REQUESTS} requests go there, then the "
                      f"split is chosen again ({decision.reason})")
        step = {"shard": self._shards, "monotonic_s": time.monotonic(), "why": why,
                "drift": dict(drift) if drift else None,
                "from": self._split, "to": to,
                "from_format": self._format, "to_format": chosen_format,
                "reason": reason, "table": decision.format_table()}
        self._decisions.append(decision)
        self._history.append(step)
        if (to, chosen_format) != (self._split, self._format) and self._shards > 0:
            if to != self._split:
                self._returned = to == self._left and self._settling()
                self._left = self._split
            self._last_change = self._shards
        self._split = to
        if to and chosen_format in self._profile.wire_formats:
            self._format = chosen_format
        headline = (f"split selection after {step['shard']} shard(s), {why}: "
                    f"split {step['from']} -> {step['to']}"
                    + (f", features as {self._format}" if self._split and self._format else ""))
        held = reason is not decision.reason  # measuring first
        if len(self._decisions) == 1:
            self._write([headline + (f"; {reason}" if held else ""),
                         *step["table"].splitlines()])
        else:
            said = reason if held else decision.summary()
            self._write([f"{headline}; {said} (table in the metrics)"])

    def _margin_for(self, rest: int | None, later: int) -> float:
        """The predicted gain a change needs: ``margin``, or more when the time
        left is short. The requests still to route (``rest`` samples, then
        ``later`` epochs) vary by the observations' relative scatter each
        (:meth:`OnlineEstimator.spread`, the larger of the link's and the
        storage tier's), so the time left varies by that over the square root
        of their number; a change must gain :data:`NOISE_FACTOR` times that.
        It stops moves of a run's last few requests on a gain within the
        noise; a job with many requests left keeps ``margin``."""
        if rest is None:
            return self._margin
        samples = rest + later * (self._epoch_samples or 0)
        requests = max(samples / self._profile.samples_per_request, 1.0)
        scatter = max(self._estimator.spread().values())
        return max(self._margin, NOISE_FACTOR * scatter / math.sqrt(requests))

    def _unmeasured(self, row) -> bool:
        """Whether ``row``'s features send :data:`SIZE_SPREAD` times the most
        bytes a sample of any shard with frames has sent, or more: what a
        byte costs there would be extrapolated."""
        return bool(row.split) and self._most_bytes > 0 and \
            row.wire_bytes >= SIZE_SPREAD * self._most_bytes

    def _settling(self) -> bool:
        """Whether the split changed less than an epoch's requests ago."""
        return self._epoch_shards is not None and \
            self._shards - self._last_change < self._epoch_shards

    def _write(self, lines: list[str]) -> None:
        """Each line in its own ``log`` call, with tqdm's bars cleared first and
        redrawn after, so that no line starts on a progress bar's."""
        with tqdm.external_write_mode():
            for line in lines:
                self._log(line)


def _predicted(row) -> float:
    """A decision row's predicted time, as the decision ranked it."""
    return row.iteration_s if row.rest_s is None else row.rest_s


def _large(change: dict, names) -> bool:
    """Whether a drift (``OnlineEstimator.drift``) is a factor of
    ``LARGE_DRIFT_FACTOR`` or more either way in one of ``names``
    (bandwidth, storage speed)."""
    return any(value is not None and name in names and
               (value <= 1 / LARGE_DRIFT_FACTOR - 1 or value >= LARGE_DRIFT_FACTOR - 1)
               for name, value in change.items())


def _summed_timings(frames) -> dict:
    """The ``timings`` of frames of one split, added up."""
    layers = zip(*(frame.timings.get("layers_s", ()) for frame in frames), strict=True)
    return {"decode_s": sum(frame.timings.get("decode_s", 0.0) for frame in frames),
            "layers_s": [sum(times) for times in layers],
            "to_wire_s": sum(frame.timings.get("to_wire_s", 0.0) for frame in frames)}
