"""The frame format: round trips, bounds, and arbitrary bytes never crashing the decoder."""

import io
import json

import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from hapi import wire


def stream(*frames):
    return io.BytesIO(b"".join(frames)).read


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_batch_frames_round_trip(dtype):
    features = torch.randn(3, 4, 5).to(dtype)
    labels = torch.tensor([2, 0, 1])
    data = wire.encode_frame("batch", {"index": "7", "keys": ["a", "b", "c"],
                                       "timings": {"decode_s": 0.5, "layers_s": [0.1]}},
                             features=features, labels=labels)
    frames = list(wire.read_frames(stream(data, wire.encode_frame("end", {"samples": "3"}))))
    assert [f.kind for f in frames] == ["batch", "end"]
    batch = frames[0]
    assert torch.equal(batch.features, features) and batch.features.dtype == dtype
    assert torch.equal(batch.labels, labels)
    assert batch.keys == ["a", "b", "c"]
    assert batch.timings == {"decode_s": 0.5, "layers_s": [0.1]}
    assert frames[1].meta["samples"] == "3"


def test_error_frame_raises_with_status_and_member():
    data = wire.encode_frame("error", {"status": "422", "message": "bad", "member": "x.jpg"})
    with pytest.raises(wire.StreamError) as err:
        list(wire.read_frames(stream(data)))
    assert err.value.status == 422 and err.value.member == "x.jpg"


def test_stream_without_end_frame_is_an_error():
    data = wire.encode_frame("batch", {"index": "0"}, features=torch.zeros(1))
    with pytest.raises(wire.FrameError, match="before its end frame"):
        list(wire.read_frames(stream(data)))


def test_cut_short_frame_is_an_error():
    data = wire.encode_frame("batch", {"index": "0"}, features=torch.zeros(100))
    with pytest.raises(wire.FrameError, match="cut short"):
        list(wire.read_frames(stream(data[:-10])))


def test_oversized_frame_is_refused_before_reading_it():
    reads = []

    def read(n):
        reads.append(n)
        return wire.LENGTH.pack(1 << 40) if len(reads) == 1 else b""

    with pytest.raises(wire.FrameError, match="exceeds"):
        list(wire.read_frames(read, max_frame_bytes=1 << 20))
    assert reads == [wire.LENGTH.size]


def test_unexpected_tensor_names_are_refused():
    from safetensors.torch import save
    blob = save({"payload": torch.zeros(1)}, metadata={"kind": "batch"})
    with pytest.raises(wire.FrameError, match="unexpected tensors"):
        wire.decode_frame(blob)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_fail_with_frame_error(data):
    try:
        frames = list(wire.read_frames(stream(data), max_frame_bytes=1 << 16))
    except wire.FrameError:
        return
    assert frames[-1].kind == "end"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256))
def test_corrupted_header_fails_with_frame_error(junk):
    good = wire.encode_frame("batch", {"index": "0"}, features=torch.zeros(2))
    blob = good[8:16] + junk + good[16 + len(junk):]
    try:
        wire.decode_frame(blob)
    except wire.FrameError:
        pass


def channel_errors(x, frame):
    """Per channel (dimension 1): the largest error of the dequantized features."""
    error = (frame.float_features() - x).abs().transpose(0, 1).reshape(x.shape[1], -1)
    return error.amax(dim=1)


@pytest.mark.parametrize("shape", [(4, 6, 3, 5), (8, 10), (2, 7, 9)])
def test_uint8_round_trip_is_within_half_a_step_per_channel(shape):
    torch.manual_seed(0)
    spread = torch.linspace(0.01, 100, shape[1]).view(1, -1, *[1] * (len(shape) - 2))
    x = torch.randn(*shape) * spread
    x[:, 0] = x[:, 0].relu()                 # ReLU-like: [0, max], zeros must stay zeros
    x[:, 1] = x[:, 1].abs() + 3              # strictly positive: range [min, max], not [0, max]
    x[:, 2] = -x[:, 2].abs() - 1             # strictly negative
    x[:, 3] = 2.5                            # constant channel: no division by zero
    packed = wire.pack_features(x, "uint8")
    frame = wire.decode_frame(wire.encode_frame("batch", features=packed)[8:])
    channels = shape[1] if len(shape) > 2 else 1  # flat features are one channel
    assert frame.features.dtype == torch.uint8 and frame.scale.shape == (channels,)
    assert torch.all(frame.scale > 0)
    assert torch.all(channel_errors(x, frame) <= frame.scale / 2 * (1 + 1e-5) + 1e-7)
    assert torch.equal(frame.float_features()[x == 0], x[x == 0])
    if channels > 1:
        assert torch.equal(frame.float_features()[:, 3], x[:, 3])
        # A strictly positive channel uses its own range, not [0, max].
        assert frame.scale[1] < x[:, 1].max() / 255


def test_uint8_zero_channel_and_empty_batch():
    x = torch.zeros(3, 4)
    packed = wire.pack_features(x, "uint8")
    frame = wire.decode_frame(wire.encode_frame("batch", features=packed)[8:])
    assert torch.equal(frame.float_features(), x) and torch.equal(frame.scale, torch.ones(1))
    empty = wire.pack_features(torch.zeros(0, 4, 2), "uint8", "zstd")
    frame = wire.decode_frame(wire.encode_frame("batch", features=empty)[8:])
    assert frame.float_features().shape == (0, 4, 2)


@pytest.mark.parametrize("dtype", wire.WIRE_DTYPES)
def test_zstd_frames_decode_bit_exactly(dtype):
    torch.manual_seed(1)
    x = torch.randn(5, 8, 4, 4).relu()
    if dtype != "uint8":   # bits that do not compare equal as numbers
        x[0, 0, 0, 0] = float("nan")
        x[0, 0, 0, 1] = float("-inf")
    raw = wire.decode_frame(wire.encode_frame("batch", features=wire.pack_features(x, dtype))[8:])
    data = wire.encode_frame("batch", {"index": "0"}, features=wire.pack_features(x, dtype, "zstd"),
                             labels=torch.arange(5))
    frames = list(wire.read_frames(stream(data, wire.encode_frame("end"))))
    packed = frames[0]
    assert packed.meta["encoding"] == "zstd" and packed.features.dtype == raw.features.dtype
    assert packed.features.shape == raw.features.shape
    assert torch.equal(packed.features.view(torch.uint8), raw.features.view(torch.uint8))
    for name in ("scale", "zero_point"):
        assert torch.equal(getattr(packed, name), getattr(raw, name)) \
            if dtype == "uint8" else getattr(packed, name) is None
    assert torch.equal(packed.labels, torch.arange(5))


@pytest.mark.parametrize("dtype", wire.WIRE_DTYPES)
def test_zstd_packs_pooled_channels_last_features(dtype):
    # A global pool of a channels-last batch: [N, C, 1, 1], contiguous, yet
    # its last stride is C, not 1 (mobilenet_v3_small at split 14).
    x = torch.nn.functional.adaptive_avg_pool2d(
        torch.rand(3, 8, 4, 4).contiguous(memory_format=torch.channels_last), 1)
    assert x.is_contiguous() and x.stride(-1) != 1
    frame = wire.decode_frame(wire.encode_frame(
        "batch", features=wire.pack_features(x, dtype, "zstd"))[wire.LENGTH.size:])
    raw = wire.decode_frame(wire.encode_frame(
        "batch", features=wire.pack_features(x, dtype))[wire.LENGTH.size:])
    assert torch.equal(frame.float_features(), raw.float_features())
    assert frame.features.shape == (3, 8, 1, 1)


def test_zstd_compresses_relu_features():
    x = torch.randn(16, 64, 6, 6).relu()
    sizes = {encoding: len(wire.encode_frame("batch", features=wire.pack_features(
        x, "float16", encoding))) for encoding in wire.WIRE_ENCODINGS}
    assert sizes["zstd"] < 0.8 * sizes["raw"]


def zstd_frame(payload, dtype="float32", shape=(4,)):
    from safetensors.torch import save
    return save({"features": torch.frombuffer(bytearray(payload), dtype=torch.uint8)},
                metadata={"kind": "batch", "encoding": "zstd", "features_dtype": dtype,
                          "features_shape": json.dumps(list(shape))})


def test_a_huge_declared_size_is_refused_before_decompressing(monkeypatch):
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 20))
    calls = []
    monkeypatch.setattr(zstandard.ZstdDecompressor, "decompress",
                        lambda *args, **kwargs: calls.append(args))
    with pytest.raises(wire.FrameError, match="above the 65536-byte frame limit"):
        wire.decode_frame(zstd_frame(bomb, shape=(1 << 18,)), max_frame_bytes=1 << 16)
    assert not calls


def test_a_payload_larger_than_its_declared_size_is_refused():
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 20))
    with pytest.raises(wire.FrameError, match="does not hold the declared 16 bytes"):
        wire.decode_frame(zstd_frame(bomb))
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20))
    with pytest.raises(wire.FrameError, match="does not hold the declared 16 bytes"):
        wire.decode_frame(zstd_frame(unsized))


@pytest.mark.parametrize("dtype,shape", [("int64", (2,)), ("float32", (-1,)),
                                         ("float32", (True,)), ("float32", "four")])
def test_bad_zstd_metadata_is_refused(dtype, shape):
    payload = zstandard.ZstdCompressor().compress(bytes(16))
    from safetensors.torch import save
    blob = save({"features": torch.frombuffer(bytearray(payload), dtype=torch.uint8)},
                metadata={"kind": "batch", "encoding": "zstd", "features_dtype": dtype,
                          "features_shape": json.dumps(shape)})
    with pytest.raises(wire.FrameError, match="features_dtype"):
        wire.decode_frame(blob)


def test_unknown_encoding_and_bad_quantization_tensors_are_refused():
    from safetensors.torch import save
    blob = save({"features": torch.zeros(2)}, metadata={"kind": "batch", "encoding": "gzip"})
    with pytest.raises(wire.FrameError, match="unknown encoding 'gzip'"):
        wire.decode_frame(blob)
    blob = save({"features": torch.zeros(2, 3, dtype=torch.uint8)}, metadata={"kind": "batch"})
    with pytest.raises(wire.FrameError, match="need 'scale' and 'zero_point'"):
        wire.decode_frame(blob)
    blob = save({"features": torch.zeros(2, 3, 4, dtype=torch.uint8), "scale": torch.ones(2),
                 "zero_point": torch.zeros(3)}, metadata={"kind": "batch"})
    with pytest.raises(wire.FrameError, match="float32 'scale' of shape \\[3\\]"):
        wire.decode_frame(blob)


@pytest.mark.parametrize("dtype", wire.WIRE_DTYPES)
def test_feature_bytes_are_what_a_frame_carries(dtype):
    """Per sample, a frame's feature tensors (scale and zero point included)."""
    for shape in [(8, 1280), (6, 16, 3, 3)]:
        packed = wire.pack_features(torch.randn(*shape), dtype)
        carried = sum(t.nbytes for t in packed.tensors.values())
        assert carried == shape[0] * wire.feature_bytes(shape[1:], dtype, frame_samples=shape[0])
