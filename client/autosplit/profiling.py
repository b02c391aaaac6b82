"""What the trainer measures for automatic split selection (``hapi.client.autosplit``).

Everything the cost model (``hapi.client.autosplit.costmodel``) uses is
measured on the running system; this module holds the measurements and the
code that takes them before training (``hapi.client.autosplit.estimator``
folds in what the stream measures during it):

- :class:`Profile` (with one :class:`LayerProfile` per layer): plain
  dataclasses that round-trip through JSON. Times are seconds *per sample*
  at the batch the profile is for, sizes bytes *per sample*.
- :func:`measure_trainer_layers`: per-layer forward time of every layer and
  forward+backward time of the trainable ones, on the trainer (a few timed
  passes after a warm-up); :func:`trainer_times` runs it at the training
  batch, or above :data:`PROFILE_BATCH` at two smaller batches and
  extrapolates (:func:`at_batch`),
  and keeps the measurements on local disk
  (``hapi.client.autosplit.profilecache``), so that a second run of the
  same model does not measure again.
- :func:`measure_optimizer_step`: one step of the run's optimizer over the
  trainable parameters (kept on local disk too, :func:`optimizer_step_s`).
- :func:`measure_decode` (vanilla's decode + preprocess on the trainer) and
  :func:`measure_copy_rate` (deserialising and copying received features).
- :func:`profile_from_model`: a :class:`Profile` from a
  :class:`hapi.zoo.LayeredModel` (boundary sizes from
  ``LayeredModel.boundary_bytes`` in the wire dtype) and the measurements
  above.
- :func:`measure_profile`: all of the above for a training run, the only
  part that talks to Swift (it reads the first images of one raw shard to
  time their decode and to measure the wire formats on real features).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from swiftclient import ClientException

import hapi
from hapi import hostmem, names, wire
from hapi.client import data
from hapi.client.autosplit.profilecache import TrainerTimesCache, cached, times_key
from hapi.client.autosplit.wireformats import (
    FormatCosts,
    candidate_formats,
    costs_from_dict,
    measure_formats,
    pinned,
)
from hapi.client.features import BURST_BYTES
from hapi.preprocess import DecodeError, preprocess, preset_size

__all__ = [
    "PROFILE_FORMAT", "LayerProfile", "Profile", "TrainerTimes", "at_batch",
    "free_memory_bytes", "measure_copy_rate", "measure_decode", "measure_optimizer_step",
    "measure_profile", "measure_trainer_layers", "optimizer_step_s", "profile_from_model",
    "speed_reference_key", "trainer_speed", "trainer_times",
]

PROFILE_FORMAT = "hapi-profile/1"
PROBE_SAMPLES = 1.5  # samples' worth of bytes read from a shard to time vanilla's decode
# ... and at least this many: the probe's transfer gives the first bandwidth;
# what may have come in a first burst (a shaper lets up to
# hapi.client.features.BURST_BYTES through at once) is not timed, and the
# rest must be worth timing (hapi.client.autosplit.estimator.MIN_TIMED_BYTES).
PROBE_MIN_BYTES = 2 * BURST_BYTES
MIN_PROBE_S = 1e-4  # a body read faster than this is read at this (no division by zero)
PROFILE_BATCH = 32  # the largest batch the trainer times its layers at
# Timed passes (after one untimed) that compare the trainer's speed now with
# the speed its cached layer times were measured at (:func:`trainer_speed`),
# each over the first frozen layers that take this long by those times.
SPEED_PASSES = 5
SPEED_PASS_S = 0.02
SPEED_BATCH = 2


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

    Transport: ``bandwidth_bytes_per_s`` (measured from the transfers),
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

    Wire formats: ``wire_formats`` maps each candidate format's name
    (``hapi.client.autosplit.wireformats``, e.g. ``uint8+zstd``) to its
    measured bytes, encode and decode times at every boundary up to the
    freeze index; the cost model chooses among them with the split. Empty:
    the one format ``wire_dtype`` (raw), sized by ``boundary_bytes`` and
    costed by ``storage_to_wire_s_per_byte`` and ``trainer_copy_s_per_byte``.
    ``trainer_receive_s_per_sample`` and ``trainer_receive_s_per_byte``: the
    trainer's loader CPU beyond the decode times (the request, socket reads,
    the frames' parsing, copies: what a decode timed alone does not see), a
    part per sample whatever the split and a part per received byte,
    measured on the real loader during the run
    (``hapi.client.autosplit.estimator.SampleAndByteCost``); 0 until measured.
    ``storage_send_s_per_byte``: what each byte sent costs the storage
    tier's compute beyond the encoding (writing frames to the network on
    the cores that compute), fitted from the frames' timings against the
    storage tier's own layer costs; 0 until measured.
    """

    model: str
    input_shape: tuple[int, ...]
    batch_size: int
    freeze: int
    layers: list[LayerProfile]
    boundary_bytes: list[int]
    activation_bytes: list[int]
    raw_bytes: float
    bandwidth_bytes_per_s: float
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
    wire_formats: dict = field(default_factory=dict)
    trainer_receive_s_per_byte: float = 0.0
    trainer_receive_s_per_sample: float = 0.0
    storage_send_s_per_byte: float = 0.0

    def __post_init__(self):
        self.input_shape = tuple(self.input_shape)
        self.wire_formats = costs_from_dict(self.wire_formats)
        for name, costs in self.wire_formats.items():
            if len(costs.bytes) != self.freeze + 1:
                raise ValueError(f"wire format {name} needs costs at the {self.freeze + 1} "
                                 f"boundaries up to the freeze index, got {len(costs.bytes)}")
        for name in ("trainer_receive_s_per_byte", "trainer_receive_s_per_sample",
                     "storage_send_s_per_byte"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.layers = [layer if isinstance(layer, LayerProfile) else LayerProfile(**layer)
                       for layer in self.layers]
        n = len(self.layers)
        if len(self.boundary_bytes) != n + 1 or len(self.activation_bytes) != n + 1:
            raise ValueError(f"{n} layers need {n + 1} boundary sizes, got "
                             f"{len(self.boundary_bytes)} and {len(self.activation_bytes)}")
        if not 0 <= self.freeze <= n:
            raise ValueError(f"freeze index {self.freeze} is outside [0, {n}]")
        if self.bandwidth_bytes_per_s <= 0:
            raise ValueError("bandwidth_bytes_per_s must be positive, got "
                             f"{self.bandwidth_bytes_per_s}")
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
        copy = replace(self, layers=[replace(layer) for layer in self.layers])
        freeze = changes.get("freeze", self.freeze)
        if freeze < self.freeze and "wire_formats" not in changes:
            # The formats' costs at the boundaries a lower freeze index still has.
            changes["wire_formats"] = {
                name: FormatCosts(*(values[:freeze + 1] for values in
                                    (c.bytes, c.encode_s, c.decode_s)))
                for name, c in self.wire_formats.items()}
        return replace(copy, **changes) if changes else copy

    def at_trainer_speed(self, factor: float) -> Profile:
        """A copy on a trainer ``factor`` times slower: its layers, its
        optimizer step and the wire formats' encode and decode (the cost
        model takes the storage tier's encode as the trainer's times the
        two tiers' speed ratio, which the trainer's speed changes)."""
        out = self.with_measurements(
            trainer_step_s=factor * self.trainer_step_s,
            wire_formats={name: costs.scaled(factor)
                          for name, costs in self.wire_formats.items()})
        for layer in out.layers:
            layer.trainer_forward_s *= factor
            if layer.trainer_train_s is not None:
                layer.trainer_train_s *= factor
        return out


# Trainer-side measurements -----------------------------------------------------------


@dataclass
class TrainerTimes:
    """Per-sample times of every layer on the trainer (see :func:`measure_trainer_layers`)."""

    forward_s: list[float]
    train_s: list[float | None]
    batch_size: int
    device: str
    iterations: int

    def scaled(self, factor: float) -> TrainerTimes:
        """These times on a trainer ``factor`` times slower (:func:`trainer_speed`)."""
        return replace(self, forward_s=[factor * s for s in self.forward_s],
                       train_s=[None if s is None else factor * s for s in self.train_s])


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
    float32 training batch: parse the frame, dequantize (uint8), concatenate,
    convert. Measured on a synthetic frame of ``nbytes`` features in the wire
    dtype (a few milliseconds)."""
    count = max(nbytes // wire.TORCH_DTYPES[wire_dtype].itemsize, 1)
    features = wire.pack_features(torch.zeros(2, count // 2 or 1), wire_dtype)
    blob = wire.encode_frame("batch", {"index": "0"}, features=features,
                             labels=torch.zeros(2, dtype=torch.int64))
    payload = blob[wire.LENGTH.size:]
    best = math.inf
    for _ in range(max(repeats, 1)):
        began = time.perf_counter()
        received = wire.decode_frame(payload).float_features()
        torch.cat([received, received[:1]]).to(torch.float32)
        best = min(best, time.perf_counter() - began)
    return best / features.tensors["features"].nbytes


def free_memory_bytes(device: str | torch.device = "cpu") -> int | None:
    """Free memory where ``device`` trains: ``torch.cuda.mem_get_info`` on a
    GPU, MemAvailable (Linux) on the CPU; None when it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return hostmem.available_memory_bytes()


def profile_from_model(model, *, input_shape: Sequence[int], freeze: int, batch_size: int,
                       trainer: TrainerTimes, raw_bytes: float, bandwidth_bytes_per_s: float,
                       wire_dtype: str = "float32", storage_s: Sequence[float | None] = (),
                       **measurements) -> Profile:
    """A :class:`Profile` for ``model`` (a :class:`hapi.zoo.LayeredModel`).

    Boundary sizes come from ``model.boundary_shapes`` at ``input_shape`` (the
    preset's ``(3, N, N)``), in the wire dtype (:func:`hapi.wire.feature_bytes`:
    uint8 adds each frame's scales and zero points) and in float32; the trainer's
    per-layer times from ``trainer``; ``storage_s`` gives the storage-side
    per-layer times measured so far (shorter than the model, or None entries,
    where not measured); any other :class:`Profile` field by keyword.
    """
    if wire_dtype not in wire.TORCH_DTYPES:
        raise ValueError(f"unknown wire dtype {wire_dtype!r}; known: "
                         f"{', '.join(wire.TORCH_DTYPES)}")
    input_shape = tuple(input_shape)
    frame_samples = measurements.get("storage_batch") or Profile.storage_batch
    storage = list(storage_s) + [None] * (len(model) - len(storage_s))
    layers = [LayerProfile(name=name, trainer_forward_s=trainer.forward_s[i],
                           trainer_train_s=trainer.train_s[i] if i >= freeze else None,
                           storage_s=storage[i] if i < freeze else None)
              for i, name in enumerate(model.layer_names)]
    return Profile(model=model.name, input_shape=tuple(input_shape), batch_size=batch_size,
                   freeze=freeze, layers=layers,
                   boundary_bytes=[math.ceil(wire.feature_bytes(shape, wire_dtype, frame_samples))
                                   for shape in model.boundary_shapes(input_shape)],
                   activation_bytes=model.boundary_bytes(input_shape, torch.float32),
                   raw_bytes=raw_bytes, bandwidth_bytes_per_s=bandwidth_bytes_per_s,
                   wire_dtype=wire_dtype,
                   trainer_device=trainer.device, **measurements)


def trainer_times(model, input_shape, freeze: int, batch_size: int, device, seed: int,
                  cache: TrainerTimesCache | None = None) -> tuple[TrainerTimes, bool]:
    """Every layer's per-sample time on the trainer at ``batch_size``.

    A batch up to :data:`PROFILE_BATCH` samples is timed as it is
    (:func:`measure_trainer_layers`): per-sample times change with the batch
    both ways, and by more than the differences between splits. A linear
    layer reads all its weights once per batch (AlexNet's first classifier
    layer takes twice the time for 8 samples as for 2, not four times),
    while a layer whose activations outgrow the processor's caches costs
    more per sample (on one core, resnet50's bn1 and layer1 blocks timed
    at 32 took 1.4-5.8x what times at 8 and 2 extrapolated, which put its
    iteration at split 0 at 0.91x its time, times at 32 at 1.04x:
    ``benchmarks/batch_times.py``). A larger batch
    is not timed, which would make profiling as long as training: the
    times at :data:`PROFILE_BATCH` and at a quarter of it are extrapolated
    (:func:`at_batch`). Each measured batch is read from ``cache`` when it
    holds it for this model, device and library versions, else measured
    and stored there. Returns (times, whether every measurement came from
    the cache)."""
    device = torch.device(device)
    if batch_size <= PROFILE_BATCH:
        return _times_at(model, input_shape, freeze, batch_size, device, seed, cache)
    large, large_cached = _times_at(model, input_shape, freeze, PROFILE_BATCH, device, seed,
                                    cache)
    small, small_cached = _times_at(model, input_shape, freeze, PROFILE_BATCH // 4, device,
                                    seed, cache)
    return at_batch(small, large, batch_size), large_cached and small_cached


def _times_at(model, input_shape, freeze, batch, device, seed, cache):
    def measure():
        inputs = torch.randn(batch, *input_shape,
                             generator=torch.Generator().manual_seed(seed))
        return measure_trainer_layers(model, inputs.to(device), freeze)

    return cached(cache, times_key(model, input_shape, freeze, batch, device), measure,
                  encode=asdict, decode=lambda doc: TrainerTimes(**doc))


def trainer_speed(model, input_shape, freeze: int, times: TrainerTimes, device, seed: int,
                  cache: TrainerTimesCache, *, times_cached: bool) -> float:
    """How many times slower than when its layer times ``times`` were
    measured the trainer runs now (below 1: faster): the forward of its
    first frozen layers that take :data:`SPEED_PASS_S` at
    :data:`SPEED_BATCH` samples by those times (all of them if they take less),
    the median of :data:`SPEED_PASSES` passes after an untimed one, against
    the same passes timed when ``times`` were. Those are stored in
    ``cache`` beside the times (:func:`speed_reference_key`): with times
    measured now (``times_cached`` false), the passes are timed and stored, and
    the speed is 1; so it is with cached times whose passes the cache does
    not hold. 1 too when no layer is frozen (there is no split to choose).

    Cached times describe the host as it was when they were measured; on a
    shared host its speed moves by more than the differences between
    splits (1.2-1.6x between one benchmark process and the next, on the
    storage tier and the trainer alike), and the storage tier's speed is
    measured now, from its frames: a trainer taken at its old speed makes
    the storage tier look slower than it is against it. A few
    milliseconds of the model's own layers tell the host's speed, where
    timing every layer again would cost what the cache saves. They are
    compared with the same passes timed with the times, not with the
    times themselves: layers timed one by one in another run (or at
    another batch) are another measurement, taken at another moment. The
    frozen layers stay in eval mode (:meth:`hapi.zoo.LayeredModel.freeze`):
    the passes change nothing in the model."""
    if freeze == 0:
        return 1.0
    device = torch.device(device)
    key = speed_reference_key(model, input_shape, freeze, times.batch_size, device)

    def measure() -> tuple[int, float]:
        totals = list(itertools.accumulate(times.forward_s[:freeze]))
        stop = next((i + 1 for i, total in enumerate(totals)
                     if total * SPEED_BATCH >= SPEED_PASS_S), freeze)
        return stop, _speed_passes(model, input_shape, stop, device, seed)

    def encode(passes: tuple[int, float]) -> dict:
        return {"stop": passes[0], "seconds": passes[1]}

    if not times_cached:
        cache.put(key, encode(measure()))
        return 1.0
    (stop, then), passes_cached = cached(cache, key, measure, encode=encode,
                                         decode=lambda doc: _passes(doc, freeze))
    if not passes_cached:
        return 1.0
    return _speed_passes(model, input_shape, stop, device, seed) / then


def _passes(doc: dict, freeze: int) -> tuple[int, float]:
    """The layers and the seconds of passes :func:`trainer_speed` stored;
    ValueError for passes over more layers than are frozen."""
    stop, seconds = doc["stop"], _seconds(doc)
    if type(stop) is not int or not 0 < stop <= freeze or seconds <= 0:
        raise ValueError(f"passes over {stop!r} of {freeze} layers in {seconds} s")
    return stop, seconds


def speed_reference_key(model, input_shape, freeze: int, batch: int, device) -> dict:
    """Where :func:`trainer_speed` keeps its passes' time: beside the
    layer times at ``batch`` (:func:`times_key`) they were timed with."""
    return {**times_key(model, input_shape, freeze, batch, device),
            "measurement": "speed passes", "passes": SPEED_PASSES, "pass_batch": SPEED_BATCH}


def _speed_passes(model, input_shape, stop: int, device, seed: int) -> float:
    """The median of :data:`SPEED_PASSES` timed forwards of ``model``'s
    first ``stop`` layers at :data:`SPEED_BATCH`, after an untimed one."""
    inputs = torch.randn(SPEED_BATCH, *input_shape,
                         generator=torch.Generator().manual_seed(seed)).to(device)
    seconds = []
    with torch.no_grad():
        for _ in range(1 + SPEED_PASSES):
            _sync(device)
            began = time.perf_counter()
            model(inputs, 0, stop)
            _sync(device)
            seconds.append(time.perf_counter() - began)
    return statistics.median(seconds[1:])


def at_batch(small: TrainerTimes, large: TrainerTimes, batch: int) -> TrainerTimes:
    """Per-sample times at ``batch`` from those measured at two smaller batches.

    Each layer's time per batch is taken as affine in the batch, ``T(n) =
    fixed + n * v`` (the fixed part: reading weights, launching kernels),
    through the two measurements: per sample at ``batch`` that is ``v +
    fixed / batch``. With ``v`` clamped at 0 and ``fixed`` anchored on the
    larger measurement (the steadier one, and the nearer to ``batch``), a
    layer whose per-sample time grew from the small batch to the large one
    keeps the large batch's, and none is predicted below ``v``."""
    if not small.batch_size < large.batch_size < batch:
        raise ValueError(f"extrapolating to batch {batch} needs two smaller measured "
                         f"batches, got {small.batch_size} and {large.batch_size}")

    def per_sample(low: float | None, high: float | None) -> float | None:
        if low is None or high is None:
            return None
        t_low, t_high = low * small.batch_size, high * large.batch_size
        slope = max((t_high - t_low) / (large.batch_size - small.batch_size), 0.0)
        fixed = max(t_high - large.batch_size * slope, 0.0)
        return min(slope + fixed / batch, high)

    return TrainerTimes(
        forward_s=[per_sample(lo, hi)
                   for lo, hi in zip(small.forward_s, large.forward_s, strict=True)],
        train_s=[per_sample(lo, hi) for lo, hi in zip(small.train_s, large.train_s, strict=True)],
        batch_size=batch, device=large.device, iterations=large.iterations)


def format_costs(model, inputs, config, cache: TrainerTimesCache | None = None):
    """The candidate wire formats' costs (:func:`measure_formats` on
    ``inputs``, the probe's images), from ``cache`` when it holds them for
    this model, data set, preset, freeze index, storage batch, device and
    library versions, else measured and stored there. Returns (costs by
    format name, whether they came from the cache)."""
    formats = candidate_formats(config.wire_dtype, config.wire_encoding)
    key = {**times_key(model, inputs.shape[1:], config.freeze, config.storage_batch,
                       inputs.device),
           "kind": "wire-formats", "container": config.container, "preset": config.preset,
           "formats": [f.name for f in formats], "hapi": hapi.__version__}
    return cached(cache, key,
                  lambda: measure_formats(model, inputs, config.freeze, formats,
                                          frame_samples=config.storage_batch),
                  encode=lambda costs: {name: cost.to_dict() for name, cost in costs.items()},
                  decode=costs_from_dict)


def measure_optimizer_step(params, optimizer, *, iterations: int = 3,
                           warmup: int = 1) -> float:
    """Seconds one step of ``optimizer`` (a callable: parameters in, a
    ``torch.optim.Optimizer`` out) takes over tensors shaped like ``params``.

    The step reads and writes every trainable parameter, its gradient and
    the optimizer's state (SGD's momentum, Adam's moments) once per
    iteration, whatever the batch: for AlexNet's trained classifier
    layers, 17 M parameters, 12-14 ms with SGD and momentum on one core. It runs on zeros
    of the same shapes, dtypes and devices (the values do not change its
    time; the model is not touched), after ``warmup`` untimed steps that
    allocate the state; the median of ``iterations`` timed steps."""
    if iterations < 1 or warmup < 0:
        raise ValueError("iterations must be >= 1 and warmup >= 0")
    stand_ins = [torch.zeros_like(p, requires_grad=True) for p in params]
    if not stand_ins:
        return 0.0
    for tensor in stand_ins:
        tensor.grad = torch.zeros_like(tensor)
    step = optimizer(stand_ins).step
    devices = {tensor.device for tensor in stand_ins}
    times = []
    for iteration in range(warmup + iterations):
        for device in devices:
            _sync(device)
        began = time.perf_counter()
        step()
        for device in devices:
            _sync(device)
        if iteration >= warmup:
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def optimizer_step_s(model, input_shape, config, device, optimizer,
                     cache: TrainerTimesCache | None = None) -> tuple[float, bool]:
    """:func:`measure_optimizer_step` over the trainable parameters of
    ``model`` (those of its layers from the freeze index), from ``cache``
    when it holds it for this model, freeze index, device, library versions
    and optimizer settings, else measured and stored there. Returns
    (seconds, whether it came from the cache)."""
    key = {**times_key(model, input_shape, config.freeze, config.batch_size, device),
           "kind": "optimizer-step", "optimizer": config.optimizer,
           "momentum": config.momentum, "weight_decay": config.weight_decay}

    def measure():
        params = [p for layer in model.layers[config.freeze:] for p in layer.parameters()
                  if p.requires_grad]
        return measure_optimizer_step(params, optimizer)

    return cached(cache, key, measure, encode=lambda seconds: {"seconds": seconds},
                  decode=_seconds)


def _seconds(doc: dict) -> float:
    if not isinstance(doc["seconds"], float):
        raise TypeError(f"seconds must be a float, got {doc['seconds']!r}")
    return doc["seconds"]


def measure_profile(model, config, plan, conn, link, cache: TrainerTimesCache | None = None,
                    optimizer=None):
    """What the trainer measures before its first request, as a
    :class:`Profile`: every layer's time here (:func:`trainer_times`, from
    ``cache`` when it has them, then scaled to the trainer's speed now,
    :func:`trainer_speed`, as are the cached wire formats' times and
    optimizer step), with ``optimizer`` (the run's, as
    :func:`measure_optimizer_step` takes it) its step's time
    (:func:`optimizer_step_s`, which stands until the run times its own
    steps; without it, 0), the boundary sizes, the bytes per raw sample,
    vanilla's decode time on the first images of a typical shard
    (a ranged GET of :data:`PROBE_SAMPLES` samples' bytes, at least
    :data:`PROBE_MIN_BYTES`, on its way while the layers are timed; its
    transfer goes to ``link``, a
    :class:`hapi.client.autosplit.estimator.LinkClock`, and gives the first
    bandwidth), every candidate wire format's bytes and costs on those
    images (:func:`hapi.client.autosplit.wireformats.measure_formats`), the
    cost of copying received features, free memory.
    Returns (profile, what the probe cost)."""
    side = preset_size(config.preset)
    input_shape = (3, side, side)
    device = torch.device(config.device)
    refs = plan.train + plan.holdout
    probe = sorted(refs, key=lambda ref: ref.bytes)[len(refs) // 2]  # a typical shard
    per_sample = probe.bytes / max(probe.samples, 1)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hapi-probe") as pool:
        # The probe waits on the link while the trainer times its layers on
        # its cores: on a slow link its bytes take longer than the timing.
        fetching = pool.submit(data.leading_samples, conn, config.container, probe,
                               max(math.ceil(PROBE_SAMPLES * per_sample + 2048),
                                   PROBE_MIN_BYTES))
        began = time.perf_counter()
        trainer, cached = trainer_times(model, input_shape, config.freeze, config.batch_size,
                                        device, config.seed, cache)
        speed = trainer_speed(model, input_shape, config.freeze, trainer, device, config.seed,
                              cache, times_cached=cached)
        step_s, step_cached = optimizer_step_s(model, input_shape, config, device, optimizer,
                                               cache) if optimizer else (0.0, False)
        trainer_s = time.perf_counter() - began
        try:
            images, transfer = fetching.result()
        except ClientException as err:
            raise data.storage_error(err, config.container, probe.name) from None
    if not images:
        raise data.DataError(f"{config.container}/{probe.name}: no whole image in its first "
                             f"{transfer.nbytes} bytes (is it a tar shard?)")
    link.observe(transfer)
    # A probe that arrived all at once timed nothing: the link is faster
    # than it can tell, and its whole body's rate stands in until the stream
    # measures the link.
    bandwidth = link.estimator.bandwidth_bytes_per_s or \
        transfer.nbytes / max(transfer.done_at - transfer.answered_at, MIN_PROBE_S)
    try:
        decode_s, _ = measure_decode(images, config.preset, config.model, repeats=3)
        inputs = preprocess(images, config.preset, config.model)
    except DecodeError as err:
        raise data.DataError(f"{config.container}/{probe.name}: image {err.index + 1} of the "
                             f"shard does not decode: {err}") from None
    began_formats = time.perf_counter()
    formats, formats_cached = format_costs(model, inputs.to(device), config, cache)
    formats_s = time.perf_counter() - began_formats
    if formats_cached:
        formats = {name: costs.scaled(speed) for name, costs in formats.items()}
    memory_dtype = pinned(config.wire_dtype, names.DEFAULT_WIRE_DTYPE)
    profile = profile_from_model(
        model, input_shape=input_shape, freeze=config.freeze, batch_size=config.batch_size,
        trainer=trainer.scaled(speed),
        raw_bytes=sum(r.bytes for r in refs) / sum(r.samples for r in refs),
        bandwidth_bytes_per_s=bandwidth, wire_dtype=memory_dtype,
        trainer_decode_s=decode_s, trainer_step_s=speed * step_s if step_cached else step_s,
        trainer_copy_s_per_byte=measure_copy_rate(wire_dtype=memory_dtype),
        samples_per_request=round(sum(r.samples for r in refs) / len(refs)),
        storage_batch=config.storage_batch, prefetch_depth=config.prefetch,
        trainer_free_bytes=free_memory_bytes(device),
        trainer_host_free_bytes=free_memory_bytes("cpu") if device.type == "cuda" else None,
        epoch_samples=plan.train_samples, wire_formats=formats)
    return profile, {"probe_shard": probe.name, "probe_bytes": transfer.nbytes,
                     "probe_images": len(images),
                     "trainer_times": "cached" if cached else "measured",
                     "trainer_times_s": trainer_s, "trainer_times_batch": trainer.batch_size,
                     "trainer_speed": speed, "allocator": hostmem.allocator(),
                     "optimizer_step_s": step_s,
                     "optimizer_step": ("cached" if step_cached else "measured") if optimizer
                     else None,
                     "wire_formats": list(formats), "wire_formats_s": formats_s,
                     "wire_formats_costs": "cached" if formats_cached else "measured"}
