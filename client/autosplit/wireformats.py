"""The wire formats the automatic split chooses from, and what each costs.

A wire format is a dtype and an encoding of the features a frame carries
(``hapi.wire``: float32, float16, per-channel uint8; raw or zstd). What it
costs depends on the boundary: how many bytes a sample's features take
(zstd's ratio depends on how many zeros the ReLU before the boundary left),
how long the storage tier takes to convert and compress them, and how long
the trainer takes to decompress, parse and dequantize them. None of that
can be computed from shapes, so :func:`measure_formats` measures it on a few
real samples (the probe images the trainer decodes anyway), at every
boundary up to the freeze index, for every candidate format, here on the
trainer. The cost model (``hapi.client.autosplit.costmodel``) then chooses
the split and the format together.

The candidates are every pair of an allowed dtype and an allowed encoding:
``--wire_dtype`` and ``--wire_encoding`` each pin one or leave it to the
choice (``auto``). The dtypes ``auto`` chooses from are float32, float16 and
uint8, the ones whose accuracy the project measured against float32
(README, "Wire encodings"); bfloat16 is as large as float16 and coarser, so
it is used only when pinned.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from hapi import names, wire

__all__ = ["AUTO", "AUTO_DTYPES", "FormatCosts", "WireFormat", "candidate_formats",
           "costs_from_dict", "measure_formats", "pinned"]

AUTO = names.WIRE_AUTO
AUTO_DTYPES = ("float32", "float16", "uint8")
REPEATS = 2  # timings per boundary and format; the fastest counts (least disturbed)
LONG_TIMING_S = 0.01  # a timing this long is not repeated: scheduling noise is small beside it
MEASURED_SAMPLES = 2  # of the probe's images: zstd's ratio and the times are per sample


@dataclass(frozen=True, order=True)
class WireFormat:
    """A dtype and an encoding of features on the wire, named ``dtype[+encoding]``."""

    dtype: str
    encoding: str = "raw"

    def __post_init__(self):
        if self.dtype not in names.WIRE_DTYPES:
            raise ValueError(f"unknown wire dtype {self.dtype!r}; known: "
                             f"{', '.join(names.WIRE_DTYPES)}")
        if self.encoding not in names.WIRE_ENCODINGS:
            raise ValueError(f"unknown wire encoding {self.encoding!r}; known: "
                             f"{', '.join(names.WIRE_ENCODINGS)}")

    @property
    def name(self) -> str:
        return self.dtype if self.encoding == "raw" else f"{self.dtype}+{self.encoding}"

    @classmethod
    def parse(cls, name: str) -> WireFormat:
        dtype, _, encoding = name.partition("+")
        return cls(dtype, encoding or "raw")

    def __str__(self):
        return self.name


def pinned(choice: str, default: str) -> str:
    """A ``--wire_dtype``/``--wire_encoding`` value where no choice is made (a
    fixed split): ``default`` for ``auto``, else the value itself."""
    return default if choice == AUTO else choice


def candidate_formats(dtype: str = AUTO, encoding: str = AUTO) -> list[WireFormat]:
    """The formats a run may use: ``dtype`` and ``encoding`` each pinned, or
    ``auto`` for every one the choice considers."""
    dtypes = AUTO_DTYPES if dtype == AUTO else (dtype,)
    encodings = names.WIRE_ENCODINGS if encoding == AUTO else (encoding,)
    return [WireFormat(d, e) for d in dtypes for e in encodings]


@dataclass
class FormatCosts:
    """One format's measured costs at each boundary ``0..f``, per sample.

    ``bytes[s]``: the features' bytes on the wire at boundary ``s`` in frames
    of the storage batch (a uint8 frame's scales and zero points shared by
    its samples; zstd at the ratio measured). ``encode_s[s]``: converting
    and compressing them, measured here (the cost model scales it to the
    storage tier's speed). ``decode_s[s]``: the trainer's parse, decompress
    and dequantize to a float32 batch. Boundary 0 is never sent as features:
    its entries are 0.
    """

    bytes: list[float]
    encode_s: list[float]
    decode_s: list[float]

    def to_dict(self) -> dict:
        return asdict(self)

    def scaled(self, factor: float) -> FormatCosts:
        """These costs on a trainer ``factor`` times slower."""
        return FormatCosts(self.bytes, [factor * s for s in self.encode_s],
                           [factor * s for s in self.decode_s])


def measure_formats(model, inputs: torch.Tensor, freeze: int, formats, *,
                    frame_samples: int, samples: int = MEASURED_SAMPLES,
                    long_timing_s: float = LONG_TIMING_S) -> dict[str, FormatCosts]:
    """Every format's :class:`FormatCosts` at boundaries ``0..freeze`` of
    ``model`` (a :class:`hapi.zoo.LayeredModel`), measured on ``inputs``
    (a few preprocessed real samples at boundary 0, the first ``samples``
    of them: zstd's ratio depends on the values, so
    random inputs would not do), with frames of ``frame_samples`` samples
    for the uint8 scales; a timing above ``long_timing_s`` is not repeated.
    Keyed by format name."""
    inputs = inputs[:samples]
    count = inputs.shape[0]
    if count < 1:
        raise ValueError("measuring wire formats needs at least one sample")
    formats = list(formats)
    costs = {f.name: FormatCosts([0.0], [0.0], [0.0]) for f in formats}
    labels = torch.zeros(count, dtype=torch.int64)
    x = inputs
    with torch.no_grad():
        for index in range(freeze):
            x = model.layers[index](x)
            for fmt in formats:
                size, encode, decode = _measure(x, fmt, labels, frame_samples, long_timing_s)
                cost = costs[fmt.name]
                cost.bytes.append(size / count)
                cost.encode_s.append(encode / count)
                cost.decode_s.append(decode / count)
    return costs


def _measure(x, fmt, labels, frame_samples, long_timing_s):
    """(bytes per frame of ``x``'s samples, encode seconds, decode seconds)."""
    encode, decode = [], []
    while len(encode) < REPEATS:
        began = time.perf_counter()
        packed = wire.pack_features(x, fmt.dtype, fmt.encoding)
        encode.append(time.perf_counter() - began)
        blob = wire.encode_frame("batch", {"index": "0", **packed.meta}, features=packed,
                                 labels=labels)
        began = time.perf_counter()
        wire.decode_frame(blob[wire.LENGTH.size:]).float_features().to(torch.float32)
        decode.append(time.perf_counter() - began)
        if encode[-1] + decode[-1] > long_timing_s:
            break
    tensors = packed.tensors
    shared = sum(tensors[name].nbytes for name in ("scale", "zero_point") if name in tensors)
    # The scales are per frame: a frame of frame_samples samples shares them.
    size = tensors["features"].nbytes + shared * x.shape[0] / max(frame_samples, 1)
    return size, min(encode), min(decode)


def costs_from_dict(doc: dict) -> dict[str, FormatCosts]:
    """:class:`FormatCosts` by format name from their JSON form (a profile's)."""
    out = {}
    for name, value in doc.items():
        WireFormat.parse(name)
        cost = value if isinstance(value, FormatCosts) else FormatCosts(**value)
        if not len(cost.bytes) == len(cost.encode_s) == len(cost.decode_s):
            raise ValueError(f"wire format {name}: bytes, encode_s and decode_s differ in length")
        if any(not math.isfinite(v) or v < 0 for v in (*cost.bytes, *cost.encode_s,
                                                       *cost.decode_s)):
            raise ValueError(f"wire format {name}: costs must be finite and >= 0")
        out[name] = cost
    return out

