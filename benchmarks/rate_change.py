"""A change of bandwidth in the middle of a run: how soon does the automatic
split decide again?

On the shaped two-tier set-up of ``benchmarks/shaped.py`` a training run
with the automatic split starts at ``--from_mbit``; ``--change_after_s``
seconds after its first decision from measurements (its log says
``profiled`` or ``profiling bound``), the link is reshaped to ``--to_mbit``
(a factor of 2 or more): the change comes mid-run, after the estimate it
departs from has settled, however long the trainer took to start. The run's
metrics give every decision, every request the selector heard of as it
completed and every shard the consumer took, each with the host's monotonic
clock (``split_selection.history[].monotonic_s``,
``split_selection.completed_at``, ``split_selection.observed_at``), so the
benchmark counts the requests completed after the change up to the first
decision the change caused (its ``why`` starts with ``drift`` and its
bandwidth drift goes the change's way; a drift the other way is noise that
happened to come after it): the shards
the link carried at the new rate, or partly at it, before the decision. The
shards the consumer took in that time are reported too; they include shards
loaded before the change, which say nothing of it. The features are pinned
to float32 (``--wire_dtype float32 --wire_encoding raw``) so that the link
paces the transfers at both rates: a link that paces nothing cannot be
measured and cannot matter to the choice.

Output: a table, ``OUT/rate_change.json`` (per repeat: the change's time,
the shards to the new decision, the decision, its delay from the change,
the decisions after it on the link estimate's noise, the link observations
after it and their delay; ``summary``: the median and the range of shards,
whether every repeat decided within ``--target_shards``, the median delay
and the decisions on noise).

    sudo .venv/bin/python benchmarks/rate_change.py --repeats 3
"""

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

from shaped import DEFAULT_LINK, NETWORKS, TwoTier
from tl_benchmark import TRAINER, load_dataset, python, run_measured, say, warm_up, write_json

FORMAT = "hapi-rate-change/1"
RESULTS = "rate_change.json"
# Words of the trainer's log line for a decision from measurements.
MEASURED_DECISION = ("profiled", "profiling bound")


def shards_to_decision(metrics, changed_at, slower):
    """(requests completed after ``changed_at`` up to the first drift
    decision after it that saw the bandwidth fall (``slower``) or rise,
    shards the consumer took in that time, that decision) or (None, None,
    None) when none came."""
    selection = metrics["split_selection"]
    for step in selection["history"]:
        bandwidth = (step.get("drift") or {}).get("bandwidth")
        if step["monotonic_s"] > changed_at and step["why"].startswith("drift") and \
                bandwidth is not None and (bandwidth < 0) == slower:
            completed, observed = ([t for t in selection[key]
                                    if changed_at < t <= step["monotonic_s"]]
                                   for key in ("completed_at", "observed_at"))
            return len(completed), len(observed), step
    return None, None, None


def after_the_decision(metrics, changed_at, step):
    """What the run did after the change's decision ``step``: its delay from
    the change (s), the decisions on a drift after it (the link estimate's
    noise: the rate did not change again), and the link observations made
    after it (Mbit/s: median, min, max, and the share within 25% of the
    median) with their median delay from their last byte to the observation
    (``lag_s``)."""
    selection = metrics["split_selection"]
    later = [one for one in selection["history"]
             if one["monotonic_s"] > step["monotonic_s"] and one["why"].startswith("drift")]
    observations = selection.get("link_observations", [])
    rates = [8 * one["bytes"] / one["seconds"] / 1e6 for one in observations
             if one["monotonic_s"] > step["monotonic_s"] and one["seconds"] > 0]
    lags = [one["lag_s"] for one in observations]
    median = statistics.median(rates) if rates else None
    return {"seconds_to_decision": step["monotonic_s"] - changed_at,
            "decisions_on_noise": len(later),
            "link_after_mbit": {"median": median, "min": min(rates), "max": max(rates),
                                "within_25pct": sum(abs(rate / median - 1) <= 0.25
                                                    for rate in rates) / len(rates)}
            if rates else None,
            "median_lag_s": statistics.median(lags) if lags else None}


def wait_for_measured_decision(log_file, thread):
    """Until the trainer's log (``log_file``, written as it runs) shows its
    first decision from measurements, or the run is over."""
    while thread.is_alive():
        if log_file.exists() and any(
                line.startswith("split selection after") and
                any(why in line for why in MEASURED_DECISION)
                for line in log_file.read_text().splitlines()):
            return
        time.sleep(0.05)


def one_run(tiers, settings, out_dir, repeat):
    """Train once, reshaping the link ``change_after_s`` after the first
    decision from measurements."""
    tiers.set_rate(settings["from_mbit"])
    flags = ["--dataset", settings["container"], "--model", settings["model"],
             "--weights", "seed:0", "--batch_size", settings["batch_size"],
             "--num_epochs", settings["epochs"], "--holdout", 0.2, "--threads", 1,
             "--cpuonly", "--no-progress", "--freeze", "--wire_dtype", "float32",
             "--wire_encoding", "raw"]
    command = tiers.trainer_command(python(TRAINER, *flags))
    result, name = {}, f"{settings['model']}-r{repeat}"

    def train():
        result["run"] = run_measured(tiers, command, name, out_dir)

    thread = threading.Thread(target=train)
    thread.start()
    wait_for_measured_decision(out_dir / "runs" / f"{name}.log", thread)
    thread.join(settings["change_after_s"])
    changed_at = time.monotonic()
    tiers.set_rate(settings["to_mbit"])
    thread.join()
    metrics = result["run"].metrics
    shards, taken, step = shards_to_decision(metrics, changed_at,
                                             settings["to_mbit"] < settings["from_mbit"])
    return {"repeat": repeat, "changed_at": changed_at, "shards": shards,
            "shards_taken_by_consumer": taken,
            "decision": None if step is None else
            {key: step[key] for key in ("shard", "why", "drift", "from", "to", "from_format",
                                        "to_format")},
            "shards_observed": len(metrics["split_selection"]["observed_at"]),
            **(after_the_decision(metrics, changed_at, step) if step is not None else {}),
            "run_s": result["run"].run_s}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="alexnet")
    parser.add_argument("--from_mbit", type=float, default=5)
    parser.add_argument("--to_mbit", type=float, default=2.5)
    parser.add_argument("--change_after_s", type=float, default=2.0,
                        help="seconds after the first decision from measurements "
                             "(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--shard_size", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--target_shards", type=int, default=3)
    parser.add_argument("--network", choices=NETWORKS, default="shaped")
    parser.add_argument("--link", default=DEFAULT_LINK, metavar="SUBNET")
    parser.add_argument("--out", type=Path, default=Path("bench-results/rate-change"))
    args = parser.parse_args(argv)
    factor = max(args.from_mbit, args.to_mbit) / min(args.from_mbit, args.to_mbit)
    if factor < 2 or args.repeats < 1:
        parser.error("the rates must differ by a factor of 2 or more; --repeats >= 1")
    settings = {**{key: value for key, value in vars(args).items() if key != "out"},
                "container": f"hapi-rate-{args.image_size}px-{args.images}",
                "quality": 90, "classes": 10, "threads": 1}
    # The trainer's log is read as it is written (wait_for_measured_decision).
    os.environ["PYTHONUNBUFFERED"] = "1"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs").mkdir(exist_ok=True)
    with TwoTier(args.out, args.from_mbit, network=args.network,
                 link=args.link, log=say) as tiers:
        load_dataset(tiers, settings)
        warm_up(tiers, settings, args.model, args.out, "warm-up")
        runs = []
        for repeat in range(1, args.repeats + 1):
            run = one_run(tiers, settings, args.out, repeat)
            runs.append(run)
            say(f"[{repeat}/{args.repeats}] {args.from_mbit:g} -> {args.to_mbit:g} Mbit/s "
                f"{args.change_after_s:g} s after the first measured decision: "
                + (f"new decision {run['shards']} shard(s) later ("
                   f"{run['shards_taken_by_consumer']} taken by the consumer; "
                   f"{run['decision']['why']}, "
                   f"split {run['decision']['from']} -> {run['decision']['to']}), "
                   f"{run['seconds_to_decision']:.2f} s after the change, then "
                   f"{run['decisions_on_noise']} decision(s) on noise"
                   if run["shards"] is not None else "no new decision"))
        setup = tiers.describe()
    decided = [run for run in runs if run["shards"] is not None]
    counts = [run["shards"] for run in decided]
    summary = {"repeats": len(runs), "decided": len(counts),
               "median_shards": statistics.median(counts) if counts else None,
               "min_shards": min(counts, default=None), "max_shards": max(counts, default=None),
               "median_seconds_to_decision": statistics.median(
                   run["seconds_to_decision"] for run in decided) if decided else None,
               "decisions_on_noise": sum(run["decisions_on_noise"] for run in decided),
               "target_shards": args.target_shards,
               "met": len(counts) == len(runs) and max(counts) <= args.target_shards}
    write_json({"format": FORMAT, "settings": settings, "setup": setup, "runs": runs,
                "summary": summary}, args.out / RESULTS)
    say(f"shards from the change to the new decision: median {summary['median_shards']} "
        f"[{summary['min_shards']}-{summary['max_shards']}] over {len(counts)} of "
        f"{len(runs)} run(s); target <= {args.target_shards}: "
        f"{'met' if summary['met'] else 'NOT met'}; {summary['decisions_on_noise']} "
        "decision(s) on noise after it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
