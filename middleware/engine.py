"""The feature-extraction engine: what the storage tier computes.

It owns what is expensive and must happen once per process (models on their
device, built with their weights and cached: :mod:`hapi.middleware.model_cache`)
and the per-batch work: decode, preprocess, run layers [0, split) in eval mode
without gradients, encode a frame, each frame in one of the device's
first-come-first-served slots (:mod:`hapi.middleware.device`). Its methods
are plain blocking calls made from worker threads (``eventlet.tpool`` in the
proxy, an executor in the server). The steps of a feature request around
them are :mod:`hapi.middleware.pipeline`.

Memory: the engine knows what a request costs (:meth:`FeatureEngine.memory_cost`,
from :mod:`hapi.middleware.memory`) and how much the requests may hold
(:meth:`FeatureEngine.memory_capacity`); requests are admitted against that
by :class:`hapi.middleware.admission.MemoryBudget`.
"""

import os
import statistics
import threading
import time
from collections import deque

import torch

from hapi import protocol, wire, zoo
from hapi import weights as weights_mod
from hapi.middleware.admission import MemoryCost
from hapi.middleware.device import (
    LAYOUT,
    DeviceSlots,
    device_capacity,
    frame_priority,
    resolve_device,
)
from hapi.middleware.memory import (
    CUDA_MARGIN_SHARE,
    MEASURED_BATCHES,
    auto_cpu_budget,
    cpu_request_peak,
    trace_splits,
)
from hapi.middleware.model_cache import ModelCache
from hapi.preprocess import DecodeError, check_image, preprocess, preset_size
from hapi.shards import ShardError, read_shard
from hapi.weights import WeightsNotFound

# The layer costs served follow the frames: each layer's cost is the median
# per-sample time of the last COST_WINDOW whole frames that ran it, once
# COST_MIN_FRAMES did; before that, the one-off measurement.
COST_WINDOW = 16
COST_MIN_FRAMES = 3


def timed_layer(layer, x):
    """``layer(x)`` and the seconds it took, the device synchronised."""
    t0 = time.perf_counter()
    y = layer(x)
    if y.is_cuda:
        torch.cuda.synchronize(y.device)
    return y, time.perf_counter() - t0


class FeatureEngine:
    """``memory_budget``: bytes that cached models and requests may hold
    together; None (``auto``) means the free device memory less a margin on a
    GPU, and :func:`auto_cpu_budget` on the CPU. ``threading_module`` gives
    the locks of OS threads (eventlet's original ``threading`` in the proxy)."""

    def __init__(self, device="auto", threads=0, max_image_pixels=40_000_000,
                 weights_dir="", max_cached_models=4, memory_budget=None,
                 threading_module=threading):
        self.device = resolve_device(device)
        if threads > 0:
            torch.set_num_threads(threads)
        self.slots = DeviceSlots(device_capacity(self.device), threading_module)
        self.max_image_pixels = max_image_pixels
        self.weights_dir = weights_dir
        if memory_budget is None and self.device.type == "cpu":
            memory_budget = auto_cpu_budget()
        self.memory_budget = memory_budget
        self.models = ModelCache(max_cached_models, threading_module)
        self._layer_counts = {}
        self._costs = {}
        self._traces = {}
        self._traces_lock = threading_module.Lock()
        self._layer_costs = {}
        self._frame_costs = {}  # (model, size, batch) -> per layer, per-sample seconds
        self._frame_costs_lock = threading_module.Lock()

    # Models -------------------------------------------------------------

    @property
    def resident_bytes(self):
        return self.models.resident_bytes

    def layer_count(self, name):
        """Number of layers of a zoo model, from a weightless build on the meta device."""
        if name not in self._layer_counts:
            with torch.device("meta"):
                self._layer_counts[name] = len(zoo.build_model(name))
        return self._layer_counts[name]

    def cached_model(self, key):
        return self.models.get(key)

    def load_model(self, key, name, weights_ref, fetched_bytes=None):
        """The model cached under ``key`` (the model name plus a weights
        identity that changes when the weights do), built with the weights
        ``weights_ref`` names and put on the device when it is not cached.

        ``fetched_bytes`` carries the content of a ``swift:`` reference,
        which the caller read with the requester's own access.
        """
        def build():
            if weights_ref.kind == "seed":
                with self.models.random_lock:
                    model = zoo.build_model(name, seed=int(weights_ref.value))
            else:
                state = self._state_dict(name, weights_ref, fetched_bytes)
                model = zoo.build_model(name, state_dict=state)
            return model.to(self.device, memory_format=LAYOUT).eval().requires_grad_(False)

        return self.models.get_or_build(key, build)

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

    # Layer costs --------------------------------------------------------

    def layer_costs(self, model, request):
        """Per-sample seconds of each layer of the model on this device, at
        the request's preset size and storage batch: measured once per
        (model, size, batch), with a batch of zeros, in a device slot.
        The trainer reads them (``/hapi/costs``, :meth:`known_layer_costs`)
        to choose a split before its first feature request. Blocking: run
        it in a worker thread.

        One untimed pass comes first: a shape's first pass also pays for
        allocating its buffers and building its kernels (oneDNN primitives
        on the CPU, cuDNN's and the CUDA context's on a GPU), which put
        AlexNet at batch 32 on one core 27% above its steady cost and
        shifted the cost between layers."""
        size = preset_size(request.preset)
        key = (request.model, size, request.batch)
        costs = self._layer_costs.get(key)
        if costs is None:
            with self.slots.slot(), torch.inference_mode():
                x = torch.zeros((request.batch, 3, size, size), device=self.device)
                x = x.contiguous(memory_format=LAYOUT)
                for _ in range(2):  # the second pass's times are kept
                    y, layer_times = x, []
                    for layer in model.layers:
                        y, seconds = timed_layer(layer, y)
                        layer_times.append(seconds)
            costs = self._layer_costs[key] = [t / request.batch for t in layer_times]
        return costs

    def known_layer_costs(self, name, preset, batch):
        """The costs :meth:`layer_costs` measured, or None when it did not;
        each layer's replaced by the median of the frames that ran it
        (:data:`COST_WINDOW`, :data:`COST_MIN_FRAMES`).

        One pass of a batch of zeros, timed when the model first ran, put
        AlexNet's storage tier at batch 2 about 20% above what its frames
        then measured, enough to tip the trainer's first decision towards a
        split that leaves the storage tier less to do."""
        key = (name, preset_size(preset), batch)
        costs = self._layer_costs.get(key)
        if costs is None:
            return None
        with self._frame_costs_lock:
            observed = [list(times) for times in self._frame_costs.get(key, ())]
        return [statistics.median(observed[i])
                if i < len(observed) and len(observed[i]) >= COST_MIN_FRAMES else cost
                for i, cost in enumerate(costs)]

    def _observe_frame(self, request, samples, layer_times):
        """Keep a whole frame's per-sample layer times for the served costs."""
        if samples != request.batch:
            return
        key = (request.model, preset_size(request.preset), request.batch)
        with self._frame_costs_lock:
            observed = self._frame_costs.setdefault(key, [])
            observed.extend(deque(maxlen=COST_WINDOW)
                            for _ in range(len(layer_times) - len(observed)))
            for times, seconds in zip(observed, layer_times, strict=False):
                times.append(seconds / samples)

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

        On the CPU the peaks come from :func:`trace_splits` (see
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
            traces = self._split_traces(request.model, size, request.dtype)[request.split]
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

    def _split_traces(self, name, size, dtype):
        """:func:`trace_splits` of a model, preset size and wire dtype, traced
        once: the first requests of a job arrive together, and each tracing
        the same forward side by side would hold all of them back on the
        storage tier's cores (a trace takes 0.1-1 s of one core)."""
        key = (name, size, dtype)
        with self._traces_lock:
            traces = self._traces.get(key)
            if traces is None:
                traces = self._traces[key] = trace_splits(name, size, dtype)
        return traces

    def _device_peak(self, model, request, size, batch):
        """Peak bytes torch allocates on the GPU for one batch of ``request``."""
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        with torch.inference_mode():
            x = torch.zeros((batch, 3, size, size), device=self.device)
            for layer in model.layers[:request.split]:
                x = layer(x)
            wire.to_wire_dtype(x, request.dtype)
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - base

    # Shards -------------------------------------------------------------

    def open_shard(self, data, preset=None):
        """Parse a shard and check every image's header (format, pixel count,
        and with ``preset`` the size the preset would resize it to) before
        any work starts, so most bad input fails before the response status
        is sent. Raises ShardError naming the member."""
        with self.slots.slot():
            samples = read_shard(data)
            for sample in samples:
                try:
                    check_image(sample.image, self.max_image_pixels, preset)
                except DecodeError as err:
                    raise ShardError(str(err), f"{sample.key}.{sample.ext}") from None
        return samples

    def extract(self, model, samples, request, index, request_number=0, started=None):
        """Run one storage batch in a device slot: decode, preprocess, layers
        [0, split), conversion to the wire dtype (uint8: quantization) and
        encoding (compression); return its frame.

        Frame ``index`` of the ``request_number``-th request stands in line
        for the slot at :func:`frame_priority`, and computes only after that
        request's frame before it. Its timings are this frame's own device
        time (it holds the slot), ``slot_wait_s`` how long it waited for
        the slot, and ``ready_s`` when it was ready to send, in seconds since
        ``started`` (the request's ``time.monotonic()`` on arrival; default:
        this call): the trainer reads the link's busy time from it."""
        if started is None:
            started = time.monotonic()
        asked = time.perf_counter()
        with self.slots.slot(frame_priority(request_number, index), owner=request_number):
            start = time.perf_counter()
            try:
                x = preprocess([s.image for s in samples], request.preset, request.model,
                               self.max_image_pixels)
            except DecodeError as err:
                bad = samples[err.index]
                raise ShardError(str(err), f"{bad.key}.{bad.ext}") from None
            # No other reference to the input: the first layer's output replaces it,
            # as in trace_splits.
            # Split 0 runs no layer: the images leave as they are, not
            # converted there and back.
            x = x.to(self.device, non_blocking=True,
                     memory_format=LAYOUT if request.split else torch.contiguous_format)
            decoded = time.perf_counter()
            layer_times = []
            with torch.inference_mode():
                for layer in model.layers[:request.split]:
                    x, seconds = timed_layer(layer, x)
                    layer_times.append(seconds)
                computed = time.perf_counter()
                features = wire.pack_features(x, request.dtype, request.encoding)
                # Channels-last features were copied out contiguous: let them
                # go before the frame's bytes are made, so that a frame never
                # holds three copies of its features at once.
                del x
            self._observe_frame(request, len(samples), layer_times)
            timings = {"slot_wait_s": start - asked, "decode_s": decoded - start,
                       "layers_s": layer_times, "to_wire_s": time.perf_counter() - computed,
                       "ready_s": time.monotonic() - started}
            return wire.encode_frame(
                "batch",
                {"index": str(index), "keys": [s.key for s in samples], "timings": timings},
                features=features,
                labels=torch.tensor([s.label for s in samples]))

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
