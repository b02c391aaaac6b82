"""The README's demo (``make demo``) as a short run, its own data set, Ctrl-C."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from hapi.client import demo
from hapi.client import main as client_main
from hapi.client_setup import datasets
from hapi.client_setup.load import load_manifest, upload_dataset
from hapi.server_setup.cluster import Cluster

# 400 digits in 10 shards of 40: 2 shards (80 digits) held out, one epoch.
SHORT = ["--digits", "400", "--shard_size", "40", "--num_epochs", "1"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """The demo's folder; its cluster is stopped after the module's tests."""
    root = tmp_path_factory.mktemp("demo")
    yield root
    Cluster(root / "swift").stop(quiet=True)


@pytest.mark.swift
def test_short_run_learns_and_reports_the_bytes(demo_root, capsys):
    """Two epochs: the second reads every shard's features from the feature
    cache; vanilla trains the same epochs to the same accuracy, receiving the
    raw shards each epoch."""
    assert demo.main(["--root", str(demo_root), *SHORT, "--num_epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "data set: uploaded 400 digits as 10 shards of 40 to container " \
           "'hapi-demo-digits'" in out
    accuracy = re.search(r"^held-out accuracy: ([\d.]+)% on 80 digits \(chance: 10%\)$", out,
                         re.MULTILINE)
    assert accuracy and float(accuracy[1]) > 10, out
    assert re.search(r"^received from Swift: \d+\.\d\d MB of features; vanilla training moves "
                     r"the raw shards: \d+\.\d\d MB \(\d+\.\d\dx\)$", out, re.MULTILINE), out
    cache = demo_root / "feature-cache"
    assert re.search(rf"^feature cache: 10 shards read from it \(\d+\.\d\d MB from disk\), 10 "
                     rf"fetched; \d+\.\d\d MB in {re.escape(str(cache))}$", out, re.MULTILINE), out
    runs = dict(re.findall(r"^(split|vanilla): +held-out accuracy ([\d.]+)%, \d+\.\d\d MB "
                           r"received, \d+\.\d s$", out, re.MULTILINE))
    assert runs == {"split": accuracy[1], "vanilla": accuracy[1]}, out
    metrics = json.loads((demo_root / "metrics.json").read_text())
    vanilla = json.loads((demo_root / "metrics-vanilla.json").read_text())
    assert metrics["cache_hits"] == metrics["cache_misses"] == 10
    assert metrics["epochs"][1]["train"]["traffic"]["bytes_received"] == 0
    assert vanilla["split"] == 0 and vanilla["cache"] is None
    assert vanilla["bytes_received"] == vanilla["raw_shard_bytes"] == metrics["raw_shard_bytes"]
    assert len(list(cache.glob("*.safetensors"))) == 10
    # Run again: every shard from the feature cache, nothing computed in Swift.
    assert demo.main(["--root", str(demo_root), *SHORT, "--no_vanilla"]) == 0
    assert "came from the feature cache of an earlier run" in capsys.readouterr().out


@pytest.mark.swift
def test_ctrl_c_is_one_line_and_status_130(demo_root, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(client_main, "run", interrupted)
    assert demo.main(["--root", str(demo_root), *SHORT]) == demo.INTERRUPTED
    swift = demo_root / "swift"
    assert capsys.readouterr().err == \
        f"interrupted (Swift keeps running: hapi-swift stop {swift})\n"
    assert all(info["alive"] for info in Cluster(swift).status().values())


@pytest.mark.swift
def test_sigint_while_training_leaves_the_cluster_serving(demo_root):
    """A real Ctrl-C (SIGINT) once training has begun: no traceback, status
    130, and the cluster still answers. The feature cache of the runs before
    goes first: read from it, the epoch could end before the signal."""
    shutil.rmtree(demo_root / "feature-cache", ignore_errors=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hapi.client.demo", "--root", str(demo_root), *SHORT],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A suite started in the background inherits SIGINT ignored, and
        # Python then leaves it ignored: a user's terminal does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:
            if line.startswith(f"{demo.MODEL}: "):  # the trainer's first line: training begins
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == demo.INTERRUPTED, err
    assert err.splitlines()[-1].startswith("interrupted (Swift keeps running") and \
        "Traceback" not in err, err
    conn = Cluster(demo_root / "swift").connection()
    assert load_manifest(conn, "hapi-demo-digits").samples == 400
    conn.close()


def test_demo_has_a_data_set_of_its_own(swift_conn, capsys):
    """What README's ``hapi-load digits`` put in ``digits`` is never the
    demo's; a demo container holding other shards is replaced, and says so."""
    assert demo.parse_args([]).container == "hapi-demo-digits"
    source = datasets.digits()
    upload_dataset(swift_conn, "test-demo-digits", source.samples, source.classes, 256)
    manifest = demo.ensure_digits(swift_conn, "test-demo-digits", 100, 25)
    assert capsys.readouterr().out == (
        "data set: container 'test-demo-digits' holds 1797 samples in 8 shards of 256, not the "
        "demo's 100 digits in shards of 25: replacing them\n"
        "data set: uploaded 100 digits as 4 shards of 25 to container 'test-demo-digits'\n")
    assert [s["samples"] for s in manifest.shards] == [25] * 4
    assert demo.ensure_digits(swift_conn, "test-demo-digits", 100, 25) == manifest
    assert capsys.readouterr().out == ("data set: reusing the 100 digits in 4 shards of 25 in "
                                       "container 'test-demo-digits'\n")

