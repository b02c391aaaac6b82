"""The feature-extraction engine shared by the Swift filter and the standalone server.

It owns what is expensive and must happen once per process (models on their
device, built with their weights and cached) and the per-batch work: decode,
preprocess, run layers [0, split) in eval mode without gradients, encode a
frame. Its methods are plain blocking calls: the caller decides where they
run (``eventlet.tpool`` in the proxy, an executor thread in the server) and
owns the concurrency around them.
"""

import json
import os
import time
from collections import OrderedDict

import torch

from hapi import weights as weights_mod
from hapi import wire, zoo
from hapi.preprocess import DecodeError, open_image, preprocess
from hapi.shards import ShardError, read_shard

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class WeightsNotFound(LookupError):
    """A weights reference names nothing this server can load."""


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

    def open_shard(self, data):
        """Parse a shard and check every image's header (format and pixel
        count) before any work starts, so most bad input fails before the
        response status is sent. Raises ShardError naming the member."""
        samples = read_shard(data)
        for sample in samples:
            try:
                open_image(sample.image, self.max_image_pixels)
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


def end_frame(samples, batches, elapsed_s):
    return wire.encode_frame("end", {"samples": str(samples), "batches": str(batches),
                                     "elapsed_s": json.dumps(elapsed_s)})


def error_frame(status, message, member=None):
    meta = {"status": str(status), "message": message}
    if member:
        meta["member"] = member
    return wire.encode_frame("error", meta)
