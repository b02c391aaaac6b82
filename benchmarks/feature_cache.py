"""What the storage-side feature cache saves a second job: its storage compute.

Starts a one-node Swift whose proxy runs the HAPI filter with
``feature_cache_container`` set, uploads synthetic JPEG shards, and per
repeat runs the same one-epoch job twice (``client/main.py`` in this
process, split = freeze index, seeded weights): the first with an empty
feature cache (every shard extracted), the second on the same data and
model (every shard answered from the cache). The storage tier's compute is
the proxy process's CPU seconds during each job (all its threads, from
``/proc``). Prints a table of medians with their min-max and writes JSON.

    python benchmarks/feature_cache.py --repeats 3
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hapi import zoo
from hapi.client import main as cli
from hapi.client_setup import datasets
from hapi.client_setup.load import upload_dataset
from hapi.server_setup.cluster import Cluster

CONTAINER = "feature-cache-bench"
CACHE = "hapi-feature-cache"
FORMAT = "hapi-feature-cache-benchmark/1"


def cpu_seconds(pid):
    """User and system CPU seconds of process ``pid``, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_job(cluster, args, proxy_pid):
    """One epoch of the job; (proxy CPU seconds, wall seconds, bytes received)."""
    user, key = cluster.users["tester"]
    argv = ["--dataset", CONTAINER, "--model", args.model, "--weights", "seed:0", "--freeze",
            "--manual_split", "--split_idx", str(zoo.MODELS[args.model].default_freeze),
            "--preset", args.preset, "--batch_size", str(args.batch_size), "--num_epochs", "1",
            "--threads", "1", "--no-progress", "-A", cluster.auth_url, "-U", user, "-K", key]
    cpu0, wall0 = cpu_seconds(proxy_pid), time.perf_counter()
    metrics = cli.run(cli.parse_args(argv), log=lambda line: None)
    return cpu_seconds(proxy_pid) - cpu0, time.perf_counter() - wall0, metrics["bytes_received"]


def empty_cache(conn):
    try:
        for entry in conn.get_container(CACHE, full_listing=True)[1]:
            conn.delete_object(CACHE, entry["name"])
    except Exception as err:  # no container yet
        if getattr(err, "http_status", None) != 404:
            raise


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="alexnet", choices=sorted(zoo.MODELS))
    parser.add_argument("--preset", default="imagenet-224")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--shard_size", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-results/feature_cache"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="hapi-cache-bench-") as root, \
            Cluster(Path(root), hapi_conf={"threads": "1",
                                           "feature_cache_container": CACHE}) as cluster:
        conn = cluster.connection()
        source = datasets.synthetic(args.images)
        upload_dataset(conn, CONTAINER, source.samples, source.classes, args.shard_size)
        proxy_pid = cluster.status()["proxy"]["pid"]
        for repeat in range(args.repeats):
            empty_cache(conn)
            first = run_job(cluster, args, proxy_pid)
            second = run_job(cluster, args, proxy_pid)
            runs.append({"repeat": repeat, "first_cpu_s": first[0], "first_wall_s": first[1],
                         "first_bytes": first[2], "second_cpu_s": second[0],
                         "second_wall_s": second[1], "second_bytes": second[2],
                         "cpu_ratio": second[0] / first[0]})
            print(f"repeat {repeat}: storage CPU {first[0]:.2f} s then {second[0]:.2f} s "
                  f"({second[0] / first[0]:.1%}); epoch {first[1]:.1f} s then "
                  f"{second[1]:.1f} s", flush=True)
        conn.close()
    summary = {key: spread([run[key] for run in runs])
               for key in ("first_cpu_s", "second_cpu_s", "cpu_ratio", "first_wall_s",
                           "second_wall_s")}
    summary["target_cpu_ratio"] = 0.10
    summary["target_met"] = summary["cpu_ratio"]["median"] <= 0.10
    print(f"\n{'':24}{'median':>10}{'min':>10}{'max':>10}")
    for key in ("first_cpu_s", "second_cpu_s", "cpu_ratio", "first_wall_s", "second_wall_s"):
        row = summary[key]
        print(f"{key:24}{row['median']:>10.3f}{row['min']:>10.3f}{row['max']:>10.3f}")
    print(f"second job's storage compute / first job's: {summary['cpu_ratio']['median']:.1%} "
          f"(target <= 10%: {'met' if summary['target_met'] else 'not met'})")
    doc = {"format": FORMAT, "args": {k: str(v) for k, v in vars(args).items()},
           "runs": runs, "summary": summary}
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
