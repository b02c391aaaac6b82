"""How long the trainer takes to measure the wire formats before its first request.

The automatic split measures every candidate wire format at every boundary
up to the freeze index (``hapi.client.autosplit.wireformats.measure_formats``)
on a few of the probe's images, once per model, data set, preset and freeze
index (then from the trainer's cache). This times it on one core, as the
trainer does it (its defaults: the first two images, a timing above 10 ms
not repeated) and as it did before (four images, every timing repeated),
alternating the two, on synthetic preprocessed images of the preset's size.

Output: a table and ``OUT/format_costs.json`` (per model and way: every
run's seconds and their median, min and max).

    .venv/bin/python benchmarks/format_costs.py --models alexnet resnet18 resnet50
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hapi import zoo
from hapi.client.autosplit.wireformats import candidate_formats, measure_formats
from hapi.preprocess import preset_size

FORMAT = "hapi-format-costs/1"
WAYS = {"defaults": {}, "four images, every timing repeated": {
    "samples": 4, "long_timing_s": float("inf")}}


def time_ways(model, inputs, frame_samples, runs):
    """Seconds of every run of every way, the ways alternating."""
    seconds = {way: [] for way in WAYS}
    for _ in range(runs):
        for way, options in WAYS.items():
            began = time.perf_counter()
            measure_formats(model, inputs, model.default_freeze, candidate_formats(),
                            frame_samples=frame_samples, **options)
            seconds[way].append(time.perf_counter() - began)
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(zoo.MODELS),
                        default=["resnet50"])
    parser.add_argument("--preset", default="imagenet-224")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--frame_samples", type=int, default=4,
                        help="samples per frame (the storage batch)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/format_costs"))
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    torch.set_num_threads(1)
    side = preset_size(args.preset)
    inputs = torch.rand((4, 3, side, side), generator=torch.Generator().manual_seed(0))
    doc = {"format": FORMAT, "settings": {**vars(args), "out": None}, "results": {}}
    print(f"{'model':<20}{'way':<38}{'median s':>9}{'min-max':>14}")
    for name in args.models:
        model = zoo.build_model(name, seed=0).eval()
        seconds = time_ways(model, inputs, args.frame_samples, args.runs)
        doc["results"][name] = {}
        for way, values in seconds.items():
            figures = {"seconds": values, "median": statistics.median(values),
                       "min": min(values), "max": max(values)}
            doc["results"][name][way] = figures
            print(f"{name:<20}{way:<38}{figures['median']:>9.2f}"
                  f"{figures['min']:>8.2f}-{figures['max']:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "format_costs.json"
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
