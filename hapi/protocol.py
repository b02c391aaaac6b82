"""The HAPI request protocol: header names, parameters and their validation.

A GET on a shard object that carries ``X-Hapi-Model`` is a feature request;
the other ``X-Hapi-*`` headers are optional. The filter in the Swift proxy and
the standalone server both parse requests with :func:`parse_request`, so the
two answer a bad parameter with the same status and message.
"""

import re
from dataclasses import dataclass

from hapi import names, zoo
from hapi.preprocess import PRESETS, preset_size

# Request headers.
MODEL = "X-Hapi-Model"
SPLIT = "X-Hapi-Split"
FREEZE = "X-Hapi-Freeze"
BATCH = "X-Hapi-Batch"
WEIGHTS = "X-Hapi-Weights"
PRESET = "X-Hapi-Preset"
DTYPE = "X-Hapi-Dtype"
ENCODING = "X-Hapi-Encoding"
REQUEST_HEADERS = (MODEL, SPLIT, FREEZE, BATCH, WEIGHTS, PRESET, DTYPE, ENCODING)

# Where the storage tier answers what each layer costs on its device:
# GET COSTS_PATH?model=M&preset=P&batch=B, a JSON document.
COSTS_PATH = "/hapi/costs"

# Response headers.
DEVICE = "X-Hapi-Device"
BATCH_USED = "X-Hapi-Batch-Used"
SAMPLES = "X-Hapi-Samples"
# How the request used the storage tier's feature cache: off, miss, or
# CACHE_HIT (the stored frames replayed).
CACHE = "X-Hapi-Cache"
CACHE_HIT = "hit"
CONTENT_TYPE = "application/vnd.hapi.frames"

# X-Hapi-Dtype: the features' dtype on the wire (uint8: quantized per channel);
# X-Hapi-Encoding: their compression (hapi.wire says how frames carry both).
WIRE_DTYPES = names.WIRE_DTYPES
DEFAULT_WIRE_DTYPE = names.DEFAULT_WIRE_DTYPE
WIRE_ENCODINGS = names.WIRE_ENCODINGS
DEFAULT_WIRE_ENCODING = names.DEFAULT_WIRE_ENCODING
DEFAULT_PRESET = names.DEFAULT_PRESET
DEFAULT_WEIGHTS = names.DEFAULT_WEIGHTS

# Conditional headers of a feature request apply to the shard it reads: they
# are sent with that read, and Swift's 304 or 412 is the answer.
CONDITIONAL_HEADERS = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")
# A feature request computes on whole shards: a byte range of one has no features.
RANGE = "Range"

# Integer headers: at most this many digits (any batch, split or freeze index fits).
INT_DIGITS = 9
# torch.manual_seed takes seeds in [0, 2**64).
MAX_SEED = 2**64 - 1
SEED_DIGITS = len(str(MAX_SEED))

_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
_ASCII_DIGITS = re.compile(r"[0-9]+")


class BadParameter(ValueError):
    """A request parameter is missing or invalid (HTTP 400)."""

    def __init__(self, parameter, message):
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.message = message


@dataclass(frozen=True)
class WeightsRef:
    """Where the model's weights come from.

    ``pretrained``: the zoo's pre-trained weights (offline package, or
    torchvision's cache/download); ``seed:N``: random init from seed N;
    ``swift:<container>/<object>``: an object in the caller's account, read
    with the caller's access; ``file:<name>``: a file in the operator's
    ``weights_dir``.
    """

    kind: str
    value: str = ""

    def __str__(self):
        return self.kind if not self.value else f"{self.kind}:{self.value}"


@dataclass(frozen=True)
class Limits:
    """What the operator allows; parsed from the filter's or server's conf."""

    max_batch: int = 256
    default_batch: int = 32
    models: tuple = tuple(zoo.MODELS)
    weights_dir_enabled: bool = False


@dataclass(frozen=True)
class FeatureRequest:
    model: str
    split: int
    freeze: int
    batch: int
    weights: WeightsRef
    preset: str
    dtype: str
    encoding: str = DEFAULT_WIRE_ENCODING


def parse_integer(raw, max_digits):
    """The value of ``raw`` if it is 1 to ``max_digits`` ASCII decimal digits,
    with optional spaces or tabs around them (HTTP's optional whitespace);
    else None. Leading zeros are allowed (``0003`` is 3); a sign, an
    underscore, or a digit of another script (fullwidth, Arabic-Indic...) is not: Python's
    ``int()`` takes all of those, and the two front ends, which see header
    bytes through different decoders, must agree on every value."""
    text = raw.strip(" \t")
    if not 1 <= len(text) <= max_digits or not _ASCII_DIGITS.fullmatch(text):
        return None
    return int(text)


def _int_param(headers, name, default):
    raw = headers.get(name)
    if raw is None:
        return default
    value = parse_integer(raw, INT_DIGITS)
    if value is None:
        raise BadParameter(name, f"must be an integer of ASCII digits, got {raw[:40]!r}")
    return value


def _choice(headers, name, choices, default, what):
    value = headers.get(name, default).strip()
    if value not in choices:
        raise BadParameter(name, f"unknown {what} {value[:40]!r}; known: {', '.join(choices)}")
    return value


def parse_weights(raw, limits):
    if raw is None or raw == DEFAULT_WEIGHTS:
        return WeightsRef(DEFAULT_WEIGHTS)
    kind, sep, value = raw.partition(":")
    if kind == "seed" and sep:
        seed = parse_integer(value, SEED_DIGITS)
        if seed is None or seed > MAX_SEED:
            raise BadParameter(WEIGHTS, f"seed must be an integer of ASCII digits from 0 to "
                               f"{MAX_SEED}, got {value[:40]!r}")
        return WeightsRef("seed", str(seed))
    if kind == "swift" and sep:
        container, slash, obj = value.partition("/")
        if not container or not slash or not obj or ".." in value.split("/"):
            raise BadParameter(WEIGHTS, "swift weights must be 'swift:<container>/<object>'")
        return WeightsRef("swift", value)
    if kind == "file" and sep:
        if not limits.weights_dir_enabled:
            raise BadParameter(WEIGHTS, "file weights are not enabled on this server")
        if not _FILE_NAME.match(value):
            raise BadParameter(WEIGHTS, f"{value[:40]!r} is not a plain file name")
        return WeightsRef("file", value)
    raise BadParameter(WEIGHTS, "must be 'pretrained', 'seed:<n>', 'swift:<container>/<object>'"
                       f" or 'file:<name>', got {raw[:60]!r}")


def parse_request(headers, limits, layer_count):
    """Validate the HAPI headers of a request into a :class:`FeatureRequest`.

    ``headers`` is any case-insensitive mapping (swob or aiohttp headers);
    ``layer_count(model)`` returns the number of layers of a zoo model.
    Raises :class:`BadParameter` naming the first bad header.
    """
    if RANGE in headers:
        raise BadParameter(RANGE, "feature requests compute whole shards; a byte range of "
                           "one has no features: send the request without Range")
    raw_model = headers.get(MODEL, "")
    try:
        model = zoo.canonical_name(raw_model.strip())
    except zoo.UnknownModel:
        model = None
    if model is None or model not in limits.models:
        raise BadParameter(MODEL, f"unknown model {raw_model[:40]!r}; "
                           f"known: {', '.join(limits.models)}")
    layers = layer_count(model)
    freeze = _int_param(headers, FREEZE, zoo.MODELS[model].default_freeze)
    if not 0 <= freeze <= layers:
        raise BadParameter(FREEZE, f"must be between 0 and {layers} (the layer count of "
                           f"{model}), got {freeze}")
    split = _int_param(headers, SPLIT, freeze)
    if not 0 <= split <= freeze:
        raise BadParameter(SPLIT, f"must be between 0 and the freeze index {freeze}, got {split}")
    batch = _int_param(headers, BATCH, limits.default_batch)
    if not 1 <= batch <= limits.max_batch:
        raise BadParameter(BATCH, f"must be between 1 and {limits.max_batch}, got {batch}")
    preset = headers.get(PRESET, DEFAULT_PRESET).strip()
    if preset not in PRESETS:
        raise BadParameter(PRESET, f"unknown preset {preset[:40]!r}; known: {', '.join(PRESETS)}")
    info = zoo.MODELS[model]
    if info.fixed_input_size and preset_size(preset) != info.input_size:
        raise BadParameter(PRESET, f"{model} takes only {info.input_size} px inputs, "
                           f"{preset!r} makes {preset_size(preset)} px")
    dtype = _choice(headers, DTYPE, WIRE_DTYPES, DEFAULT_WIRE_DTYPE, "dtype")
    encoding = _choice(headers, ENCODING, WIRE_ENCODINGS, DEFAULT_WIRE_ENCODING, "encoding")
    weights = parse_weights(headers.get(WEIGHTS), limits)
    return FeatureRequest(model=model, split=split, freeze=freeze, batch=batch,
                          weights=weights, preset=preset, dtype=dtype, encoding=encoding)


def request_headers(req):
    """The HTTP headers that ask for ``req`` (a :class:`FeatureRequest`)."""
    return {
        MODEL: req.model, SPLIT: str(req.split), FREEZE: str(req.freeze),
        BATCH: str(req.batch), WEIGHTS: str(req.weights), PRESET: req.preset,
        DTYPE: req.dtype, ENCODING: req.encoding,
    }
