"""The HAPI filter in a real Swift proxy, driven with python-swiftclient."""

import json
import statistics
import threading
import time

import pytest
import torch
import torchvision
from helpers import (
    BAD_PARAMETERS,
    BAD_SHARDS,
    bad_shard_objects,
    feature_request,
    raw_get,
    samples,
)
from safetensors.torch import save as st_save
from swiftclient import ClientException

from hapi import protocol, wire, zoo
from hapi.client.features import fetch_features
from hapi.preprocess import preprocess
from hapi.shards import Sample, write_shard
from hapi.weights import pretrained_state_dict

pytestmark = pytest.mark.swift

CONTAINER = "hapi-filter-tests"


@pytest.fixture(scope="module")
def conn(swift_cluster):
    connection = swift_cluster.connection()
    connection.put_container(CONTAINER)
    connection.put_object(CONTAINER, "small.tar", write_shard(samples(5)))
    yield connection
    connection.close()


def fetch(conn, name, req):
    stream = fetch_features(conn, CONTAINER, name, req)
    frames = list(stream)
    return stream, frames


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def error_of(conn, name, headers):
    with pytest.raises(ClientException) as err:
        conn.get_object(CONTAINER, name, headers=headers)
    return err.value.http_status, err.value.http_response_content


def test_frames_follow_the_storage_batch(conn):
    stream, frames = fetch(conn, "small.tar", feature_request("alexnet", batch=2))
    assert stream.batch_used == 2 and stream.samples == 5
    assert stream.device in ("cpu", "cuda", "cuda:0")
    assert [len(f.labels) for f in frames] == [2, 2, 1]
    assert [k for f in frames for k in f.keys] == [f"{i:06d}" for i in range(5)]
    assert [int(x) for f in frames for x in f.labels] == [i % 10 for i in range(5)]
    split = zoo.MODELS["alexnet"].default_freeze
    assert all(len(f.timings["layers_s"]) == split for f in frames)
    assert stream.end.meta["samples"] == "5"


# The heavy models run on few, small images; vit_b_16 needs 224 px.
EQUIVALENCE = [(name, "imagenet-224" if name == "vit_b_16" else "imagenet-64")
               for name in zoo.MODELS]


@pytest.mark.parametrize(("name", "preset"), EQUIVALENCE)
def test_split_equivalence_through_the_proxy(conn, name, preset):
    """Layers [s, end) on the proxy's features == the whole model
    (docs/DESIGN.md, split equivalence)."""
    if name == "efficientnet_lite0":  # the real ImageNet weights, offline
        weights, model = "pretrained", zoo.build_model(name, state_dict=pretrained_state_dict(name))
    else:
        weights, model = "seed:0", zoo.build_model(name, seed=0)
    images = samples(3, first=100)
    conn.put_object(CONTAINER, f"eq-{name}.tar", write_shard(images))
    x = preprocess([s.image for s in images], preset, name)
    with torch.no_grad():
        expected = model(x)
    freeze = model.default_freeze
    for split in sorted({0, 1, freeze // 2, freeze} if name == "alexnet" else
                        {1, freeze // 2, freeze}):
        _, frames = fetch(conn, f"eq-{name}.tar",
                          feature_request(name, split, weights=weights, preset=preset))
        features = torch.cat([f.features for f in frames])
        with torch.no_grad():
            local = model(x, 0, split)
            out = model(features.clone(), split)  # a layer may be an in-place ReLU
        assert features.shape == local.shape
        assert relative_error(features, local) <= 1e-5, (name, split)
        assert relative_error(out, expected) <= 1e-5, (name, split)


def test_half_precision_on_the_wire(conn):
    _, full = fetch(conn, "small.tar", feature_request("resnet18"))
    _, half = fetch(conn, "small.tar", feature_request("resnet18", dtype="float16"))
    a, b = torch.cat([f.features for f in full]), torch.cat([f.features for f in half])
    assert b.dtype == torch.float16 and b.nbytes * 2 == a.nbytes
    assert relative_error(b.float(), a) < 1e-2


def test_weights_from_a_swift_object(conn):
    """Weights in torchvision's own key space, stored as an object in the caller's account."""
    torch.manual_seed(7)
    state = torchvision.models.resnet18().state_dict()
    model = zoo.build_model("resnet18", state_dict=state)
    conn.put_object(CONTAINER, "weights/r18.safetensors", st_save(state))
    req = feature_request("resnet18", weights=f"swift:{CONTAINER}/weights/r18.safetensors")
    _, frames = fetch(conn, "small.tar", req)
    x = preprocess([s.image for s in samples(5)], "imagenet-64", "resnet18")
    with torch.no_grad():
        local = model(x, 0, model.default_freeze)
    assert relative_error(torch.cat([f.features for f in frames]), local) <= 1e-5


@pytest.fixture(scope="module")
def bad_objects(conn):
    objects = bad_shard_objects()
    for name, data in objects.items():
        conn.put_object(CONTAINER, name, data)
    return objects


def good_request_works(conn):
    _, frames = fetch(conn, "small.tar", feature_request("alexnet"))
    assert sum(len(f.labels) for f in frames) == 5


@pytest.mark.parametrize(("override", "parameter"), BAD_PARAMETERS)
def test_bad_parameter_is_400_naming_it_and_proxy_keeps_serving(conn, override, parameter):
    headers = {**protocol.request_headers(feature_request("alexnet")), **override}
    status, body = error_of(conn, "small.tar", headers)
    assert status == 400
    doc = json.loads(body)
    assert doc["parameter"] == parameter and doc["error"]
    good_request_works(conn)


@pytest.mark.parametrize(("name", "member", "message"), BAD_SHARDS)
def test_bad_shard_is_422_naming_the_member(conn, bad_objects, name, member, message):
    headers = protocol.request_headers(feature_request("alexnet"))
    status, body = error_of(conn, name, headers)
    assert status == 422
    doc = json.loads(body)
    assert message in doc["error"]
    assert doc["member"] == member
    assert conn.get_object(CONTAINER, name)[1] == bad_objects[name]
    good_request_works(conn)


def test_member_failing_after_the_status_ends_the_stream_naming_it(conn):
    """Headers are checked up front; a body that breaks in batch 2 becomes an error frame."""
    images = samples(4)
    broken = images[3].image[:len(images[3].image) // 2]
    conn.put_object(CONTAINER, "late-failure.tar",
                    write_shard([*images[:3], Sample(images[3].key, broken, "png", 3)]))
    stream = fetch_features(conn, CONTAINER, "late-failure.tar", feature_request("alexnet"))
    received = []
    with pytest.raises(wire.StreamError) as err:
        received.extend(len(frame.labels) for frame in stream)
    assert received == [2]
    assert err.value.status == 422 and err.value.member == "000003.png"
    good_request_works(conn)


def test_missing_object_is_swifts_404(conn):
    status, _ = error_of(conn, "no-such-shard.tar",
                         protocol.request_headers(feature_request("alexnet")))
    assert status == 404
    good_request_works(conn)


def timed_get(url, headers):
    t0 = time.perf_counter()
    status, body = raw_get(url, headers)
    return status, body, time.perf_counter() - t0


# Tokens this tempauth issues are fernet tokens (AUTH_ftk...), valid or not.
@pytest.mark.parametrize("token", [None, "AUTH_ftk-not-a-valid-token"])
def test_no_valid_token_is_401_without_tensor_bytes(conn, token):
    url = f"{conn.url}/{CONTAINER}/small.tar"
    headers = protocol.request_headers(feature_request("alexnet"))
    if token:
        headers["X-Auth-Token"] = token
    status, body = raw_get(url, headers)
    assert status == 401
    assert b"features" not in body and b"__metadata__" not in body
    good_request_works(conn)


def test_requests_without_hapi_headers_get_the_object(conn):
    assert conn.get_object(CONTAINER, "small.tar")[1] == write_shard(samples(5))


def test_info_advertises_the_filter(swift_cluster):
    status, body = raw_get(f"{swift_cluster.proxy_url}/info", {})
    info = json.loads(body)["hapi"]
    assert status == 200
    assert set(info["models"]) == set(zoo.MODELS)
    assert info["max_batch"] > 0 and "imagenet-224" in info["presets"]


def test_proxy_serves_others_during_a_long_extraction(conn, swift_cluster):
    """Torch runs in OS threads, the proxy hub keeps serving
    (docs/DESIGN.md, "Swift is untouched"): a health check and a plain GET
    answer in about their idle time while frames compute; were the hub
    blocked by a frame, a probe would wait for most of that frame."""
    conn.put_object(CONTAINER, "long.tar", write_shard(samples(24, size=256, first=500)))
    req = feature_request("resnet50", batch=4, preset="imagenet-224")
    plain_url = f"{conn.url}/{CONTAINER}/small.tar"

    def probe():
        status, _, health_s = timed_get(f"{swift_cluster.proxy_url}/healthcheck", {})
        assert status == 200
        status, body, get_s = timed_get(plain_url, {"X-Auth-Token": conn.token})
        assert status == 200 and body == write_shard(samples(5))
        return max(health_s, get_s)

    idle = [probe() for _ in range(5)]
    started, done = threading.Event(), threading.Event()
    result = {}

    def extract():
        started.set()
        result["frames"] = fetch(conn, "long.tar", req)[1]
        done.set()

    worker = threading.Thread(target=extract)
    worker.start()
    started.wait()
    time.sleep(1.0)
    latencies = []
    while not done.is_set() and len(latencies) < 20:
        latencies.append(probe())
        time.sleep(0.1)
    worker.join()
    frames = result["frames"]
    assert sum(len(f.labels) for f in frames) == 24
    assert len(latencies) >= 5, "extraction finished before the proxy could be probed"
    frame_s = min(f.timings["decode_s"] + sum(f.timings["layers_s"]) for f in frames)
    assert max(latencies) < frame_s / 2, (latencies, frame_s)
    assert statistics.median(latencies) < 20 * statistics.median(idle) + 0.02, (latencies, idle)
