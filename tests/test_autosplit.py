"""Automatic split selection in real runs: client/main.py's default with --freeze.

The data set is the first 240 of scikit-learn's digits in 10 shards of 24
(8 to train on, 2 held out); EfficientNet-Lite0 with its pre-trained
weights at 32 px, frozen below layer 21. A run starts at the freeze index,
decides after at most ``MAX_PROFILE_SHARDS`` shards and re-decides when the
storage tier's speed or the bandwidth drifts; once the storage tier has run
the model at the run's preset and storage batch, the next run decides
before its first feature request, from the layer costs the storage tier
serves. The trainer's layer times are cached in a folder of this module's
own. The timings of this shared VM are noisy, so the tests assert what the
selection must do (decide in time, explain itself, follow a drift, compute
what a fixed split computes), not which split it picks.
"""

import inspect
import json
import platform
import re
import threading

import pytest
import torch
from helpers import upload_digits
from pytest import approx

from hapi import wire
from hapi.client import data
from hapi.client import main as cli
from hapi.client.autosplit import AutomaticSplit, profiling
from hapi.client.autosplit.profilecache import CACHE_ENV
from hapi.client.data import Part, ShardData, ShardRef, Transfer, rebatch

CONTAINER = "hapi-autosplit-digits"
SAMPLES, SHARD_SIZE, FREEZE = 240, 24, 21
EPOCH_SAMPLES = 2 * SAMPLES  # two epochs: training and held-out shards, each pass
MAX_PROFILE_SHARDS = inspect.signature(AutomaticSplit).parameters["max_profile_shards"].default
# float32 features (raw or zstd, both lossless): the automatic runs compute
# exactly what the fixed run computes, whatever the split.
FLAGS = ["--dataset", CONTAINER, "--model", "myefficientnet_lite0", "--freeze",
         "--preset", "resize-32", "--batch_size", "20", "--storage_batch", "7",
         "--lr", "0.05", "--threads", "1", "--num_epochs", "2", "--wire_dtype", "float32"]


@pytest.fixture(scope="module", autouse=True)
def profile_cache(tmp_path_factory):
    """The trainer's layer times are cached here, not in the user's cache."""
    folder = tmp_path_factory.mktemp("profiles")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="module")
def cluster(swift_cluster):
    upload_digits(swift_cluster, CONTAINER, SAMPLES, SHARD_SIZE)
    return swift_cluster


def train(cluster, *flags, on_step=None):
    """Run client/main.py in this process; return its metrics and its log lines."""
    user, key = cluster.users["tester"]
    lines = []
    args = cli.parse_args([*FLAGS, *flags, "-A", cluster.auth_url, "-U", user, "-K", key])
    return cli.run(args, on_step=on_step, log=lines.append), lines


@pytest.fixture(scope="module")
def fixed_run(cluster):
    """The reference: the same job at a fixed split, the freeze index."""
    metrics, _ = train(cluster, "--manual_split", "--split_idx", str(FREEZE))
    return metrics


@pytest.fixture(scope="module")
def auto_run(cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto")
    metrics, lines = train(cluster, "--metrics", str(out / "metrics.json"))
    return metrics, lines, out


def assert_same_losses(metrics, reference):
    for epoch, ref_epoch in zip(metrics["epochs"], reference["epochs"], strict=True):
        assert epoch["step_loss"] == approx(ref_epoch["step_loss"], rel=1e-4)
        assert epoch["accuracy"] == ref_epoch["accuracy"]


def test_decides_within_the_bound_and_explains_the_decision(auto_run):
    metrics, lines, out = auto_run
    selection = metrics["split_selection"]
    first = selection["history"][0]
    assert selection["automatic"] and first["from"] == FREEZE
    assert first["shard"] <= MAX_PROFILE_SHARDS
    assert selection["samples_per_split"][str(FREEZE)] > 0  # profiled at the freeze index
    assert sum(selection["samples_per_split"].values()) == EPOCH_SAMPLES
    decision = selection["decision"]
    assert metrics["split"] == selection["split"] == decision["split"] == \
        selection["history"][-1]["to"]
    assert [row["split"] for row in decision["rows"]] == list(range(FREEZE + 1))
    assert all(row["iteration_s"] > 0 for row in decision["rows"])
    table = selection["table"].splitlines()
    assert [int(line[1:4]) for line in table[1:FREEZE + 2]] == list(range(FREEZE + 1))
    assert table[1 + decision["split"]].startswith("*")
    # The first decision's table is logged once, each line on its own; each
    # re-decision in one line, its table in the metrics.
    assert sum(line == table[0] for line in lines) == 1
    assert all(line in lines for line in first["table"].splitlines())
    assert sum(line.startswith("split selection after") for line in lines) == \
        len(selection["history"])
    assert selection["history"][-1]["table"] == selection["table"]
    assert selection["profile"]["trainer_step_s"] > 0
    # The optimizer's step, timed before the first request (or read from the
    # cache), stands in the first decision until the run times its own.
    assert selection["profiling"]["optimizer_step"] in ("measured", "cached")
    assert selection["profiling"]["optimizer_step_s"] > 0
    assert selection["profiling"]["probe_bytes"] > 0
    # The trainer keeps what freed tensors give back (on glibc), so its
    # cached times and its speed passes are timed with its pages kept.
    assert selection["profiling"]["allocator"] == \
        ("glibc, freed memory kept" if platform.libc_ver()[0] == "glibc" else "default")
    assert json.loads((out / "metrics.json").read_text()) == metrics
    plot = out / "metrics-split.png"
    assert selection["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_automatic_selection_computes_what_a_fixed_split_computes(auto_run, fixed_run):
    metrics, _, _ = auto_run
    assert_same_losses(metrics, fixed_run)
    assert fixed_run["split_selection"] == {"automatic": False, "split": FREEZE,
                                            "samples_per_split": {str(FREEZE): EPOCH_SAMPLES}}


def test_a_drift_of_the_storage_speed_re_decides(cluster, fixed_run, monkeypatch):
    """The storage tier's frames report 50 times faster than they ran, then,
    after the first decision, 50 times slower: the selection sees the drift,
    re-decides towards the trainer, and the batches that straddle the change
    of split still train exactly as at the fixed split."""
    speed = {"factor": 1 / 50}
    timings = wire.Frame.timings.fget

    def scaled(frame):
        measured = timings(frame)
        return {**measured, "decode_s": measured["decode_s"] * speed["factor"],
                "layers_s": [seconds * speed["factor"] for seconds in measured["layers_s"]]}

    def slow_down(step):
        if step.global_step == 6:
            speed["factor"] = 50.0

    monkeypatch.setattr(wire.Frame, "timings", property(scaled))
    metrics, _ = train(cluster, on_step=slow_down)
    history = metrics["split_selection"]["history"]
    # The storage tier ran this job before (fixed_run): a decision from its
    # layer costs comes first, then the one from the frames ("profiled", or
    # at the profiling bound when too few transfers were timed on the link).
    assert history[0]["shard"] == 0
    first = history[1]
    assert first["why"] == "profiled" or first["why"].startswith("profiling bound")
    assert first["shard"] <= MAX_PROFILE_SHARDS and first["to"] > 0
    drifts = [step for step in history[1:] if re.search(r"storage \+\d{3,}%", step["why"])]
    assert drifts, history
    assert drifts[0]["to"] < drifts[0]["from"]
    assert len(metrics["split_selection"]["samples_per_split"]) >= 2
    assert_same_losses(metrics, fixed_run)


def test_a_second_run_decides_before_its_first_feature_request(cluster, tmp_path, monkeypatch):
    """The first run of a job (a storage batch no other test uses) finds no
    layer costs at the storage tier and starts at the freeze index; its
    feature requests have the storage tier measure them, so the second run
    of the same job decides before its first feature request, and reads the
    trainer's layer times from the cache instead of measuring them, its
    probe's GET on the way meanwhile."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # empty: the first run measures
    probing, overlapped = threading.Event(), []

    def leading_samples(*args):
        probing.set()
        return real_leading_samples(*args)

    def trainer_speed(*args, **kwargs):
        overlapped.append(probing.wait(timeout=10))
        return real_trainer_speed(*args, **kwargs)

    real_leading_samples, real_trainer_speed = data.leading_samples, profiling.trainer_speed
    monkeypatch.setattr(data, "leading_samples", leading_samples)
    monkeypatch.setattr(profiling, "trainer_speed", trainer_speed)
    job = ("--storage_batch", "5", "--num_epochs", "1")
    first, first_lines = train(cluster, *job)
    probing.clear()
    second, second_lines = train(cluster, *job)
    # Each run times the trainer's speed (the first stores its passes with
    # its layer times), the probe's GET on its way meanwhile.
    assert overlapped == [True, True]
    before, after = (run["split_selection"] for run in (first, second))
    assert before["profiling"]["storage_costs"]["known"] is False
    assert "not measured there yet" in before["profiling"]["storage_costs"]["note"]
    assert any(line.startswith("split selection: the storage tier (http://") and
               f"has no layer costs of {first['model']} at resize-32, storage batch 5" in line
               for line in first_lines)
    assert before["history"][0]["shard"] > 0 and before["history"][0]["from"] == FREEZE
    assert before["samples_per_split"][str(FREEZE)] > 0

    assert after["profiling"]["storage_costs"]["known"] is True
    assert any(f"knows {second['model']}'s layer costs on cpu; deciding before the first "
               "feature request" in line for line in second_lines)
    decided = after["history"][0]
    assert decided["shard"] == 0 and decided["why"] == "the storage tier's layer costs"
    assert after["samples_per_split"].get(str(decided["to"]), 0) > 0
    measured = after["history"][1]  # the frames' decision still comes, within the bound
    assert measured["from"] == decided["to"] and measured["shard"] <= MAX_PROFILE_SHARDS
    assert measured["why"] == "profiled" or measured["why"].startswith("profiling bound")
    assert before["profiling"]["trainer_times"] == "measured"
    assert before["profiling"]["optimizer_step"] == "measured"
    assert after["profiling"]["trainer_times"] == "cached"
    assert after["profiling"]["optimizer_step"] == "cached"
    assert after["profiling"]["optimizer_step_s"] == before["profiling"]["optimizer_step_s"]
    # Every iteration but the first told the trainer's speed against its profile.
    steps = sum(epoch["train"]["steps"] for epoch in second["epochs"])
    seen = after["trainer_observations"]
    assert len(seen) == steps - 1 and all(one["seconds"] > 0 and one["predicted_s"] > 0
                                          for one in seen)
    # The same times, read from the cache, scaled to the trainer's speed
    # now, then (as in the first run) to its iterations' speed: every layer alike.
    assert before["profiling"]["trainer_speed"] == 1.0
    assert after["profiling"]["trainer_speed"] > 0
    assert any("their cached times now" in line for line in second_lines)
    scales = [ours["trainer_forward_s"] / theirs["trainer_forward_s"] for ours, theirs
              in zip(after["profile"]["layers"], before["profile"]["layers"], strict=True)]
    assert scales == pytest.approx([scales[0]] * len(scales))
    assert after["profile"]["layers"][0]["storage_s"] > 0
    # Layer times at the training batch (20: up to PROFILE_BATCH, timed as
    # it is), the speed passes timed with them, one file of the wire
    # formats' costs, one of the optimizer's step.
    assert len(list(tmp_path.iterdir())) == 4


# Pieces, without Swift ---------------------------------------------------------------


def shard(name, split, keys, width):
    ref = ShardRef(name, len(keys), 1000, 0, len(keys))
    return ShardData(ref=ref, split=split, inputs=torch.full((len(keys), width), float(split)),
                     labels=torch.zeros(len(keys), dtype=torch.int64), keys=keys,
                     transfer=Transfer(1000, 0.0, 0.0, 0.0), load_s=0.0)


def test_a_batch_keeps_the_split_of_each_part():
    shards = [shard("a", 5, ["a0", "a1", "a2"], 3), shard("b", 5, ["b0", "b1"], 3),
              shard("c", 0, ["c0", "c1", "c2", "c3"], 8)]
    batches = list(rebatch(shards, 4, skip=1))
    assert [batch.keys for batch in batches] == [["a1", "a2", "b0", "b1"], ["c0", "c1", "c2", "c3"]]
    assert [[(p.split, tuple(p.inputs.shape)) for p in batch.parts] for batch in batches] == \
        [[(5, (4, 3))], [(0, (4, 8))]]
    mixed = next(rebatch(shards, 6))
    assert [(p.split, len(p.inputs)) for p in mixed.parts] == [(5, 5), (0, 1)]
    assert isinstance(mixed.parts[0], Part) and len(mixed) == 6
