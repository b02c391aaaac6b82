"""The wire format chosen with the split: measured format costs, the cost
model's joint choice, the selector's route, the ranged probe of a shard.

No Swift here except where a test says so: profiles are built by hand or
from a real zoo model, and formats are measured on real preprocessed images.
"""

import io
import statistics

import pytest
import torch
from PIL import Image

from hapi import names, zoo
from hapi.client.autosplit import AutomaticSplit
from hapi.client.autosplit.costmodel import choose_split, evaluate_split
from hapi.client.autosplit.estimator import SampleAndByteCost
from hapi.client.autosplit.profiling import LayerProfile, Profile
from hapi.client.autosplit.wireformats import (
    FormatCosts,
    WireFormat,
    candidate_formats,
    measure_formats,
    pinned,
)
from hapi.client.data import FrameStats, ShardData, ShardRef, Transfer
from hapi.preprocess import preprocess
from hapi.shards import Sample, leading_images, write_shard


def jpeg(seed, side=64):
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(side, side, 3, generator=generator) * 255).to(torch.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(out, format="JPEG", quality=90)
    return out.getvalue()


# Formats ---------------------------------------------------------------------------


def test_candidates_are_pinned_or_left_to_the_choice():
    assert [f.name for f in candidate_formats()] == [
        "float32", "float32+zstd", "float16", "float16+zstd", "uint8", "uint8+zstd"]
    assert [f.name for f in candidate_formats("uint8")] == ["uint8", "uint8+zstd"]
    assert [f.name for f in candidate_formats(encoding="raw")] == ["float32", "float16", "uint8"]
    assert [f.name for f in candidate_formats("bfloat16", "zstd")] == ["bfloat16+zstd"]
    assert pinned(names.WIRE_AUTO, "float32") == "float32"
    assert pinned("uint8", "float32") == "uint8"
    assert WireFormat.parse("uint8+zstd") == WireFormat("uint8", "zstd")
    assert str(WireFormat.parse("float16")) == "float16"
    with pytest.raises(ValueError, match="unknown wire dtype 'int4'"):
        WireFormat("int4")
    with pytest.raises(ValueError, match="unknown wire encoding 'lzma'"):
        WireFormat.parse("uint8+lzma")


@pytest.fixture(scope="module")
def measured():
    """AlexNet's formats measured on four real (decoded, preprocessed) JPEGs at 64 px."""
    model = zoo.build_model("alexnet", seed=0)
    images = [jpeg(seed) for seed in range(4)]
    inputs = preprocess(images, "resize-64", "alexnet")
    freeze = model.default_freeze
    costs = measure_formats(model, inputs, freeze, candidate_formats(), frame_samples=8)
    return model, costs, freeze


def test_measured_sizes_follow_the_dtypes_and_compression(measured):
    model, costs, freeze = measured
    floats = model.boundary_bytes((3, 64, 64), torch.float32)
    assert set(costs) == {f.name for f in candidate_formats()}
    for s in range(1, freeze + 1):
        assert costs["float32"].bytes[s] == pytest.approx(floats[s])
        assert costs["float16"].bytes[s] == pytest.approx(floats[s] / 2)
        # uint8: a quarter of float32, plus the per-frame scales shared by 8 samples.
        assert floats[s] / 4 <= costs["uint8"].bytes[s] < floats[s] / 4 + 8 * 256
        # zstd is lossless compression: never much above the raw size, and
        # below it where a ReLU left zeros (AlexNet's features end on one).
        for dtype in ("float32", "float16", "uint8"):
            assert costs[f"{dtype}+zstd"].bytes[s] <= costs[dtype].bytes[s] * 1.01 + 64
    assert costs["uint8+zstd"].bytes[freeze] < 0.8 * costs["uint8"].bytes[freeze]
    for cost in costs.values():
        assert cost.bytes[0] == cost.encode_s[0] == cost.decode_s[0] == 0
        assert len(cost.bytes) == freeze + 1
        assert all(t > 0 for t in cost.decode_s[1:])


def formats_profile(bandwidth, encode_s=1e-4, decode_s=1e-4, **changes):
    """A two-layer model frozen at 2; at boundary 2, per sample: float32 4000
    bytes (free to encode), uint8+zstd 500 bytes (``encode_s``/``decode_s``);
    storage 1 ms per layer, trainer 1 ms per layer."""
    layers = [LayerProfile("a", 1e-3, storage_s=1e-3), LayerProfile("b", 1e-3, storage_s=1e-3),
              LayerProfile("c", 1e-3, trainer_train_s=2e-3)]
    formats = {"float32": FormatCosts([0, 8000, 4000], [0, 0, 0], [0, 1e-6, 1e-6]),
               "uint8+zstd": FormatCosts([0, 3000, 500], [0, encode_s, encode_s],
                                         [0, decode_s, decode_s])}
    profile = Profile(model="two", input_shape=(3, 8, 8), batch_size=4, freeze=2,
                      layers=layers, boundary_bytes=[12000, 8000, 4000, 40],
                      activation_bytes=[12000, 8000, 4000, 40], raw_bytes=6000,
                      bandwidth_bytes_per_s=bandwidth, trainer_decode_s=5e-3,
                      samples_per_request=8, storage_batch=4, prefetch_depth=2,
                      wire_formats=formats)
    return profile.with_measurements(**changes)


def test_a_slow_link_takes_the_compact_format_a_fast_one_the_cheap_one():
    slow = choose_split(formats_profile(bandwidth=1e5))
    assert (slow.split, slow.wire_format) == (2, "uint8+zstd")
    # 500 bytes at 100 kB/s: 5 ms a sample, the link the bottleneck.
    assert slow.chosen.transfer_s == pytest.approx(4 * 500 / 1e5)
    # A fast link and a costly encoding (8 ms a sample on the storage tier):
    # float32 is free to encode and its bytes cost nothing at 1 GB/s.
    fast = choose_split(formats_profile(bandwidth=1e9, encode_s=8e-3))
    assert (fast.split, fast.wire_format) == (2, "float32")
    assert "float32" in fast.format_table() and fast.to_dict()["wire_format"] == "float32"


def test_the_decode_and_the_receive_cost_weigh_on_the_trainer():
    # At 1 MB/s float32 takes 4 ms a sample on the link. uint8+zstd decodes in
    # 1 ms: on a CPU trainer its stage is 1 + 2 ms of training, and it wins.
    chosen = choose_split(formats_profile(bandwidth=1e6, decode_s=1e-3))
    assert chosen.wire_format == "uint8+zstd"
    assert chosen.chosen.iteration_s == pytest.approx(4 * 3e-3)
    # On a fast link with a costly encoding (4 ms) float32 wins, until the
    # loader's receive cost (2 us a byte: 8 ms for float32's 4000 bytes,
    # 1 ms for uint8+zstd's 500) makes the trainer the bottleneck.
    fast = formats_profile(bandwidth=1e9, encode_s=4e-3, decode_s=1e-4)
    assert choose_split(fast).wire_format == "float32"
    receiving = choose_split(fast.with_measurements(trainer_receive_s_per_byte=2e-6))
    assert receiving.wire_format == "uint8+zstd"
    assert receiving.chosen.trainer_host_s == pytest.approx(4 * (1e-4 + 2e-6 * 500))


def test_the_current_format_is_kept_within_the_margin():
    profile = formats_profile(bandwidth=1e5)
    best = choose_split(profile)
    kept = choose_split(profile, current=2, current_format="float32", margin=100.0)
    assert (kept.split, kept.wire_format) == (2, "float32")
    assert "kept the current split and format" in kept.reason
    assert kept.chosen.iteration_s > best.chosen.iteration_s


def test_a_fresh_short_job_counts_the_pipeline_fill():
    profile = formats_profile(bandwidth=1e5)
    fresh = choose_split(profile, rest_samples=64, fresh=True)
    running = choose_split(profile, rest_samples=64)
    row = fresh.chosen
    cycle = row.iteration_s / profile.batch_size
    last = row.trainer_s / profile.batch_size
    r = profile.samples_per_request
    assert row.rest_s == pytest.approx(row.fill_s + (64 - r) * cycle + r * last)
    ran = running.chosen
    assert ran.rest_s == pytest.approx(max(
        (64 * ran.supply_s + r * ran.trainer_last_s) / 4, 64 * ran.trainer_cycle_s / 4))
    assert ran.rest_s >= 64 * ran.iteration_s / 4
    assert "64 samples still to request" in fresh.reason


def test_a_profile_with_formats_round_trips_through_json():
    profile = formats_profile(bandwidth=1e6)
    again = Profile.from_json(profile.to_json())
    assert again.wire_formats == profile.wire_formats
    lower = profile.with_measurements(freeze=1)
    assert all(len(c.bytes) == 2 for c in lower.wire_formats.values())
    with pytest.raises(ValueError, match="costs must be finite"):
        formats_profile(1e6, wire_formats={"uint8": {"bytes": [0, -1, 2], "encode_s": [0] * 3,
                                                     "decode_s": [0] * 3}})
    with pytest.raises(ValueError, match="unknown wire dtype"):
        formats_profile(1e6, wire_formats={"int4": {"bytes": [0] * 3, "encode_s": [0] * 3,
                                                    "decode_s": [0] * 3}})


# The selector ----------------------------------------------------------------------


def shard_at(split, wire_format, host_cpu_s, samples=8, nbytes=4000, slower=1.0):
    """A shard of ``split`` whose frames took 1 ms a sample to decode and 1 ms
    a layer (``slower`` times that)."""
    ref = ShardRef(name="s", samples=samples, bytes=nbytes, lo=0, hi=samples)
    took = 1e-3 * samples * slower
    frames = [FrameStats({"decode_s": took, "layers_s": [took] * split,
                          "to_wire_s": 0.0}, samples, nbytes)]
    return ShardData(ref=ref, split=split, inputs=torch.zeros(samples, 1),
                     labels=torch.zeros(samples, dtype=torch.int64), keys=list(range(samples)),
                     transfer=Transfer(nbytes=nbytes + 100, sent_at=0.0, answered_at=0.01,
                                       done_at=1.0),
                     load_s=1.0, frames=frames, wire_format=wire_format, host_cpu_s=host_cpu_s)


def test_the_selector_starts_on_the_fewest_bytes_and_routes_its_choice():
    selector = AutomaticSplit(formats_profile(bandwidth=1e5), log=lambda line: None)
    assert selector.route == (2, WireFormat("uint8", "zstd"))
    selector.decide_now("test")
    assert selector.route == (2, WireFormat("uint8", "zstd"))
    assert selector.history[-1]["to_format"] == "uint8+zstd"


def test_the_receive_cost_has_a_part_per_request_and_a_part_per_byte():
    # 0.2 ms a sample whatever the bytes, plus 0.1 us a byte.
    def cost(per_sample_bytes):
        return 2e-4 + 1e-7 * per_sample_bytes

    fit = SampleAndByteCost(window=16)
    assert fit.costs() == (0.0, 0.0) and not fit
    for size in (1000, 1100, 1000):
        fit.observe(size, cost(size))
    # Shards alike in bytes cannot tell the two parts apart: all per sample.
    assert not fit.separable
    assert fit.costs() == (pytest.approx(cost(1000)), 0.0)
    for size in (4000, 8000):
        fit.observe(size, cost(size))
    assert fit.separable
    assert fit.costs() == (pytest.approx(2e-4), pytest.approx(1e-7))
    # Once measured, the cost per byte stays when the window holds one size again.
    for _ in range(16):
        fit.observe(8000, cost(8000))
    assert fit.costs() == (pytest.approx(2e-4), pytest.approx(1e-7))
    # A cost that grows faster than the bytes (a negative part per request)
    # counts wholly per byte.
    steep = SampleAndByteCost(window=16)
    for size in (1000, 4000):
        steep.observe(size, 1e-7 * size - 5e-5)
    assert steep.costs() == (0.0, pytest.approx(statistics.median([0.5e-7, 0.875e-7])))


def test_the_receive_cost_per_sample_weighs_on_every_split():
    profile = formats_profile(bandwidth=1e5)
    base = {row.split: row.trainer_host_s for row in choose_split(profile).rows}
    costly = choose_split(profile.with_measurements(trainer_receive_s_per_sample=1e-3))
    assert {row.split: row.trainer_host_s for row in costly.rows} == \
        {split: pytest.approx(host + 4 * 1e-3) for split, host in base.items()}


def test_the_loaders_cpu_beyond_the_decode_is_the_receive_cost():
    selector = AutomaticSplit(formats_profile(bandwidth=1e5, decode_s=1e-3),
                              log=lambda line: None, profile_frames=1, max_profile_shards=1)
    for _ in range(3):  # 24 ms for 8 samples, of which 8 decoding, over 4100 bytes
        selector.observe(shard_at(2, "uint8+zstd", host_cpu_s=24e-3))
    profile = selector.current_profile()
    assert profile.trainer_receive_s_per_sample == pytest.approx(16e-3 / 8)
    assert profile.trainer_receive_s_per_byte == 0.0
    assert [step["why"] for step in selector.history] == ["profiling bound reached (1 shards)"]
    # Shards ten times larger in bytes tell the two parts apart, and the
    # split is chosen again with them: 16 ms more for 36000 more bytes.
    for _ in range(3):
        selector.observe(shard_at(2, "uint8+zstd", host_cpu_s=40e-3, nbytes=40000))
    profile = selector.current_profile()
    assert profile.trainer_receive_s_per_byte == pytest.approx(16e-3 / 36000)
    assert profile.trainer_receive_s_per_sample == pytest.approx(
        (16e-3 - 16e-3 / 36000 * 4100) / 8)
    assert [step["why"] for step in selector.history][1:] == ["receive cost per byte measured"]


def test_the_storage_cost_per_byte_weighs_on_every_split_but_vanilla():
    profile = formats_profile(bandwidth=1e6)
    base = {row.split: row for row in choose_split(profile).rows}
    costly = choose_split(profile.with_measurements(storage_send_s_per_byte=1e-6))
    for row in costly.rows:
        extra = 0.0 if row.split == 0 else 4 * 1e-6 * row.wire_bytes
        assert row.storage_s == pytest.approx(base[row.split].storage_s + extra)
    assert costly.inputs["storage_send_s_per_byte"] == 1e-6


def contended_profile():
    """formats_profile on a fast link, its second layer 1.5 ms on the
    storage tier: split 2 (4000 bytes of float32 a sample) is the best, and
    split 1 (8000) is predicted 16% slower."""
    profile = formats_profile(bandwidth=1e9)
    profile.layers[1].storage_s = 1.5e-3
    return profile


def test_the_first_decision_sends_two_requests_at_a_heavier_contender():
    lines = []
    selector = AutomaticSplit(contended_profile(), storage_costs=[1e-3, 1.5e-3],
                              epoch_samples=64, log=lines.append)
    selector.decide_now("the storage tier's layer costs")
    float32 = WireFormat("float32")
    assert [selector.route for _ in range(5)] == [(2, float32), (1, float32), (1, float32),
                                                  (2, float32), (2, float32)]
    assert selector.report()["profiling"]["measuring_request"] == \
        {"split": 1, "wire_format": "float32"}
    assert [(step["from"], step["to"]) for step in selector.history] == [(2, 2)]
    assert "requests 2 and 3 go at split 1 (2.0x the bytes of split 2" in lines[-1]
    # Nothing to measure: without the storage tier's layer costs (the
    # frames measure every split's), or with no heavier split close enough.
    blind = AutomaticSplit(contended_profile(), epoch_samples=64, log=lines.append)
    blind.decide_now("test")
    slow = AutomaticSplit(formats_profile(bandwidth=1e5), storage_costs=[1e-3, 1e-3],
                          epoch_samples=64, log=lines.append)
    slow.decide_now("the storage tier's layer costs")
    for selector in (blind, slow):
        assert len({selector.route for _ in range(4)}) == 1
        assert "measuring_request" not in selector.report()["profiling"]


def test_the_storage_tiers_compute_beyond_its_layer_costs_is_fitted_per_byte():
    """The storage tier's own layer costs are 1 ms a sample a layer, and its
    decode 1 ms; sending a byte costs it 0.5 us more, spread over the whole
    frame (the cores that compute also send). Once shards far apart in bytes
    arrived, the profile has the cost per byte and the frames' times without
    what the recent shards' bytes cost them: a split pays for its own bytes,
    once, and the split is chosen again."""
    per_byte = 5e-7
    selector = AutomaticSplit(contended_profile(), storage_costs=[1e-3, 1e-3],
                              log=lambda line: None, profile_frames=1, max_profile_shards=1)

    def shard(split, nbytes):
        base = 1e-3 * (1 + split)  # decode and layers, per sample
        sent = per_byte * (nbytes + 100) / 8  # the transfer adds 100 bytes to 8 samples
        return shard_at(split, "float32", host_cpu_s=24e-3, nbytes=nbytes,
                        slower=1 + sent / base)

    for _ in range(3):
        selector.observe(shard(2, 32000))
    assert selector.current_profile().storage_send_s_per_byte == 0.0
    selector.observe(shard(1, 80000))
    profile = selector.current_profile()
    assert profile.storage_send_s_per_byte == pytest.approx(per_byte)
    assert profile.storage_decode_s == pytest.approx(1e-3)
    assert [layer.storage_s for layer in profile.layers[:2]] == pytest.approx([1e-3, 1e-3])
    # The split in use is predicted what its frames took: 2 ms of layers,
    # 1 ms of decode, 2 ms for its 4012.5 bytes a sample (over the decode:
    # taken from it alone, the rest would count twice).
    row = evaluate_split(profile, 2, wire_format="float32")
    assert row.storage_s == pytest.approx(4 * (3e-3 + per_byte * 4012.5))
    # The loader's CPU, the same for both sizes, tells its two parts apart too.
    assert selector.history[-1]["why"] == "receive and storage cost per byte measured"


def test_a_choice_beyond_the_bytes_measured_so_far_measures_them_first():
    """On a fast link with a costly encoding float32 wins, with 8 times the
    bytes of the uint8+zstd the run started with: two requests measure it
    before the split moves, then the split is chosen again."""
    lines = []
    selector = AutomaticSplit(formats_profile(bandwidth=1e9, encode_s=8e-3), log=lines.append,
                              profile_frames=1, max_profile_shards=1)
    compact, float32 = WireFormat("uint8", "zstd"), WireFormat("float32")
    assert selector.route == (2, compact)
    selector.observe(shard_at(2, "uint8+zstd", host_cpu_s=24e-3, nbytes=4000))
    held = selector.history[-1]
    assert (held["from"], held["to"], held["to_format"]) == (2, 2, "uint8+zstd")
    assert held["reason"].startswith("measuring first: split 2 would send 7.8x the most bytes")
    assert any("measuring first" in line for line in lines)
    assert [selector.route for _ in range(3)] == [(2, float32), (2, float32), (2, compact)]
    selector.observe(shard_at(2, "float32", host_cpu_s=24e-3, nbytes=32000))
    moved = selector.history[-1]
    assert moved["why"] == "receive cost per byte measured"
    assert (moved["to"], moved["to_format"]) == (2, "float32")
    assert selector.route == (2, float32)


# The ranged probe --------------------------------------------------------------------


def test_leading_images_are_the_whole_ones_in_a_prefix():
    images = [jpeg(seed) for seed in range(3)]
    shard = write_shard([Sample(key=f"{i:03d}", image=image, label=i, ext="jpg")
                         for i, image in enumerate(images)])
    assert leading_images(shard) == images
    # Cut in the middle of the second image: only the first is whole.
    second_end = shard.index(images[1]) + len(images[1])
    assert leading_images(shard[:second_end - 1]) == images[:1]
    assert leading_images(shard[:second_end + 1]) == images[:2]
    assert leading_images(shard[:100]) == []
    assert leading_images(b"not a tar at all" * 64) == []
