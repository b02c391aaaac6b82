"""The wire format of a HAPI feature stream.

A response body is a sequence of frames. Each frame is an 8-byte
little-endian length N followed by N bytes of a safetensors blob: tensors
``features`` (one storage batch, in the wire dtype) and ``labels`` (int64),
and string metadata:

- ``kind``: ``batch``, ``end`` (last frame: totals) or ``error`` (the stream
  failed after its 200 status was sent; ``status``, ``message``, ``member``),
- ``index``: batch number; ``keys``: JSON list of the samples' keys,
- ``timings``: JSON ``{"slot_wait_s": float, "decode_s": float, "layers_s":
  [float per layer run], "to_wire_s": float, "ready_s": float}``: the wait
  for a device slot, decode and preprocess, each layer, the features' way
  to the wire (dtype conversion or quantization, copy to host memory,
  compression), and when the frame was ready to send, in seconds since the
  storage tier received the request.

Wire dtypes (:data:`WIRE_DTYPES`): ``float32``, ``float16`` and ``bfloat16``
are casts. ``uint8`` is per-channel affine quantization: channel c of
features ``[N, C, ...]`` is dimension 1 (the channels of a convolution's
output, the tokens of a transformer's ``[N, T, D]``; flat features
``[N, D]`` are one channel), quantized with the batch's own minimum and maximum of that
channel; the frame then also holds tensors ``scale`` and ``zero_point``
(float32 ``[C]``), and ``x = (q - zero_point) * scale`` within ``scale / 2``.
Where a channel's range holds 0, its zero point is an integer, so 0 is
carried exactly (a ReLU's zeros stay zeros).

Encodings (:data:`WIRE_ENCODINGS`): ``raw`` stores ``features`` as is;
``zstd`` stores them as a uint8 tensor of zstd-compressed bytes, with
metadata ``features_dtype`` and ``features_shape`` (JSON list) to restore
them bit-exactly. A reader refuses a frame whose declared feature size is
above its frame limit before decompressing anything.

safetensors holds only raw tensor bytes and a JSON header: nothing in a
stream is ever unpickled. Readers bound the frame size before reading it.
"""

import json
import math
import struct
from dataclasses import dataclass, field

import torch
import zstandard
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hapi import names

LENGTH = struct.Struct("<Q")
DEFAULT_MAX_FRAME_BYTES = 1 << 30
KINDS = ("batch", "end", "error")
WIRE_DTYPES = names.WIRE_DTYPES
WIRE_ENCODINGS = names.WIRE_ENCODINGS
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "uint8": torch.uint8}
TORCH_DTYPES = {name: _TORCH[name] for name in WIRE_DTYPES}
QUANTIZED = "uint8"
QUANT_LEVELS = 255
# Per channel, a uint8 frame carries a float32 scale and a float32 zero point.
QUANT_BYTES_PER_CHANNEL = 8
ZSTD_LEVEL = 3
_FRAME_TENSORS = {"features", "labels", "scale", "zero_point"}


class FrameError(ValueError):
    """A stream or frame is malformed."""


@dataclass
class Frame:
    kind: str
    meta: dict = field(default_factory=dict)
    features: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None

    @property
    def keys(self):
        return json.loads(self.meta.get("keys", "[]"))

    @property
    def timings(self):
        return json.loads(self.meta.get("timings", "{}"))

    def float_features(self):
        """The features as the trainer computes on them: dequantized to
        float32 from uint8, else as they came."""
        if self.features is None or self.scale is None:
            return self.features
        return dequantize(self.features, self.scale, self.zero_point)


@dataclass(frozen=True)
class PackedFeatures:
    """Features ready for a frame: its tensors (on the host) and metadata."""

    tensors: dict
    meta: dict = field(default_factory=dict)


def quantize(x):
    """Per-channel affine uint8 quantization of ``x`` ``[N, C, ...]`` (channels
    on dimension 1; flat features ``[N, D]`` are one channel), on ``x``'s
    device: ``(q, scale, zero_point)``, the last two float32 ``[C]``.

    A channel whose range holds 0 gets an integer zero point and a scale
    that still covers its minimum and maximum, so 0 is exact and every value
    is within ``scale / 2``; any other channel maps its minimum to 0 and its
    maximum to 255. A constant channel gets scale 1 (no division by zero)."""
    if x.dim() < 2:
        raise ValueError(f"uint8 features need a channel dimension, got shape {list(x.shape)}")
    if x.dim() == 2:
        # Flat features [N, D] are one channel: D scales and zero points per
        # frame would outweigh the frame's own bytes at small storage batches.
        q, scale, zero_point = quantize(x.unsqueeze(1))
        return q.squeeze(1), scale, zero_point
    others = [0, *range(2, x.dim())]
    if x.numel() == 0:
        lo = hi = torch.zeros(x.shape[1], device=x.device)
    else:
        lo, hi = x.amin(dim=others).float(), x.amax(dim=others).float()
    span = hi - lo
    holds_zero = (lo <= 0) & (hi >= 0)
    zero = torch.round(-lo / span.clamp_min(torch.finfo(torch.float32).tiny) * QUANT_LEVELS)
    zero = torch.where(lo < 0, zero.clamp_min(1), zero)
    zero = torch.where(hi > 0, zero.clamp_max(QUANT_LEVELS - 1), zero).clamp(0, QUANT_LEVELS)
    covering = torch.maximum(-lo / zero.clamp_min(1), hi / (QUANT_LEVELS - zero).clamp_min(1))
    scale = torch.where(holds_zero, covering, span / QUANT_LEVELS)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.where(holds_zero, zero, -lo / scale)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    # One float32 temporary the size of x, worked on in place.
    q = x.to(torch.float32, copy=True).div_(scale.view(shape))
    q.add_(zero_point.view(shape)).round_().clamp_(0, QUANT_LEVELS)
    return q.to(torch.uint8), scale, zero_point


def quantized_channels(shape):
    """The channels :func:`quantize` gives features of ``shape`` ``[N, ...]``
    their own scale: dimension 1, or one for flat features ``[N, D]``."""
    return shape[1] if len(shape) > 2 else 1


def dequantize(q, scale, zero_point):
    """float32 features from :func:`quantize`'s ``(q, scale, zero_point)``."""
    shape = (1, -1) + (1,) * (q.dim() - 2)
    return (q.float() - zero_point.view(shape)) * scale.view(shape)


def to_wire_dtype(x, dtype):
    """``x`` in the wire ``dtype``, on its own device: ``{"features": ...}``,
    with ``scale`` and ``zero_point`` for uint8."""
    if dtype == QUANTIZED:
        q, scale, zero_point = quantize(x)
        return {"features": q, "scale": scale, "zero_point": zero_point}
    return {"features": x.to(TORCH_DTYPES[dtype])}


def pack_features(x, dtype, encoding="raw"):
    """``x`` (any float tensor, any device) as a frame carries it: converted or
    quantized to ``dtype`` on its device, copied to the host, compressed
    with ``encoding``."""
    tensors = {name: t.cpu().contiguous() for name, t in to_wire_dtype(x, dtype).items()}
    if encoding == "raw":
        return PackedFeatures(tensors)
    if encoding != "zstd":
        raise ValueError(f"unknown wire encoding {encoding!r}; known: {', '.join(WIRE_ENCODINGS)}")
    features = tensors["features"]
    compressed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw_bytes(features))
    tensors["features"] = torch.frombuffer(bytearray(compressed), dtype=torch.uint8)
    return PackedFeatures(tensors, {"encoding": "zstd", "features_dtype": dtype,
                                    "features_shape": json.dumps(list(features.shape))})


def raw_bytes(tensor):
    """A CPU tensor's bytes in its element order, as a flat uint8 array.

    Flat before the byte view: a contiguous tensor with dimensions of size 1
    (features after a global pool, ``[N, C, 1, 1]``, from a channels-last
    forward) may keep a last stride other than 1, which ``view`` refuses."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def feature_bytes(sample_shape, dtype, frame_samples):
    """Bytes one sample's features of ``sample_shape`` (``[C, ...]``) take in
    frames of ``frame_samples`` samples in the wire ``dtype``, before any
    compression: a uint8 frame adds each channel's scale and zero point,
    shared by its samples."""
    size = math.prod(sample_shape) * TORCH_DTYPES[dtype].itemsize
    if dtype == QUANTIZED and sample_shape:
        channels = quantized_channels((frame_samples, *sample_shape))
        size += QUANT_BYTES_PER_CHANNEL * channels / max(frame_samples, 1)
    return size


def encode_frame(kind, meta=None, features=None, labels=None):
    """Serialise one frame; ``meta`` values that are not strings become JSON.
    ``features``: a tensor, stored as is, or :class:`PackedFeatures`."""
    if kind not in KINDS:
        raise ValueError(f"unknown frame kind {kind!r}")
    strings = {"kind": kind}
    for key, value in (meta or {}).items():
        strings[key] = value if isinstance(value, str) else json.dumps(value)
    tensors = {}
    if isinstance(features, PackedFeatures):
        tensors.update((name, t.contiguous()) for name, t in features.tensors.items())
        strings.update(features.meta)
    elif features is not None:
        tensors["features"] = features.contiguous()
    if labels is not None:
        tensors["labels"] = labels.to(torch.int64).contiguous()
    blob = st_save(tensors, metadata=strings)
    return LENGTH.pack(len(blob)) + blob


def decode_frame(blob, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES):
    """Parse one safetensors blob (without its length prefix) into a Frame,
    its features decompressed (at most ``max_frame_bytes`` of them)."""
    if len(blob) < 8:
        raise FrameError("frame is shorter than its header length")
    (header_len,) = LENGTH.unpack_from(blob)
    if header_len > len(blob) - 8:
        raise FrameError("frame header is longer than the frame")
    try:
        header = json.loads(blob[8:8 + header_len])
        tensors = st_load(bytes(blob))
    except (ValueError, SafetensorError, UnicodeDecodeError) as err:
        raise FrameError(f"frame is not a valid safetensors blob: {err}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
        raise FrameError("frame metadata has no valid 'kind'")
    unknown = set(tensors) - _FRAME_TENSORS
    if unknown:
        raise FrameError(f"frame has unexpected tensors {sorted(unknown)}")
    features = tensors.get("features")
    encoding = meta.get("encoding", "raw")
    if encoding not in WIRE_ENCODINGS:
        raise FrameError(f"frame has unknown encoding {encoding[:40]!r}; "
                         f"known: {', '.join(WIRE_ENCODINGS)}")
    if encoding == "zstd" and features is not None:
        features = _decompress(features, meta, max_frame_bytes)
    scale, zero_point = tensors.get("scale"), tensors.get("zero_point")
    _check_quantization(features, scale, zero_point)
    return Frame(kind=meta["kind"], meta=meta, features=features, labels=tensors.get("labels"),
                 scale=scale, zero_point=zero_point)


def _decompress(payload, meta, max_frame_bytes):
    """The features a zstd frame declares, refused before decompression when
    their declared size is above ``max_frame_bytes`` or the payload's zstd
    header disagrees with it."""
    dtype_name = meta.get("features_dtype", "")
    try:
        shape = json.loads(meta.get("features_shape", ""))
    except ValueError:
        shape = None
    if dtype_name not in TORCH_DTYPES or not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise FrameError("zstd frame needs 'features_dtype' (a wire dtype) and "
                         "'features_shape' (a JSON list of sizes)")
    dtype = TORCH_DTYPES[dtype_name]
    size = math.prod(shape) * dtype.itemsize
    if size > max_frame_bytes:
        raise FrameError(f"zstd frame declares {size} bytes of features, above the "
                         f"{max_frame_bytes}-byte frame limit")
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise FrameError("zstd frame's features must be a 1-D uint8 tensor of compressed bytes")
    data = payload.numpy().tobytes()
    try:
        if zstandard.frame_content_size(data) != size:
            raise FrameError(f"zstd payload does not hold the declared {size} bytes")
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as err:
        raise FrameError(f"zstd payload does not decompress: {err}") from None
    if len(raw) != size:
        raise FrameError(f"zstd payload holds {len(raw)} bytes, not the declared {size}")
    if not size:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


def _check_quantization(features, scale, zero_point):
    if scale is None and zero_point is None:
        if features is not None and features.dtype == torch.uint8:
            raise FrameError("uint8 features need 'scale' and 'zero_point' tensors")
        return
    channels = quantized_channels(features.shape) \
        if features is not None and features.dim() >= 2 else None
    if features is None or features.dtype != torch.uint8 or channels is None:
        raise FrameError("'scale' and 'zero_point' go only with uint8 features [N, C, ...]")
    for name, tensor in (("scale", scale), ("zero_point", zero_point)):
        if tensor is None or tensor.dtype != torch.float32 or tuple(tensor.shape) != (channels,):
            raise FrameError(f"uint8 features of {channels} channels need a float32 "
                             f"'{name}' of shape [{channels}]")


def read_frames(read, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES):
    """Yield frames from ``read(n) -> bytes`` (a file's or response's read).

    Stops after the ``end`` frame; raises :class:`FrameError` on a frame
    above ``max_frame_bytes`` (on the wire, or its features once
    decompressed), a stream cut short, or an ``error`` frame.
    """
    while True:
        prefix = _read_exactly(read, LENGTH.size, allow_eof=True)
        if not prefix:
            raise FrameError("stream ended before its end frame")
        (length,) = LENGTH.unpack(prefix)
        if length > max_frame_bytes:
            raise FrameError(f"frame of {length} bytes exceeds the {max_frame_bytes}-byte limit")
        frame = decode_frame(_read_exactly(read, length), max_frame_bytes)
        if frame.kind == "error":
            raise StreamError(frame.meta)
        yield frame
        if frame.kind == "end":
            return


class StreamError(FrameError):
    """The server reported a failure inside the stream (an ``error`` frame)."""

    def __init__(self, meta):
        super().__init__(f"{meta.get('status', '500')}: {meta.get('message', 'stream failed')}"
                         + (f" (member {meta['member']})" if meta.get("member") else ""))
        self.status = int(meta.get("status", "500"))
        self.member = meta.get("member")


def _read_exactly(read, n, allow_eof=False):
    chunks, remaining = [], n
    while remaining:
        chunk = read(remaining)
        if not chunk:
            if allow_eof and remaining == n:
                return b""
            raise FrameError(f"stream cut short: {n - remaining} of {n} bytes")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
