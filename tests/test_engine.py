"""The feature engine on its own: batches, errors naming members, weights files, devices."""

import io
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from hapi import protocol, wire, zoo
from hapi.middleware.engine import FeatureEngine
from hapi.preprocess import preprocess
from hapi.shards import Sample, ShardError, write_shard
from hapi.weights import WeightsNotFound, save_state_dict


def jpeg(seed, size=48):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def request(model="resnet18", split=4, weights="seed:0"):
    limits = protocol.Limits(weights_dir_enabled=True)
    return protocol.FeatureRequest(model=model, split=split,
                                   freeze=zoo.MODELS[model].default_freeze, batch=4,
                                   weights=protocol.parse_weights(weights, limits),
                                   preset="imagenet-32", dtype="float32")


def extract(engine, req, samples):
    model = engine.load_model((req.model, str(req.weights)), req.model, req.weights)
    frame = wire.decode_frame(engine.extract(model, samples, req, 0)[wire.LENGTH.size:])
    return model, frame


def test_extract_runs_layers_below_the_split():
    engine = FeatureEngine(device="cpu")
    samples = [Sample(f"{i:03d}", jpeg(i), "jpg", i) for i in range(3)]
    req = request()
    model, frame = extract(engine, req, samples)
    with torch.no_grad():
        expected = model(preprocess([s.image for s in samples], req.preset, req.model), 0, 4)
    assert torch.allclose(frame.features, expected, rtol=1e-5, atol=1e-6)
    assert frame.labels.tolist() == [0, 1, 2] and frame.keys == ["000", "001", "002"]
    assert len(frame.timings["layers_s"]) == 4


def test_models_are_cached_and_evicted_oldest_first():
    engine = FeatureEngine(device="cpu", max_cached_models=2)
    first = engine.load_model(("resnet18", "seed:0"), "resnet18", protocol.WeightsRef("seed", "0"))
    assert engine.load_model(("resnet18", "seed:0"), "resnet18",
                             protocol.WeightsRef("seed", "0")) is first
    for seed in ("1", "2"):
        ref = protocol.WeightsRef("seed", seed)
        engine.load_model(("resnet18", str(ref)), "resnet18", ref)
    assert engine.cached_model(("resnet18", "seed:0")) is None
    assert engine.cached_model(("resnet18", "seed:2")) is not None


def test_frozen_models_never_track_gradients():
    engine = FeatureEngine(device="cpu")
    model = engine.load_model(("alexnet", "seed:0"), "alexnet", protocol.WeightsRef("seed", "0"))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_open_shard_names_a_member_that_is_not_an_image():
    engine = FeatureEngine(device="cpu")
    data = write_shard([Sample("000", jpeg(0), "jpg", 0), Sample("001", b"GIF89a junk", "jpg", 1)])
    with pytest.raises(ShardError) as err:
        engine.open_shard(data)
    assert err.value.member == "001.jpg"


def test_a_truncated_jpeg_fails_in_extract_naming_the_member():
    engine = FeatureEngine(device="cpu")
    good = jpeg(1)
    samples = engine.open_shard(write_shard([Sample("000", jpeg(0), "jpg", 0),
                                             Sample("001", good[:len(good) // 3], "jpg", 1)]))
    req = request()
    model = engine.load_model(("resnet18", "seed:0"), "resnet18", req.weights)
    with pytest.raises(ShardError) as err:
        engine.extract(model, samples, req, 0)
    assert err.value.member == "001.jpg"


def test_file_weights_stay_inside_weights_dir(tmp_path):
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    save_state_dict(state, weights_dir / "r18.safetensors")
    (tmp_path / "secret.safetensors").write_bytes(b"outside")
    engine = FeatureEngine(device="cpu", weights_dir=str(weights_dir))
    assert engine.weights_file("r18.safetensors") == str(weights_dir / "r18.safetensors")
    for name in ("../secret.safetensors", "missing.safetensors", "/etc/passwd"):
        with pytest.raises(WeightsNotFound):
            engine.weights_file(name)
    req = request(weights="file:r18.safetensors")
    model, _ = extract(engine, req, [Sample("000", jpeg(0), "jpg", 0)])
    assert torch.equal(model.layers[0].weight, state["conv1.weight"])


def test_layer_count_needs_no_weights():
    engine = FeatureEngine(device="cpu")
    assert engine.layer_count("vgg19") == len(zoo.build_model("vgg19", seed=0))


class SlowFirstCall(torch.nn.Module):
    """A layer whose first call takes 50 ms longer, as a shape's first pass
    pays for building its kernels."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        time.sleep(0.05 if self.calls == 1 else 0.001)
        return x


def test_layer_costs_leave_out_a_shapes_first_pass():
    layers = [SlowFirstCall(), SlowFirstCall()]
    req = request()
    costs = FeatureEngine(device="cpu").layer_costs(SimpleNamespace(layers=layers), req)
    assert [layer.calls for layer in layers] == [2, 2]
    assert len(costs) == 2
    assert all(0.001 / req.batch <= c < 0.02 / req.batch for c in costs)


class FasterAfterTwoCalls(torch.nn.Module):
    """A layer that takes 20 ms in its first two calls, 1 ms after."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        time.sleep(0.02 if self.calls <= 2 else 0.001)
        return x


def test_served_layer_costs_follow_the_frames():
    """The costs served are the one-off measurement until three whole frames
    ran a layer, then the median of the frames' per-sample times; a short
    last frame does not count."""
    engine = FeatureEngine(device="cpu")
    req = request(split=2)
    model = SimpleNamespace(layers=[FasterAfterTwoCalls(), FasterAfterTwoCalls(),
                                    FasterAfterTwoCalls()])
    assert engine.known_layer_costs(req.model, req.preset, req.batch) is None
    engine.layer_costs(model, req)  # its two passes take 20 ms a layer
    one_off = engine.known_layer_costs(req.model, req.preset, req.batch)
    assert all(c >= 0.02 / req.batch for c in one_off)
    samples = [Sample(f"{i:03d}", jpeg(i), "jpg", i) for i in range(req.batch)]
    frames = []
    for index in range(2):
        frames.append(engine.extract(model, samples, req, index))
        engine.extract(model, samples[:1], req, index)  # a short frame: not counted
    assert engine.known_layer_costs(req.model, req.preset, req.batch) == one_off
    frames.append(engine.extract(model, samples, req, 2))
    served = engine.known_layer_costs(req.model, req.preset, req.batch)
    timings = [wire.decode_frame(f[wire.LENGTH.size:]).timings["layers_s"]
               for f in frames]
    assert served[:2] == [sorted(t[i] for t in timings)[1] / req.batch for i in range(2)]
    assert all(c < 0.01 / req.batch for c in served[:2])
    assert served[2] == one_off[2]  # above the split: no frame ran it
    assert engine.known_layer_costs(req.model, req.preset, 2 * req.batch) is None


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: checks that layers run on the GPU and give "
                           "the CPU's features")
def test_cuda_features_match_the_cpu():
    samples = [Sample(f"{i:03d}", jpeg(i), "jpg", i) for i in range(4)]
    req = request(split=zoo.MODELS["resnet18"].default_freeze)
    _, on_cpu = extract(FeatureEngine(device="cpu"), req, samples)
    gpu = FeatureEngine(device="auto")
    assert gpu.device.type == "cuda"
    _, on_gpu = extract(gpu, req, samples)
    assert on_gpu.features.device.type == "cpu"
    assert torch.allclose(on_gpu.features, on_cpu.features, rtol=1e-3, atol=1e-4)
