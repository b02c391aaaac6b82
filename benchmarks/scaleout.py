"""Epoch time of the trainer on 1 and on several torchrun ranks, trainer-bound.

Starts a one-node Swift with the HAPI filter (``--proxies`` proxy servers,
the trainer's requests spread over them with ``--storage_urls``), uploads
synthetic JPEG shards, and runs the real trainer command under torchrun,
``torchrun --nproc_per_node R client/main.py ...``, once per rank count in
``--ranks``, at a low split (``--split``), so that most of the frozen layers
run on the trainer and the trainer is the bottleneck. The global batch is the
same for every rank count (each rank's ``--batch_size`` is the global batch
divided by the ranks), each rank has one torch thread, and nothing is held
out: the epoch time is the training pass alone.

Each rank count runs ``--repeats`` times, in rounds (every rank count once,
then again), so that slow drift of the host hits them alike. Prints a table
of medians with their min-max (epoch time, samples per second, speed-up over
the first rank count, computed within each round) and writes
``OUT/scaleout.json``; the trainers' metrics and logs go to ``OUT/runs/``.

    python benchmarks/scaleout.py --out /tmp/scaleout
    python benchmarks/scaleout.py --ranks 1 2 4 --images 512 --size 112

On one machine the ranks share its cores with each other and with Swift: the
speed-up is bounded by the cores left to the trainers.
"""

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from hapi.client_setup.datasets import synthetic
from hapi.client_setup.load import upload_dataset
from hapi.server_setup.cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
CONTAINER = "scaleout"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--split", type=int, default=2,
                        help="layers run in Swift (default: %(default)s)")
    parser.add_argument("--images", type=int, default=128, help="default: %(default)s")
    parser.add_argument("--size", type=int, default=64,
                        help="image side and preset resize-SIZE (default: %(default)s)")
    parser.add_argument("--shard_size", type=int, default=16, help="default: %(default)s")
    parser.add_argument("--batch", type=int, default=16,
                        help="global batch, split among the ranks (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1, help="default: %(default)s")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2],
                        help="rank counts to run (default: 1 2)")
    parser.add_argument("--proxies", type=int, default=2,
                        help="Swift proxy servers (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="default: %(default)s")
    parser.add_argument("--out", default="scaleout-results", help="default: %(default)s")
    args = parser.parse_args(argv)
    for ranks in args.ranks:
        if ranks < 1 or args.batch % ranks:
            parser.error(f"--ranks {ranks}: the global batch {args.batch} must split evenly "
                         "among the ranks")
    return args


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(cluster, args, ranks, runs, name):
    """One torchrun of the trainer on ``ranks`` ranks; its metrics document."""
    user, key = cluster.users["tester"]
    metrics = runs / f"{name}.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "client/main.py",
        "--dataset", CONTAINER, "--model", args.model, "--weights", "seed:0", "--freeze",
        "--manual_split", "--split_idx", str(args.split), "--preset", f"resize-{args.size}",
        "--batch_size", str(args.batch // ranks), "--num_epochs", str(args.epochs),
        "--holdout", "0", "--threads", "1", "--storage_urls", ",".join(cluster.proxy_urls),
        "--metrics", str(metrics), "-A", cluster.auth_url, "-U", user, "-K", key]
    with open(runs / f"{name}.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(f"the run on {ranks} rank(s) failed: see {runs / f'{name}.log'}")
    return json.loads(metrics.read_text())


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    runs_done = []
    with contextlib.ExitStack() as stack:
        devices = stack.enter_context(tempfile.TemporaryDirectory(
            prefix="hapi-scaleout-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        cluster = stack.enter_context(Cluster(
            out / "cluster", devices=devices, proxies=args.proxies,
            hapi_conf={"threads": "1"}))
        conn = cluster.connection()
        source = synthetic(args.images, size=args.size)
        upload_dataset(conn, CONTAINER, source.samples, source.classes, args.shard_size)
        conn.close()
        for repeat in range(args.repeats):
            for ranks in args.ranks:
                metrics = train(cluster, args, ranks, runs, f"ranks-{ranks}-r{repeat}")
                epochs = metrics["epochs"]
                epoch_s = sum(e["time_s"] for e in epochs) / len(epochs)
                runs_done.append({
                    "repeat": repeat, "ranks": ranks, "epoch_s": epoch_s,
                    "samples_per_s": metrics["samples"]["train"] / epoch_s,
                    "trainer_compute_s": metrics["compute_s"] / len(epochs),
                    "trainer_wait_s": metrics["wait_s"] / len(epochs),
                    "rank_samples": epochs[-1].get("rank_samples")})
    first = args.ranks[0]
    base = {run["repeat"]: run["epoch_s"] for run in runs_done if run["ranks"] == first}
    for run in runs_done:
        run["speedup"] = base[run["repeat"]] / run["epoch_s"]
    results = []
    for ranks in args.ranks:
        mine = [run for run in runs_done if run["ranks"] == ranks]
        row = {"ranks": ranks, "rank_samples": mine[-1]["rank_samples"]}
        for key in ("epoch_s", "samples_per_s", "trainer_compute_s", "trainer_wait_s",
                    "speedup"):
            values = [run[key] for run in mine]
            row[key] = statistics.median(values)
            row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
        results.append(row)
    report = {"model": args.model, "split": args.split, "images": args.images,
              "size": args.size, "global_batch": args.batch, "proxies": args.proxies,
              "cpus": os.cpu_count(), "repeats": args.repeats, "results": results,
              "runs": runs_done}
    (out / "scaleout.json").write_text(json.dumps(report, indent=1))
    print(f"{args.model} split {args.split}, {args.images} images at {args.size} px, global "
          f"batch {args.batch}, {args.proxies} proxies, {os.cpu_count()} CPUs; medians of "
          f"{args.repeats} (min-max)")
    print(f"{'ranks':>5} {'epoch s':>18} {'samples/s':>10} {'compute s':>10} {'wait s':>7} "
          f"{'speed-up':>18}")
    for row in results:
        print(f"{row['ranks']:>5} {row['epoch_s']:>6.2f} ({row['epoch_s_min']:.2f}-"
              f"{row['epoch_s_max']:.2f}) {row['samples_per_s']:>10.1f} "
              f"{row['trainer_compute_s']:>10.2f} {row['trainer_wait_s']:>7.2f} "
              f"{row['speedup']:>6.2f} ({row['speedup_min']:.2f}-{row['speedup_max']:.2f})")
    print(f"results: {out / 'scaleout.json'}")


if __name__ == "__main__":
    main()
