"""What the trainer measures for automatic split selection (``hapi.client.split``).

Everything the cost model uses is measured on the running system; this
module holds the measurements and the code that takes them:

- :class:`Profile` (with one :class:`LayerProfile` per layer): plain
  dataclasses that round-trip through JSON. Times are seconds *per sample*,
  sizes bytes *per sample*, so one profile serves any batch size.
- :func:`measure_trainer_layers`: per-layer forward time of every layer and
  forward+backward time of the trainable ones, on the trainer, at the
  training batch size (a few timed passes after a warm-up).
- :func:`measure_decode` (vanilla's decode + preprocess on the trainer) and
  :func:`measure_copy_rate` (deserialising and copying received features).
- :class:`OnlineEstimator`: folds the ``timings`` of the frames as they
  arrive and the transfers' bytes and durations into storage-side per-layer
  times and the bandwidth, and says when either has drifted from the values
  the current choice was made with.
- :func:`profile_from_model`: a :class:`Profile` from a
  :class:`hapi.zoo.LayeredModel` (boundary sizes from its shapes) and the
  measurements above.

Nothing here talks to Swift or the network: the trainer feeds it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import torch

__all__ = [
    "PROFILE_FORMAT", "LayerProfile", "OnlineEstimator", "Profile", "TrainerTimes",
    "free_memory_bytes", "measure_copy_rate", "measure_decode", "measure_trainer_layers",
    "profile_from_model",
]

PROFILE_FORMAT = "hapi-profile/1"
WIRE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


# The profile -----------------------------------------------------------------------


@dataclass
class LayerProfile:
    """One layer's measured costs, per sample.

    ``trainer_forward_s``: forward on the trainer (no gradients below the
    freeze index, training mode above it). ``trainer_train_s``: forward and
    backward on the trainer, for the layers at or above the freeze index
    (None below it). ``storage_s``: the storage tier's time for the layer,
    averaged over the frames that ran it (None while no frame has).
    """

    name: str
    trainer_forward_s: float
    trainer_train_s: float | None = None
    storage_s: float | None = None


@dataclass
class Profile:
    """The inputs of the split cost model, all per sample unless named otherwise.

    Sizes: ``boundary_bytes[i]`` is the size of the tensor at boundary ``i``
    (the input of layer ``i``) in the wire dtype, ``len(layers) + 1`` of
    them; ``activation_bytes[i]`` the same tensor in float32, as it sits in
    memory on either side. ``raw_bytes`` is what vanilla moves instead of
    boundary 0: the encoded samples as stored in the shards (tar included).
    ``frame_overhead_bytes`` is what a frame adds per sample (header, keys,
    labels, timings) on top of the features.

    Times: ``storage_decode_s`` (decode + preprocess on the storage tier,
    from the frames' ``decode_s``), ``storage_to_wire_s_per_byte`` (the
    frames' ``to_wire_s`` over their feature bytes), ``storage_serve_s_per_byte``
    (serving raw bytes in vanilla; 0 when not measured),
    ``trainer_decode_s`` (vanilla: decode + preprocess on the trainer),
    ``trainer_copy_s_per_byte`` (the trainer deserialising and copying what
    it receives), ``trainer_step_s`` (per iteration: loss, optimizer step
    and what else a step costs besides the layers).

    Transport: ``bandwidth`` (bytes/s, measured from the transfers),
    ``request_latency_s`` (a request's time to first byte beyond the storage
    compute), ``samples_per_request`` (the shard size), ``storage_batch``
    (the storage batch asked for), ``prefetch_depth`` (requests in flight).

    Memory (bytes; None = unknown, not checked): ``trainer_free_bytes`` on
    the device that trains, ``trainer_host_free_bytes`` host memory for the
    prefetched shards when that device is not the CPU (on a CPU trainer both
    come out of ``trainer_free_bytes``), ``storage_budget_bytes`` what the
    storage tier gives this job's activations.

    ``storage_speed_ratio``: storage time over trainer time for the same
    layer, to assume when no storage layer has been measured yet (None: 1).
    """

    model: str
    input_shape: tuple[int, ...]
    batch_size: int
    freeze: int
    layers: list[LayerProfile]
    boundary_bytes: list[int]
    activation_bytes: list[int]
    raw_bytes: float
    bandwidth: float
    wire_dtype: str = "float32"
    frame_overhead_bytes: float = 0.0
    storage_decode_s: float = 0.0
    storage_to_wire_s_per_byte: float = 0.0
    storage_serve_s_per_byte: float = 0.0
    trainer_decode_s: float = 0.0
    trainer_copy_s_per_byte: float = 0.0
    trainer_step_s: float = 0.0
    request_latency_s: float = 0.0
    samples_per_request: int = 100
    storage_batch: int = 64
    prefetch_depth: int = 2
    trainer_device: str = "cpu"
    trainer_free_bytes: int | None = None
    trainer_host_free_bytes: int | None = None
    storage_budget_bytes: int | None = None
    storage_speed_ratio: float | None = None
    epoch_samples: int | None = None
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        self.input_shape = tuple(self.input_shape)
        self.layers = [layer if isinstance(layer, LayerProfile) else LayerProfile(**layer)
                       for layer in self.layers]
        n = len(self.layers)
        if len(self.boundary_bytes) != n + 1 or len(self.activation_bytes) != n + 1:
            raise ValueError(f"{n} layers need {n + 1} boundary sizes, got "
                             f"{len(self.boundary_bytes)} and {len(self.activation_bytes)}")
        if not 0 <= self.freeze <= n:
            raise ValueError(f"freeze index {self.freeze} is outside [0, {n}]")
        if self.bandwidth <= 0:
            raise ValueError(f"bandwidth must be positive, got {self.bandwidth}")
        if self.batch_size < 1 or self.samples_per_request < 1 or self.storage_batch < 1:
            raise ValueError("batch_size, samples_per_request and storage_batch must be >= 1")
        if self.prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, got {self.prefetch_depth}")

    def __len__(self):
        return len(self.layers)

    def to_dict(self) -> dict:
        return {"format": PROFILE_FORMAT, **asdict(self), "input_shape": list(self.input_shape)}

    @classmethod
    def from_dict(cls, doc: dict) -> Profile:
        if doc.get("format", PROFILE_FORMAT) != PROFILE_FORMAT:
            raise ValueError(f"not a {PROFILE_FORMAT} document: {doc.get('format')!r}")
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in doc.items() if key in names})

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        return cls.from_dict(json.loads(text))

    def save(self, path) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path) -> Profile:
        with open(path) as f:
            return cls.from_json(f.read())

    def with_measurements(self, **changes) -> Profile:
        """A copy with some fields replaced (``dataclasses.replace``), layers copied."""
        copy = replace(self, layers=[replace(layer) for layer in self.layers],
                       notes=dict(self.notes))
        return replace(copy, **changes) if changes else copy


# Trainer-side measurements -----------------------------------------------------------


@dataclass
class TrainerTimes:
    """Per-sample times of every layer on the trainer (see :func:`measure_trainer_layers`)."""

    forward_s: list[float]
    train_s: list[float | None]
    batch_size: int
    device: str
    iterations: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _preserved_state(modules, device: torch.device):
    """Put back the buffers of ``modules`` (BatchNorm running statistics) and
    the random generators after the block: profiling must not change training."""
    buffers = [(buf, buf.detach().clone()) for module in modules for buf in module.buffers()]
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, saved in buffers:
                    buf.copy_(saved)


def measure_trainer_layers(model, inputs: torch.Tensor, freeze: int | None = None, *,
                           iterations: int = 3, warmup: int = 1) -> TrainerTimes:
    """Time every layer of ``model`` (a :class:`hapi.zoo.LayeredModel`) on the trainer.

    ``inputs`` is one training batch at boundary 0 (a real batch, or random
    values of the input shape: the values do not change the time), on the
    device that trains. Layers below ``freeze`` (default ``model.frozen``)
    run forward without gradients, as the trainer runs them for a split below
    the freeze index; layers from ``freeze`` on run in training mode,
    forward and then backward (``torch.autograd.grad`` with respect to their
    parameters and, above the first layer with trainable parameters, their
    input, as in training: nothing accumulates in ``.grad``). Each layer is
    timed on its own, the device synchronised around it; the result is the
    median over ``iterations`` passes after ``warmup`` untimed ones, divided
    by the batch size. The model's parameters, buffers (BatchNorm
    statistics), mode and the random generators are as before the call.
    """
    freeze = model.frozen if freeze is None else freeze
    if not 0 <= freeze <= len(model):
        raise ValueError(f"freeze index {freeze} is outside [0, {len(model)}]")
    if iterations < 1 or warmup < 0:
        raise ValueError("iterations must be >= 1 and warmup >= 0")
    device = inputs.device
    batch = inputs.shape[0]
    n = len(model)
    forward = [[] for _ in range(n)]
    train = [[] for _ in range(n)]
    was_training = model.training
    trainable = list(model.layers[freeze:])
    try:
        model.train()
        with _preserved_state(trainable, device):
            for iteration in range(warmup + iterations):
                timed = iteration >= warmup
                x = inputs
                with torch.no_grad():
                    for index in range(freeze):
                        x, seconds = _timed_forward(model.layers[index], x, device)
                        if timed:
                            forward[index].append(seconds)
                input_grad = False  # the input needs a gradient above a trained parameter
                for index in range(freeze, n):
                    layer = model.layers[index]
                    x, fwd, fwd_bwd = _timed_train(layer, x, input_grad, device)
                    input_grad = input_grad or any(p.requires_grad for p in layer.parameters())
                    if timed:
                        forward[index].append(fwd)
                        train[index].append(fwd_bwd)
    finally:
        model.train(was_training)
    resolution = time.get_clock_info("perf_counter").resolution
    per_sample = [max(statistics.median(times), resolution) / batch for times in forward]
    train_s = [max(statistics.median(times), resolution) / batch if times else None
               for times in train]
    return TrainerTimes(forward_s=per_sample, train_s=train_s, batch_size=batch,
                        device=str(device), iterations=iterations)


def _timed_forward(layer, x, device):
    if getattr(layer, "inplace", False):
        x = x.clone()  # the layer writes into its input: keep the caller's tensor
    _sync(device)
    began = time.perf_counter()
    y = layer(x)
    _sync(device)
    return y, time.perf_counter() - began


def _timed_train(layer, x, input_grad, device):
    leaf = x.detach().requires_grad_(input_grad)
    # A clone (outside the timer) so that in-place layers do not write into a leaf.
    inp = leaf.clone() if input_grad or getattr(layer, "inplace", False) else leaf
    targets = [p for p in layer.parameters() if p.requires_grad]
    if input_grad:
        targets.append(leaf)
    _sync(device)
    began = time.perf_counter()
    with torch.enable_grad():
        out = layer(inp)
    _sync(device)
    forward_done = time.perf_counter()
    if targets and out.requires_grad:
        grad_out = torch.ones_like(out)
        _sync(device)
        backward_began = time.perf_counter()
        torch.autograd.grad(out, targets, grad_outputs=grad_out, allow_unused=True)
        _sync(device)
        backward = time.perf_counter() - backward_began
    else:
        backward = 0.0
    forward = forward_done - began
    return out.detach(), forward, forward + backward


def measure_decode(images: Sequence[bytes], preset: str, model: str,
                   repeats: int = 1) -> tuple[float, float]:
    """Vanilla's decode + preprocess on the trainer: (seconds per sample,
    encoded bytes per sample) over ``images`` (encoded image bytes, e.g. the
    members of one raw shard)."""
    from hapi.preprocess import preprocess

    if not images:
        raise ValueError("no images to measure")
    times = []
    for _ in range(max(repeats, 1)):
        began = time.perf_counter()
        preprocess(list(images), preset, model)
        times.append(time.perf_counter() - began)
    return min(times) / len(images), sum(map(len, images)) / len(images)


def measure_copy_rate(nbytes: int = 4 << 20, wire_dtype: str = "float32",
                      repeats: int = 3) -> float:
    """Seconds per received byte the trainer spends turning frames into a
    float32 training batch: parse the frame, concatenate, convert. Measured
    on a synthetic frame of ``nbytes`` features (a few milliseconds)."""
    from hapi import wire

    dtype = getattr(torch, wire_dtype)
    count = max(nbytes // dtype.itemsize, 1)
    features = torch.zeros(2, count // 2 or 1, dtype=dtype)
    blob = wire.encode_frame("batch", {"index": "0"}, features=features,
                             labels=torch.zeros(2, dtype=torch.int64))
    payload = blob[wire.LENGTH.size:]
    best = math.inf
    for _ in range(max(repeats, 1)):
        began = time.perf_counter()
        frame = wire.decode_frame(payload)
        torch.cat([frame.features, frame.features[:1]]).to(torch.float32)
        best = min(best, time.perf_counter() - began)
    return best / features.nbytes


def free_memory_bytes(device: str | torch.device = "cpu") -> int | None:
    """Free memory where ``device`` trains: ``torch.cuda.mem_get_info`` on a
    GPU, MemAvailable (Linux) on the CPU; None when it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def profile_from_model(model, *, input_shape: Sequence[int], freeze: int, batch_size: int,
                       trainer: TrainerTimes, raw_bytes: float, bandwidth: float,
                       wire_dtype: str = "float32", storage_s: Sequence[float | None] = (),
                       **measurements) -> Profile:
    """A :class:`Profile` for ``model`` (a :class:`hapi.zoo.LayeredModel`).

    Boundary sizes come from the model's shapes at ``input_shape`` (the
    preset's ``(3, N, N)``) in the wire dtype and in float32; the trainer's
    per-layer times from ``trainer``; ``storage_s`` gives the storage-side
    per-layer times measured so far (shorter than the model, or None entries,
    where not measured); any other :class:`Profile` field by keyword.
    """
    if wire_dtype not in WIRE_ITEMSIZE:
        raise ValueError(f"unknown wire dtype {wire_dtype!r}")
    shapes = model.boundary_shapes(tuple(input_shape))
    elements = [math.prod(shape) for shape in shapes]
    storage = list(storage_s) + [None] * (len(model) - len(storage_s))
    layers = [LayerProfile(name=name, trainer_forward_s=trainer.forward_s[i],
                           trainer_train_s=trainer.train_s[i] if i >= freeze else None,
                           storage_s=storage[i] if i < freeze else None)
              for i, name in enumerate(model.layer_names)]
    return Profile(model=model.name, input_shape=tuple(input_shape), batch_size=batch_size,
                   freeze=freeze, layers=layers,
                   boundary_bytes=[e * WIRE_ITEMSIZE[wire_dtype] for e in elements],
                   activation_bytes=[e * 4 for e in elements], raw_bytes=raw_bytes,
                   bandwidth=bandwidth, wire_dtype=wire_dtype,
                   trainer_device=trainer.device, **measurements)


# Online estimation from the stream ----------------------------------------------------


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
    (:meth:`observe_transfer`, or :meth:`observe_request`); read the
    estimates (``bandwidth``, ``storage_layer_s``, ``storage_decode_s``...)
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
    """

    def __init__(self, window: int = 16, min_observations: int = 3,
                 drift_window: int | None = None, spread_factor: float = 2.0):
        if window < 1 or min_observations < 1:
            raise ValueError("window and min_observations must be >= 1")
        self.window = window
        self.min_observations = min_observations
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
        """``nbytes`` received in ``seconds`` of receiving: the time the bytes
        were on the way, not the time the storage tier spent computing them
        (see :meth:`observe_request`)."""
        if nbytes > 0 and seconds > 0:
            self._transfers.add((nbytes, seconds))
            self.transfers += 1

    def observe_request(self, nbytes: int, elapsed_s: float, storage_s: float = 0.0,
                        first_byte_s: float = 0.0):
        """A whole request: ``elapsed_s`` from sending it to its last byte,
        ``storage_s`` the storage compute its frames report (sum of their
        decode, layers and to_wire), ``first_byte_s`` the wait for its first
        byte. The storage tier computes a frame and then writes it, so a
        request's receiving time is about its elapsed time less the storage
        compute that did not overlap the first byte's wait and less that wait.
        Prefer :meth:`observe_transfer` with per-frame arrival times where
        the reader has them."""
        receiving = elapsed_s - max(first_byte_s, 0.0) - max(storage_s, 0.0)
        if first_byte_s > 0:
            self._latency.add(first_byte_s)
        # Overlap between the storage compute and the transfer makes the
        # difference an underestimate; never count less than a tenth of the
        # elapsed time as receiving time (a bound, not a measurement).
        self.observe_transfer(nbytes, max(receiving, 0.1 * elapsed_s))

    def observe_latency(self, seconds: float):
        """A request's time to its first byte beyond the storage compute."""
        if seconds >= 0:
            self._latency.add(seconds)

    # Estimates -----------------------------------------------------------

    @property
    def bandwidth(self) -> float | None:
        return _rate(self._transfers.values)

    @property
    def storage_decode_s(self) -> float | None:
        return self._decode.median()

    @property
    def storage_to_wire_s_per_byte(self) -> float | None:
        return self._to_wire.median()

    @property
    def request_latency_s(self) -> float | None:
        return self._latency.median()

    def storage_layer_s(self, layers: int) -> list[float | None]:
        """Per-sample storage time of layers ``[0, layers)``; None where no frame ran it."""
        return [self._layers[i].median() if i in self._layers else None for i in range(layers)]

    def apply(self, profile: Profile) -> Profile:
        """``profile`` with the estimates made so far filled in (a copy)."""
        out = profile.with_measurements()
        for index, seconds in enumerate(self.storage_layer_s(min(len(out), out.freeze))):
            if seconds is not None:
                out.layers[index].storage_s = seconds
        for name in ("bandwidth", "storage_decode_s", "storage_to_wire_s_per_byte",
                     "request_latency_s"):
            value = getattr(self, name)
            if value is not None:
                setattr(out, name, value)
        return out

    # Drift -----------------------------------------------------------------

    def mark(self) -> dict:
        """Record the current estimates as those the current choice was made
        with; later drift is measured against them. Returns the baseline."""
        self._baseline = {"bandwidth": self.bandwidth,
                          "layers": {i: s.median() for i, s in self._layers.items()},
                          "decode": self._decode.median()}
        for series in (self._decode, self._to_wire, self._transfers, self._latency,
                       *self._layers.values()):
            series.since_mark = 0
        return self._baseline

    def keep_recent(self) -> None:
        """After a drift: forget what came before the last mark, for every
        quantity with at least ``min_observations`` new observations, so that
        the estimates describe the new conditions only, not a mix of both.

        A layer the storage tier ran before the mark but not since (the split
        moved below it) keeps its last times, scaled by the storage tier's
        drift on what it still runs: a storage tier that got twice as slow is
        twice as slow on every layer."""
        change = self.drift()["storage"]
        scale = 1.0 + change if change is not None else 1.0
        series = [self._decode, self._to_wire, self._transfers, self._latency,
                  *self._layers.values()]
        for one in series:
            if one.since_mark >= self.min_observations:
                recent = one.recent(self.drift_window)
                one.values.clear()
                one.values.extend(recent)
        if scale != 1.0:
            for one in self._layers.values():
                if one.since_mark < self.min_observations and one.values:
                    # Not run since the mark: rescale by the storage drift (see apply).
                    values = [v * scale for v in one.values]
                    one.values.clear()
                    one.values.extend(values)

    def drift(self) -> dict:
        """Relative change since :meth:`mark` (``new / old - 1``) of the
        bandwidth and of the storage time per sample (decode plus the layers
        measured both then and now), over the last ``drift_window``
        observations since the mark; each None until ``min_observations`` new
        observations of it arrived. Without a mark, both are None."""
        result = {"bandwidth": None, "storage": None}
        base = self._baseline
        if base is None:
            return result
        limit = self.drift_window
        recent = self._transfers.recent(limit)
        if base["bandwidth"] and len(recent) >= self.min_observations:
            result["bandwidth"] = _rate(recent) / base["bandwidth"] - 1
        pairs = []  # (value at the mark, value since), for decode and each layer seen in both
        for old, series in ((base["decode"], self._decode),
                            *((base["layers"].get(i), s) for i, s in self._layers.items())):
            values = series.recent(limit)
            if old and len(values) >= self.min_observations:
                pairs.append((old, statistics.median(values)))
        if pairs:
            result["storage"] = sum(new for _, new in pairs) / sum(old for old, _ in pairs) - 1
        return result

    def spread(self) -> dict:
        """How much one observation since :meth:`mark` strays from the others:
        the median absolute deviation over the median (relative) of the
        per-transfer rates, and of the storage times (decode and each layer,
        weighted by their medians). 0 until there are two observations."""
        limit = self.drift_window
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
        change no larger than the noise is no drift."""
        spread = self.spread()
        return any(change is not None
                   and abs(change) > max(threshold, self.spread_factor * spread[name])
                   for name, change in self.drift().items())


def _relative_spread(values) -> float:
    if len(values) < 2:
        return 0.0
    middle = statistics.median(values)
    return statistics.median(abs(v - middle) for v in values) / middle if middle > 0 else 0.0


def _rate(transfers) -> float | None:
    seconds = sum(s for _, s in transfers)
    return sum(b for b, _ in transfers) / seconds if seconds > 0 else None
