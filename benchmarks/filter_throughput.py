"""Feature-extraction throughput through the Swift filter vs a bare torch loop.

Starts a one-node Swift with the HAPI filter, uploads one shard of synthetic
JPEGs, and for each model alternates two measurements on the same core, with
the same torch thread count, batch, split and images:

- filter: a HAPI GET of the shard through the proxy, from the request until
  the end frame has been read (decode, preprocess, layers [0, split), wire
  encoding, the object read and the transfer on loopback);
- bare: the same decode + preprocess + layers [0, split) in a plain loop in
  this process; and the forward alone on pre-decoded inputs, for scale.

The proxy and this process's bare loop are pinned to core 0, the rest of the
cluster and the reading side to the other cores. Prints a table of medians
and writes every run to JSON.

    python benchmarks/filter_throughput.py --models alexnet resnet18 --runs 5
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hapi import protocol, zoo
from hapi.client.features import fetch_features
from hapi.client_setup.datasets import synthetic
from hapi.preprocess import PRESETS, preprocess
from hapi.server_setup.cluster import Cluster
from hapi.shards import write_shard

CONTAINER = "hapi-bench"


def pin(pid, cores):
    """Pin every thread of process ``pid`` (0: this one) to ``cores``."""
    tasks = Path(f"/proc/{pid or os.getpid()}/task")
    for tid in tasks.iterdir():
        os.sched_setaffinity(int(tid.name), cores)


def time_filter(conn, req):
    start = time.perf_counter()
    stream = fetch_features(conn, CONTAINER, "shard.tar", req)
    samples = sum(len(frame.labels) for frame in stream)
    return time.perf_counter() - start, samples, stream.device


def time_bare(model, images, req, device, decode=True):
    batches = [images[i:i + req.batch] for i in range(0, len(images), req.batch)]
    inputs = None if decode else [preprocess(b, req.preset, req.model).to(device) for b in batches]
    start = time.perf_counter()
    with torch.inference_mode():
        for index, batch in enumerate(batches):
            x = preprocess(batch, req.preset, req.model).to(device) if decode else inputs[index]
            model(x, 0, req.split).to(torch.float32).cpu()
    return time.perf_counter() - start


def bench_model(conn, name, images, args, cores):
    split = zoo.MODELS[name].default_freeze
    req = protocol.FeatureRequest(model=name, split=split, freeze=split, batch=args.batch,
                                  weights=protocol.WeightsRef("seed", "0"),
                                  preset=args.preset, dtype="float32")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = zoo.build_model(name, seed=0).to(device).eval()
    time_filter(conn, req)  # warm-up: the proxy builds and caches the model
    runs = {"filter_s": [], "bare_s": [], "bare_forward_s": []}
    for _ in range(args.runs):
        pin(0, cores["client"])
        elapsed, samples, proxy_device = time_filter(conn, req)
        assert samples == len(images), f"{name}: {samples} samples came back, not {len(images)}"
        runs["filter_s"].append(elapsed)
        pin(0, cores["storage"])
        runs["bare_s"].append(time_bare(model, images, req, device))
        runs["bare_forward_s"].append(time_bare(model, images, req, device, decode=False))
    medians = {key: statistics.median(values) for key, values in runs.items()}
    return {
        "model": name, "split": split, "batch": args.batch, "images": len(images),
        "preset": args.preset, "threads": args.threads, "device": proxy_device,
        "runs": runs,
        "filter_img_s": len(images) / medians["filter_s"],
        "bare_img_s": len(images) / medians["bare_s"],
        "bare_forward_img_s": len(images) / medians["bare_forward_s"],
        "ratio_to_bare": medians["bare_s"] / medians["filter_s"],
        "ratio_to_bare_forward": medians["bare_forward_s"] / medians["filter_s"],
    }


def print_table(results):
    header = (f"{'model':<20}{'split':>6}{'batch':>6}{'filter img/s':>14}{'bare img/s':>12}"
              f"{'fwd-only img/s':>16}{'filter/bare':>13}{'filter/fwd':>12}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['model']:<20}{r['split']:>6}{r['batch']:>6}{r['filter_img_s']:>14.1f}"
              f"{r['bare_img_s']:>12.1f}{r['bare_forward_img_s']:>16.1f}"
              f"{r['ratio_to_bare']:>13.3f}{r['ratio_to_bare_forward']:>12.3f}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["alexnet", "resnet18"],
                        choices=sorted(zoo.MODELS))
    parser.add_argument("--images", type=int, default=64, help="images in the shard")
    parser.add_argument("--size", type=int, default=224, help="JPEG side in pixels")
    parser.add_argument("--preset", default="imagenet-224", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=16, help="storage batch")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per model (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--out", default="bench-results/filter_throughput.json")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    available = sorted(os.sched_getaffinity(0))
    cores = {"storage": {available[0]},
             "client": set(available[1:]) or {available[0]}}
    images = list(synthetic(args.images, size=args.size).samples)
    with tempfile.TemporaryDirectory(prefix="hapi-bench-") as root, \
            Cluster(root, hapi_conf={"threads": str(args.threads)}) as cluster:
        for server, state in cluster.status().items():
            pin(state["pid"], cores["storage"] if server == "proxy" else cores["client"])
        conn = cluster.connection()
        conn.put_container(CONTAINER)
        conn.put_object(CONTAINER, "shard.tar", write_shard(images))
        encoded = [s.image for s in images]
        results = [bench_model(conn, name, encoded, args, cores) for name in args.models]
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__,
                               "cores": {k: sorted(v) for k, v in cores.items()},
                               "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
