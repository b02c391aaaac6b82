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

from hapi import names, zoo

SIZES = names.PRESET_SIZES


class DecodeError(ValueError):
    """An image member could not be decoded (or is larger than allowed)."""


def _preset(size, crop):
    resize = [v2.Resize(round(size * 256 / 224)), v2.CenterCrop(size)] if crop \
        else [v2.Resize((size, size))]
    return v2.Compose([v2.PILToTensor(), *resize, v2.ToDtype(torch.float32, scale=True)])


def preset_size(name):
    """The side in pixels of the images a preset makes."""
    return int(name.rpartition("-")[2])


PRESETS = {name: _preset(preset_size(name), crop=name.startswith("imagenet-"))
           for name in names.PRESETS}


def resized_size(preset, width, height):
    """(width, height) of a ``width`` x ``height`` image after the preset's
    resize, before any crop (torchvision's rule: the shorter side to the
    preset's resize target, the longer side in proportion, truncated)."""
    size = preset_size(preset)
    if preset.startswith("resize-"):
        return size, size
    short_target = round(size * 256 / 224)
    short, long = sorted((width, height))
    long_target = int(short_target * long / short)
    return (short_target, long_target) if width <= height else (long_target, short_target)


# The decoders of the shard format's image types (hapi.shards.IMAGE_EXTENSIONS);
# no other PIL plugin ever sees member bytes, whatever the member's extension.
DECODERS = ("JPEG", "PNG", "WEBP", "BMP", "PPM")


def check_image(data, max_pixels, preset=None):
    """Open encoded image bytes far enough to read the format and size, and
    refuse before any pixel is decoded (decompression bombs) an image above
    ``max_pixels``, or one that the resize of ``preset`` (when given) would
    make larger than that: a 2 x 2,000,000 image is small, but resizing its
    shorter side to 256 px would make it a billion pixels. Returns the
    lazily-decoding PIL image."""
    try:
        image = Image.open(io.BytesIO(data), formats=DECODERS)
    except Image.DecompressionBombError:
        raise DecodeError(f"image is above the {max_pixels}-pixel limit") from None
    except UnidentifiedImageError:
        raise DecodeError("not a decodable image: not a JPEG, PNG, WebP, BMP or PPM "
                          "image") from None
    except Exception as err:  # untrusted bytes: whatever fails, they are no image
        raise DecodeError(f"not a decodable image: {err}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(f"image is {width}x{height}, above the {max_pixels}-pixel limit")
    if preset is not None:
        resized = resized_size(preset, width, height)
        if resized[0] * resized[1] > max_pixels:
            raise DecodeError(f"image is {width}x{height}: preset {preset} would resize it "
                              f"to {resized[0]}x{resized[1]}, above the {max_pixels}-pixel "
                              "limit")
    return image


def open_image(data, max_pixels, preset=None):
    """Decode encoded image bytes into an RGB PIL image (see :func:`check_image`)."""
    image = check_image(data, max_pixels, preset)
    try:
        return image.convert("RGB")
    except Exception as err:  # untrusted bytes: whatever fails, they do not decode
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
            tensors.append(transform(open_image(data, max_pixels, preset)))
        except DecodeError as err:
            err.index = index
            raise
    return torch.stack(tensors)
