"""What a feature request costs in memory on the storage tier.

The admission of requests (:mod:`hapi.middleware.admission`) needs, per
model, split, preset size and wire dtype, the bytes one request holds at a
storage batch b. On the CPU that comes from a trace of the forward on the meta
device (:func:`trace_splits`: every tensor the ops create is counted, no
weights are built and nothing runs); on a GPU the engine measures torch's peak
allocation and never counts less than the trace.
"""

from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hapi import zoo
from hapi.hostmem import available_memory_bytes
from hapi.middleware.device import LAYOUT
from hapi.wire import to_wire_dtype

# memory_budget = auto on the CPU: this share of MemAvailable when the process
# starts (DEFAULT_CPU_BUDGET where it cannot be read).
AUTO_BUDGET_SHARE = 0.5
DEFAULT_CPU_BUDGET = 2 << 30

# On a GPU, the share of the device's memory never handed out: the CUDA
# context, cuDNN workspaces and the caching allocator's fragmentation.
CUDA_MARGIN_SHARE = 0.1
# Batch sizes of the forwards whose peak memory is traced (and measured on a
# GPU) to fit a request's cost, fixed + per sample * batch.
MEASURED_BATCHES = (1, 4)


def auto_cpu_budget():
    """:data:`AUTO_BUDGET_SHARE` of the memory available now."""
    available = available_memory_bytes()
    return DEFAULT_CPU_BUDGET if available is None else int(available * AUTO_BUDGET_SHARE)


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
    """Bytes of one batch's forward to one split, from :func:`trace_splits`."""

    peak: int  # input, layers [0, split) and the wire-dtype copy, temporaries included
    input: int  # the preprocessed float32 batch
    output: int  # the float32 features
    wire: int  # the features in the wire dtype


def trace_splits(name, size, dtype, batches=MEASURED_BATCHES):
    """Trace the forward of ``name`` to every split and the cast to the wire
    ``dtype`` there, on the meta device, for a batch of each size in
    ``batches`` of images of ``size`` px, in the engine's layout: the batch
    copied channels-last before the first layer, the features copied out
    contiguous after the cast. Every tensor the ops create is counted, no
    weights are built and nothing runs.

    One pass through the layers per batch size serves every split: the
    peak to split s is the peak of layers [0, s) (kept as the pass goes on)
    or of the cast at s, whichever is larger, and the cast's tensors are
    dropped before the next layer runs. A request at a new split then costs
    nothing to trace, and a model costs one pass per preset size and dtype.
    ``{split: {batch: ForwardTrace}}`` for splits 0..len(layers)."""
    with torch.device("meta"):
        model = zoo.build_model(name)
    traces = {split: {} for split in range(len(model.layers) + 1)}
    for batch in batches:
        trace = LiveBytes()
        with torch.inference_mode(), trace:
            x = torch.empty((batch, 3, size, size), device="meta")
            input_bytes = x.nbytes
            for split in traces:
                if split == 1:
                    x = x.contiguous(memory_format=LAYOUT)
                if split:
                    x = model.layers[split - 1](x)
                layers_peak = trace.peak
                wire = to_wire_dtype(x, dtype)["features"].contiguous()
                traces[split][batch] = ForwardTrace(peak=trace.peak, input=input_bytes,
                                                    output=x.nbytes, wire=wire.nbytes)
                del wire
                trace.peak = layers_peak
    return traces


def cpu_request_peak(trace):
    """Bytes one batch holds on the CPU at the peak of :meth:`FeatureEngine.extract`:
    the largest of its three moments (preprocessing: the per-image tensors
    and their stacked batch; the forward with the wire-dtype copy; encoding:
    the features, their wire copy when the dtype changes, the safetensors
    blob and the length-prefixed frame; a compressed frame holds less), plus
    the previous frame, still being sent while this batch is computed. The
    uint8 quantization's float32 temporary is in the traced peak."""
    cast = trace.wire if trace.wire != trace.output else 0  # float32 on the wire: no copy
    encode = trace.output + cast + 2 * trace.wire
    return max(2 * trace.input, trace.peak, encode) + trace.wire


def tensor_bytes(module):
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size()
               for t in (*module.parameters(), *module.buffers()))
