"""The feature-extraction engine shared by the Swift filter and the standalone server.

It owns what is expensive and must happen once per process (models on their
device, built with their weights and cached) and the per-batch work: decode,
preprocess, run layers [0, split) in eval mode without gradients, encode a
frame. Its methods are plain blocking calls: the caller decides where they
run (``eventlet.tpool`` in the proxy, an executor thread in the server) and
owns the concurrency around them.

Both front ends also share from here what they must answer alike: the
operator's options (:class:`Settings`), the response headers, the cache key
of a request's model, and the mapping of failures to an HTTP status with a
JSON body (:class:`RequestError`) or, once the stream has started, to an
error frame (:func:`stream_error_frame`).

Memory: the engine knows what a request costs (:meth:`FeatureEngine.memory_cost`)
and how much the requests may hold (:meth:`FeatureEngine.memory_capacity`);
the front ends admit requests against that with
:class:`hapi.middleware.admission.MemoryBudget`.
"""

import json
import os
import re
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hapi import protocol, wire, zoo
from hapi import weights as weights_mod
from hapi.middleware.admission import MemoryBudget, MemoryCost, OverBudget
from hapi.preprocess import DecodeError, check_image, preprocess, preset_size
from hapi.shards import ShardError, read_shard
from hapi.weights import WeightsError

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# The operator's options and their defaults: the filter's [filter:hapi] section
# and the standalone server's [hapi] section take the same names.
OPTION_DEFAULTS = {
    "device": "auto",
    "max_batch": 256,
    "default_batch": 32,
    "max_concurrent": 4,
    "threads": 0,
    "weights_dir": "",
    "max_shard_bytes": 1 << 28,
    "max_image_pixels": 40_000_000,
    "max_cached_models": 4,
    "models": "",
    "memory_budget": "auto",
    "queue_timeout": 10,
    "min_batch": 1,
}

# memory_budget = auto on the CPU: this share of MemAvailable when the process
# starts (DEFAULT_CPU_BUDGET where /proc/meminfo is missing).
AUTO_BUDGET_SHARE = 0.5
DEFAULT_CPU_BUDGET = 2 << 30
# On a GPU, the share of the device's memory never handed out: the CUDA
# context, cuDNN workspaces and the caching allocator's fragmentation.
CUDA_MARGIN_SHARE = 0.1
# Batch sizes of the forwards whose peak memory is traced (and measured on a
# GPU) to fit a request's cost, fixed + per sample * batch.
MEASURED_BATCHES = (1, 4)
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)


class WeightsNotFound(LookupError):
    """A weights reference names nothing this server can load."""


@dataclass(frozen=True)
class Settings:
    """The operator's options, parsed once for the filter or the server."""

    limits: protocol.Limits
    max_concurrent: int
    max_shard_bytes: int
    device: str
    threads: int
    weights_dir: str
    max_image_pixels: int
    max_cached_models: int
    memory_budget: int | None
    queue_timeout: float
    min_batch: int

    @classmethod
    def from_conf(cls, conf):
        """Parse a mapping of option names to strings; absent options take
        :data:`OPTION_DEFAULTS`. Raises ValueError naming a bad option."""
        def get(name):
            return str(conf.get(name, OPTION_DEFAULTS[name])).strip()

        def integer(name, minimum=1):
            try:
                value = int(get(name))
            except ValueError:
                value = minimum - 1
            if value < minimum:
                raise ValueError(f"option {name} must be an integer >= {minimum}, "
                                 f"got {get(name)!r}")
            return value

        try:
            queue_timeout = float(get("queue_timeout"))
        except ValueError:
            queue_timeout = -1.0
        if not 0 <= queue_timeout < float("inf"):
            raise ValueError(f"option queue_timeout must be a number of seconds >= 0, "
                             f"got {get('queue_timeout')!r}")
        models = tuple(zoo.canonical_name(m.strip()) for m in get("models").split(",")
                       if m.strip())
        limits = protocol.Limits(max_batch=integer("max_batch"),
                                 default_batch=integer("default_batch"),
                                 models=models or tuple(zoo.MODELS),
                                 weights_dir_enabled=bool(get("weights_dir")))
        if limits.default_batch > limits.max_batch:
            raise ValueError(f"option default_batch ({limits.default_batch}) is above "
                             f"max_batch ({limits.max_batch})")
        min_batch = integer("min_batch")
        if min_batch > limits.max_batch:
            raise ValueError(f"option min_batch ({min_batch}) is above "
                             f"max_batch ({limits.max_batch})")
        return cls(limits=limits, max_concurrent=integer("max_concurrent"),
                   max_shard_bytes=integer("max_shard_bytes"), device=get("device"),
                   threads=integer("threads", minimum=0), weights_dir=get("weights_dir"),
                   max_image_pixels=integer("max_image_pixels"),
                   max_cached_models=integer("max_cached_models"),
                   memory_budget=parse_memory_budget(get("memory_budget")),
                   queue_timeout=queue_timeout, min_batch=min_batch)

    def make_engine(self):
        return FeatureEngine(device=self.device, threads=self.threads,
                             max_image_pixels=self.max_image_pixels,
                             weights_dir=self.weights_dir,
                             max_cached_models=self.max_cached_models,
                             memory_budget=self.memory_budget)

    def make_budget(self, engine):
        """The admission bookkeeping of one front end, over ``engine``'s memory."""
        return MemoryBudget(engine.memory_capacity, min_batch=self.min_batch,
                            queue_timeout=self.queue_timeout)


def parse_memory_budget(text):
    """``auto`` (None) or a size in bytes: digits with an optional k, M, G or
    T suffix (powers of 1024; a trailing B or iB is allowed)."""
    if text.lower() == "auto":
        return None
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"option memory_budget must be 'auto' or a size such as 512M or "
                         f"2G, got {text!r}")
    number, unit = match.groups()
    size = int(float(number) * 1024 ** " kmgt".index(unit.lower() or " "))
    if size <= 0:
        raise ValueError(f"option memory_budget must be above zero, got {text!r}")
    return size


def auto_cpu_budget():
    """:data:`AUTO_BUDGET_SHARE` of the memory available now, from /proc/meminfo."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * AUTO_BUDGET_SHARE)
    except OSError:
        pass
    return DEFAULT_CPU_BUDGET


class LiveBytes(TorchDispatchMode):
    """While active in a thread, the peak of the bytes held by the tensors
    that ops create there, each storage counted once (views and in-place
    results share their input's) and forgotten once freed. On the meta
    device it traces a forward's memory without running it."""

    def __init__(self):
        super().__init__()
        self.peak = 0
        self._live = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._live = {ref: size for ref, size in self._live.items() if not ref.expired()}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                self._live.setdefault(StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(self._live.values()))
        return out


@dataclass(frozen=True)
class ForwardTrace:
    """Bytes of one batch's forward, from :func:`trace_forward`."""

    peak: int  # input, layers [0, split) and the wire-dtype copy, temporaries included
    input: int  # the preprocessed float32 batch
    output: int  # the float32 features
    wire: int  # the features in the wire dtype


def trace_forward(name, size, split, dtype, batches=MEASURED_BATCHES):
    """Trace layers [0, split) of ``name`` and the cast to the wire ``dtype``
    on the meta device, for a batch of each size in ``batches`` of images of
    ``size`` px: every tensor the ops create is counted, no weights are built
    and nothing runs. A :class:`ForwardTrace` per batch size."""
    with torch.device("meta"):
        model = zoo.build_model(name)
    traces = {}
    for batch in batches:
        trace = LiveBytes()
        with torch.inference_mode(), trace:
            x = torch.empty((batch, 3, size, size), device="meta")
            input_bytes = x.nbytes
            for layer in model.layers[:split]:
                x = layer(x)
            wire = x.to(WIRE_DTYPES[dtype])
        traces[batch] = ForwardTrace(peak=trace.peak, input=input_bytes, output=x.nbytes,
                                     wire=wire.nbytes)
    return traces


def cpu_request_peak(trace):
    """Bytes one batch holds on the CPU at the peak of :meth:`FeatureEngine.extract`:
    the largest of its three moments (preprocessing: the per-image tensors
    and their stacked batch; the forward with the wire-dtype copy; encoding:
    the features, their wire copy when the dtype changes, the safetensors
    blob and the length-prefixed frame), plus the previous frame, still
    being sent while this batch is computed."""
    cast = trace.wire if trace.wire != trace.output else 0  # float32 on the wire: no copy
    encode = trace.output + cast + 2 * trace.wire
    return max(2 * trace.input, trace.peak, encode) + trace.wire


def tensor_bytes(module):
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size()
               for t in (*module.parameters(), *module.buffers()))


def resolve_device(name):
    """``auto`` means the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


class FeatureEngine:
    """``memory_budget``: bytes that cached models and requests may hold
    together; None (``auto``) means the free device memory less a margin on a
    GPU, and :func:`auto_cpu_budget` on the CPU."""

    def __init__(self, device="auto", threads=0, max_image_pixels=40_000_000,
                 weights_dir="", max_cached_models=4, memory_budget=None):
        self.device = resolve_device(device)
        if threads > 0:
            torch.set_num_threads(threads)
        self.max_image_pixels = max_image_pixels
        self.weights_dir = weights_dir
        self.max_cached_models = max_cached_models
        if memory_budget is None and self.device.type == "cpu":
            memory_budget = auto_cpu_budget()
        self.memory_budget = memory_budget
        self._models = OrderedDict()
        self._model_bytes = {}
        # A running total, so that the front end's thread reads it while a
        # worker thread loads a model.
        self.resident_bytes = 0
        self._layer_counts = {}
        self._costs = {}

    # Models -------------------------------------------------------------

    def layer_count(self, name):
        """Number of layers of a zoo model, from a weightless build on the meta device."""
        if name not in self._layer_counts:
            with torch.device("meta"):
                self._layer_counts[name] = len(zoo.build_model(name))
        return self._layer_counts[name]

    def cached_model(self, key):
        model = self._models.get(key)
        if model is not None:
            self._models.move_to_end(key)
        return model

    def load_model(self, key, name, weights_ref, fetched_bytes=None):
        """Build ``name`` with the weights ``weights_ref`` names, put it on the
        device, and cache it under ``key`` (the model name plus a weights
        identity that changes when the weights do).

        ``fetched_bytes`` carries the content of a ``swift:`` reference,
        which the caller read with the requester's own access.
        """
        model = self.cached_model(key)
        if model is not None:
            return model
        if weights_ref.kind == "seed":
            model = zoo.build_model(name, seed=int(weights_ref.value))
        else:
            model = zoo.build_model(name, state_dict=self._state_dict(name, weights_ref,
                                                                      fetched_bytes))
        model = model.to(self.device).eval().requires_grad_(False)
        self._models[key] = model
        self._model_bytes[key] = tensor_bytes(model)
        self.resident_bytes += self._model_bytes[key]
        while len(self._models) > self.max_cached_models:
            evicted, _ = self._models.popitem(last=False)
            self.resident_bytes -= self._model_bytes.pop(evicted)
        return model

    def weights_file(self, name):
        """Path of a ``file:`` reference, confined to the operator's weights_dir."""
        if not self.weights_dir:
            raise WeightsNotFound("file weights are not enabled on this server")
        root = os.path.realpath(self.weights_dir)
        path = os.path.realpath(os.path.join(root, name))
        if os.path.dirname(path) != root or not os.path.isfile(path):
            raise WeightsNotFound(f"no weights file {name!r} on this server")
        return path

    def _state_dict(self, name, weights_ref, fetched_bytes):
        if weights_ref.kind == "pretrained":
            return weights_mod.pretrained_state_dict(name)
        if weights_ref.kind == "file":
            with open(self.weights_file(weights_ref.value), "rb") as f:
                fetched_bytes = f.read()
        return weights_mod.load_state_dict_bytes(fetched_bytes, source=str(weights_ref))

    # Memory -------------------------------------------------------------

    def memory_capacity(self):
        """Bytes the requests may hold now: the budget less the cached models.

        On a GPU the budget is what this process could allocate (the device's
        free memory plus what torch's caching allocator already holds) less
        :data:`CUDA_MARGIN_SHARE` of the device, and never above an explicit
        memory_budget. Cheap: the front ends call it on every admission.
        """
        budget = self.memory_budget
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            usable = free + torch.cuda.memory_reserved(self.device) - int(CUDA_MARGIN_SHARE * total)
            budget = usable if budget is None else min(budget, usable)
        return max(0, budget - self.resident_bytes)

    def memory_cost(self, model, request):
        """The bytes ``request`` holds at storage batch b, as a :class:`MemoryCost`
        fitted to the peaks at :data:`MEASURED_BATCHES`, cached per model,
        split, preset size and wire dtype. Blocking: run it in a worker thread.

        On the CPU the peaks come from :func:`trace_forward` (see
        :func:`cpu_request_peak`). On a GPU they are measured: the peak memory
        torch allocates for the forward and the wire-dtype copy. Other
        requests running on the device meanwhile can only blur that reading,
        so it never counts for less than the trace of the same forward.
        Not counted: one decoded image at a time (bounded by
        max_image_pixels), the shard's bytes (bounded by max_shard_bytes),
        work buffers of the kernels themselves.
        """
        size = preset_size(request.preset)
        key = (request.model, request.split, size, request.dtype)
        cost = self._costs.get(key)
        if cost is None:
            traces = trace_forward(request.model, size, request.split, request.dtype)
            if self.device.type == "cuda":
                measured = MemoryCost.fit({batch: self._device_peak(model, request, size, batch)
                                           for batch in MEASURED_BATCHES})
                traced = MemoryCost.fit({batch: t.peak for batch, t in traces.items()})
                cost = MemoryCost(max(measured.fixed, traced.fixed),
                                  max(measured.per_sample, traced.per_sample))
            else:
                cost = MemoryCost.fit({batch: cpu_request_peak(t) for batch, t in traces.items()})
            self._costs[key] = cost
        return cost

    def _device_peak(self, model, request, size, batch):
        """Peak bytes torch allocates on the GPU for one batch of ``request``."""
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        with torch.inference_mode():
            x = torch.zeros((batch, 3, size, size), device=self.device)
            for layer in model.layers[:request.split]:
                x = layer(x)
            x.to(WIRE_DTYPES[request.dtype])
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - base

    # Shards -------------------------------------------------------------

    def response_headers(self, feature_req, samples):
        """The headers of a feature stream's 200 response."""
        return {
            "Content-Type": protocol.CONTENT_TYPE,
            protocol.DEVICE: str(self.device),
            protocol.BATCH_USED: str(feature_req.batch),
            protocol.SAMPLES: str(samples),
            protocol.SPLIT: str(feature_req.split),
            protocol.MODEL: feature_req.model,
        }

    def open_shard(self, data, preset=None):
        """Parse a shard and check every image's header (format, pixel count,
        and with ``preset`` the size the preset would resize it to) before
        any work starts, so most bad input fails before the response status
        is sent. Raises ShardError naming the member."""
        samples = read_shard(data)
        for sample in samples:
            try:
                check_image(sample.image, self.max_image_pixels, preset)
            except DecodeError as err:
                raise ShardError(str(err), f"{sample.key}.{sample.ext}") from None
        return samples

    def extract(self, model, samples, request, index):
        """Run one storage batch: decode, preprocess, layers [0, split); return a frame."""
        start = time.perf_counter()
        try:
            x = preprocess([s.image for s in samples], request.preset, request.model,
                           self.max_image_pixels)
        except DecodeError as err:
            bad = samples[err.index]
            raise ShardError(str(err), f"{bad.key}.{bad.ext}") from None
        # No other reference to the input: the first layer's output replaces it,
        # as in trace_forward.
        x = x.to(self.device, non_blocking=True)
        decoded = time.perf_counter()
        layer_times = []
        with torch.inference_mode():
            for layer in model.layers[:request.split]:
                t0 = time.perf_counter()
                x = layer(x)
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)
                layer_times.append(time.perf_counter() - t0)
            computed = time.perf_counter()
            features = x.to(WIRE_DTYPES[request.dtype]).cpu()
        timings = {"decode_s": decoded - start, "layers_s": layer_times,
                   "to_wire_s": time.perf_counter() - computed}
        return wire.encode_frame(
            "batch",
            {"index": str(index), "keys": [s.key for s in samples], "timings": timings},
            features=features,
            labels=torch.tensor([s.label for s in samples]))


def model_key(feature_req, swift_path=None, swift_etag=None):
    """Cache key of a request's model: its name and an identity of its weights.

    A ``swift:`` weights object is identified by its path and ETag (from a
    HEAD made with the caller's access), so replacing the object replaces
    the model; other references identify themselves.
    """
    if feature_req.weights.kind == "swift":
        return feature_req.model, f"{swift_path}@{swift_etag}"
    return feature_req.model, str(feature_req.weights)


def summary_line(path, request, asked, samples, bytes_in, bytes_out, seconds, outcome):
    """The log line of a feature request that was answered with a stream, the
    same in the filter's and the server's logs. ``path`` is quoted, so an
    object name cannot forge log lines."""
    return (f"{quote(path)} model={request.model} split={request.split} "
            f"batch={request.batch} (asked {asked}) samples={samples} bytes_in={bytes_in} "
            f"bytes_out={bytes_out} seconds={seconds:.3f} outcome={outcome}")


def refusal_line(path, status, body):
    """The log line of a feature request refused with ``status`` and the JSON
    ``body`` (or Swift's own refusal), the same in the filter and the server."""
    return f"{quote(path)} refused {status}: {body}"


def quote(path):
    """``path`` (a native string) %-encoded for a log line."""
    return urllib.parse.quote(path.encode("utf-8", "surrogateescape"), safe="/")


def split_batches(samples, batch):
    return [samples[i:i + batch] for i in range(0, len(samples), batch)]


class RequestError(Exception):
    """A feature request refused before its stream starts: an HTTP status and
    the fields of its JSON body (``error`` plus the culprit: ``parameter``,
    ``member``...). The filter and the server each turn it into a response of
    their framework, so both answer every failure with the same status and body.
    """

    def __init__(self, status, message, retry_after=1, **fields):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.fields = {"error": message, **fields}

    @property
    def body(self):
        return json.dumps(self.fields).encode()

    @property
    def headers(self):
        return {"Retry-After": str(self.retry_after)} if self.status == 503 else {}

    @classmethod
    def from_exception(cls, err):
        """The answer to one of :data:`REQUEST_FAILURES` raised before the stream."""
        if isinstance(err, protocol.BadParameter):
            return cls(400, err.message, parameter=err.parameter)
        if isinstance(err, (WeightsError, WeightsNotFound)):
            return cls(400, str(err), parameter=protocol.WEIGHTS)
        if isinstance(err, ShardError):
            return cls(422, str(err), member=err.member)
        if isinstance(err, OverBudget):
            return cls(503, str(err), retry_after=err.retry_after, **err.fields)
        raise TypeError(f"no HAPI answer for {type(err).__name__}") from err

    @classmethod
    def not_an_object(cls):
        return cls(400, "HAPI requests must GET an object", parameter=protocol.MODEL)

    @classmethod
    def at_capacity(cls, max_concurrent):
        return cls(503, "HAPI is at capacity; retry later", max_concurrent=max_concurrent)

    @classmethod
    def too_large(cls, path, length, max_shard_bytes):
        return cls(413, f"{path} is {length} bytes, above max_shard_bytes {max_shard_bytes}")

    @classmethod
    def weights_refused(cls, path, status, status_line):
        """Swift refused the caller's own read of a ``swift:`` weights object
        (401 or 403): Swift's status, with a body that names the parameter
        (the refusal of a HEAD has no body of its own to pass on)."""
        return cls(status, f"weights object {path} is not readable by this caller: "
                   f"{status_line}", parameter=protocol.WEIGHTS)

    @classmethod
    def weights_unreadable(cls, path, status_line):
        """A ``swift:`` weights object Swift would not serve for a reason
        other than the caller's access (401 and 403 pass through)."""
        return cls(400, f"weights object {path} could not be read: {status_line}",
                   parameter=protocol.WEIGHTS)


# What bad input raises before a stream starts; RequestError.from_exception maps them.
REQUEST_FAILURES = (protocol.BadParameter, WeightsError, WeightsNotFound, ShardError,
                    OverBudget)


def stream_error_frame(err):
    """The last frame of a stream that failed after its 200 status went out."""
    if isinstance(err, ShardError):
        return error_frame(422, str(err), err.member)
    return error_frame(500, f"feature extraction failed: {type(err).__name__}")


def end_frame(samples, batches, elapsed_s):
    return wire.encode_frame("end", {"samples": str(samples), "batches": str(batches),
                                     "elapsed_s": json.dumps(elapsed_s)})


def error_frame(status, message, member=None):
    meta = {"status": str(status), "message": message}
    if member:
        meta["member"] = member
    return wire.encode_frame("error", meta)
