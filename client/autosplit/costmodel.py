"""The cost model of the overlapped pipeline, and the choice of a split.

Given a :class:`hapi.client.autosplit.profiling.Profile` (everything
measured, per sample), :func:`choose_split` predicts the iteration and epoch
time of every candidate split ``s`` in ``[0, f]`` (``s = 0`` is vanilla: raw
shards cross the network and the trainer decodes them) and picks the
fastest one that fits memory on both tiers. The :class:`Decision` carries
the whole table (:meth:`Decision.format_table`, :meth:`Decision.to_json`);
``hapi.client.autosplit.plot.plot_decision`` draws it.

The cost model
--------------

Per sample, for split ``s`` and freeze index ``f`` (``L`` layers, ``t_T[i]``
the trainer's forward time of layer ``i``, ``t_TB[i]`` its forward+backward
time, ``t_S[i]`` the storage tier's time, ``b[s]`` the boundary's bytes in
the wire dtype, ``a[s]`` in float32)::

    wire(s)  = raw_bytes                                     s = 0
             = b[s] + frame_overhead_bytes                   s > 0
    S(s)     = storage_serve_s_per_byte * raw_bytes          s = 0 (serving bytes)
             = storage_decode_s + sum(t_S[0:s]) + storage_to_wire_s_per_byte * b[s]
               + storage_send_s_per_byte * wire(s)
    N(s)     = wire(s) / bandwidth
    H(s)     = trainer_decode_s + trainer_copy_s_per_byte * a[0]   s = 0
             = trainer_copy_s_per_byte * b[s]                       s > 0
               (either + trainer_receive_s_per_sample
                       + trainer_receive_s_per_byte * wire(s))
    C(s)     = sum(t_T[s:f]) + sum(t_TB[f:L]) + trainer_step_s / batch

``storage_send_s_per_byte`` is what each byte sent costs the storage
tier's compute besides the encoding (the cores that compute also write the
frames to the network and run its stack): 0 until the frames of two
splits far apart in bytes measured it
(``hapi.client.autosplit.selector.AutomaticSplit``, the storage tier's
cost per byte).

The storage tier, the link and the trainer are three resources that work at
the same time on different batches (docs/DESIGN.md, the overlapped
pipeline): once the pipeline is full, each sample costs the time of the
busiest one. On a CPU trainer the host
work ``H`` (decoding, deserialising, copying) and the compute ``C`` share the
cores, so the trainer's stage is ``H + C``; on a GPU they are two stages.

What does not overlap is the path of one request. The loader
(``hapi.client.data.ShardLoader``) keeps ``d`` requests in flight
(``prefetch_depth``) and sends the next one when the trainer takes a shard;
within a request nothing overlaps: it waits ``Lat`` (``request_latency_s``)
for its first byte, the storage tier computes a frame and only then writes
it, and the shard is decoded (vanilla) or deserialised when it is complete.
A request of ``R`` samples (``samples_per_request``) therefore takes
``Lat + R * (S + N + H)``, and ``d`` of them share the time between two
shards taken by the trainer::

    Q(s)     = (Lat / R + S + N + H) / d                  d >= 1
             = Lat / R + S + N + H + C                    d = 0 (sequential)
    cycle(s) = max(S, N, H + C, Q)          (CPU trainer; max(S, N, H, C, Q) on a GPU)
    iteration_s = batch * cycle(s)
    fill_s   = Lat + R * (S + N + H)        the first shard, before training starts
    ahead    = R * N                        s = 0: raw shards share the link
             = B * max(S, N)                s > 0: another request's first frame
             = 0                            s > 0 and B >= R: one frame a request
    G        = min(max(R, batch), samples)  the grain: what the trainer computes on at once
    epoch_s  = max(fill_s + max(samples - R, 0) * supply + G * C',
                   fill_s + (k - 1) * ahead + max(samples - R, 0) * T + min(samples, R) * C',
                   fill_s + (G - R) * supply + (samples - G) * T + G * C')
               (supply = max(S, N, Q), and H too on a GPU;
                k = min(max(d, 1), shards in the epoch) requests sent together,
                B the storage batch, T = H + C on a CPU trainer and
                max(H, C) on a GPU, C' = H + C on a CPU trainer and C on a GPU;
                iterations = ceil(samples / batch))

The epoch is the latest of three paths. Along the supply's, the first shard
arrives, then one shard a supply cycle, and the trainer still works on the
last grain: a training batch of several shards waits for all of them (a
batch of 32 out of shards of 8 for four), a shard larger than the batch is
trained on once it is complete. Along the trainer's, it starts on the first
shard and never waits again; but the ``k`` requests sent together at the
start each have their first frame computed before the first shard's later
ones (the storage tier's frame order,
``hapi.middleware.device.frame_priority``; raw shards share the link), so
the first shard is ``(k - 1) * ahead`` late. On a storage-bound split that
delay costs nothing (the storage tier works throughout); on a trainer-bound
one the trainer waits for it. The third path is the trainer's from its
first grain, which the supply completes ``G - R`` samples after the first
shard; with a grain of one shard it is never the latest.

Wire formats
------------

With ``profile.wire_formats`` (each candidate's measured bytes, encode and
decode times per boundary, ``hapi.client.autosplit.wireformats``), every
split ``s > 0`` is predicted in every format ``F``::

    wire(s, F) = bytes_F[s] + frame_overhead_bytes
    S(s, F)    = storage_decode_s + sum(t_S[0:s]) + rho * encode_F[s]
                 + storage_send_s_per_byte * wire(s, F)
    H(s, F)    = decode_F[s] + trainer_receive_s_per_sample
                 + trainer_receive_s_per_byte * wire(s, F)

(``rho``: the storage/trainer speed ratio below;
``trainer_receive_s_per_sample`` and ``trainer_receive_s_per_byte``: the
loader's measured CPU beyond the decode, per sample whatever the split and
per received byte, which every ``H`` above includes, vanilla's too), and
each split's row is its best
format. Without formats the split's features are ``wire_dtype``, raw, as in
the formulas above.

Ranking
-------

With ``rest_samples`` (``U``: the samples a choice can still route, those
not yet requested) the candidates are ranked by their predicted time, else
per iteration. ``fresh`` (no request out: the start of a pass) counts the
pipeline's fill, as ``epoch_s``; in a running pipeline the requests in
flight, at the split they were sent with, keep every station busy across
a change, and the ``U`` samples take::

    rest_s = max(B_S + U * supply + min(U, G) * C',  B_T + U * T)

(``supply`` the busiest station before the trainer, ``max(S, N, Q)``, and
``H`` too on a GPU; ``T``, ``C'`` and ``G`` as in ``epoch_s``; ``B_S`` the
supply's work on the samples already sent, at the split in use, and
``B_T`` the trainer's, but no less than ``B_S``: it takes shards in
order): their shards arrive one a supply cycle after those sent before
and the trainer still works on the last one, or the trainer, the slower,
takes them one a trainer cycle after its backlog. A split whose
trainer does more work pays it at the end of the job, and the backlog is
the same whatever the choice, so late in an epoch a change gains little
and the margin keeps the split in use. With ``later_epochs`` (the passes
still to come after these samples) each candidate also pays that many
``epoch_s``: a choice mid-epoch is the split of the rest of the job, not
of the few samples left in this pass, which would favour a split the next
pass then leaves. A change to a split below any the
trainer has run adds one trainer iteration (``warm_up_s``): its first pass
through layers new to the process builds their kernels and buffers
(resnet50 at batch 8 on a CPU: 0.45 s more on the first shard at split 8,
0.8 of an iteration there). Predictions within
``SPLIT_TIE`` of the fastest are ties, won by the fewest bytes on the wire.
docs/DESIGN.md ("Choosing the split and the wire format") says why the
cycle is a max and not a queueing solution such as mean-value analysis.

``Q`` is the bound of a loop with ``d`` requests (``d = 0``: nothing
overlaps, the iteration is the sum of everything); with a bottleneck stage
well above the rest it hides behind the max. Kernel socket buffers let a
frame's transfer overlap the next frame's computation a little; the model
ignores that (it errs towards the slower of the two). The winner minimises
the predicted time (see Ranking above); predictions within ``SPLIT_TIE`` of the
fastest go to the fewest bytes, exact ties then to the smaller total work
``S + N + H + C``, then the larger split.

Memory (bytes; a split that does not fit is infeasible, with the reason):

- storage tier, per sample in the storage batch: the largest pair of
  consecutive activations in ``[0, s]`` plus the wire copy of ``b[s]``. The
  storage batch is the one asked for, shrunk to fit ``storage_budget_bytes``
  (the storage tier's batch adaptation); a split where not even one sample
  fits is infeasible.
- trainer: the prefetched shards, ``(d + 2) * R * held(s)`` (``d`` waiting,
  one being trained on, one being concatenated; ``held(0) = a[0] + raw_bytes``,
  ``held(s) = b[s]``), plus the training batch's activations
  ``batch * (a[s] + max(inference peak of [s, f), a[f] + 2 * sum(a[f+1:L+1])))``
  (the saved activations of the trainable layers and their gradients). On a
  CPU trainer both come out of ``trainer_free_bytes``; on a GPU the
  activations do and the shards come out of ``trainer_host_free_bytes``.

Storage times of layers no frame has run yet
--------------------------------------------

The storage tier reports the layers it ran, ``[0, s)`` for the split in
use. For a deeper candidate the missing layers are estimated from the
trainer's own forward times of the same layers, scaled by how much faster
or slower the storage tier is on the layers both have run::

    rho     = sum(t_S[i] for i in K) / sum(t_T[i] for i in K)    K: layers measured on both
    t_S[i]  = rho * t_T[i]                                       for i not in K

A ratio of sums weights each layer by its time, so the big layers that
dominate a split's cost dominate the ratio and a microsecond layer's timer
noise does not. Before any storage layer is measured (vanilla so far) the
ratio is ``profile.storage_speed_ratio`` when given, else 1 (same
hardware), and the decision says that it was assumed. Limitation: one
ratio for all layers; a GPU storage tier facing a CPU trainer speeds up
convolutions more than small element-wise layers, so profile at ``s = f``
(all frozen layers measured at once) where that matters.

Over a run
----------

:class:`hapi.client.autosplit.selector.AutomaticSplit` drives the choice
during training: it decides before the first request when the storage tier
serves its layer costs, else starts at the freeze index (the first frames
time every frozen layer on the storage tier); it decides after a few frames
and transfers (at most ``max_profile_shards`` shards), and re-decides when
the bandwidth or the storage speed drifts by more than a threshold and
their noise (``OnlineEstimator.drifted``), at most once an epoch unless the
drift is large, keeping the split in use unless the new best is more than
``margin`` faster. Once all of an epoch's requests are sent it decides once
for the next epoch (``fresh``: the loader starts each pass empty). A choice
that would send twice the most bytes per sample of any shard so far is
measured first, by two requests, and made again with what they cost.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from hapi.client.autosplit.profiling import Profile
from hapi.names import SPLIT_TIE

__all__ = [
    "DECISION_FORMAT", "Decision", "SplitCost", "choose_split", "evaluate_split",
    "storage_encode_s", "storage_layer_times",
]

DECISION_FORMAT = "hapi-split-decision/1"


@dataclass
class SplitCost:
    """The cost model's prediction for one split. Times are seconds per
    training iteration (``batch`` samples) unless named otherwise (``fill_s``
    the first shard, ``first_ahead_s`` what one other request sent with it
    holds it back, ``epoch_s`` and ``rest_s`` all of them); ``trainer_last_s``
    is the trainer's work on a shard that arrived whole, which nothing
    overlaps at the end of a job; ``supply_s`` the busiest station before
    the trainer (the storage tier, the link, the requests' loop; on a GPU
    trainer also its host work), which paces the shards' arrivals;
    ``warm_up_s`` what a change mid-run adds to ``rest_s`` for layers the
    trainer has not run yet; memory in bytes."""

    split: int
    wire_format: str
    first_trainer_layer: str
    wire_bytes: float
    storage_s: float
    transfer_s: float
    trainer_host_s: float
    trainer_compute_s: float
    trainer_s: float
    pipeline_s: float
    iteration_s: float
    bottleneck: str
    fill_s: float
    epoch_s: float | None
    iterations: int | None
    storage_batch: int
    storage_estimated_layers: int
    storage_memory_bytes: float
    trainer_memory_bytes: float
    trainer_host_memory_bytes: float
    feasible: bool = True
    reason: str = ""
    work_s: float = 0.0
    samples_per_s: float = 0.0
    rest_s: float | None = None
    first_ahead_s: float = 0.0
    trainer_cycle_s: float = 0.0
    trainer_last_s: float = 0.0
    supply_s: float = 0.0
    warm_up_s: float = 0.0


@dataclass
class Decision:
    """The chosen split and the predictions it was chosen from."""

    split: int
    freeze: int
    model: str
    batch_size: int
    bandwidth_bytes_per_s: float
    storage_ratio: float
    storage_ratio_source: str
    rows: list[SplitCost]
    reason: str
    current: int | None = None
    inputs: dict = field(default_factory=dict)
    wire_format: str = ""

    @property
    def chosen(self) -> SplitCost:
        return self.rows[self.split]

    def to_dict(self) -> dict:
        rows = [asdict(row) for row in self.rows]
        return {"format": DECISION_FORMAT, "split": self.split, "freeze": self.freeze,
                "model": self.model, "batch_size": self.batch_size,
                "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
                "storage_ratio": self.storage_ratio,
                "storage_ratio_source": self.storage_ratio_source, "reason": self.reason,
                "current": self.current, "wire_format": self.wire_format,
                "inputs": self.inputs, "rows": rows}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def format_table(self) -> str:
        """The predictions as a text table, the choice marked with ``*``: one
        line per split, then two lines of explanation. Times are seconds per
        iteration, the wire column megabytes per iteration."""
        header = (f"{'':1}{'s':>3} {'first trainer layer':<20} {'format':<12} {'wire MB':>8} "
                  f"{'storage s':>10} {'network s':>10} {'trainer s':>10} {'requests s':>10} "
                  f"{'iter s':>10} {'bottleneck':<12} {'epoch s':>9}  note")
        lines = [header]
        for row in self.rows:
            mark = "*" if row.split == self.split else ""
            epoch = "-" if row.epoch_s is None else f"{row.epoch_s:9.1f}"
            if not row.feasible:
                note = row.reason
            elif row.split == 0:
                note = "vanilla: raw shards, decoded on the trainer"
            else:
                note = f"storage batch {row.storage_batch}" + (
                    f", {row.storage_estimated_layers} storage layer(s) estimated"
                    if row.storage_estimated_layers else "")
            lines.append(
                f"{mark:1}{row.split:>3} {row.first_trainer_layer[:20]:<20} "
                f"{row.wire_format or 'raw shard':<12} "
                f"{row.wire_bytes * self.batch_size / 1e6:8.3f} {row.storage_s:10.4f} "
                f"{row.transfer_s:10.4f} {row.trainer_s:10.4f} {row.pipeline_s:10.4f} "
                f"{row.iteration_s:10.4f} {row.bottleneck:<12} {epoch:>9}  {note}")
        lines.append(f"split {self.split}: {self.reason}")
        lines.append(f"per iteration of {self.batch_size} samples at "
                     f"{self.bandwidth_bytes_per_s * 8 / 1e6:.1f} Mbit/s; "
                     f"storage/trainer speed ratio {self.storage_ratio:.3g} "
                     f"({self.storage_ratio_source})")
        return "\n".join(lines)

    def summary(self) -> str:
        """The choice in one line: split, predicted time, bottleneck, bandwidth."""
        chosen = self.chosen
        return (f"split {self.split} ({chosen.first_trainer_layer} first on the trainer, "
                f"{chosen.wire_format or 'raw shards'}), "
                f"{chosen.iteration_s:.4g} s per iteration, bottleneck {chosen.bottleneck}, "
                f"{self.bandwidth_bytes_per_s * 8 / 1e6:.1f} Mbit/s")


# The cost model ------------------------------------------------------------------


def storage_layer_times(profile: Profile) -> tuple[list[float], float, str, list[bool]]:
    """Per-sample storage time of every frozen layer ``[0, f)``: measured
    where a frame ran the layer, else the trainer's forward time scaled by
    the storage/trainer ratio on the layers both measured (module docstring).
    Returns (times, ratio, how the ratio was found, which were estimated)."""
    frozen = profile.layers[:profile.freeze]
    both = [layer for layer in frozen
            if layer.storage_s is not None and layer.trainer_forward_s > 0]
    trainer_sum = sum(layer.trainer_forward_s for layer in both)
    if both and trainer_sum > 0:
        ratio = sum(layer.storage_s for layer in both) / trainer_sum
        source = f"measured on {len(both)} layer(s)"
    elif profile.storage_speed_ratio is not None:
        ratio, source = profile.storage_speed_ratio, "assumed (profile.storage_speed_ratio)"
    else:
        ratio, source = 1.0, "assumed 1: no storage layer measured yet"
    estimated = [layer.storage_s is None for layer in frozen]
    times = [ratio * layer.trainer_forward_s if layer.storage_s is None else layer.storage_s
             for layer in frozen]
    return times, ratio, source, estimated


def storage_encode_s(profile: Profile, split: int, wire_format: str | None,
                     storage_ratio: float) -> float:
    """Per sample, the storage tier's way from the features at ``split`` to
    the wire in ``wire_format`` (None: the profile's ``wire_dtype``, raw):
    the format's encode time measured on the trainer, scaled by
    ``storage_ratio``, or the frames' ``to_wire_s`` per byte."""
    if wire_format is not None:
        return storage_ratio * profile.wire_formats[wire_format].encode_s[split]
    return profile.storage_to_wire_s_per_byte * profile.boundary_bytes[split]


def evaluate_split(profile: Profile, split: int, freeze: int | None = None, *,
                   wire_format: str | None = None, epoch_samples: int | None = None,
                   storage_times: list[float] | None = None,
                   estimated: list[bool] | None = None,
                   storage_ratio: float | None = None) -> SplitCost:
    """The cost model's prediction for ``split`` with its features in
    ``wire_format`` (a name of ``profile.wire_formats``; None: the profile's
    ``wire_dtype`` without them); see the module docstring."""
    p = profile
    freeze = p.freeze if freeze is None else freeze
    if not 0 <= freeze <= len(p):
        raise ValueError(f"freeze index {freeze} is outside [0, {len(p)}]")
    if not 0 <= split <= freeze:
        raise ValueError(f"split {split} must be between 0 and the freeze index {freeze}")
    if storage_times is None or estimated is None or storage_ratio is None:
        storage_times, storage_ratio, _, estimated = storage_layer_times(
            p if freeze == p.freeze else p.with_measurements(freeze=freeze))
    if wire_format is not None and wire_format not in p.wire_formats:
        raise ValueError(f"wire format {wire_format!r} was not measured; measured: "
                         f"{', '.join(p.wire_formats) or 'none'}")
    batch, requests, depth = p.batch_size, p.samples_per_request, p.prefetch_depth
    a, b = p.activation_bytes, p.boundary_bytes
    layers = p.layers

    # Per-sample stage times.
    if split == 0:
        wire = p.raw_bytes
        storage = p.storage_serve_s_per_byte * p.raw_bytes
        host = p.trainer_decode_s + p.trainer_copy_s_per_byte * a[0]
    else:
        if wire_format is not None:
            wire = p.wire_formats[wire_format].bytes[split] + p.frame_overhead_bytes
            host = p.wire_formats[wire_format].decode_s[split]
        else:
            wire = b[split] + p.frame_overhead_bytes
            host = p.trainer_copy_s_per_byte * b[split]
        storage = p.storage_decode_s + sum(storage_times[:split]) + \
            storage_encode_s(p, split, wire_format, storage_ratio) + \
            p.storage_send_s_per_byte * wire
    host += p.trainer_receive_s_per_sample + p.trainer_receive_s_per_byte * wire
    transfer = wire / p.bandwidth_bytes_per_s
    compute = trainer_layers_s(p, split, freeze) + p.trainer_step_s / batch
    work = storage + transfer + host + compute
    request = p.request_latency_s / requests + storage + transfer + host
    pipeline = request / depth if depth else request + compute
    if _on_cpu(p.trainer_device):
        stages = {"storage": storage, "network": transfer, "trainer": host + compute}
    else:
        stages = {"storage": storage, "network": transfer, "trainer_host": host,
                  "trainer": compute}
    stages["requests"] = pipeline
    bottleneck = max(stages, key=stages.get)
    cycle = stages[bottleneck]
    supply = max(value for name, value in stages.items() if name != "trainer")
    fill = p.request_latency_s + requests * (storage + transfer + host)
    last = compute + (host if _on_cpu(p.trainer_device) else 0.0)
    trainer_cycle = host + compute if _on_cpu(p.trainer_device) else max(host, compute)
    samples = epoch_samples if epoch_samples is not None else p.epoch_samples

    # Memory.
    reasons = []
    storage_peak = 0.0 if split == 0 else \
        max(a[i] + a[i + 1] for i in range(split)) + b[split]
    storage_batch = p.storage_batch
    if split > 0 and p.storage_budget_bytes is not None:
        fits = int(p.storage_budget_bytes // storage_peak) if storage_peak > 0 else storage_batch
        storage_batch = min(storage_batch, fits)
        if storage_batch < 1:
            reasons.append(f"storage: one sample needs {_mb(storage_peak)} of activations, "
                           f"the budget is {_mb(p.storage_budget_bytes)}")
    # Another request's first frame goes before the first shard's later
    # frames on the storage tier (its frame_priority), and before them on
    # the link; raw shards share the link whole.
    frame = min(max(storage_batch, 1), requests)
    if split == 0:
        ahead = requests * transfer
    else:
        ahead = frame * max(storage, transfer) if frame < requests else 0.0
    held = (a[0] + p.raw_bytes) if split == 0 else b[split]
    host_memory = (depth + 2) * requests * held
    inference_peak = max((a[i] + a[i + 1] for i in range(split, freeze)), default=0)
    training_set = a[freeze] + 2 * sum(a[freeze + 1:])
    device_memory = batch * (a[split] + max(inference_peak, training_set))
    if _on_cpu(p.trainer_device):
        if p.trainer_free_bytes is not None and host_memory + device_memory > p.trainer_free_bytes:
            reasons.append(f"trainer: {_mb(host_memory)} of prefetched shards and "
                           f"{_mb(device_memory)} of activations exceed the "
                           f"{_mb(p.trainer_free_bytes)} free")
    else:
        if p.trainer_free_bytes is not None and device_memory > p.trainer_free_bytes:
            reasons.append(f"trainer device: {_mb(device_memory)} of activations exceed the "
                           f"{_mb(p.trainer_free_bytes)} free")
        if p.trainer_host_free_bytes is not None and host_memory > p.trainer_host_free_bytes:
            reasons.append(f"trainer host: {_mb(host_memory)} of prefetched shards exceed "
                           f"the {_mb(p.trainer_host_free_bytes)} free")

    return SplitCost(
        split=split, wire_format="" if split == 0 else (wire_format or p.wire_dtype),
        first_trainer_layer=layers[split].name if split < len(layers) else "(output)",
        wire_bytes=wire, storage_s=batch * storage, transfer_s=batch * transfer,
        trainer_host_s=batch * host, trainer_compute_s=batch * compute,
        trainer_s=batch * (host + compute), pipeline_s=batch * pipeline,
        iteration_s=batch * cycle, bottleneck=bottleneck, fill_s=fill,
        first_ahead_s=ahead, trainer_cycle_s=batch * trainer_cycle,
        trainer_last_s=batch * last, supply_s=batch * supply,
        epoch_s=None if samples is None else
        _fresh_s(fill, ahead, supply, trainer_cycle, last, samples, requests, depth, batch),
        iterations=None if samples is None else math.ceil(samples / batch),
        storage_batch=max(storage_batch, 0) if split else 0,
        storage_estimated_layers=sum(estimated[:split]),
        storage_memory_bytes=storage_peak * max(storage_batch, 1) if split else 0.0,
        trainer_memory_bytes=device_memory, trainer_host_memory_bytes=host_memory,
        feasible=not reasons, reason="; ".join(reasons), work_s=batch * work,
        samples_per_s=1 / cycle if cycle > 0 else math.inf)


def trainer_layers_s(profile: Profile, split: int, freeze: int | None = None) -> float:
    """Per sample, the trainer's layers for a sample that came at ``split``:
    forward up to the freeze index (default the profile's), then forward
    and backward."""
    freeze = profile.freeze if freeze is None else freeze
    layers = profile.layers
    return sum(layer.trainer_forward_s for layer in layers[split:freeze]) + \
        sum(layer.trainer_forward_s if layer.trainer_train_s is None else layer.trainer_train_s
            for layer in layers[freeze:])


def _on_cpu(device: str) -> bool:
    return str(device).split(":")[0] == "cpu"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.0f} MiB"


def _rank(row: SplitCost):
    time = row.iteration_s if row.rest_s is None else row.rest_s
    return (time, row.work_s, row.wire_bytes, -row.split)


def _fewest_bytes_of_the_fastest(rows, tie: float) -> SplitCost:
    """The row with the fewest bytes among those predicted within ``tie``
    (relative) of the fastest: closer predictions are ties within the
    measurements' noise, and bytes are a link other jobs share."""
    fastest = min(rows, key=_rank)
    limit = _rank(fastest)[0] * (1 + tie)
    return min((row for row in rows if _rank(row)[0] <= limit),
               key=lambda row: (row.wire_bytes, _rank(row)))


def _fresh_s(fill, ahead, supply, trainer_cycle, last, samples, requests, depth,
             batch) -> float:
    """Seconds for ``samples`` from an empty pipeline (the module docstring's
    ``epoch_s``), the latest of three paths: the supply's (the first shard,
    then one shard a ``supply`` cycle, then the trainer's work on the last
    grain); the trainer's from its first shard, which the other requests
    sent with it delay by ``ahead`` each (it then never waits); and the
    trainer's from its first grain (:func:`_grain`), whose other shards
    come one a supply cycle after the first; with a grain of one shard the
    third path is never the latest."""
    together = min(max(depth, 1), math.ceil(samples / requests))
    grain = _grain(samples, requests, batch)
    rest = max(samples - requests, 0)
    return max(fill + rest * supply + grain * last,
               fill + (together - 1) * ahead + rest * trainer_cycle
               + min(samples, requests) * last,
               fill + (grain - requests) * supply + (samples - grain) * trainer_cycle
               + grain * last)


def _grain(samples, requests, batch):
    """Of ``samples``, how many the trainer needs before it computes: a
    training batch, or a shard when shards are larger."""
    return min(max(requests, batch), samples)


def _rest_s(row: SplitCost, profile: Profile, rest_samples: int, fresh: bool,
            backlog: tuple[float, float] = (0.0, 0.0)) -> float:
    """Predicted seconds for the ``rest_samples`` samples still to request:
    with ``fresh`` (no request out yet) from an empty pipeline, as
    ``epoch_s``; else behind the requests already sent, which keep their
    split and hold the supply and the trainer for ``backlog`` seconds. The
    new shards then arrive one a supply cycle and the last one still needs
    the trainer's work, or the trainer, the slower, takes them one a trainer
    cycle (the module docstring's Ranking)."""
    batch, requests = profile.batch_size, profile.samples_per_request
    if not fresh:
        supply, trainer = backlog
        arrived = supply + rest_samples * row.supply_s / batch + \
            _grain(rest_samples, requests, batch) * row.trainer_last_s / batch
        return max(arrived, trainer + rest_samples * row.trainer_cycle_s / batch)
    return _fresh_s(row.fill_s, row.first_ahead_s, row.supply_s / batch,
                    row.trainer_cycle_s / batch,
                    row.trainer_last_s / batch, rest_samples,
                    requests, profile.prefetch_depth, batch)


def choose_split(profile: Profile, freeze: int | None = None, *,
                 epoch_samples: int | None = None, current: int | None = None,
                 current_format: str | None = None, rest_samples: int | None = None,
                 fresh: bool = False, backlog_samples: tuple[int, int] = (0, 0),
                 trained_from: int | None = None, later_epochs: int = 0,
                 margin: float = 0.0, tie: float = SPLIT_TIE, candidates=None) -> Decision:
    """Predict every split in ``[0, freeze]`` (or ``candidates``) with every
    measured wire format, and choose the pair.

    Each split's row is its best format. The choice is the feasible pair
    with the lowest predicted time for the rest of the job when
    ``rest_samples`` is given (``fresh``: before any request, the pipeline's
    fill included; else behind ``backlog_samples``, the samples already sent
    at ``current`` and ``current_format``: on their way, and loaded but not
    yet trained on; a split below ``trained_from``, the lowest the trainer
    has run, costs it one more iteration to warm up; ``later_epochs``
    more passes of ``epoch_samples`` follow them), else per iteration;
    pairs predicted within ``tie``
    (relative) of it are ties, won by the fewest bytes (then less total
    work, the larger split). With ``current`` and ``current_format`` (what is in use)
    and ``margin`` (e.g. 0.05), they are kept unless the best is more than
    ``margin`` faster: switching has a cost, and predictions within a few
    percent are noise. Raises ValueError when no candidate fits memory.
    """
    freeze = profile.freeze if freeze is None else freeze
    if freeze != profile.freeze:
        profile = profile.with_measurements(freeze=freeze)
    storage_times, ratio, source, estimated = storage_layer_times(profile)
    formats = list(profile.wire_formats) or [None]
    in_use = current is not None and 0 <= current <= freeze

    def evaluate(split, wire_format):
        return evaluate_split(profile, split, freeze, wire_format=wire_format,
                              epoch_samples=epoch_samples, storage_times=storage_times,
                              estimated=estimated, storage_ratio=ratio)

    backlog = (0.0, 0.0)
    if in_use and not fresh and any(backlog_samples):
        sent = evaluate(current, current_format if current and current_format in
                        profile.wire_formats else None)
        on_the_way, loaded = backlog_samples
        supply = on_the_way * sent.supply_s / profile.batch_size
        # The trainer takes shards in order: it reaches the new ones once the
        # last one sent before has arrived and it has trained on all of them.
        backlog = (supply, max(supply, (on_the_way + loaded) * sent.trainer_cycle_s /
                               profile.batch_size))

    def predict(split, wire_format):
        row = evaluate(split, wire_format)
        if rest_samples is not None:
            if not fresh and trained_from is not None and split < trained_from:
                row.warm_up_s = row.trainer_cycle_s
            row.rest_s = _rest_s(row, profile, rest_samples, fresh, backlog) + row.warm_up_s
            if later_epochs and row.epoch_s is not None:
                row.rest_s += later_epochs * row.epoch_s
        return row

    def best_format(split):
        options = [predict(split, fmt) for fmt in (formats if split else [None])]
        feasible = [row for row in options if row.feasible]
        return _fewest_bytes_of_the_fastest(feasible, tie) if feasible else options[0]

    rows = [best_format(s) for s in range(freeze + 1)]
    allowed = set(range(freeze + 1)) if candidates is None else set(candidates)
    if bad := allowed - set(range(freeze + 1)):
        raise ValueError(f"candidate split(s) {sorted(bad)} outside [0, {freeze}]")
    for row in rows:
        if row.split not in allowed and row.feasible:
            row.feasible, row.reason = False, "not a candidate"
    feasible = [row for row in rows if row.feasible]
    if not feasible:
        raise ValueError("no split fits memory: " + "; ".join(
            f"s={row.split}: {row.reason}" for row in rows))
    best = _fewest_bytes_of_the_fastest(feasible, tie)
    chosen = best
    measure = "iteration time" if rest_samples is None else \
        f"time for the {rest_samples} samples still to request" + \
        (f" and {later_epochs} more epoch(s)" if later_epochs else "")
    reason = f"lowest predicted {measure} ({_rank(best)[0]:.4g} s, bottleneck {best.bottleneck})"
    if in_use and current in allowed:
        kept = predict(current, current_format if current and current_format in
                       profile.wire_formats else None) if current else rows[0]
        if kept.feasible and (kept.split, kept.wire_format) != (best.split, best.wire_format) \
                and _rank(kept)[0] <= _rank(best)[0] * (1 + margin):
            chosen = kept
            rows[current] = kept
            reason = (f"kept the current split and format: predicted {_rank(kept)[0]:.4g} s, "
                      f"within {margin:.0%} of the best, split {best.split} "
                      f"{best.wire_format} ({_rank(best)[0]:.4g} s)")
    return Decision(split=chosen.split, freeze=freeze, model=profile.model,
                    batch_size=profile.batch_size,
                    bandwidth_bytes_per_s=profile.bandwidth_bytes_per_s, storage_ratio=ratio,
                    storage_ratio_source=source, rows=rows, reason=reason, current=current,
                    inputs=_inputs(profile), wire_format=chosen.wire_format)


def _inputs(p: Profile) -> dict:
    """The scalar measurements a decision was made with (for the metrics JSON)."""
    names = ("batch_size", "bandwidth_bytes_per_s", "raw_bytes", "wire_dtype", "storage_decode_s",
             "storage_send_s_per_byte",
             "trainer_decode_s", "trainer_copy_s_per_byte", "trainer_receive_s_per_byte",
             "trainer_receive_s_per_sample", "trainer_step_s",
             "request_latency_s", "samples_per_request", "storage_batch", "prefetch_depth",
             "trainer_device", "trainer_free_bytes", "trainer_host_free_bytes",
             "storage_budget_bytes", "epoch_samples")
    return {name: getattr(p, name) for name in names}
