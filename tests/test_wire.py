"""The frame format: round trips, bounds, and arbitrary bytes never crashing the decoder."""

import io

import pytest
import torch
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
