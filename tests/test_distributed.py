"""The trainer on two processes under torchrun (gloo, CPU) against a real Swift.

The data set: the first 120 of scikit-learn's digits in 10 shards of 12; 8
shards (96 samples) train, 2 are held out. Each rank's batch is a shard (12
samples): rank r's step k is shard 2k + r of the epoch's seeded order, so
the two ranks' step k together is the single process's step k at a batch of
24, and with only the head's Linear layer trained (no BatchNorm, no dropout)
both runs compute the same losses and weights. Each epoch has 4 steps.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, upload_digits
from pytest import approx

from hapi.client import data, distributed
from hapi.client import main as cli
from hapi.client.train import Trainer, TrainingError

CONTAINER = "hapi-distributed-digits"
SAMPLES, SHARD_SIZE, TRAIN_SAMPLES, EPOCHS = 120, 12, 96, 3
FLAGS = ["--dataset", CONTAINER, "--model", "myefficientnet_lite0", "--weights", "seed:0",
         "--freeze_idx", "22", "--manual_split", "--split_idx", "21", "--preset", "resize-32",
         "--storage_batch", "6", "--lr", "0.05", "--threads", "1", "--sequential",
         "--num_epochs", str(EPOCHS)]
ROOT = Path(__file__).resolve().parent.parent
# Runs client/main.py's run() as torchrun starts it, recording each step's keys.
RECORDING = """\
import json, os, sys
from hapi.client import main as cli
from hapi.client.train import Trainer, TrainingError
steps = []
cli.run(cli.parse_args(sys.argv[2:]), on_step=lambda s: steps.append([s.epoch, s.keys]))
with open(os.path.join(sys.argv[1], f"keys-{os.environ['RANK']}.json"), "w") as out:
    json.dump(steps, out)
"""


@pytest.fixture(scope="module")
def cluster(swift_cluster):
    upload_digits(swift_cluster, CONTAINER, SAMPLES, SHARD_SIZE)
    return swift_cluster


def credentials(cluster):
    user, password = cluster.users["tester"]
    return ["-A", cluster.auth_url, "-U", user, "-K", password]


def torchrun(script, *args):
    """``torchrun --nproc_per_node 2`` of ``script`` on a free port, started (a Popen)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def two_ranks(cluster, tmp_path_factory):
    """Two ranks at a batch of 12 each, uninterrupted, checkpointing every step."""
    work = tmp_path_factory.mktemp("two-ranks")
    script = work / "recording.py"
    script.write_text(RECORDING)
    rc, _, err = finished(torchrun(
        str(script), str(work), *FLAGS, "--batch_size", "12", "--checkpoint_every", "1",
        "--checkpoint_dir", str(work / "ckpt"), "--metrics", str(work / "m.json"),
        *credentials(cluster)))
    assert rc == 0, err[-3000:]
    keys = [json.loads((work / f"keys-{rank}.json").read_text()) for rank in (0, 1)]
    return json.loads((work / "m.json").read_text()), keys, work / "ckpt"


@pytest.fixture(scope="module")
def one_process(cluster):
    """The same run in this process at the global batch, 24."""
    return cli.run(cli.parse_args([*FLAGS, "--batch_size", "24", *credentials(cluster)]))


def test_rank_share_partitions_each_epoch(tmp_path):
    refs = [data.ShardRef(f"s{i}.tar", 10, 1000, 0, 10) for i in range(7)]
    for epoch in range(3):
        order = data.epoch_order(refs, 5, epoch)
        shares = [data.rank_share(order, rank, 3) for rank in range(3)]
        assert sorted(r.name for share in shares for r in share) == sorted(r.name for r in refs)
        assert [len(share) for share in shares] == [3, 2, 2]
        assert shares == [data.rank_share(data.epoch_order(refs, 5, epoch), rank, 3)
                          for rank in range(3)]
    with pytest.raises(data.DataError, match="7 training shards cannot be shared among 8"):
        data.rank_share(refs, 0, 8)


def test_two_ranks_give_the_losses_of_one_process_at_the_global_batch(two_ranks,
                                                                       one_process):
    metrics, _, _ = two_ranks
    assert metrics["world_size"] == 2 and one_process["world_size"] == 1
    for two, one in zip(metrics["epochs"], one_process["epochs"], strict=True):
        assert two["step_batch"] == one["step_batch"] == [24] * 4
        assert two["step_loss"] == approx(one["step_loss"], rel=1e-4)
        assert two["loss"] == approx(one["loss"], rel=1e-4)
        # the held-out evaluation runs on rank 0 alone, over every held-out sample
        assert two["holdout"]["samples"] == one["holdout"]["samples"] == 24
        assert two["accuracy"] == approx(one["accuracy"])
    # the run learns: its loss falls
    assert metrics["epochs"][-1]["loss"] < metrics["epochs"][0]["loss"]


def test_every_sample_once_per_epoch_across_the_ranks(two_ranks):
    metrics, keys, _ = two_ranks
    for epoch in range(EPOCHS):
        seen = [key for rank in keys for step_epoch, step_keys in rank
                for key in step_keys if step_epoch == epoch]
        assert len(seen) == len(set(seen)) == TRAIN_SAMPLES
        per_rank = [sum(len(k) for e, k in rank if e == epoch) for rank in keys]
        assert per_rank == metrics["epochs"][epoch]["rank_samples"] == [48, 48]
    # each rank trains on its own shards: no key on both ranks in an epoch
    firsts = [{k for e, ks in rank if e == 0 for k in ks} for rank in keys]
    assert not firsts[0] & firsts[1]


def ranks_of(process):
    """The pids of torchrun's workers, by rank (from their environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) != process.pid:
            continue
        for var in environ:
            if var.startswith(b"RANK="):
                found[int(var[5:])] = int(entry.name)
    return found


def test_a_killed_rank_stops_the_run_and_resume_continues(cluster, two_ranks, tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = [*FLAGS, "--batch_size", "12", "--checkpoint_every", "1",
             "--checkpoint_dir", str(ckpt), "--metrics", str(tmp_path / "m.json"),
             *credentials(cluster)]
    run = torchrun("client/main.py", *flags)
    deadline = time.monotonic() + 240
    while not (ckpt / "latest.json").exists():
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.01)
    os.kill(ranks_of(run)[1], signal.SIGKILL)
    rc, _, err = finished(run)
    assert rc != 0
    assert "error: rank 0 " in err and "--resume continues from the last checkpoint" in err, \
        err[-3000:]
    stopped_at = json.loads((ckpt / "latest.json").read_text())["step"]
    assert stopped_at < EPOCHS * 4

    rc, _, err = finished(torchrun("client/main.py", *flags, "--resume"))
    assert rc == 0, err[-3000:]
    resumed = json.loads((tmp_path / "m.json").read_text())
    uninterrupted, _, _ = two_ranks
    assert resumed["resumed_from"] is not None
    for after, before in zip(resumed["epochs"], uninterrupted["epochs"], strict=True):
        assert after["step_loss"] == approx(before["step_loss"], rel=1e-5)
        assert after["rank_samples"] == before["rank_samples"]


def test_resume_at_another_world_size_is_refused(cluster, two_ranks, capsys):
    _, _, ckpt = two_ranks
    status = cli.main([*FLAGS, "--batch_size", "12", "--checkpoint_dir", str(ckpt),
                       "--resume", "--num_epochs", str(EPOCHS + 1), *credentials(cluster)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert err[-1].startswith("error: the checkpoint in ") and \
        "written by 2 rank(s) and this run has 1" in err[-1], err


def test_uneven_shares_pad_with_empty_steps_and_keep_the_global_mean(cluster, tmp_path):
    # 7 training shards: rank 0 trains on 4 (4 steps), rank 1 on 3 (3 steps, then one on
    # no samples); the last step is rank 0's shard alone, as the single process's is.
    flags = [*FLAGS, "--holdout", "0.3", "--num_epochs", "2", *credentials(cluster)]
    rc, _, err = finished(torchrun(
        "client/main.py", *flags, "--batch_size", "12", "--checkpoint_every", "1",
        "--checkpoint_dir", str(tmp_path / "ckpt"), "--metrics", str(tmp_path / "m.json")))
    assert rc == 0, err[-3000:]
    two = json.loads((tmp_path / "m.json").read_text())
    one = cli.run(cli.parse_args([*flags, "--batch_size", "24"]))
    for after, before in zip(two["epochs"], one["epochs"], strict=True):
        assert after["step_batch"] == before["step_batch"] == [24, 24, 24, 12]
        assert sorted(after["rank_samples"]) == [36, 48]
        assert after["step_loss"] == approx(before["step_loss"], rel=1e-4)


def test_a_rank_whose_last_batch_is_one_sample_is_refused_with_batchnorm(cluster):
    # 96 samples on 2 ranks, 48 each: batches of 47 leave 1 for each rank's last batch,
    # and layer 19 (trained from --freeze_idx 19) is a BatchNorm. Refused before DDP starts,
    # so this rank needs no process group; one process (96 % 47 = 2) would train.
    args = cli.parse_args([*FLAGS, "--freeze_idx", "19", "--split_idx", "19",
                           "--batch_size", "47", *credentials(cluster)])
    config = cli.train_config(args, log=lambda line: None)
    refusal = (r"^rank 0's last batch of epoch 1 would hold 1 of its 48 training samples, "
               r"and the trained layers .* have BatchNorm")
    with Trainer(config, cli.swift_connector(args), log=lambda line: None,
                 ranks=distributed.Ranks(rank=1, world_size=2)) as trainer, \
            pytest.raises(TrainingError, match=refusal):
        trainer.train()
