"""The shaped link's goodput, measured: how fast one Swift GET really moves bytes.

A ``tc tbf`` link shaped to R Mbit/s carries less than R of payload (the
TCP/IP and HTTP headers ride on it too, and the bucket is not perfect), so
the pipeline bound of ``benchmarks/tl_benchmark.py`` counts the transfer at
the rate measured here, in the same run, rather than at the nominal one.

``put`` (storage tier) stores one object of incompressible random bytes;
``get`` (trainer tier) reads its first ``--seconds`` worth at the nominal
rate (a ranged GET, so a slow link costs seconds, not minutes) and writes
the bytes, the seconds from request to last byte, and the rate::

    python benchmarks/link_probe.py put --object hapi-results/probe --size 8000000
    python benchmarks/link_probe.py get --object hapi-results/probe --nominal_mbit 25 \\
        --metrics probe.json

Both take Swift credentials from ST_AUTH, ST_USER and ST_KEY.
"""

import argparse
import json
import os
import sys
import time

from all_in_cos import CONTENT_TYPE, parse_result

from hapi.client_setup.load import connect

CHUNK = 1 << 16


def put(target, size):
    conn = connect()
    try:
        conn.put_container(target[0])
        conn.put_object(*target, os.urandom(size), content_type=CONTENT_TYPE)
    finally:
        conn.close()


def get(target, nominal_mbit, seconds, metrics_path=None):
    """Read about ``seconds`` of the link's nominal rate; return what it took."""
    wanted = max(int(nominal_mbit * 1e6 / 8 * seconds), CHUNK)
    conn = connect()
    try:
        conn.head_object(*target)  # authenticated and connected before the clock starts
        began = time.perf_counter()
        _, body = conn.get_object(*target, resp_chunk_size=CHUNK,
                                  headers={"Range": f"bytes=0-{wanted - 1}"})
        nbytes = sum(len(chunk) for chunk in body)
        elapsed = time.perf_counter() - began
    finally:
        conn.close()
    report = {"object": "/".join(target), "nominal_mbit": nominal_mbit, "bytes": nbytes,
              "seconds": elapsed, "goodput_mbit": nbytes * 8 / elapsed / 1e6}
    if metrics_path:
        with open(metrics_path, "w") as out:
            json.dump(report, out, indent=1)
    print(f"{nbytes / 1e6:.2f} MB in {elapsed:.2f} s: {report['goodput_mbit']:.1f} Mbit/s "
          f"of a nominal {nominal_mbit}")
    return report


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    store = commands.add_parser("put", help="storage tier: store the probe object")
    store.add_argument("--object", required=True, type=parse_result, metavar="CONTAINER/OBJECT")
    store.add_argument("--size", type=int, default=8_000_000, help="bytes (default: 8000000)")
    read = commands.add_parser("get", help="trainer tier: time a GET of it across the link")
    read.add_argument("--object", required=True, type=parse_result, metavar="CONTAINER/OBJECT")
    read.add_argument("--nominal_mbit", type=float, required=True,
                      help="the rate the link is shaped to")
    read.add_argument("--seconds", type=float, default=3.0,
                      help="read this many seconds' worth at the nominal rate (default: 3)")
    read.add_argument("--metrics", help="write the figures to this JSON file")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "put":
        put(args.object, args.size)
    else:
        get(args.object, args.nominal_mbit, args.seconds, args.metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
