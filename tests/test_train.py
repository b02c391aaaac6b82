"""The compute tier against a real Swift: client/main.py's training, split and vanilla.

The data set is the first 240 of scikit-learn's digits in 10 shards of 24:
8 shards (192 samples) to train on, 2 held out. EfficientNet-Lite0 with its
real pre-trained weights, at 32 px, keeps every run to seconds.
"""

import json
import threading
import time

import pytest
import torch
from helpers import upload_digits
from pytest import approx
from torch import nn

from hapi import zoo
from hapi.client import data
from hapi.client import main as cli
from hapi.client.checkpoint import LATEST, load_checkpoint, save_checkpoint
from hapi.stores import DirectoryStore

CONTAINER = "hapi-train-digits"
SAMPLES, SHARD_SIZE, TRAIN_SAMPLES = 240, 24, 192
BATCH, STORAGE_BATCH = 20, 7
# float32 features (raw or zstd, both lossless): automatic runs compute
# exactly what a fixed split computes.
FLAGS = ["--dataset", CONTAINER, "--model", "myefficientnet_lite0", "--freeze",
         "--preset", "resize-32", "--batch_size", str(BATCH), "--storage_batch",
         str(STORAGE_BATCH), "--lr", "0.05", "--threads", "1", "--wire_dtype", "float32"]


@pytest.fixture(scope="module")
def cluster(swift_cluster):
    upload_digits(swift_cluster, CONTAINER, SAMPLES, SHARD_SIZE)
    return swift_cluster


def credentials(cluster, key=None):
    user, password = cluster.users["tester"]
    return ["-A", cluster.auth_url, "-U", user, "-K", key or password]


def train(cluster, *flags, on_step=None):
    """Run client/main.py in this process; return its metrics and every StepRecord."""
    records = []

    def record(step):
        records.append(step)
        if on_step is not None:
            on_step(step)

    args = cli.parse_args([*FLAGS, *flags, *credentials(cluster)])
    return cli.run(args, on_step=record), records


@pytest.fixture(scope="module")
def split_run(cluster):
    """Two epochs in split mode at the freeze index, uninterrupted."""
    return train(cluster, "--num_epochs", "2", "--manual_split", "--split_idx", "21")


def assert_same_epochs(metrics, reference):
    """Same loss after every step, same held-out accuracy after every epoch."""
    for epoch, ref_epoch in zip(metrics["epochs"], reference["epochs"], strict=True):
        assert epoch["step_loss"] == approx(ref_epoch["step_loss"], rel=1e-4)
        assert epoch["accuracy"] == ref_epoch["accuracy"]


@pytest.mark.parametrize("split", [0, 10])
def test_the_split_moves_work_not_results(cluster, split_run, split, capsys):
    """Vanilla (split 0) and a split inside the frozen part compute the same
    steps; the console says which crosses the network, features or raw shards."""
    metrics, records = train(cluster, "--num_epochs", "2", "--split_idx", str(split))
    out = capsys.readouterr().out
    if split == 0:
        assert "split 0 (vanilla: raw shards from Swift, preprocessed and run here)" in out
        assert "features" not in out
        assert f"received {metrics['bytes_received'] / 1e6:.1f} MB of raw shards from Swift" \
            in out
    else:
        assert "split 10 (features from the Swift proxy)" in out
        assert f"received {metrics['bytes_received'] / 1e6:.1f} MB from the Swift proxy" in out
    assert metrics["mode"] == ("vanilla" if split == 0 else "split")
    assert (metrics["split"], metrics["freeze"]) == (split, 21)
    reference, reference_records = split_run
    assert [r.keys for r in records] == [r.keys for r in reference_records]
    assert_same_epochs(metrics, reference)
    if split == 0:
        assert metrics["devices"]["storage"] is None
        assert metrics["bytes_received"] == metrics["raw_shard_bytes"]


def test_optimizer_sees_the_users_batch_whatever_the_storage_batch(split_run):
    metrics, records = split_run
    assert metrics["storage_batch"] == {"requested": STORAGE_BATCH, "used": [STORAGE_BATCH],
                                        "reduced_shards": 0}
    assert metrics["retries"] == {"total": 0, "by_cause": {}}
    full, last = divmod(TRAIN_SAMPLES, BATCH)
    for epoch in metrics["epochs"]:
        assert epoch["step_batch"] == [BATCH] * full + [last]
    for epoch in (0, 1):
        keys = [key for r in records if r.epoch == epoch for key in r.keys]
        assert len(keys) == len(set(keys)) == TRAIN_SAMPLES
    assert metrics["devices"] == {"trainer": "cpu", "storage": ["cpu"]}


def test_metrics_count_epochs_from_1_and_their_times_add_up(split_run):
    """Epochs count from 1, as on the console; the time spent fetching is the
    wall time with a request in flight, not the sum over overlapping requests."""
    metrics, _ = split_run
    assert [epoch["epoch"] for epoch in metrics["epochs"]] == [1, 2]
    passes = [p for e in metrics["epochs"] for p in (e["train"], e["holdout"])]
    for pass_ in passes:
        assert 0 < pass_["traffic"]["fetch_s"] <= pass_["time_s"]
        assert pass_["wait_s"] + pass_["compute_s"] == approx(pass_["time_s"], rel=0.01)
    assert metrics["fetch_s"] == approx(sum(p["traffic"]["fetch_s"] for p in passes))
    assert metrics["fetch_s"] <= metrics["wall_s"]
    assert metrics["wait_s"] + metrics["compute_s"] <= metrics["wall_s"]
    assert "load_s" not in metrics


def test_training_learns(split_run):
    metrics, _ = split_run
    first, second = metrics["epochs"]
    assert second["loss"] < first["loss"]
    assert metrics["accuracy"] >= 0.4  # 10 classes: chance is 0.1
    assert metrics["samples"] == {"train": TRAIN_SAMPLES, "holdout": SAMPLES - TRAIN_SAMPLES}


def test_fetching_overlaps_training(cluster, monkeypatch):
    """With slow storage and a slow trainer, prefetching hides one behind the other."""
    in_flight, most = 0, []
    lock = threading.Lock()

    def slow_fetch(*args, **kwargs):
        nonlocal in_flight
        with lock:
            in_flight += 1
            most.append(in_flight)
        try:
            time.sleep(0.2)
            return fetch_features(*args, **kwargs)
        finally:
            with lock:
                in_flight -= 1

    fetch_features = data.fetch_features
    monkeypatch.setattr(data, "fetch_features", slow_fetch)
    runs = {}
    for mode in ("--sequential", "--prefetch=2"):
        most.clear()
        metrics, _ = train(cluster, "--holdout", "0", "--batch_size", str(SHARD_SIZE), mode,
                           "--split_idx", "21", on_step=lambda step: time.sleep(0.2))
        runs[mode] = metrics["epochs"][0]["train"], max(most)
    (sequential, seq_most), (overlapped, ovl_most) = runs.values()
    assert (seq_most, ovl_most) == (1, 2)
    assert sequential["steps"] == overlapped["steps"] == SAMPLES // SHARD_SIZE
    assert overlapped["time_s"] < 0.75 * sequential["time_s"]
    assert overlapped["wait_s"] < 0.5 * sequential["wait_s"]


class Crash(Exception):
    pass


def test_resume_continues_from_the_last_checkpoint(cluster, split_run, capsys):
    """Both runs choose their split automatically (FLAGS fix none): whatever
    each chooses, they compute what the run at the freeze index computed."""
    checkpoints = ["--num_epochs", "2", "--checkpoint_container", "hapi-train-checkpoints",
                   "--checkpoint_every", "3"]
    steps_per_epoch = -(-TRAIN_SAMPLES // BATCH)
    crashed = []

    def crash(step):
        crashed.append(step)
        if step.global_step == steps_per_epoch + 4:
            raise Crash

    with pytest.raises(Crash):
        train(cluster, *checkpoints, on_step=crash)
    resumed, records = train(cluster, *checkpoints, "--resume")
    # Checkpoints after global steps 3, 6, 9, 10 (end of epoch 1) and 12: the
    # second epoch continues after its step 2, the crashed run's steps 13-14 are lost.
    assert resumed["resumed_from"] == {"epoch": 2, "step": 2}
    assert records[0].global_step == 13
    # The split selector ranks the rest of the job from there: the storage
    # tier served the model before the crash, so it decided before the first
    # request, then again once it knew where the job resumes (after the whole
    # shards before the one the second epoch's step 3 starts in).
    whys = [step["why"] for step in resumed["split_selection"]["history"]]
    before = 2 * BATCH // SHARD_SIZE * SHARD_SIZE
    assert whys[:2] == ["the storage tier's layer costs",
                        f"resumed at epoch 2 after {before} samples"]
    seen = [key for r in crashed[steps_per_epoch:12] for key in r.keys] + \
        [key for r in records for key in r.keys]
    assert len(seen) == len(set(seen)) == TRAIN_SAMPLES
    # Exactly the uninterrupted run: same batches, same losses, same accuracy.
    reference, reference_records = split_run
    assert [r.keys for r in records] == [r.keys for r in reference_records[12:]]
    assert_same_epochs(resumed, reference)
    # The wall time counts the interrupted run's too, up to its last checkpoint.
    assert resumed["wall_s"] >= resumed["wait_s"] + resumed["compute_s"]

    capsys.readouterr()
    tested, steps = train(cluster, "--testonly", "--checkpoint_container",
                          "hapi-train-checkpoints")
    assert (tested["epochs"], steps) == ([], [])
    assert tested["test"]["samples"] == tested["samples"]["test"] == SAMPLES
    assert tested["test"]["accuracy"] == tested["accuracy"] >= 0.4
    assert tested["bytes_received"] == tested["test"]["traffic"]["bytes_received"] > 0
    out = capsys.readouterr().out
    assert f"; evaluating {SAMPLES} samples;" in out
    assert f"received {tested['bytes_received'] / 1e6:.1f} MB from" in out
    assert "received 0.0 MB" not in out


def test_resuming_a_complete_run_says_so_and_keeps_its_metrics(cluster, tmp_path, capsys):
    flags = [*FLAGS, *credentials(cluster), "--split_idx", "21", "--holdout", "0",
             "--checkpoint_dir", str(tmp_path / "ckpt"), "--metrics", str(tmp_path / "m.json")]
    assert cli.main(flags) == 0
    written = (tmp_path / "m.json").read_bytes()
    capsys.readouterr()
    assert cli.main([*flags, "--resume"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "complete" in line] == [
        f"the run in {tmp_path / 'ckpt'} is already complete: 1 of 1 epochs trained, nothing "
        "to resume (a higher --num_epochs trains on)"]
    assert "epoch 1/1" not in out and "received" not in out
    assert (tmp_path / "m.json").read_bytes() == written


def test_checkpoint_round_trip_on_disk(tmp_path):
    def model_and_optimizer(seed):
        torch.manual_seed(seed)
        model = zoo.LayeredModel("tiny", [("a", nn.Linear(4, 4)), ("b", nn.Linear(4, 2))], 1)
        model.freeze(1)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        return model, optimizer

    store = DirectoryStore(tmp_path)
    model, optimizer = model_and_optimizer(0)
    for step in (1, 2):
        save_checkpoint(store, model, 1, optimizer, {"step": step, "epoch": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step-000000002.safetensors"]
    restored, restored_optimizer = model_and_optimizer(1)
    ckpt = load_checkpoint(store)
    ckpt.restore(restored, restored_optimizer)
    assert ckpt.state["epoch"] == 0
    assert torch.equal(restored.layers[1].weight, model.layers[1].weight)
    assert not torch.equal(restored.layers[0].weight, model.layers[0].weight)  # frozen: not saved
    saved, loaded = optimizer.state_dict(), restored_optimizer.state_dict()
    assert json.loads(json.dumps(saved["param_groups"])) == loaded["param_groups"]  # tuples: lists
    for param, values in saved["state"].items():
        for name, value in values.items():
            assert torch.equal(loaded["state"][param][name], value)


@pytest.mark.parametrize(("flags", "message"), [
    (["-K", "wrong"], "refused test:tester: 401"),
    (["--dataset", "hapi-no-such-container"], "container 'hapi-no-such-container' does not exist"),
    (["--dataset", "hapi-train-empty"], "has no manifest.json"),
    (["--storage_batch", "1000"], '"parameter": "X-Hapi-Batch"'),
    (["--end", "500"], "sample range [0, 500) is not within the data set's 240 samples"),
    (["--resume", "--checkpoint_container", "hapi-train-empty"], "there is no checkpoint"),
])
def test_errors_are_one_clear_line(cluster, capsys, flags, message):
    conn = cluster.connection()
    conn.put_container("hapi-train-empty")
    conn.close()
    assert cli.main([*FLAGS, *credentials(cluster), *flags]) == 1
    assert message in capsys.readouterr().err

