"""benchmarks/tl_benchmark.py and split_quality.py end to end, with tiny
settings, as their real commands.

As root the storage tier runs in a shaped network namespace; elsewhere the
benchmark falls back to loopback, and these tests say so (a warning) and
check that fallback instead.
"""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

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
# The zoo's fastest model, whose trained layers are small for ALL_IN_COS to fetch.
TINY = ["--models", "mobilenet_v3_small", "--bandwidths", "200", "--images", "24",
        "--shard_size", "8", "--batch_size", "8", "--epochs", "1", "--holdout", "0.34"]

pytestmark = [pytest.mark.swift, pytest.mark.timeout(900)]


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


def test_smoke_run_writes_every_mode_field_and_plot(tmp_path):
    out = tmp_path / "bench"
    proc = start_benchmark(out)
    stdout, _ = proc.communicate(timeout=850)
    assert proc.returncode == 0, stdout[-4000:]

    doc = json.loads((out / "results.json").read_text())
    assert doc["setup"]["shaped"] is SHAPED
    records = doc["results"]
    assert [r["mode"] for r in records] == MODES
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
    assert case["chosen_split"] in case["contenders"]
    for split in case["contenders"]:
        assert len(case["runs_s"][str(split)]) == 2
    times = {int(s): t for s, t in case["times_s"].items()}
    assert case["best_s"] == min(times.values()) == times[case["best_split"]]
    assert case["ratio"] == pytest.approx(times[case["chosen_split"]] / case["best_s"])
    assert case["hit"] is (case["ratio"] <= 1.05)
    chosen_runs, best_runs = (case["runs_s"][str(case[key])] for key in ("chosen_split",
                                                                         "best_split"))
    assert case["miss_within_noise"] is (not case["hit"] and min(chosen_runs) <= max(best_runs))
    assert doc["summary"]["cases"] == 1 and doc["summary"]["hits"] == int(case["hit"])
    assert doc["summary"]["misses_within_noise"] == int(case["miss_within_noise"])
    assert "chosen split best or within 5% of it: " in stdout
    assert (out / "split_quality.png").read_bytes().startswith(b"\x89PNG")
    assert not namespaces_of(proc.pid)
