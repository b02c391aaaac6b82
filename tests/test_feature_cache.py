"""The trainer's feature cache (``--cache_dir``) against a real one-node Swift.

The data set is the first 48 of scikit-learn's digits in 4 shards of 12;
ResNet-18 with ``seed:0`` weights at 32 px, a fixed split, nothing held
out: each run takes seconds. Feature requests are counted where the trainer
sends them (``hapi.client.data.fetch_features``), so a hit is seen to send
nothing, not only to report nothing.
"""

import json
import subprocess
import sys
import threading
from dataclasses import replace

import pytest
import torch
from helpers import upload_digits

from hapi import protocol
from hapi.client import data
from hapi.client import main as cli
from hapi.client.feature_cache import FeatureCache, ShardCache, parse_size
from hapi.client_setup.load import load_manifest
from hapi.shards import read_shard, write_shard

CONTAINER = "hapi-cache-digits"
SAMPLES, SHARD_SIZE, SHARDS = 48, 12, 4
SPLIT = 11  # ResNet-18's freeze index: the whole frozen part in Swift
FLAGS = ["--dataset", CONTAINER, "--model", "resnet18", "--weights", "seed:0",
         "--preset", "resize-32", "--batch_size", "8", "--storage_batch", "12",
         "--holdout", "0", "--threads", "1", "--freeze", "--manual_split", "--split_idx",
         str(SPLIT)]


@pytest.fixture(scope="module")
def cluster(swift_cluster):
    upload_digits(swift_cluster, CONTAINER, SAMPLES, SHARD_SIZE)
    return swift_cluster


@pytest.fixture
def feature_requests(monkeypatch):
    """The shards the trainer asked the storage tier for, by name."""
    sent = []
    fetch = data.fetch_features

    def counted(conn, container, name, request, *args, **kwargs):
        sent.append(name)
        return fetch(conn, container, name, request, *args, **kwargs)

    monkeypatch.setattr(data, "fetch_features", counted)
    return sent


def train(cluster, *flags):
    """Run client/main.py in this process; return its metrics."""
    user, key = cluster.users["tester"]
    args = cli.parse_args([*FLAGS, *flags, "-A", cluster.auth_url, "-U", user, "-K", key])
    return cli.run(args, log=lambda line: None)


def traffic(metrics, epoch):
    return metrics["epochs"][epoch - 1]["train"]["traffic"]


def test_later_epochs_read_the_cache_and_send_nothing(cluster, tmp_path, feature_requests):
    metrics = train(cluster, "--num_epochs", "3", "--cache_dir", str(tmp_path))
    assert len(feature_requests) == SHARDS  # the first epoch's, none after
    first, *later = (traffic(metrics, epoch) for epoch in (1, 2, 3))
    assert (first["cache_misses"], first["cache_hits"]) == (SHARDS, 0)
    assert first["bytes_received"] > 0 and first["cache_read_bytes"] == 0
    for epoch in later:
        assert (epoch["cache_hits"], epoch["cache_misses"]) == (SHARDS, 0)
        assert epoch["bytes_received"] == 0 and epoch["storage_compute_s"] == 0
        assert epoch["cache_read_bytes"] > 0
    assert metrics["cache_hits"] == 2 * SHARDS and metrics["cache_misses"] == SHARDS
    assert metrics["bytes_received"] == first["bytes_received"]
    assert metrics["cache"]["written_bytes"] == metrics["cache"]["size_bytes"] > 0
    assert len(list(tmp_path.glob("*.safetensors"))) == SHARDS
    assert not list(tmp_path.glob(".*.part"))


def test_the_cache_never_changes_what_training_computes(cluster, tmp_path):
    """The same loss after every step without the cache, filling it, and
    reading it (entries kept from the previous run)."""
    plain = train(cluster, "--num_epochs", "2")
    filling = train(cluster, "--num_epochs", "2", "--cache_dir", str(tmp_path))
    reading = train(cluster, "--num_epochs", "2", "--cache_dir", str(tmp_path))
    assert reading["cache_misses"] == 0 and reading["bytes_received"] == 0
    for metrics in (filling, reading):
        for epoch, ref in zip(metrics["epochs"], plain["epochs"], strict=True):
            assert epoch["step_loss"] == ref["step_loss"]
            assert epoch["step_batch"] == ref["step_batch"]


def test_an_entry_is_per_split(cluster, tmp_path, feature_requests):
    train(cluster, "--cache_dir", str(tmp_path))
    metrics = train(cluster, "--cache_dir", str(tmp_path), "--split_idx", str(SPLIT - 1))
    assert metrics["cache_misses"] == SHARDS and metrics["cache_hits"] == 0
    assert len(feature_requests) == 2 * SHARDS
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 * SHARDS


def test_vanilla_is_not_cached(cluster, tmp_path):
    """At split 0 the raw shards cross the network every epoch, as vanilla's do."""
    metrics = train(cluster, "--num_epochs", "2", "--cache_dir", str(tmp_path),
                    "--split_idx", "0")
    assert metrics["cache_hits"] == metrics["cache_misses"] == 0
    assert metrics["bytes_received"] == metrics["raw_shard_bytes"]
    assert not list(tmp_path.glob("*.safetensors"))


def test_an_overwritten_shard_misses_and_a_deleted_one_is_never_read(cluster, tmp_path,
                                                                      feature_requests):
    """A shard with new content has a new ETag, so a new key: its features
    are fetched again; a shard gone from the listing has no key at all."""
    container = "hapi-cache-overwritten"
    upload_digits(cluster, container, SAMPLES, SHARD_SIZE)
    flags = ["--cache_dir", str(tmp_path), "--dataset", container]
    train(cluster, *flags)
    conn = cluster.connection()
    try:
        name = load_manifest(conn, container).shards[0]["name"]
        _, body = conn.get_object(container, name)
        first, second, *rest = read_shard(body)  # the same keys, two images swapped
        swapped = [replace(first, image=second.image), replace(second, image=first.image)]
        conn.put_object(container, name, write_shard(swapped + rest))
        feature_requests.clear()
        metrics = train(cluster, *flags)
        assert feature_requests == [name]
        assert (metrics["cache_hits"], metrics["cache_misses"]) == (SHARDS - 1, 1)

        conn.delete_object(container, name)
        request = protocol.FeatureRequest(
            model="resnet18", split=SPLIT, freeze=SPLIT, batch=12,
            weights=protocol.WeightsRef("seed", "0"), preset="resize-32", dtype="float32")
        view = ShardCache.open(FeatureCache(tmp_path), conn, container, request)
        assert view.key(name, SPLIT, "float32") is None and view.get(name, SPLIT, "float32") is None
        with pytest.raises(data.DataError, match="lists shards that are not in the container"):
            train(cluster, *flags)
    finally:
        conn.close()


def test_a_corrupt_entry_is_deleted_and_fetched_again(cluster, tmp_path, feature_requests):
    reference = train(cluster, "--cache_dir", str(tmp_path))
    damaged = sorted(tmp_path.glob("*.safetensors"))[0]
    raw = bytearray(damaged.read_bytes())
    raw[-5] ^= 0xFF  # a feature's bytes: the file still parses
    damaged.write_bytes(bytes(raw))
    truncated = sorted(tmp_path.glob("*.safetensors"))[1]
    truncated.write_bytes(truncated.read_bytes()[:100])  # does not parse
    feature_requests.clear()
    metrics = train(cluster, "--cache_dir", str(tmp_path))
    assert len(feature_requests) == 2
    assert metrics["cache"]["corrupt"] == 2
    assert (metrics["cache_hits"], metrics["cache_misses"]) == (SHARDS - 2, 2)
    assert metrics["epochs"][0]["step_loss"] == reference["epochs"][0]["step_loss"]
    assert damaged.read_bytes() != bytes(raw)  # fetched and written again, whole
    assert FeatureCache(tmp_path).get(damaged.stem) is not None


def test_a_full_cache_evicts_the_least_recently_used(cluster, tmp_path, feature_requests):
    train(cluster, "--cache_dir", str(tmp_path / "probe"))
    entry = max(p.stat().st_size for p in (tmp_path / "probe").glob("*.safetensors"))
    bound = int(2.5 * entry)
    metrics = train(cluster, "--num_epochs", "2", "--cache_dir", str(tmp_path / "small"),
                    "--cache_size", str(bound))
    cache = metrics["cache"]
    assert cache["max_bytes"] == bound and 0 < cache["size_bytes"] <= bound
    assert cache["evicted"] >= SHARDS  # each epoch's order outruns a 2-entry cache
    assert len(list((tmp_path / "small").glob("*.safetensors"))) == 2
    assert metrics["cache_hits"] + metrics["cache_misses"] == 2 * SHARDS


def entry(seed, samples=16):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(samples, 8, 4, 4, generator=generator),
            torch.randint(0, 10, (samples,), generator=generator),
            [f"{seed:03d}{i:03d}" for i in range(samples)])


def test_lru_order_and_the_size_bound(tmp_path):
    probe = FeatureCache(tmp_path / "probe")
    size = probe.put("x", *entry(0))
    cache = FeatureCache(tmp_path / "lru", max_bytes=3 * size)
    for key in "abc":
        cache.put(key, *entry(ord(key)))
    assert cache.get("a") is not None  # a is now used more recently than b
    cache.put("d", *entry(ord("d")))
    assert cache.get("b") is None
    assert all(cache.get(key) is not None for key in "acd")
    assert cache.size() <= 3 * size
    assert cache.put("huge", *entry(1, samples=64)) == 0 and cache.get("huge") is None
    assert cache.report()["evicted"] == 1


def test_an_entry_reads_back_exactly(tmp_path):
    cache = FeatureCache(tmp_path)
    inputs, labels, keys = entry(7)
    half = inputs.to(torch.float16)
    cache.put("k", half, labels, keys)
    got = cache.get("k")
    assert got.inputs.dtype == torch.float16 and torch.equal(got.inputs, half)
    assert torch.equal(got.labels, labels) and got.keys == keys
    assert got.nbytes == (tmp_path / "k.safetensors").stat().st_size


def test_two_writers_of_one_entry_never_leave_a_torn_file(tmp_path):
    """Two caches on one folder (two trainers) write the same entry at once,
    many times, while a third reads it: every read is whole or a miss."""
    writers = [FeatureCache(tmp_path), FeatureCache(tmp_path)]
    reader = FeatureCache(tmp_path)
    inputs, labels, keys = entry(3, samples=256)
    start = threading.Barrier(3)

    def write(cache):
        start.wait()
        for _ in range(40):
            cache.put("same", inputs, labels, keys)

    threads = [threading.Thread(target=write, args=(cache,)) for cache in writers]
    for thread in threads:
        thread.start()
    start.wait()
    reads = []
    while any(thread.is_alive() for thread in threads):
        reads.append(reader.get("same"))
    for thread in threads:
        thread.join()
    assert reader.report()["corrupt"] == 0
    assert all(torch.equal(got.inputs, inputs) for got in reads if got is not None)
    assert [p.name for p in tmp_path.iterdir()] == ["same.safetensors"]


def test_two_trainers_fill_one_cache_at_once(cluster, tmp_path):
    """Two trainer processes, one cache folder, the same entries at once."""
    user, key = cluster.users["tester"]
    cache = tmp_path / "cache"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "hapi.client.main", *FLAGS, "--cache_dir", str(cache),
         "--metrics", str(tmp_path / f"metrics-{i}.json"), "-A", cluster.auth_url, "-U", user,
         "-K", key], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    results = [json.loads((tmp_path / f"metrics-{i}.json").read_text()) for i in range(2)]
    assert results[0]["epochs"][0]["step_loss"] == results[1]["epochs"][0]["step_loss"]
    assert sorted(p.suffix for p in cache.iterdir()) == [".safetensors"] * SHARDS
    after = train(cluster, "--cache_dir", str(cache))
    assert after["cache"]["corrupt"] == 0 and after["cache_hits"] == SHARDS
    assert after["epochs"][0]["step_loss"] == results[0]["epochs"][0]["step_loss"]


@pytest.mark.parametrize("text, expected", [("2G", 2 << 30), ("512M", 512 << 20),
                                            ("1.5GiB", 3 << 29), ("100000", 100_000),
                                            ("64kb", 64 << 10)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("flags, message", [
    (["--cache_size", "lots"], "--cache_size: 'lots' is not a size: expected a number of "
                               "bytes with an optional K, M, G or T"),
    (["--cache_size", "0"], "--cache_size 0: must be above 0 bytes"),
])
def test_bad_cache_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.parse_args([*FLAGS, *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err


def test_cache_dir_default_is_under_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = cli.parse_args([*FLAGS, "--cache_dir", "default", "--cache_size", "2G"])
    assert args.cache_dir == str(tmp_path / "hapi" / "features")
    assert args.cache_size == 2 << 30
    assert cli.parse_args(FLAGS).cache_dir is None
    assert cli.parse_args(FLAGS).cache_size == 1 << 30


class Crash(Exception):
    pass


def test_a_resumed_run_reads_the_cache_and_computes_the_same(cluster, tmp_path,
                                                             feature_requests):
    """Interrupted in its second epoch, resumed from its checkpoint: the
    resumed run sends no feature request and ends with the uninterrupted
    run's losses, step for step."""
    reference = train(cluster, "--num_epochs", "2")
    flags = ["--num_epochs", "2", "--cache_dir", str(tmp_path / "cache"),
             "--checkpoint_dir", str(tmp_path / "ckpt"), "--checkpoint_every", "2"]
    user, key = cluster.users["tester"]
    args = cli.parse_args([*FLAGS, *flags, "-A", cluster.auth_url, "-U", user, "-K", key])

    def crash(step):
        if step.global_step == 9:  # 6 steps an epoch: the second epoch's step 3
            raise Crash

    with pytest.raises(Crash):
        cli.run(args, on_step=crash, log=lambda line: None)
    feature_requests.clear()
    resumed = train(cluster, *flags, "--resume")
    assert resumed["resumed_from"] == {"epoch": 2, "step": 2}
    assert feature_requests == []
    for epoch, ref in zip(resumed["epochs"], reference["epochs"], strict=True):
        assert epoch["step_loss"] == ref["step_loss"]


def test_automatic_split_selection_learns_only_from_requests(cluster, tmp_path, monkeypatch):
    """Shards read from the cache are not shown to the split selector: it
    hears about the shards whose features crossed the network, and only those."""
    observed = []
    from hapi.client.autosplit import AutomaticSplit
    from hapi.client.autosplit.wireformats import WireFormat
    observe = AutomaticSplit.observe

    def recorded(self, shard):
        observed.append(shard.cache)
        return observe(self, shard)

    monkeypatch.setattr(AutomaticSplit, "observe", recorded)
    # Whatever the selector decides, the requests stay at one split and format, so the
    # second epoch's shards come from the cache.
    monkeypatch.setattr(AutomaticSplit, "route",
                        property(lambda self: (SPLIT, WireFormat("float32"))))
    flags = [flag for flag in FLAGS if flag not in ("--manual_split", "--split_idx", str(SPLIT))]
    user, key = cluster.users["tester"]
    args = cli.parse_args([*flags, "--num_epochs", "2", "--cache_dir", str(tmp_path),
                           "-A", cluster.auth_url, "-U", user, "-K", key])
    metrics = cli.run(args, log=lambda line: None)
    assert metrics["split_selection"]["automatic"]
    loaded = sum(epoch["train"]["traffic"]["shards"] for epoch in metrics["epochs"])
    assert metrics["cache_hits"] > 0
    assert "hit" not in observed and len(observed) == loaded - metrics["cache_hits"]


def test_a_write_the_disk_refuses_is_skipped(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    (tmp_path / "cache").rmdir()  # the folder removed under a running trainer
    assert cache.put("k", *entry(5)) == 0
    assert cache.get("k") is None
    assert cache.report()["write_errors"] == 1
