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
"""

import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from hapi import protocol, wire, zoo
from hapi import weights as weights_mod
from hapi.preprocess import DecodeError, check_image, preprocess
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
}


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

        models = tuple(zoo.canonical_name(m.strip()) for m in get("models").split(",")
                       if m.strip())
        limits = protocol.Limits(max_batch=integer("max_batch"),
                                 default_batch=integer("default_batch"),
                                 models=models or tuple(zoo.MODELS),
                                 weights_dir_enabled=bool(get("weights_dir")))
        if limits.default_batch > limits.max_batch:
            raise ValueError(f"option default_batch ({limits.default_batch}) is above "
                             f"max_batch ({limits.max_batch})")
        return cls(limits=limits, max_concurrent=integer("max_concurrent"),
                   max_shard_bytes=integer("max_shard_bytes"), device=get("device"),
                   threads=integer("threads", minimum=0), weights_dir=get("weights_dir"),
                   max_image_pixels=integer("max_image_pixels"),
                   max_cached_models=integer("max_cached_models"))

    def make_engine(self):
        return FeatureEngine(device=self.device, threads=self.threads,
                             max_image_pixels=self.max_image_pixels,
                             weights_dir=self.weights_dir,
                             max_cached_models=self.max_cached_models)


def resolve_device(name):
    """``auto`` means the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


class FeatureEngine:
    def __init__(self, device="auto", threads=0, max_image_pixels=40_000_000,
                 weights_dir="", max_cached_models=4):
        self.device = resolve_device(device)
        if threads > 0:
            torch.set_num_threads(threads)
        self.max_image_pixels = max_image_pixels
        self.weights_dir = weights_dir
        self.max_cached_models = max_cached_models
        self._models = OrderedDict()
        self._layer_counts = {}

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
        while len(self._models) > self.max_cached_models:
            self._models.popitem(last=False)
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

    def open_shard(self, data):
        """Parse a shard and check every image's header (format and pixel
        count) before any work starts, so most bad input fails before the
        response status is sent. Raises ShardError naming the member."""
        samples = read_shard(data)
        for sample in samples:
            try:
                check_image(sample.image, self.max_image_pixels)
            except DecodeError as err:
                raise ShardError(str(err), f"{sample.key}.{sample.ext}") from None
        return samples

    def extract(self, model, samples, request, index):
        """Run one storage batch: decode, preprocess, layers [0, split); return a frame."""
        start = time.perf_counter()
        try:
            inputs = preprocess([s.image for s in samples], request.preset, request.model,
                                self.max_image_pixels)
        except DecodeError as err:
            bad = samples[err.index]
            raise ShardError(str(err), f"{bad.key}.{bad.ext}") from None
        x = inputs.to(self.device, non_blocking=True)
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


def split_batches(samples, batch):
    return [samples[i:i + batch] for i in range(0, len(samples), batch)]


class RequestError(Exception):
    """A feature request refused before its stream starts: an HTTP status and
    the fields of its JSON body (``error`` plus the culprit: ``parameter``,
    ``member``...). The filter and the server each turn it into a response of
    their framework, so both answer every failure with the same status and body.
    """

    def __init__(self, status, message, **fields):
        super().__init__(message)
        self.status = status
        self.fields = {"error": message, **fields}

    @property
    def body(self):
        return json.dumps(self.fields).encode()

    @property
    def headers(self):
        return {"Retry-After": "1"} if self.status == 503 else {}

    @classmethod
    def from_exception(cls, err):
        """The answer to one of :data:`REQUEST_FAILURES` raised before the stream."""
        if isinstance(err, protocol.BadParameter):
            return cls(400, err.message, parameter=err.parameter)
        if isinstance(err, (WeightsError, WeightsNotFound)):
            return cls(400, str(err), parameter=protocol.WEIGHTS)
        if isinstance(err, ShardError):
            return cls(422, str(err), member=err.member)
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
    def weights_unreadable(cls, path, status_line):
        """A ``swift:`` weights object Swift would not serve for a reason
        other than the caller's access (401 and 403 pass through)."""
        return cls(400, f"weights object {path} could not be read: {status_line}",
                   parameter=protocol.WEIGHTS)


# What bad input raises before a stream starts; RequestError.from_exception maps them.
REQUEST_FAILURES = (protocol.BadParameter, WeightsError, WeightsNotFound, ShardError)


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
