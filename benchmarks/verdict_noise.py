"""How often split_quality.py's verdict calls a split slower than itself.

Where the chosen split is neither the fastest nor tied with it,
``split_quality.py`` runs the two ``--repeats`` times each in alternating
order and counts a miss when the chosen split's median is over
``1 + tolerance`` times the best's. Two splits that cost the same then miss
by chance, as often as the runs' noise puts two medians that far apart.
This measures that chance on the grid's own set-up: per case
(``MODEL:MBIT:BATCH:SPLIT[:FORMAT]``), one split runs ``2 x --repeats``
times, as the verdict would run two, and the report gives

- the verdict on those runs, the first of each alternating pair against
  the second (an A/A test: any ratio but 1 is noise);
- ``false_miss_share``: over every way to deal the runs into a "chosen"
  and a "best" series of ``--repeats`` each, the share in which the
  chosen series' median is over ``1 + tolerance`` times the best's: the
  chance that a verdict between two splits of the same cost is a miss.

Runs are timed exactly as split_quality.py times a split (its trainer
flags, ``--iterations`` steps, the format given, else the trainer's
default for a fixed split). Output: a table and ``OUT/verdict_noise.json``.

    sudo .venv/bin/python benchmarks/verdict_noise.py \\
        --cases mobilenet_v3_small:125:32:3:uint8+zstd alexnet:500:32:6 --iterations 24
"""

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import split_quality
from shaped import CommandFailed, TwoTier, add_two_tier_arguments
from tl_benchmark import load_dataset, warm_up, with_spread, write_results

from hapi import zoo

FORMAT = "hapi-verdict-noise/1"


def parse_case(text):
    """``MODEL:MBIT:BATCH:SPLIT[:FORMAT]`` as a dict; ValueError naming what is wrong."""
    fields = text.split(":")
    if len(fields) not in (4, 5):
        raise ValueError(f"{text!r}: not MODEL:MBIT:BATCH:SPLIT[:FORMAT]")
    model, rate, batch, split = fields[:4]
    if model not in zoo.MODELS:
        raise ValueError(f"{text!r}: unknown model {model!r}")
    try:
        rate, batch, split = int(rate), int(batch), int(split)
    except ValueError:
        raise ValueError(f"{text!r}: MBIT, BATCH and SPLIT must be integers") from None
    freeze = zoo.MODELS[model].default_freeze
    if rate <= 0 or batch < 1 or not 0 <= split <= freeze:
        raise ValueError(f"{text!r}: needs MBIT > 0, BATCH >= 1 and 0 <= SPLIT <= {freeze}")
    return {"model": model, "bandwidth_mbit": rate, "batch_size": batch, "split": split,
            "wire_format": fields[4] if len(fields) == 5 else None}


def verdict_order(runs):
    """The runs dealt as the verdict deals two splits' runs: round ``r``
    runs (chosen, best) when ``r`` is even, (best, chosen) when odd."""
    chosen, best = [], []
    for r, pair in enumerate(zip(runs[::2], runs[1::2], strict=True)):
        first, second = pair if r % 2 == 0 else pair[::-1]
        chosen.append(first)
        best.append(second)
    return chosen, best


def false_miss_share(runs, repeats, tolerance):
    """The share of the ways to pick ``repeats`` of ``runs`` as the chosen
    series (the rest, as many, the best) in which the chosen median is
    over ``1 + tolerance`` times the best's."""
    if len(runs) != 2 * repeats:
        raise ValueError(f"{len(runs)} runs for two series of {repeats}")
    misses = ways = 0
    for picked in itertools.combinations(range(len(runs)), repeats):
        chosen = [runs[i] for i in picked]
        best = [runs[i] for i in range(len(runs)) if i not in picked]
        misses += statistics.median(chosen) > (1 + tolerance) * statistics.median(best)
        ways += 1
    return misses / ways


def measure_case(tiers, settings, case, out_dir):
    """The case's runs and what the verdict would make of them."""
    tiers.set_rate(case["bandwidth_mbit"])
    base = split_quality.run_flags(settings, case["model"], case["batch_size"])
    wire = split_quality.wire_flags(case["wire_format"]) if case["wire_format"] else []
    tag = f"{case['model']}-{case['bandwidth_mbit']}mbit-b{case['batch_size']}-s{case['split']}"
    runs = []
    for n in range(2 * settings["repeats"]):
        run = split_quality.timed_run(tiers, lambda _split: [*base, *wire], case["split"],
                                      f"{tag}-{n}", out_dir)
        runs.append(split_quality.train_time(run.metrics))
        print(f"{tag} run {n + 1}/{2 * settings['repeats']}: {runs[-1]:.2f} s", flush=True)
    chosen, best = verdict_order(runs)
    return {**case, "runs_s": with_spread(runs), "verdict_runs_s": {"chosen": chosen,
                                                                      "best": best},
            "verdict_ratio": statistics.median(chosen) / statistics.median(best),
            "false_miss_share": false_miss_share(runs, settings["repeats"],
                                                 settings["tolerance"])}


def run_all(settings, out_dir):
    doc = {"format": FORMAT, "settings": settings, "setup": None, "cases": [],
           "summary": None}
    cases = settings["cases"]
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    with TwoTier(out_dir, max(c["bandwidth_mbit"] for c in cases),
                 network=settings["network"], threads=settings["threads"],
                 link=settings["link"]) as tiers:
        doc["setup"] = tiers.describe()
        load_dataset(tiers, settings)
        warmed = set()
        for case in cases:
            if case["model"] not in warmed:
                warm_up(tiers, settings, case["model"], out_dir, f"{case['model']}-warm-up")
                warmed.add(case["model"])
            doc["cases"].append(measure_case(tiers, settings, case, out_dir))
            write_results(doc, out_dir, "verdict_noise")
    shares = [c["false_miss_share"] for c in doc["cases"]]
    doc["summary"] = {"cases": len(shares), "false_miss_share": with_spread(shares)}
    return doc


def format_table(doc):
    rows = ["| model | Mbit/s | batch | split | format | runs s | spread | A/A verdict "
            "| false-miss share |", "|---|---|---|---|---|---|---|---|---|"]
    for c in doc["cases"]:
        runs = c["runs_s"]
        rows.append(f"| {c['model']} | {c['bandwidth_mbit']} | {c['batch_size']} | "
                    f"{c['split']} | {c['wire_format'] or 'default'} | "
                    f"{runs['median']:.2f} [{runs['min']:.2f}-{runs['max']:.2f}] | "
                    f"{runs['max'] / runs['min'] - 1:.0%} | {c['verdict_ratio']:.3f} | "
                    f"{c['false_miss_share']:.1%} |")
    return "\n".join(rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", required=True, metavar="CASE",
                        help="MODEL:MBIT:BATCH:SPLIT[:FORMAT], FORMAT as DTYPE[+ENCODING]")
    parser.add_argument("--iterations", type=int, default=8, help="training iterations per run")
    parser.add_argument("--shard_size", type=int, default=8, help="images per shard")
    parser.add_argument("--repeats", type=int, default=5,
                        help="runs per series, as split_quality.py's --repeats (default: 5)")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="split_quality.py's tolerance (default: 0.05)")
    parser.add_argument("--image_size", type=int, default=224, help="JPEG side in pixels")
    add_two_tier_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("bench-results/verdict_noise"))
    args = parser.parse_args(argv)
    try:
        args.cases = [parse_case(text) for text in args.cases]
    except ValueError as err:
        parser.error(str(err))
    if args.iterations < 1 or args.repeats < 1:
        parser.error("--iterations and --repeats must be positive")
    return args


def settings_from(args):
    """split_quality.py's settings for these cases (the same data set for the same sizes)."""
    settings = split_quality.settings_from(argparse.Namespace(
        models=sorted({c["model"] for c in args.cases}),
        bandwidths=[c["bandwidth_mbit"] for c in args.cases],
        batch_sizes=[c["batch_size"] for c in args.cases], iterations=args.iterations,
        repeats=args.repeats, confirm_within=None, cutoff=None, tolerance=args.tolerance,
        shard_size=args.shard_size, image_size=args.image_size, quality=90,
        threads=args.threads, network=args.network, link=args.link))
    del settings["confirm_within"], settings["cutoff"]  # split_quality's; nothing here uses them
    return {**settings, "cases": args.cases}


def main(argv=None):
    args = parse_args(argv)
    try:
        doc = run_all(settings_from(args), args.out.absolute())
    except CommandFailed as err:
        print(f"error: a run failed: {err}", file=sys.stderr)
        return 1
    print(format_table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
