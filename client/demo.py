"""The README's main job: transfer learning on a data set stored in Swift.

    python -m hapi.client.demo --root run

1. starts a one-node Swift with the HAPI filter in its proxy, in ROOT/swift
   (or reuses it when it is already running);
2. uploads scikit-learn's digits as shards to the container
   ``hapi-demo-digits``, unless it already holds exactly those digits in
   shards of that size (it says what it found and replaces anything else);
3. runs ``client/main.py``'s training in this process: EfficientNet-Lite0 with
   its real ImageNet weights, frozen below its default freeze index, those
   layers run in the Swift proxy next to the data, the classifier head
   trained here on the features it sends (`--auto_split`: the trainer picks
   the split instead), each shard's features kept in the trainer's feature
   cache, ROOT/feature-cache, once they arrive: they cross the network in
   the first epoch only (and not at all in a later demo, whose entries are
   there already);
4. trains the same epochs vanilla (split 0: the raw shards cross the network
   every epoch and every layer runs here), unless ``--no_vanilla``;
5. prints the held-out accuracy, the bytes received and the time of each,
   and the raw shards that vanilla training moves for the same passes.

The cluster keeps running for the next run; ``hapi-swift stop ROOT/swift``
stops it. Ctrl-C stops the demo with one line and exit status 130; a cluster
that was starting is stopped again, a running one keeps running.
"""

import argparse
import itertools
import sys
from pathlib import Path

from hapi import names, zoo
from hapi.client import main as client_main
from hapi.client_setup import datasets
from hapi.client_setup.load import LoadError, load_manifest, positive_int, upload_dataset
from hapi.server_setup.cluster import Cluster, ClusterError

MODEL = "efficientnet_lite0"
PRESET = "resize-112"
DIGITS = 1797
INTERRUPTED = 130  # the shell's status for a program stopped by SIGINT


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hapi.client.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="run", help="folder for the cluster, checkpoints "
                        "and metrics (default: run)")
    parser.add_argument("--container", default="hapi-demo-digits",
                        help="container of the demo's digits (default: hapi-demo-digits); "
                        "anything else in it is replaced")
    parser.add_argument("--digits", type=_digit_count, default=DIGITS,
                        help=f"train and hold out the first N digits (default: all {DIGITS})")
    parser.add_argument("--shard_size", type=positive_int, default=64, help="digits per shard")
    parser.add_argument("--num_epochs", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--optimizer", default="adam", choices=("sgd", "adam"))
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the trainer, which only trains the head")
    parser.add_argument("--wire_dtype", default="float32", choices=names.WIRE_DTYPES,
                        help="dtype of the features on the wire (default: float32)")
    parser.add_argument("--no_vanilla", action="store_true",
                        help="skip the vanilla run that the split run is compared with")
    parser.add_argument("--auto_split", action="store_true",
                        help="let the trainer choose the split (default: split = freeze index, "
                        "the whole frozen feature extractor in Swift)")
    return parser.parse_args(argv)


def _digit_count(text):
    value = positive_int(text)
    if value > DIGITS:
        raise argparse.ArgumentTypeError(f"there are {DIGITS} digits, not {value}")
    return value


def shard_sizes(count, shard_size):
    """The sample counts of the shards that ``count`` samples make."""
    return [min(shard_size, count - first) for first in range(0, count, shard_size)]


def ensure_digits(conn, container, count, shard_size):
    """Upload the first ``count`` digits in shards of ``shard_size`` to
    ``container`` unless it holds exactly those already; say which."""
    try:
        found = load_manifest(conn, container)
    except LoadError:
        found = None
    wanted = shard_sizes(count, shard_size)
    if found is not None:
        sizes = [shard["samples"] for shard in found.shards]
        if sizes == wanted and found.classes == [str(d) for d in range(10)]:
            print(f"data set: reusing the {count} digits in {len(sizes)} shards of "
                  f"{shard_size} in container {container!r}")
            return found
        print(f"data set: container {container!r} holds {found.samples} samples in "
              f"{len(sizes)} shards of {max(sizes, default=0)}, not the demo's {count} digits "
              f"in shards of {shard_size}: replacing them")
    source = datasets.digits()
    manifest = upload_dataset(conn, container, itertools.islice(source.samples, count),
                              source.classes, shard_size)
    print(f"data set: uploaded {manifest.samples} digits as {len(manifest.shards)} shards of "
          f"{shard_size} to container {container!r}")
    return manifest


def main(argv=None):
    args = parse_args(argv)
    root = Path(args.root).absolute()
    cluster = Cluster(root / "swift")
    try:
        return run_demo(args, root, cluster)
    except KeyboardInterrupt:
        running = cluster.is_set_up() and all(
            info["alive"] for info in cluster.status().values())
        state = f"Swift keeps running: hapi-swift stop {cluster.root}" if running \
            else "Swift is stopped"
        print(f"interrupted ({state})", file=sys.stderr, flush=True)
        return INTERRUPTED


def run_demo(args, root, cluster):
    try:
        cluster.start()
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    user, key = cluster.users["tester"]
    conn = cluster.connection()
    try:
        ensure_digits(conn, args.container, args.digits, args.shard_size)
    finally:
        conn.close()
    metrics_path = root / "metrics.json"
    job = [
        "--dataset", args.container, "--model", f"my{MODEL}", "--freeze",
        "--preset", PRESET, "--num_epochs", str(args.num_epochs),
        "--batch_size", str(args.batch_size), "--optimizer", args.optimizer,
        "--lr", str(args.lr), "--wire_dtype", args.wire_dtype,
        "--threads", str(args.threads), "--metrics", str(metrics_path),
        "--checkpoint_dir", str(root / "checkpoints"),
    ]
    split = ["--cache_dir", str(root / "feature-cache")]
    if not args.auto_split:
        split += ["--manual_split", "--split_idx", str(zoo.MODELS[MODEL].default_freeze)]
    credentials = ["-A", cluster.auth_url, "-U", user, "-K", key]
    print(f"training: python client/main.py {' '.join(job + split)} (as {user} on "
          f"{cluster.auth_url})")
    try:
        metrics = client_main.run(client_main.parse_args([*job, *split, *credentials]))
        vanilla = None
        if not args.no_vanilla:
            job[job.index("--metrics") + 1] = str(root / "metrics-vanilla.json")
            job[job.index("--checkpoint_dir") + 1] = str(root / "checkpoints-vanilla")
            job += ["--split_idx", "0"]
            print(f"\nvanilla, the same epochs: python client/main.py {' '.join(job)}")
            vanilla = client_main.run(client_main.parse_args([*job, *credentials]))
    except client_main.EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    report(metrics, vanilla, args.num_epochs)
    print(f"metrics: {metrics_path}; Swift keeps running: hapi-swift stop {root / 'swift'}")
    return 0


def report(metrics, vanilla, epochs):
    """The split run against vanilla: accuracy, bytes, time."""
    received, raw = metrics["bytes_received"], metrics["raw_shard_bytes"]
    storage = metrics["devices"]["storage"]
    # None when every shard's features came from the feature cache (a rerun).
    where = f"ran in Swift on {', '.join(storage)}" if storage else \
        "came from the feature cache of an earlier run"
    print(f"\n{MODEL}, frozen below layer {metrics['freeze']} of {metrics['layers']}, split "
          f"{metrics['split']}: layers [0, {metrics['split']}) {where}, the rest here on "
          f"{metrics['devices']['trainer']}")
    print(f"held-out accuracy: {metrics['accuracy']:.1%} on {metrics['samples']['holdout']} "
          f"digits (chance: 10%)")
    print(f"received from Swift: {received / 1e6:.2f} MB of features; vanilla training moves "
          f"the raw shards: {raw / 1e6:.2f} MB ({received / raw:.2f}x)")
    cache = metrics["cache"]
    print(f"feature cache: {metrics['cache_hits']} shards read from it "
          f"({metrics['cache_read_bytes'] / 1e6:.2f} MB from disk), {metrics['cache_misses']} "
          f"fetched; {cache['size_bytes'] / 1e6:.2f} MB in {cache['dir']}")
    passes = (metrics["samples"]["train"] + metrics["samples"]["holdout"]) * epochs
    print(f"per sample and epoch: {received / passes / 1e3:.1f} KB of features, "
          f"{raw / passes / 1e3:.1f} KB of shard")
    if received > raw:
        print("(an 8x8 digit is smaller than its features; near-data extraction saves bytes "
              "where samples outweigh their features, as photos of ~110 KB do)")
    if vanilla is not None:
        print(f"split:   held-out accuracy {metrics['accuracy']:.1%}, {received / 1e6:.2f} MB "
              f"received, {metrics['wall_s']:.1f} s")
        print(f"vanilla: held-out accuracy {vanilla['accuracy']:.1%}, "
              f"{vanilla['bytes_received'] / 1e6:.2f} MB received, {vanilla['wall_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
