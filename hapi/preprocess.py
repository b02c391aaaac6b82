"""Deterministic preprocessing presets: encoded image bytes to input tensors.

The storage tier and the trainer (vanilla mode) use the same preset code, so
a split changes where preprocessing runs, never what it computes.
A preset fixes the geometry: ``imagenet-N`` resizes the shorter side to
N*256/224 and centre-crops N x N (torchvision's evaluation transform);
``resize-N`` resizes the whole image to N x N (for small images such as the
8x8 digits). The normalisation is the model's own (``ModelInfo.mean``/``std``:
the statistics its pre-trained weights expect).
"""

import io

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from hapi import zoo

SIZES = (32, 64, 112, 224)


class DecodeError(ValueError):
    """An image member could not be decoded (or is larger than allowed)."""


def _preset(size, crop):
    resize = [v2.Resize(round(size * 256 / 224)), v2.CenterCrop(size)] if crop \
        else [v2.Resize((size, size))]
    return v2.Compose([v2.PILToTensor(), *resize, v2.ToDtype(torch.float32, scale=True)])


PRESETS = {
    **{f"imagenet-{n}": _preset(n, crop=True) for n in SIZES},
    **{f"resize-{n}": _preset(n, crop=False) for n in SIZES},
}


def preset_size(name):
    """The side in pixels of the images a preset makes."""
    return int(name.rpartition("-")[2])


def check_image(data, max_pixels):
    """Open encoded image bytes far enough to read the format and size, and
    refuse images above ``max_pixels`` before any pixel is decoded
    (decompression bombs). Returns the lazily-decoding PIL image."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise DecodeError(f"image is above the {max_pixels}-pixel limit") from None
    except UnidentifiedImageError:
        raise DecodeError("not a decodable image: no known image format") from None
    except (OSError, ValueError) as err:
        raise DecodeError(f"not a decodable image: {err}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(f"image is {width}x{height}, above the {max_pixels}-pixel limit")
    return image


def open_image(data, max_pixels):
    """Decode encoded image bytes into an RGB PIL image (see :func:`check_image`)."""
    image = check_image(data, max_pixels)
    try:
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DecodeError(f"image does not decode: {err}") from None


def preprocess(images, preset, model, max_pixels=40_000_000):
    """Decode and preprocess a list of encoded images into one NCHW batch
    for the zoo model named ``model``.

    Raises :class:`DecodeError` carrying the index of the first bad image in
    ``err.index``.
    """
    info = zoo.MODELS[model]
    transform = v2.Compose([PRESETS[preset], v2.Normalize(info.mean, info.std)])
    tensors = []
    for index, data in enumerate(images):
        try:
            tensors.append(transform(open_image(data, max_pixels)))
        except DecodeError as err:
            err.index = index
            raise
    return torch.stack(tensors)
