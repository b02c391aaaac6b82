"""An independent check of the preprocessing presets and of each model's
normalisation against torchvision's (and timm's) own transforms and weights
metadata.

The feature-equivalence tests elsewhere take their expected inputs from
``hapi.preprocess`` itself; here the expected tensors come from
``torchvision.transforms`` applied to PIL images loaded the way torchvision's
data sets load them (``pil_loader``: decode, then ``convert("RGB")``), which is
the pipeline the pre-trained weights were evaluated with.

Tolerance: one uint8 level. The presets resize the decoded uint8 tensor (torch's
antialiased bilinear kernel); the reference resizes the PIL image (Pillow's
kernel). Both compute the same antialiased bilinear filter in fixed point and
may round a value differently, so a value may differ by one level (1/255 before
normalisation, (1/255)/std after it), never more. The test images are noise on a
gradient: a wrong size (even by one pixel, see
``test_imagenet_32_rounds_its_resize_target``), crop offset, interpolation or
antialias setting moves many values by several levels. Normalisation is checked
exactly, apart from the resize.
"""

import io
import math

import numpy as np
import pytest
import timm.data
import torch
import torchvision.models as tvm
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets.folder import pil_loader
from torchvision.transforms import InterpolationMode

from hapi import zoo
from hapi.preprocess import PRESETS, preprocess, resized_size
from hapi.protocol import DEFAULT_PRESET
from hapi.weights import EFFICIENTNET_LITE0_TIMM_ARCH

SIZES = (32, 64, 112, 224)
TORCHVISION_MODELS = ("alexnet", "resnet18", "resnet50", "vgg11", "vgg19", "densenet121",
                      "vit_b_16", "mobilenet_v3_small")

# (width, height, PIL mode, format): landscape, portrait, odd sizes, images
# smaller than every preset (upscaled), an extreme aspect ratio, grayscale,
# alpha and palette images, and a JPEG.
IMAGES = {
    "landscape-500x375": (500, 375, "RGB", "PNG"),
    "portrait-333x517": (333, 517, "RGB", "PNG"),
    "odd-31x29": (31, 29, "RGB", "PNG"),
    "grayscale-8x8": (8, 8, "L", "PNG"),
    "rgba-97x250": (97, 250, "RGBA", "PNG"),
    "wide-1000x21": (1000, 21, "RGB", "PNG"),
    "palette-225x224": (225, 224, "P", "PNG"),
    "jpeg-640x480": (640, 480, "RGB", "JPEG"),
}


def _image(index, width, height, mode):
    """Noise on a colour gradient, in ``mode``: a one-pixel shift or another
    filter changes many values by many levels."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    noisy = np.clip(gradient + rng.normal(0, 40, gradient.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(noisy)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        return image
    return image if mode == "RGB" else image.convert(mode)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """name -> (encoded bytes, the RGB image torchvision's ``pil_loader`` reads
    from the same bytes)."""
    folder = tmp_path_factory.mktemp("reference-images")
    loaded = {}
    for index, (name, (width, height, mode, fmt)) in enumerate(IMAGES.items()):
        buffer = io.BytesIO()
        _image(index, width, height, mode).save(buffer, format=fmt)
        path = folder / f"{name}.{fmt.lower()}"
        path.write_bytes(buffer.getvalue())
        loaded[name] = (buffer.getvalue(), pil_loader(path))
    return loaded


def _reference_resize(preset):
    """torchvision's Resize for a preset: ``imagenet-N`` resizes the shorter
    side to N*256/224 (rounded), ``resize-N`` the whole image to N x N; both
    bilinear with antialiasing."""
    kind, _, size = preset.partition("-")
    size = int(size)
    target = round(size * 256 / 224) if kind == "imagenet" else (size, size)
    return T.Resize(target, interpolation=InterpolationMode.BILINEAR, antialias=True)


def _reference(preset, mean, std, resize=None):
    resize = resize or _reference_resize(preset)
    size = int(preset.partition("-")[2])
    crop = [T.CenterCrop(size)] if preset.startswith("imagenet-") else []
    return T.Compose([resize, *crop, T.ToTensor(), T.Normalize(mean, std)])


def _levels(normalised, std):
    """A normalised (C, H, W) tensor in uint8 levels, less the mean."""
    return normalised * torch.tensor(std).view(-1, 1, 1) * 255


def _max_level_difference(got, expected, std):
    return float((_levels(got, std) - _levels(expected, std)).abs().max())


def _assert_within_one_level(got, expected, std):
    assert got.shape == expected.shape
    # 1e-3: float32 rounding of normalise-then-scale, far below a level
    assert _max_level_difference(got, expected, std) <= 1 + 1e-3


def _weights_transforms(model):
    return tvm.get_model_weights(model).DEFAULT.transforms()


# Geometry: every preset against torchvision's transforms ------------------------


@pytest.mark.parametrize("preset", [f"{kind}-{n}" for kind in ("imagenet", "resize")
                                    for n in SIZES])
def test_preset_matches_torchvision_transforms(images, preset):
    info = zoo.MODELS["resnet18"]
    for name, (data, rgb) in images.items():
        got = preprocess([data], preset, "resnet18")[0]
        expected = _reference(preset, info.mean, info.std)(rgb)
        size = int(preset.partition("-")[2])
        assert got.shape == (3, size, size), name
        _assert_within_one_level(got, expected, info.std)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_resized_size_is_torchvisions_resize(images, preset):
    """The pixel-limit check predicts the size torchvision's resize makes."""
    for name, (_, rgb) in images.items():
        assert resized_size(preset, *rgb.size) == _reference_resize(preset)(rgb).size, name


def test_imagenet_32_rounds_its_resize_target(images):
    """32 * 256/224 = 36.57: the preset rounds it to 37, where timm's rule
    (floor(32 / crop_pct 0.875)) gives 36. The two differ by many levels, so
    the one-level tolerance tells a one-pixel resize difference apart."""
    assert round(32 * 256 / 224) == 37 and math.floor(32 / 0.875) == 36
    info = zoo.MODELS["resnet18"]
    data, rgb = images["landscape-500x375"]
    got = preprocess([data], "imagenet-32", "resnet18")[0]
    _assert_within_one_level(got, _reference("imagenet-32", info.mean, info.std)(rgb), info.std)
    floor_rule = _reference("imagenet-32", info.mean, info.std, resize=T.Resize(36))(rgb)
    assert _max_level_difference(got, floor_rule, info.std) > 5


# Normalisation: each model's against its weights' metadata ----------------------


@pytest.mark.parametrize("model", TORCHVISION_MODELS)
def test_normalisation_is_the_torchvision_weights(images, model):
    transforms = _weights_transforms(model)
    info = zoo.MODELS[model]
    assert info.mean == tuple(transforms.mean)
    assert info.std == tuple(transforms.std)
    data, rgb = images["portrait-333x517"]
    normalise = T.Normalize(transforms.mean, transforms.std)
    for preset in ("resize-32", "imagenet-64"):
        torch.testing.assert_close(preprocess([data], preset, model)[0],
                                   normalise(PRESETS[preset](rgb)), rtol=0, atol=1e-6)


def test_efficientnet_lite0_normalisation_is_timms_config(images):
    """The weights package declares no preprocessing; timm's configuration for
    the same TensorFlow weights does: mean and std 0.5, 224 px, crop_pct 0.875
    (resize 256: the imagenet-224 geometry) and bicubic interpolation. The
    presets resize bilinearly for every model: this differs from timm's
    bicubic by several levels and matches timm's transform made bilinear."""
    config = timm.data.resolve_data_config(
        pretrained_cfg=timm.get_pretrained_cfg(EFFICIENTNET_LITE0_TIMM_ARCH).to_dict())
    info = zoo.MODELS["efficientnet_lite0"]
    assert (info.mean, info.std) == (config["mean"], config["std"]) == ((0.5,) * 3, (0.5,) * 3)
    assert config["input_size"] == (3, info.input_size, info.input_size)
    assert math.floor(info.input_size / config["crop_pct"]) == round(224 * 256 / 224)
    assert config["interpolation"] == "bicubic"
    data, rgb = images["landscape-500x375"]
    got = preprocess([data], "imagenet-224", "efficientnet_lite0")[0]
    bilinear = timm.data.create_transform(**{**config, "interpolation": "bilinear"})
    _assert_within_one_level(got, bilinear(rgb), info.std)
    assert _max_level_difference(got, timm.data.create_transform(**config)(rgb), info.std) > 5


# The default preset against each model's evaluation transform -------------------


@pytest.mark.parametrize("model", [m for m in TORCHVISION_MODELS if m != "resnet50"])
def test_default_preset_is_the_weights_evaluation_transform(images, model):
    transforms = _weights_transforms(model)
    assert (transforms.resize_size, transforms.crop_size) == ([256], [224])
    assert (transforms.interpolation, transforms.antialias) == (InterpolationMode.BILINEAR, True)
    assert DEFAULT_PRESET == "imagenet-224"
    for name in ("landscape-500x375", "rgba-97x250", "grayscale-8x8"):
        data, rgb = images[name]
        _assert_within_one_level(preprocess([data], DEFAULT_PRESET, model)[0], transforms(rgb),
                                 transforms.std)


def test_resnet50_weights_were_evaluated_at_resize_232(images):
    """ResNet-50's DEFAULT weights (IMAGENET1K_V2) were evaluated resizing the
    shorter side to 232, not 256; the presets are the same for every model, so
    imagenet-224 gives ResNet-50 the 256/224 geometry of the other models."""
    weights = tvm.get_model_weights("resnet50").DEFAULT
    transforms = weights.transforms()
    assert weights is tvm.ResNet50_Weights.IMAGENET1K_V2
    assert (transforms.resize_size, transforms.crop_size) == ([232], [224])
    data, rgb = images["landscape-500x375"]
    got = preprocess([data], DEFAULT_PRESET, "resnet50")[0]
    at_256 = _reference(DEFAULT_PRESET, transforms.mean, transforms.std)(rgb)
    assert _reference_resize(DEFAULT_PRESET).size == 256
    _assert_within_one_level(got, at_256, transforms.std)
    assert _max_level_difference(got, transforms(rgb), transforms.std) > 10
