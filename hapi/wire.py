"""The wire format of a HAPI feature stream.

A response body is a sequence of frames. Each frame is an 8-byte
little-endian length N followed by N bytes of a safetensors blob: tensors
``features`` (one storage batch, in the wire dtype) and ``labels`` (int64),
and string metadata:

- ``kind``: ``batch``, ``end`` (last frame: totals) or ``error`` (the stream
  failed after its 200 status was sent; ``status``, ``message``, ``member``),
- ``index``: batch number; ``keys``: JSON list of the samples' keys,
- ``timings``: JSON ``{"decode_s": float, "layers_s": [float per layer run],
  "to_wire_s": float}``: decode and preprocess, each layer, dtype conversion
  and copy to host memory.

safetensors holds only raw tensor bytes and a JSON header: nothing in a
stream is ever unpickled. Readers bound the frame size before reading it.
"""

import json
import struct
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

LENGTH = struct.Struct("<Q")
DEFAULT_MAX_FRAME_BYTES = 1 << 30
KINDS = ("batch", "end", "error")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FrameError(ValueError):
    """A stream or frame is malformed."""


@dataclass
class Frame:
    kind: str
    meta: dict = field(default_factory=dict)
    features: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    @property
    def keys(self):
        return json.loads(self.meta.get("keys", "[]"))

    @property
    def timings(self):
        return json.loads(self.meta.get("timings", "{}"))


def encode_frame(kind, meta=None, features=None, labels=None):
    """Serialise one frame; ``meta`` values that are not strings become JSON."""
    if kind not in KINDS:
        raise ValueError(f"unknown frame kind {kind!r}")
    strings = {"kind": kind}
    for key, value in (meta or {}).items():
        strings[key] = value if isinstance(value, str) else json.dumps(value)
    tensors = {}
    if features is not None:
        tensors["features"] = features.contiguous()
    if labels is not None:
        tensors["labels"] = labels.to(torch.int64).contiguous()
    blob = st_save(tensors, metadata=strings)
    return LENGTH.pack(len(blob)) + blob


def decode_frame(blob):
    """Parse one safetensors blob (without its length prefix) into a Frame."""
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
    unknown = set(tensors) - {"features", "labels"}
    if unknown:
        raise FrameError(f"frame has unexpected tensors {sorted(unknown)}")
    return Frame(kind=meta["kind"], meta=meta, features=tensors.get("features"),
                 labels=tensors.get("labels"))


def read_frames(read, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES):
    """Yield frames from ``read(n) -> bytes`` (a file's or response's read).

    Stops after the ``end`` frame; raises :class:`FrameError` on a frame
    above ``max_frame_bytes``, a stream cut short, or an ``error`` frame.
    """
    while True:
        prefix = _read_exactly(read, LENGTH.size, allow_eof=True)
        if not prefix:
            raise FrameError("stream ended before its end frame")
        (length,) = LENGTH.unpack(prefix)
        if length > max_frame_bytes:
            raise FrameError(f"frame of {length} bytes exceeds the {max_frame_bytes}-byte limit")
        frame = decode_frame(_read_exactly(read, length))
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
