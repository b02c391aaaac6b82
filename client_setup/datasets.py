"""Sources of samples to put into Swift: an image folder, scikit-learn's digits, synthetic JPEGs.

Each source is a :class:`Source`: the class names, the sample count and a
one-pass iterator of :class:`hapi.shards.Sample`. Keys are zero-padded
running indices, so the order of the samples is the order of their keys.
"""

import functools
import io
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from hapi.shards import IMAGE_EXTENSIONS, Sample

log = logging.getLogger(__name__)

KEY_WIDTH = 6


class SourceError(ValueError):
    """A source cannot be read: a missing folder, no classes, bad parameters."""


@dataclass(frozen=True)
class Source:
    classes: list
    count: int
    samples: Iterator[Sample]


def sample_key(index, count):
    """Zero-padded key of sample ``index`` out of ``count``: keys sort in sample order."""
    return str(index).zfill(max(KEY_WIDTH, len(str(count - 1))))


def image_folder(path, seed=0):
    """Samples from ``path/<class>/<image>``: class index by sorted subfolder name.

    Files keep their encoded bytes and extension. Files whose extension is not
    an image's are skipped (with a logged warning giving their count). The
    samples are shuffled with ``seed`` so that shards mix the classes. Each
    file is decoded as it is read: one that does not decode stops the
    iteration with a :class:`SourceError` naming it.
    """
    root = Path(path)
    if not root.is_dir():
        raise SourceError(f"image folder {str(root)!r} does not exist or is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SourceError(f"image folder {str(root)!r} has no class subfolders")
    files, skipped = _image_files(root, classes)
    if skipped:
        log.warning("skipped %d non-image files under %s", skipped, root)
    if not files:
        raise SourceError(f"image folder {str(root)!r} holds no images "
                          f"({', '.join(IMAGE_EXTENSIONS)}) in its class subfolders")
    random.Random(seed).shuffle(files)
    return Source(classes, len(files), _read_files(files))


def _image_files(root, classes):
    """``([(file, label), ...] in sorted order, number of non-image files)``."""
    files, skipped = [], 0
    for label, name in enumerate(classes):
        for file in sorted((root / name).rglob("*")):
            if not file.is_file() or file.name.startswith("."):
                continue
            if _extension(file) in IMAGE_EXTENSIONS:
                files.append((file, label))
            else:
                skipped += 1
    return files, skipped


def _extension(file):
    return file.suffix[1:].lower()


def _read_files(files):
    for index, (file, label) in enumerate(files):
        image = file.read_bytes()
        _check_decodes(file, image)
        yield Sample(key=sample_key(index, len(files)), image=image, ext=_extension(file),
                     label=label)


def _check_decodes(file, image):
    """Refuse, naming ``file``, an image that the storage tier would refuse
    (with its default pixel limit) under the member name it gets in a shard."""
    from hapi.middleware.settings import OPTION_DEFAULTS
    from hapi.preprocess import DecodeError, open_image

    try:
        open_image(image, OPTION_DEFAULTS["max_image_pixels"])
    except DecodeError as err:
        raise SourceError(f"{file}: {err}; remove or replace the file and load again") from None


def digits():
    """scikit-learn's 1,797 handwritten digits as 8x8 grayscale PNGs, 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = np.rint(data.images * (255 / 16)).astype(np.uint8)
    count = len(pixels)
    samples = (Sample(key=sample_key(i, count), image=_encode(pixels[i], "PNG"), ext="png",
                      label=int(data.target[i]))
               for i in range(count))
    return Source([str(name) for name in data.target_names], count, samples)


IMAGENET_LIKE = "imagenet"
# Sides of the ImageNet-like images, drawn per image (inclusive): about 400 x 350 on
# average, as ImageNet's photos, which the storage tier resizes (preset imagenet-224).
IMAGENET_WIDTHS = (300, 500)
IMAGENET_HEIGHTS = (250, 450)
# Fine grain and flat-coloured shapes on top of the 1/f field: with these, quality-90
# JPEGs come out at about 110 KB on average, the mean size of ImageNet's photos.
IMAGENET_GRAIN = 1.55
IMAGENET_SHAPES = 12


def synthetic(count, size=224, classes=10, seed=0, quality=90):
    """``count`` photo-like RGB JPEGs in ``classes`` classes.

    ``size``: the side of square images in pixels, or :data:`IMAGENET_LIKE`
    for images that mirror ImageNet's photos: a width and height drawn per
    image from :data:`IMAGENET_WIDTHS` x :data:`IMAGENET_HEIGHTS`, with fine
    grain and shapes so that their JPEGs are about 110 KB at quality 90.
    Image ``i`` depends only on ``(seed, i)`` and has label ``i % classes``.
    The images have the 1/f spectrum of natural images, so they compress like
    photos, with a class-dependent grating and tint that a classifier can learn.
    """
    square = size != IMAGENET_LIKE
    if count < 1 or (square and (not isinstance(size, int) or size < 8)) or classes < 1 \
            or not 1 <= quality <= 100:
        raise SourceError(f"synthetic needs count >= 1, size >= 8 or {IMAGENET_LIKE!r}, "
                          f"classes >= 1 and 1 <= quality <= 100 (got {count}, {size}, "
                          f"{classes}, {quality})")
    draw = (functools.partial(synthetic_image, size=size) if square else imagenet_like_image)
    samples = (Sample(key=sample_key(i, count),
                      image=_encode(draw(seed, i, i % classes, classes), "JPEG",
                                    quality=quality),
                      ext="jpg", label=i % classes)
               for i in range(count))
    return Source([f"class_{c:0{len(str(classes - 1))}d}" for c in range(classes)], count, samples)


def synthetic_image(seed, index, label, classes, size):
    """One synthetic image as a ``size`` x ``size`` x 3 uint8 array."""
    rng = np.random.default_rng([seed, index])
    return _render(rng, label, classes, _pink_noise(rng, size, size, alpha=1.0))


def imagenet_like_image(seed, index, label, classes):
    """One ImageNet-like image as a height x width x 3 uint8 array (sides drawn per image).

    The square images' field plus fine grain (a 1/f**0.5 field) and
    :data:`IMAGENET_SHAPES` ellipses and rectangles of shifted colour, whose
    edges and textured insides make the JPEGs as large as a photo's.
    """
    rng = np.random.default_rng([seed, index, 1])
    width = int(rng.integers(IMAGENET_WIDTHS[0], IMAGENET_WIDTHS[1] + 1))
    height = int(rng.integers(IMAGENET_HEIGHTS[0], IMAGENET_HEIGHTS[1] + 1))
    luma = (_pink_noise(rng, height, width, alpha=1.0)
            + IMAGENET_GRAIN * _pink_noise(rng, height, width, alpha=0.5))
    return _render(rng, label, classes, luma, shapes=IMAGENET_SHAPES)


def _render(rng, label, classes, luma, shapes=0):
    """The class's grating and tint over the random ``luma`` field, with ``shapes``."""
    height, width = luma.shape
    chroma_a, chroma_b = (0.5 * _pink_noise(rng, height, width, alpha=1.5) for _ in range(2))
    angle = np.pi * label / classes
    cycles = 6 + 3 * (label % 3)
    x, y = _unit_grid(height, width)
    luma += 0.8 * np.sin(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle))
                         + rng.uniform(0, 2 * np.pi), dtype=np.float32)
    tint = 2 * np.pi * label / classes
    chroma_a += 0.6 * np.cos(tint)
    chroma_b += 0.6 * np.sin(tint)
    rgb = np.stack([luma + chroma_a,
                    luma - 0.5 * chroma_a + chroma_b,
                    luma - 0.5 * chroma_a - chroma_b], axis=-1)
    for _ in range(shapes):
        rgb += _shape_mask(rng, x, y)[..., None] * rng.uniform(-1.2, 1.2, 3).astype(np.float32)
    return np.clip(128 + 40 * rgb, 0, 255).astype(np.uint8)


def _shape_mask(rng, x, y):
    """An ellipse or a rectangle at a random place, of random size, as a bool mask."""
    cx, cy = rng.uniform(0, 1, 2)
    rx, ry = rng.uniform(0.03, 0.25, 2)
    if rng.random() < 0.5:
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
    return (np.abs(x - cx) < rx) & (np.abs(y - cy) < ry)


@functools.cache
def _unit_grid(height, width):
    """Pixel coordinates ``(x, y)`` scaled to [0, 1), float32."""
    return np.meshgrid(np.arange(width, dtype=np.float32) / width,
                       np.arange(height, dtype=np.float32) / height)


@functools.cache
def _spectral_filter(height, width, alpha):
    """The 1/f**alpha amplitudes of an rfft2 spectrum, zero at f = 0."""
    freq = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :])
    freq[0, 0] = np.inf
    return (freq ** -alpha).astype(np.float32)


def _pink_noise(rng, height, width, alpha):
    """A ``height`` x ``width`` float32 random field with a 1/f**alpha spectrum, unit variance."""
    gain = _spectral_filter(height, width, alpha)
    spectrum = rng.standard_normal((2, *gain.shape), dtype=np.float32) * gain
    field = np.fft.irfft2(spectrum[0] + 1j * spectrum[1], s=(height, width)).astype(np.float32)
    return field / field.std()


def _encode(pixels, fmt, **options):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **options)
    return buf.getvalue()
