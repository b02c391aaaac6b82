"""ALL_IN_COS, the HAPI paper's storage-only baseline: the whole job runs in storage.

On a request from the trainer, the storage tier runs the complete
transfer-learning job itself (feature extraction and training) against its
own Swift, and the trainer gets back only the trained layers. Two commands,
one per tier (``benchmarks/tl_benchmark.py`` runs them in the shaped set-up
of ``benchmarks/shaped.py``):

``train`` (storage tier): the trainer's own code (``hapi.client.main``) at
split 0, so every layer runs here and the raw shards never leave the storage
node; it then stores the trained layers, ``[freeze, end)``, as one
safetensors object in Swift. All flags other than ``--result`` are
client/main.py's, e.g.::

    python benchmarks/all_in_cos.py train --result hapi-results/alexnet.safetensors \\
        --dataset bench --model alexnet --weights seed:0 --freeze --metrics job.json

``fetch`` (trainer tier): downloads that object across the link, loads the
layers into the model to check they are complete, and writes what it moved::

    python benchmarks/all_in_cos.py fetch --result hapi-results/alexnet.safetensors \\
        --model alexnet --freeze_idx 18 --metrics fetch.json

Both take Swift credentials from ST_AUTH, ST_USER and ST_KEY.
"""

import argparse
import json
import sys
import tempfile
import time

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hapi import zoo
from hapi.client import main as trainer_main
from hapi.client.checkpoint import Checkpoint, load_checkpoint
from hapi.client_setup.load import connect
from hapi.stores import DirectoryStore

CONTENT_TYPE = "application/octet-stream"


def parse_result(text):
    container, _, name = text.partition("/")
    if not container or not name:
        raise argparse.ArgumentTypeError(f"expected CONTAINER/OBJECT, got {text!r}")
    return container, name


def train(result, trainer_argv):
    """Run the job here at split 0; store the trained layers at ``result``."""
    with tempfile.TemporaryDirectory(prefix="all-in-cos-") as ckpt_dir:
        args = trainer_main.parse_args(
            [*trainer_argv, "--manual_split", "--split_idx", "0", "--checkpoint_dir", ckpt_dir])
        metrics_path, args.metrics = args.metrics, None
        metrics = trainer_main.run(args)
        ckpt = load_checkpoint(DirectoryStore(ckpt_dir))
    layers = {key: tensor for key, tensor in ckpt.tensors.items() if key.startswith("layers.")}
    blob = st_save(layers)
    began = time.perf_counter()
    conn = trainer_main.swift_connector(args)()
    try:
        conn.put_container(result[0])
        conn.put_object(*result, blob, content_type=CONTENT_TYPE)
    finally:
        conn.close()
    metrics["all_in_cos"] = {"result": "/".join(result), "result_bytes": len(blob),
                             "first_layer": ckpt.state["first_layer"],
                             "upload_s": time.perf_counter() - began}
    if metrics_path:
        with open(metrics_path, "w") as out:
            json.dump(metrics, out, indent=1)
    print(f"stored the trained layers [{ckpt.state['first_layer']}, end) of {args.model} as "
          f"{'/'.join(result)} ({len(blob) / 1e6:.2f} MB)")


def fetch(result, model_name, first_layer, metrics_path=None):
    """Download the trained layers and load them into the model; return what it cost."""
    conn = connect()
    began = time.perf_counter()
    try:
        _, blob = conn.get_object(*result)
    finally:
        conn.close()
    fetch_s = time.perf_counter() - began
    tensors = st_load(blob)
    model = zoo.build_model(model_name, seed=0)
    head = f"layers.{len(model) - 1}.weight"
    model.replace_head(tensors[head].shape[0])
    Checkpoint(state={"first_layer": first_layer}, tensors=tensors).restore(model)
    report = {"result": "/".join(result), "bytes": len(blob), "fetch_s": fetch_s,
              "tensors": len(tensors), "layers": [first_layer, len(model)]}
    if metrics_path:
        with open(metrics_path, "w") as out:
            json.dump(report, out, indent=1)
    print(f"fetched {report['bytes'] / 1e6:.2f} MB of trained layers in {fetch_s:.2f} s")
    return report


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    # No abbreviations: every flag ``train`` does not know belongs to client/main.py.
    job = commands.add_parser("train", allow_abbrev=False,
                              help="storage tier: run the job, store the layers "
                                   "(other flags: client/main.py's)")
    job.add_argument("--result", required=True, type=parse_result, metavar="CONTAINER/OBJECT")
    get = commands.add_parser("fetch", help="trainer tier: download the trained layers")
    get.add_argument("--result", required=True, type=parse_result, metavar="CONTAINER/OBJECT")
    get.add_argument("--model", required=True, help="the zoo model that was trained")
    get.add_argument("--freeze_idx", type=int, required=True,
                     help="first trained layer (the freeze index)")
    get.add_argument("--metrics", help="write the download's figures to this JSON file")
    return parser


def main(argv=None):
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "fetch":
        if rest:
            build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
        fetch(args.result, zoo.canonical_name(args.model), args.freeze_idx, args.metrics)
        return 0
    try:
        train(args.result, rest)
    except trainer_main.EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
