"""Every wire dtype and encoding end to end: the filter in Swift's proxy and
the standalone server send the same tensors for the same request, refuse a
bad value with the same 400, and the trainer's reader turns uint8 frames back
into float32 features within half a quantization step of float32's.

Both read from the session's Swift, whose proxy runs the filter; the server
runs as a subprocess in front of it.
"""

import dataclasses
import json
import math
import urllib.request

import pytest
import torch
from helpers import ServerProcess, feature_request, small_shard_connection
from test_same_answers import both, frames_of, hapi

from hapi import protocol, wire, zoo
from hapi.client.autosplit.profiling import TrainerTimes, measure_copy_rate, profile_from_model
from hapi.client.features import fetch_features, intermediate_connection

CONTAINER = "hapi-same-answers"  # the container test_same_answers.both reads
ENCODINGS = [(dtype, encoding) for dtype in wire.WIRE_DTYPES for encoding in wire.WIRE_ENCODINGS]


@pytest.fixture(scope="module")
def conn(swift_cluster):
    yield from small_shard_connection(swift_cluster, CONTAINER)


@pytest.fixture(scope="module")
def server(swift_cluster, tmp_path_factory):
    with ServerProcess(swift_cluster.proxy_url, tmp_path_factory.mktemp("encodings"),
                       {"threads": "1", "max_concurrent": "8"}) as process:
        yield process


def request(dtype, encoding):
    return dataclasses.replace(feature_request("alexnet", split=5, dtype=dtype),
                               encoding=encoding)


def assert_same_frames(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.kind == y.kind and x.keys == y.keys
        assert x.meta.get("encoding") == y.meta.get("encoding")
        for name in ("features", "labels", "scale", "zero_point"):
            p, q = getattr(x, name), getattr(y, name)
            assert (p is None) == (q is None), name
            if p is not None:
                assert p.dtype == q.dtype and p.shape == q.shape, name
                assert torch.equal(p.view(torch.uint8), q.view(torch.uint8)), name


@pytest.mark.parametrize("dtype,encoding", ENCODINGS)
def test_filter_and_server_send_the_same_tensors(swift_cluster, server, conn, dtype, encoding):
    (filter_status, filter_body), (server_status, server_body) = both(
        swift_cluster, server, conn, "small.tar", hapi(request(dtype, encoding)))
    assert filter_status == server_status == 200
    filter_frames, server_frames = frames_of(filter_body), frames_of(server_body)
    assert_same_frames(filter_frames, server_frames)
    batch = filter_frames[0]
    assert batch.features.dtype == wire.TORCH_DTYPES[dtype]
    assert batch.meta.get("encoding", "raw") == encoding
    assert (batch.scale is not None) == (dtype == "uint8")


def test_uint8_features_reach_the_trainer_within_half_a_step(conn, server):
    """Through python-swiftclient, both tiers: float32 features, each within
    half its channel's quantization step of the float32 request's, and the
    compressed stream smaller than the raw one."""
    exact = [f.features for f in fetch_features(conn, CONTAINER, "small.tar",
                                                request("float32", "raw"))]
    for via in (conn, intermediate_connection(conn, server.url)):
        sizes = {}
        for encoding in wire.WIRE_ENCODINGS:
            stream = fetch_features(via, CONTAINER, "small.tar", request("uint8", encoding))
            frames = list(stream)
            sizes[encoding] = stream.reader.bytes_read
            for frame, reference in zip(frames, exact, strict=True):
                assert frame.features.dtype == torch.uint8
                features = frame.float_features()
                assert features.dtype == torch.float32 and features.shape == reference.shape
                error = (features - reference).abs().transpose(0, 1)
                bound = frame.scale / 2 * (1 + 1e-5) + 1e-6
                assert torch.all(error.reshape(len(bound), -1).amax(dim=1) <= bound)
                assert torch.equal(features[reference == 0], reference[reference == 0])
        assert sizes["zstd"] < sizes["raw"]


@pytest.mark.parametrize("header,value", [(protocol.ENCODING, "gzip"),
                                          (protocol.ENCODING, "ZSTD"),
                                          (protocol.DTYPE, "int8")])
def test_a_bad_value_is_the_same_400_naming_its_header(swift_cluster, server, conn, header,
                                                       value):
    filter_answer, server_answer = both(swift_cluster, server, conn, "small.tar",
                                        hapi(**{header: value}))
    assert filter_answer == server_answer
    status, body = filter_answer
    assert status == 400 and json.loads(body)["parameter"] == header
    assert repr(value) in json.loads(body)["error"]


def test_info_advertises_the_dtypes_and_encodings(swift_cluster):
    with urllib.request.urlopen(f"{swift_cluster.proxy_url}/info", timeout=30) as resp:
        info = json.load(resp)["hapi"]
    assert info["dtypes"] == list(wire.WIRE_DTYPES)
    assert info["encodings"] == list(wire.WIRE_ENCODINGS)


@pytest.mark.parametrize("dtype,encoding", ENCODINGS)
def test_request_headers_round_trip_every_encoding(dtype, encoding):
    req = request(dtype, encoding)
    limits = protocol.Limits()
    parsed = protocol.parse_request(protocol.request_headers(req), limits, lambda model: 40)
    assert parsed == req
    assert protocol.request_headers(req)[protocol.ENCODING] == encoding


def test_encoding_defaults_to_raw():
    parsed = protocol.parse_request({protocol.MODEL: "alexnet"}, protocol.Limits(),
                                    lambda model: 40)
    assert (parsed.dtype, parsed.encoding) == ("float32", "raw")


@pytest.mark.parametrize("dtype", wire.WIRE_DTYPES)
def test_the_trainers_copy_rate_is_measured_in_every_wire_dtype(dtype):
    """The automatic split's decode cost per received byte (uint8 frames
    included: they are dequantized, as the trainer's reader does)."""
    assert 0 < measure_copy_rate(nbytes=1 << 16, wire_dtype=dtype, repeats=1) < 1


def test_uint8_boundaries_count_each_frames_scales_and_zero_points():
    model = zoo.build_model("alexnet", seed=0).freeze(18)
    times = TrainerTimes(forward_s=[1e-3] * len(model), train_s=[None] * len(model),
                         batch_size=4, device="cpu", iterations=1)
    profiles = {dtype: profile_from_model(
        model, input_shape=(3, 64, 64), freeze=18, batch_size=4, trainer=times, raw_bytes=3e3,
        bandwidth_bytes_per_s=1e6, wire_dtype=dtype, storage_batch=16)
        for dtype in ("float32", "uint8")}
    shapes = model.boundary_shapes((3, 64, 64))
    channels = [shape[0] if len(shape) > 1 else 1 for shape in shapes]  # flat: one channel
    assert profiles["uint8"].boundary_bytes == [
        math.prod(shape) + math.ceil(8 * c / 16) for shape, c in zip(shapes, channels,
                                                                     strict=True)]
    assert profiles["float32"].boundary_bytes == model.boundary_bytes((3, 64, 64))
