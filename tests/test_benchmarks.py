"""benchmarks/tl_benchmark.py and split_quality.py end to end, with tiny
settings, as their real commands; the ImageNet-like images they load by default.

As root the storage tier runs in a shaped network namespace; elsewhere the
benchmark falls back to loopback, and these tests say so (a warning) and
check that fallback instead.
"""

import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from hapi import zoo
from hapi.client_setup import datasets

REPO = Path(__file__).resolve().parents[1]
BENCHMARK = REPO / "benchmarks" / "tl_benchmark.py"
SPLIT_QUALITY = REPO / "benchmarks" / "split_quality.py"
MODES = ["vanilla", "hapi_auto", "hapi_freeze", "hapi_sequential", "all_in_cos"]
PLOTS = ("epoch_time.png", "bytes.png", "split.png")
# What every run must record (each record has more).
FIELDS = {"model", "mode", "bandwidth_mbit", "epoch_s", "link_bytes", "trainer_bytes",
          "trainer_compute_s", "trainer_wait_s", "storage_compute_s", "storage_wait_s",
          "split", "accuracy"}
SHAPED = os.geteuid() == 0
FEATURE_MODES = {"hapi_auto", "hapi_freeze", "hapi_sequential"}
# A tiny data set of the default ImageNet-like images.
TINY_DATA = ["--bandwidths", "200", "--images", "24", "--shard_size", "8", "--batch_size", "8",
             "--epochs", "1", "--holdout", "0.34"]
# The zoo's fastest model, whose trained layers are small for ALL_IN_COS to fetch.
TINY = ["--models", "mobilenet_v3_small", *TINY_DATA, "--repeats", "1", "--encodings", "float32"]



def benchmark(test):
    """A test that runs a benchmark: it starts Swift and may take minutes."""
    return pytest.mark.swift(pytest.mark.timeout(900)(test))


def start_benchmark(out, script=BENCHMARK, flags=TINY):
    if not SHAPED:
        warnings.warn("network namespaces need root: the benchmark runs unshaped on "
                      "loopback here (no rate limit, no link byte counters)", stacklevel=2)
    return subprocess.Popen([sys.executable, str(script), *flags, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO)


def namespaces_of(pid):
    if not SHAPED:
        return []
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                             check=True).stdout
    return [line for line in listing.splitlines() if line.startswith(f"hapib-{pid}-")]


def swift_pids(out):
    return [int(path.read_text()) for path in (out / "swift" / "run").glob("*.pid")]


def running(pid):
    """Alive and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@benchmark
def test_smoke_run_writes_every_mode_field_and_plot(tmp_path):
    out = tmp_path / "bench"
    proc = start_benchmark(out)
    stdout, _ = proc.communicate(timeout=850)
    assert proc.returncode == 0, stdout[-4000:]

    doc = json.loads((out / "results.json").read_text())
    assert doc["setup"]["shaped"] is SHAPED
    records = doc["results"]
    assert [r["mode"] for r in records] == MODES
    assert [r["encoding"] for r in records] == [
        "float32" if mode in FEATURE_MODES else None for mode in MODES]
    assert {r["repeat"] for r in records} == {1}
    assert FIELDS.issubset(records[0])
    assert all(list(r) == list(records[0]) for r in records)
    for record in records:
        assert record["epoch_s"] > 0 and record["trainer_bytes"] > 0
        for run in record["runs"]:
            assert (out / "runs" / f"{run}.json").exists()
    by_mode = {r["mode"]: r for r in records}
    freeze = by_mode["hapi_freeze"]["freeze"]
    assert by_mode["vanilla"]["split"] == 0 and by_mode["hapi_freeze"]["split"] == freeze
    assert 0 <= by_mode["hapi_auto"]["split"] <= freeze
    # The same seeded job in every mode: the same held-out accuracy.
    assert len({r["accuracy"] for r in records}) == 1
    if SHAPED:
        vanilla = by_mode["vanilla"]
        # Headers and the small requests add a little to what the trainer counted.
        assert vanilla["trainer_bytes"] <= vanilla["link_bytes_to_trainer"] \
            <= 1.3 * vanilla["trainer_bytes"]
        assert by_mode["hapi_freeze"]["bound_ratio"] is not None
        # The measured payload rate: below the shaped rate, yet most of it.
        for record in records:
            assert 0.5 < record["link_goodput_mbit"] / record["bandwidth_mbit"] < 1.05, record
    else:
        assert all(r["link_bytes"] is None and r["link_goodput_mbit"] is None for r in records)
        assert "UNSHAPED" in stdout
    assert "HAPI auto vs vanilla" in stdout
    for name in PLOTS:
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert not namespaces_of(proc.pid)
    assert not any(running(pid) for pid in swift_pids(out))


@benchmark
def test_sigterm_stops_swift_and_removes_the_namespaces(tmp_path):
    out = tmp_path / "bench"
    proc = start_benchmark(out)
    try:
        for line in proc.stdout:
            if line.startswith("storage tier: Swift at"):
                break
        pids = swift_pids(out)
        assert pids and all(running(pid) for pid in pids)
        assert bool(namespaces_of(proc.pid)) is SHAPED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.communicate()
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(running(pid) for pid in pids)
    assert not namespaces_of(proc.pid)


@benchmark
def test_repeats_interleave_and_encodings_shrink_the_features(tmp_path):
    """Two rounds of a grid with two encodings: every cell once per round, in
    round order; medians and spreads per cell; quantized, compressed features
    cross the link in fewer bytes than float32 ones."""
    out = tmp_path / "bench"
    proc = start_benchmark(out, flags=[
        "--models", "resnet18", *TINY_DATA, "--modes", "vanilla", "hapi_freeze",
        "--encodings", "float32", "uint8+zstd", "--repeats", "2"])
    stdout, _ = proc.communicate(timeout=850)
    assert proc.returncode == 0, stdout[-4000:]

    doc = json.loads((out / "results.json").read_text())
    cell_order = [("vanilla", None), ("hapi_freeze", "float32"), ("hapi_freeze", "uint8+zstd")]
    assert [(r["repeat"], r["mode"], r["encoding"]) for r in doc["results"]] == [
        (repeat, mode, encoding) for repeat in (1, 2) for mode, encoding in cell_order]
    cells = doc["cells"]
    assert [(c["mode"], c["encoding"], c["repeats"]) for c in cells] == [
        (mode, encoding, 2) for mode, encoding in cell_order]
    for cell in cells:
        records = [r for r in doc["results"]
                   if (r["mode"], r["encoding"]) == (cell["mode"], cell["encoding"])]
        times = sorted(r["epoch_s"] for r in records)
        assert cell["epoch_s"] == {"median": pytest.approx(sum(times) / 2),
                                   "min": times[0], "max": times[1]}
        assert len(cell["runs"]) == 2 and cell["splits"] == [records[0]["split"]] * 2
    freeze = {c["encoding"]: c for c in cells if c["mode"] == "hapi_freeze"}
    assert freeze["uint8+zstd"]["trainer_bytes"]["max"] \
        < 0.5 * freeze["float32"]["trainer_bytes"]["min"]

    [summary] = doc["summary"].values()
    assert summary["encoding"] == "float32" and set(summary["by_encoding"]) == {
        "float32", "uint8+zstd"}
    for encoding, targets in summary["by_encoding"].items():
        low, high = targets["bytes_vanilla_over_freeze_spread"]
        assert low <= targets["bytes_vanilla_over_freeze"] <= high
        per_round = [
            _bytes_of(doc, "vanilla", None, repeat) / _bytes_of(doc, "hapi_freeze", encoding,
                                                                 repeat)
            for repeat in (1, 2)]
        assert sorted(per_round) == pytest.approx([low, high])
    assert summary["bytes_vanilla_over_freeze"] == \
        summary["by_encoding"]["float32"]["bytes_vanilla_over_freeze"]
    assert "medians of 2 round(s)" in stdout and "uint8+zstd" in stdout
    for name in PLOTS:
        assert (out / name).read_bytes().startswith(b"\x89PNG")


def _bytes_of(doc, mode, encoding, repeat):
    """The bytes of one run as the summary counts them: the link's, else the trainer's."""
    [record] = [r for r in doc["results"]
                if (r["mode"], r["encoding"], r["repeat"]) == (mode, encoding, repeat)]
    return record["link_bytes"] if record["link_bytes"] is not None else record["trainer_bytes"]


def test_imagenet_like_images_have_photo_sizes_and_jpeg_sizes():
    """The benchmark's default data: sides drawn within 300-500 x 250-450 px,
    about 400 x 350 on average, and JPEGs of about 110 KB on average, as ImageNet's."""
    from PIL import Image

    samples = list(datasets.synthetic(64, size=datasets.IMAGENET_LIKE, seed=1).samples)
    sides = [Image.open(io.BytesIO(s.image)).size for s in samples]
    widths, heights = zip(*sides, strict=True)
    assert min(widths) >= 300 and max(widths) <= 500
    assert min(heights) >= 250 and max(heights) <= 450
    assert len(set(sides)) > 32
    assert 370 < sum(widths) / 64 < 430 and 320 < sum(heights) / 64 < 380
    mean_kb = sum(len(s.image) for s in samples) / 64 / 1e3
    assert 95 < mean_kb < 125, mean_kb
    again = next(iter(datasets.synthetic(1, size=datasets.IMAGENET_LIKE, seed=1).samples))
    assert again.image == samples[0].image


@benchmark
def test_split_quality_times_every_split_and_judges_the_choice(tmp_path):
    """One case, no cutoff: every split s <= f has a measured time, the
    contenders a second run, and the verdict follows from those times."""
    out = tmp_path / "splits"
    proc = start_benchmark(out, SPLIT_QUALITY, [
        "--models", "resnet18", "--bandwidths", "200", "--batch_sizes", "2",
        "--iterations", "4", "--shard_size", "2", "--repeats", "2", "--cutoff", "0"])
    stdout, _ = proc.communicate(timeout=850)
    assert proc.returncode == 0, stdout[-4000:]

    doc = json.loads((out / "split_quality.json").read_text())
    [case] = doc["cases"]
    freeze = case["freeze"]
    assert sorted(map(int, case["times_s"])) == list(range(freeze + 1))
    assert all(seconds > 0 for seconds in case["times_s"].values())
    assert 0 <= case["chosen_split"] <= freeze and case["decided"]
    assert sum(case["samples_per_split"].values()) == 4 * 2
    assert case["samples_per_split"][str(case["chosen_split"])] == \
        max(case["samples_per_split"].values())
    assert case["auto_ratio"] == pytest.approx(case["auto_run_s"] / case["best_s"])
    assert case["chosen_split"] in case["contenders"]
    for split in case["contenders"]:
        assert len(case["runs_s"][str(split)]) == 2
    times = {int(s): t for s, t in case["times_s"].items()}
    assert times[case["best_split"]] == min(times.values())
    assert case["chosen_split"] in case["tied"]
    if case["best_split"] in case["tied"]:
        assert case["verdict_runs_s"] is None and case["hit"] and case["ratio"] == 1.0
    else:
        verdict = case["verdict_runs_s"]
        chosen_runs, best_runs = (verdict[str(case[key])] for key in ("chosen_split",
                                                                      "best_split"))
        assert len(chosen_runs) == len(best_runs) == 2
        assert case["ratio"] == pytest.approx(statistics.median(chosen_runs)
                                              / statistics.median(best_runs))
        assert case["hit"] is (case["ratio"] <= 1.05)
        assert case["miss_within_noise"] is (not case["hit"]
                                             and min(chosen_runs) <= max(best_runs))
    assert doc["summary"]["cases"] == 1 and doc["summary"]["hits"] == int(case["hit"])
    assert doc["summary"]["misses_within_noise"] == int(case["miss_within_noise"])
    assert "chosen split best or within 5% of it: " in stdout
    assert (out / "split_quality.png").read_bytes().startswith(b"\x89PNG")
    assert not namespaces_of(proc.pid)


def benchmark_module(name):
    """A module of benchmarks/ (they import each other as top-level modules)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def benchmark_json(name, out, *argv):
    """Run benchmarks/NAME.py's main with ``argv`` and ``--out out``; its NAME.json."""
    benchmark_module(name).main([*argv, "--out", str(out)])
    return json.loads((out / f"{name}.json").read_text())


def test_a_choice_is_judged_on_fresh_runs_unless_it_is_the_best():
    judge = benchmark_module("split_quality").judge
    times = {0: 3.0, 1: 2.0, 2: 2.06}
    # The chosen split, or one tied with it, is the fastest: a hit, no verdict runs.
    assert judge(times, 1, 1, None, 0.05)["hit"]
    tied = judge(times, 2, 1, None, 0.05)
    assert tied["hit"] and tied["best_split"] == 1 and tied["ratio"] == 1.0
    # Else the fresh runs alone decide, whatever the selection medians said:
    # 2.06 against 2.0 was within 5%, the verdict runs are 10% apart.
    missed = judge(times, 2, 1, {2: [2.2, 2.3, 2.2], 1: [2.0, 2.1, 1.9]}, 0.05)
    assert missed["best_split"] == 1 and missed["ratio"] == pytest.approx(1.1)
    assert not missed["hit"] and not missed["miss_within_noise"]
    overlapping = judge(times, 2, 1, {2: [2.2, 2.1, 2.2], 1: [2.0, 2.15, 1.9]}, 0.05)
    assert not overlapping["hit"] and overlapping["miss_within_noise"]
    # A choice the selection runs put 10% behind is a hit on fresh runs 4% apart.
    hit = judge({1: 2.0, 2: 2.2}, 2, 1, {2: [2.08, 2.1, 2.0], 1: [2.0, 2.0, 2.05]}, 0.05)
    assert hit["hit"] and hit["ratio"] == pytest.approx(1.04)


def test_a_single_run_faster_than_every_confirmed_median_is_confirmed(monkeypatch):
    """The contenders' band is drawn from the fastest single run; a split
    outside it whose one run beats their medians runs ``repeats`` times
    too, so that the best is never one lucky run."""
    module = benchmark_module("split_quality")
    later = {3: [0.60, 0.73, 0.51, 0.73], 4: [0.62, 0.84, 0.59, 0.82],
             7: [0.66, 0.64, 0.83, 0.74]}
    timed = []

    def timed_run(tiers, flags, split, name, out_dir):
        timed.append(split)
        return SimpleNamespace(metrics=later[split].pop(0))

    monkeypatch.setattr(module, "timed_run", timed_run)
    monkeypatch.setattr(module, "train_time", lambda seconds: seconds)
    runs = {2: [0.69], 3: [0.50], 4: [0.57], 5: [0.65], 7: [0.58], 9: None}
    settings = {"repeats": 5, "confirm_within": 0.15}
    contenders = module.confirm(None, settings, None, "tag", runs, 4, None)
    assert contenders == [3, 4, 7]
    assert timed == [3, 4] * 4 + [7] * 4
    assert all(len(runs[s]) == 5 for s in contenders) and runs[5] == [0.65]
    assert module.fastest_split(runs) == 3


def quality_part(path, cases, tolerance=0.05):
    """A split_quality.json of ``cases`` (model, Mbit/s, batch, hit) in ``path``."""
    module = benchmark_module("split_quality")
    done = [{"model": model, "bandwidth_mbit": rate, "batch_size": batch, "chosen_split": 3,
             "best_split": 3 if hit else 4, "chosen_s": 1.0, "best_s": 1.0 if hit else 0.8,
             "ratio": 1.0 if hit else 1.25, "auto_ratio": 1.0, "stopped": [], "hit": hit,
             "is_best": hit, "miss_within_noise": False, "decided": True,
             "times_s": {"3": 1.0, "4": 0.8}, "predicted_s": {"3": 1.0, "4": 0.9}}
            for model, rate, batch, hit in cases]
    path.mkdir()
    (path / "split_quality.json").write_text(json.dumps({
        "format": module.FORMAT, "settings": {"tolerance": tolerance, "iterations": 8},
        "setup": {"shaped": True, "note": ""}, "cases": done,
        "summary": module.summarise(done, tolerance)}))
    return path


def test_a_grid_run_in_parts_is_merged_into_one_summary(tmp_path, capsys):
    """Two parts' cases in one document, table and plot, counted together;
    a case in two parts, or parts judged at different tolerances, are
    refused with the file named, and nothing is written."""
    main = benchmark_module("split_quality").main
    alexnet = quality_part(tmp_path / "alexnet", [("alexnet", 5, 8, True),
                                                  ("alexnet", 25, 8, False)])
    resnet = quality_part(tmp_path / "resnet18", [("resnet18", 5, 8, True)])
    assert main(["--merge", str(alexnet), str(resnet / "split_quality.json"),
                 "--out", str(tmp_path / "grid")]) == 0
    doc = json.loads((tmp_path / "grid" / "split_quality.json").read_text())
    assert [(case["model"], case["bandwidth_mbit"]) for case in doc["cases"]] == \
        [("alexnet", 5), ("alexnet", 25), ("resnet18", 5)]
    assert (doc["summary"]["cases"], doc["summary"]["hits"]) == (3, 2)
    assert doc["summary"]["hit_share"] == pytest.approx(2 / 3)
    assert [(part["source"], part["cases"]) for part in doc["parts"]] == \
        [("alexnet", 2), ("resnet18", 1)]
    assert "2 of 3 cases (66.7%)" in capsys.readouterr().out
    assert (tmp_path / "grid" / "split_quality.png").read_bytes().startswith(b"\x89PNG")

    again = quality_part(tmp_path / "again", [("alexnet", 25, 8, True)])
    loose = quality_part(tmp_path / "loose", [("resnet18", 25, 8, True)], tolerance=0.1)
    for parts, said in (([alexnet, again], "alexnet at 25 Mbit/s and batch 8 is also in"),
                        ([resnet, loose], "different tolerances: [0.05, 0.1]")):
        out = tmp_path / f"refused-{parts[1].name}"
        assert main(["--merge", *map(str, parts), "--out", str(out)]) == 1
        error = capsys.readouterr().err
        assert error.startswith("error: cannot merge: ") and said in error
        assert not (out / "split_quality.json").exists()


def test_the_choice_is_the_split_that_carried_most_of_the_run():
    carried_split = benchmark_module("split_quality").carried_split

    def run(final, counts):
        return {"split": final, "split_selection": {"samples_per_split": counts}}

    # Two measuring requests at 6, most of the run at 9, the last request at 11.
    assert carried_split(run(11, {"6": 16, "9": 40, "11": 8})) == 9
    assert carried_split(run(2, {"2": 192, "3": 64})) == 2
    # A tie, or nothing recorded: the split the run ended at.
    assert carried_split(run(5, {"3": 32, "5": 32})) == 5
    assert carried_split(run(5, {"3": 32, "4": 32, "5": 8})) == 4
    assert carried_split({"split": 7, "split_selection": {}}) == 7


def test_splits_of_the_same_bytes_and_compute_are_ties():
    tied_splits = benchmark_module("split_quality").tied_splits

    def row(split, nbytes, storage, compute, wire_format="uint8+zstd", feasible=True):
        return {"split": split, "wire_bytes": nbytes, "storage_s": storage,
                "trainer_compute_s": compute, "wire_format": wire_format,
                "feasible": feasible}

    rows = [row(12, 9000, 1.0, 0.5), row(13, 2000, 1.2, 0.3), row(14, 2000, 1.203, 0.3),
            row(15, 2000, 1.203, 0.3, feasible=False), row(16, 2000, 1.203, 0.3, "float32"),
            row(17, 2000, 1.5, 0.3)]
    metrics = {"split_selection": {"decision": {"rows": rows}}}
    assert tied_splits(metrics, 13) == [13, 14]
    assert tied_splits(metrics, 12) == [12]
    assert tied_splits({"split_selection": {"decision": None}}, 5) == [5]


def test_each_split_is_timed_in_the_format_its_row_predicted():
    format_flags = benchmark_module("split_quality").format_flags
    rows = [{"split": 0, "wire_format": ""}, {"split": 5, "wire_format": "uint8+zstd"},
            {"split": 10, "wire_format": "float16"}]
    metrics = {"split_selection": {"wire_format": "float16+zstd", "decision": {"rows": rows}}}
    assert format_flags(metrics, 5) == ["--wire_dtype", "uint8", "--wire_encoding", "zstd"]
    assert format_flags(metrics, 10) == ["--wire_dtype", "float16", "--wire_encoding", "raw"]
    # No row, or split 0's empty format: the format the run used.
    assert format_flags(metrics, 0) == ["--wire_dtype", "float16", "--wire_encoding", "zstd"]
    assert format_flags({"split_selection": {"decision": None}}, 3) == []


def test_rate_change_counts_the_shards_between_the_change_and_the_new_decision():
    shards_to_decision = benchmark_module("rate_change").shards_to_decision
    history = [{"monotonic_s": 1.0, "why": "profiled"},
               {"monotonic_s": 3.2, "why": "drift: bandwidth +38%", "drift": {"bandwidth": 0.38}},
               {"monotonic_s": 5.0, "why": "drift: bandwidth -50%", "drift": {"bandwidth": -0.5}}]
    metrics = {"split_selection": {"history": history,
                                   "completed_at": [0.4, 0.9, 1.9, 3.4, 4.5, 5.2],
                                   "observed_at": [0.5, 1.0, 2.0, 3.5, 4.0, 4.9, 5.5]}}
    # A slower link: the drift the other way at 3.2 s is noise, not the new decision.
    shards, taken, step = shards_to_decision(metrics, changed_at=3.0, slower=True)
    assert (shards, taken) == (2, 3) and step is history[2]  # 3.4, 4.5; 3.5, 4.0, 4.9
    assert shards_to_decision(metrics, changed_at=3.0, slower=False)[2] is history[1]
    assert shards_to_decision(metrics, changed_at=6.0, slower=True) == (None, None, None)


def test_rate_change_waits_for_the_first_decision_from_measurements(tmp_path):
    """The link changes only after the trainer's log shows a decision from
    measurements (not the start from the storage tier's layer costs), or
    once the run is over."""
    wait = benchmark_module("rate_change").wait_for_measured_decision
    log = tmp_path / "run.log"
    log.write_text("split selection after 0 shard(s), the storage tier's layer costs: ...\n")
    waiter = threading.Thread(target=wait, args=(log, threading.current_thread()))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()
    log.write_text(log.read_text() + "split selection after 4 shard(s), profiled: 18 -> 18\n")
    waiter.join(5)
    assert not waiter.is_alive()
    finished = threading.Thread(target=lambda: None)
    finished.start()
    finished.join()
    wait(tmp_path / "never-written.log", finished)


def test_split_changes_are_counted_in_the_epoch_they_happened():
    split_changes = benchmark_module("tl_benchmark").split_changes

    def epoch(train, holdout):
        return {"train": {"traffic": {"shards": train}},
                "holdout": {"traffic": {"shards": holdout}} if holdout else None}

    # The first decision, before any request, chooses where the run starts.
    history = [{"shard": 0, "from": 13, "to": 11},
               {"shard": 4, "from": 11, "to": 8}, {"shard": 5, "from": 8, "to": 8},
               {"shard": 6, "from": 8, "to": 9}, {"shard": 7, "from": 9, "to": 8},
               {"shard": 13, "from": 8, "to": 11}]
    metrics = {"epochs": [epoch(5, 1), epoch(5, 1), epoch(5, None)],
               "split_selection": {"history": history}}
    assert split_changes(metrics) == [2, 1, 1]  # epochs end after shards 6, 12 and 17
    assert split_changes({"epochs": [epoch(5, 1)], "split_selection": {}}) == [0]


def test_the_automatic_run_is_judged_with_its_profiling_against_the_faster_mode():
    bench = benchmark_module("tl_benchmark")

    def record(mode, repeat, epoch_s, profiling_s=0.0):
        return {"model": "m", "bandwidth_mbit": 8, "mode": mode, "repeat": repeat,
                "encoding": "auto" if mode in bench.FEATURE_MODES else None,
                "epoch_s": epoch_s, "profiling_s": profiling_s}

    results = [record("vanilla", 1, 10.0), record("hapi_freeze", 1, 8.0),
               record("hapi_auto", 1, 8.0, profiling_s=0.4),
               record("vanilla", 2, 6.0), record("hapi_freeze", 2, 9.0),
               record("hapi_auto", 2, 6.3, profiling_s=0.0)]
    ratio = bench.auto_over_best(results, "m", 8, "auto")
    assert ratio["min"] == pytest.approx(1.05) and ratio["max"] == pytest.approx(1.05)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                    reason="freed memory is kept through glibc's mallopt; this is not glibc")
def test_the_allocator_benchmark_reads_the_speed_in_fresh_processes_both_ways(tmp_path):
    doc = benchmark_json("allocator", tmp_path, "--models", "alexnet", "--batch", "2",
                         "--processes", "1")
    ways = doc["results"]["alexnet"]
    assert set(ways) == {"default", "freed memory kept"}
    for way in ways.values():
        assert way["measuring_process"]["times"] == "measured"
        assert way["measuring_process"]["speed"] == 1.0
        assert [run["times"] for run in way["fresh_processes"]] == ["cached"]
        assert way["speed"]["median"] > 0 and way["iteration_s"]["median"] > 0
        assert way["passes_s"]["median"] == pytest.approx(
            way["speed"]["median"] * way["measuring_process"]["reference_passes_s"])


def test_the_batch_times_benchmark_compares_both_ways_with_whole_iterations(tmp_path):
    doc = benchmark_json("batch_times", tmp_path, "--models", "alexnet", "--batch", "4",
                         "--anchors", "2", "1", "--repeats", "1")
    figures = doc["results"]["alexnet"]
    assert figures["iteration_s"]["median"] > 0
    for way in ("at_batch", "extrapolated"):
        assert figures[f"{way}_s"]["median"] > 0
        assert figures[f"{way}_over_iteration"]["median"] == pytest.approx(
            figures[f"{way}_s"]["median"] / figures["iteration_s"]["median"])
    assert [layer["name"] for layer in figures["layers"]] == \
        list(zoo.build_model("alexnet", seed=0).layer_names)
    with pytest.raises(SystemExit):
        benchmark_json("batch_times", tmp_path, "--batch", "4", "--anchors", "8", "2")


def test_the_verdict_noise_benchmark_deals_runs_as_the_verdict_does():
    module = benchmark_module("verdict_noise")
    assert module.parse_case("alexnet:500:32:6:uint8+zstd") == {
        "model": "alexnet", "bandwidth_mbit": 500, "batch_size": 32, "split": 6,
        "wire_format": "uint8+zstd"}
    assert module.parse_case("resnet18:5:8:0")["wire_format"] is None
    for bad, why in (("alexnet:500:32", "MODEL:MBIT:BATCH:SPLIT"), ("vgg:5:8:1", "unknown model"),
                     ("alexnet:fast:8:1", "integers"), ("alexnet:5:8:99", "SPLIT <=")):
        with pytest.raises(ValueError, match=why):
            module.parse_case(bad)
    # Rounds alternate which series runs first, as split_quality.verdict_runs does.
    assert module.verdict_order([1, 2, 3, 4, 5, 6]) == ([1, 4, 5], [2, 3, 6])
    # Runs that agree never miss; a slow half misses whenever the chosen
    # series holds more slow runs than the best series (one way in two here).
    assert module.false_miss_share([2.0] * 6, 3, 0.05) == 0.0
    assert module.false_miss_share([1.0, 1.0, 1.0, 2.0, 2.0, 2.0], 3, 0.05) == 0.5
    # Medians of 1.0 against 1.04: within the tolerance, never a miss.
    assert module.false_miss_share([1.0, 1.0, 1.04, 1.04], 2, 0.05) == 0.0
    with pytest.raises(ValueError, match="5 runs for two series of 3"):
        module.false_miss_share([1.0] * 5, 3, 0.05)


def test_format_costs_times_both_ways_and_writes_json(tmp_path):
    doc = benchmark_json("format_costs", tmp_path, "--models", "alexnet", "--preset",
                         "resize-64", "--runs", "1")
    ways = doc["results"]["alexnet"]
    assert set(ways) == {"defaults", "four images, every timing repeated"}
    assert all(way["median"] > 0 and len(way["seconds"]) == 1 for way in ways.values())
