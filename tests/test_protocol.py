"""Request-parameter parsing: every bad header is named, nothing else crashes it."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hapi import protocol, zoo

LIMITS = protocol.Limits(max_batch=64, default_batch=16)


def layer_count(name):
    return 40


def parse(**headers):
    return protocol.parse_request({protocol.MODEL: "alexnet", **headers}, LIMITS, layer_count)


def test_defaults():
    req = parse()
    assert req.model == "alexnet"
    assert req.freeze == zoo.MODELS["alexnet"].default_freeze
    assert req.split == req.freeze
    assert req.batch == 16
    assert req.weights == protocol.WeightsRef("pretrained")
    assert (req.preset, req.dtype) == (protocol.DEFAULT_PRESET, "float32")


def test_original_my_prefix_names_the_same_model():
    assert protocol.parse_request({protocol.MODEL: "myalexnet"}, LIMITS, layer_count).model \
        == "alexnet"


def test_request_headers_round_trip():
    req = parse(**{protocol.SPLIT: "3", protocol.BATCH: "5", protocol.WEIGHTS: "seed:4",
                   protocol.PRESET: "resize-32", protocol.DTYPE: "float16"})
    assert protocol.parse_request(protocol.request_headers(req), LIMITS, layer_count) == req


@pytest.mark.parametrize(("header", "value", "message"), [
    (protocol.MODEL, "lenet", "unknown model"),
    (protocol.SPLIT, "x", "must be an integer"),
    (protocol.SPLIT, "-1", "integer of ASCII digits"),
    (protocol.SPLIT, "39", "between 0 and the freeze index"),
    (protocol.FREEZE, "41", "between 0 and 40"),
    (protocol.BATCH, "0", "between 1 and 64"),
    (protocol.BATCH, "65", "between 1 and 64"),
    (protocol.BATCH, "1.5", "must be an integer"),
    (protocol.PRESET, "imagenet-999", "unknown preset"),
    (protocol.DTYPE, "int8", "unknown dtype"),
    (protocol.WEIGHTS, "http://example.org/w.pth", "must be 'pretrained'"),
    (protocol.WEIGHTS, "seed:-3", "ASCII digits from 0 to"),
    (protocol.WEIGHTS, f"seed:{2**64}", "ASCII digits from 0 to 18446744073709551615"),
    (protocol.WEIGHTS, "seed:" + "9" * 30, "ASCII digits from 0 to"),
    (protocol.WEIGHTS, "swift:only-a-container", "swift:<container>/<object>"),
    (protocol.WEIGHTS, "swift:c/../other/o", "swift:<container>/<object>"),
    (protocol.WEIGHTS, "file:w.safetensors", "not enabled"),
])
def test_bad_parameters_are_named(header, value, message):
    with pytest.raises(protocol.BadParameter, match=message) as err:
        parse(**{header: value})
    assert err.value.parameter == header


@pytest.mark.parametrize(("raw", "value"), [
    ("3", 3), ("0003", 3), (" 3 ", 3), ("\t7", 7), ("000000000", 0),
    ("+3", None), ("-3", None), ("1_0", None), ("3.0", None), ("", None), (" ", None),
    ("\uff13", None),  # fullwidth 3: int() takes it
    ("\u0663", None),  # Arabic-Indic 3: int() takes it
    ("1e3", None), ("0x10", None), ("1234567890", None),  # more than 9 digits
])
def test_integer_headers_are_ascii_digits_only(raw, value):
    """One rule for every integer header, in both front ends: ASCII digits,
    leading zeros allowed, optional spaces or tabs around; nothing else that
    Python's int() would take."""
    assert protocol.parse_integer(raw, protocol.INT_DIGITS) == value
    if value is None:
        with pytest.raises(protocol.BadParameter, match="integer of ASCII digits"):
            parse(**{protocol.BATCH: raw})
    else:
        assert parse(**{protocol.SPLIT: raw}).split == value


@pytest.mark.parametrize("seed", ["0", str(2**64 - 1), "00012"])
def test_seeds_torch_takes_are_accepted(seed):
    assert parse(**{protocol.WEIGHTS: f"seed:{seed}"}).weights.value == str(int(seed))


def test_a_byte_range_is_refused_naming_range():
    with pytest.raises(protocol.BadParameter, match="whole shards") as err:
        parse(Range="bytes=0-99")
    assert err.value.parameter == "Range"


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", ".hidden", ""])
def test_file_weights_must_be_a_plain_name(name):
    limits = protocol.Limits(weights_dir_enabled=True)
    with pytest.raises(protocol.BadParameter, match=r"plain file name|must be"):
        protocol.parse_request({protocol.MODEL: "alexnet", protocol.WEIGHTS: f"file:{name}"},
                               limits, layer_count)


def test_fixed_input_size_models_refuse_other_sizes():
    with pytest.raises(protocol.BadParameter, match="only 224 px") as err:
        protocol.parse_request({protocol.MODEL: "vit_b_16", protocol.PRESET: "imagenet-64"},
                               LIMITS, layer_count)
    assert err.value.parameter == protocol.PRESET


def test_operator_can_restrict_models():
    limits = protocol.Limits(models=("resnet18",))
    with pytest.raises(protocol.BadParameter, match="known: resnet18"):
        protocol.parse_request({protocol.MODEL: "alexnet"}, limits, layer_count)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(protocol.REQUEST_HEADERS), st.text(max_size=30)))
def test_arbitrary_headers_parse_or_name_the_bad_one(headers):
    try:
        req = protocol.parse_request(headers, LIMITS, layer_count)
    except protocol.BadParameter as err:
        assert err.parameter in protocol.REQUEST_HEADERS
    else:
        assert 0 <= req.split <= req.freeze <= 40 and 1 <= req.batch <= 64
