"""Split quality: is the automatic split the best one, or within 5% of it?

As the HAPI paper measured it: for every model x bandwidth x training batch
size, on the shaped two-tier set-up of ``benchmarks/shaped.py``,

1. the automatic selection runs (``client/main.py --freeze``) over a fixed
   number of iterations, and its choice is read from its metrics: the
   split that carried the run, the one most of its training samples came
   at (on a tie, the split it ended at). A run of a few iterations may
   move its last requests to another split, when the requests already
   sent make one tier the bottleneck of the job's tail and that split
   leaves it less work; a fixed run of that split over the whole job
   would time a choice the run did not make. The split it ended at and
   its samples per split are kept beside the verdict;
2. every split ``s`` in ``[0, f]`` runs over the same iterations
   (``--manual_split --split_idx s``) and its training-pass time is
   measured; a run that takes over ``--cutoff`` (1.5) times the shortest
   one so far is stopped, as it can be neither the best nor close to it;
3. the contenders, the chosen split and every split whose first run came
   within ``--confirm_within`` (15%) of the fastest, run again in
   interleaved rounds up to ``--repeats`` (3) runs each, and their
   medians count: the fastest of many single noisy runs is fast partly by
   luck. A split screened outside that band whose one run still beats
   every contender's median is confirmed the same way, so the best split
   is always the median of ``--repeats`` runs, never one lucky run.

The automatic run chooses the wire format with the split; every timed
split runs in the format that run's cost model gave it (its decision's row
for that split; the format the run used where it made no decision), so that
each split is timed as the choice would have run it. Splits the cost model
sees as the same work as the chosen one (the same bytes on the wire and the
same compute on each tier, within 1%: e.g. AlexNet's boundaries before and
after ``flatten``) are ties: a run cannot tell them apart but by noise.

4. where the best split so found is neither the chosen one nor tied with
   it, the two run again, ``--repeats`` more times each in alternating
   order, and the verdict comes from these fresh runs alone: the best of
   several contenders' medians is itself fast partly by luck (the lowest
   of noisy medians is biased low), and runs that chose a split cannot
   also judge it without that bias.

A case is a hit when the chosen split is the best or tied with it, or its
verdict runs' median is within the tolerance (5%) of the best split's; the
report gives the share of hits and of exact best choices. A miss is also
marked *within noise* when the chosen split's verdict runs and the best
split's overlap (the slowest run of the best is slower than the fastest run
of the chosen): the measurement then cannot order the two, whatever their
medians say. Results go to ``OUT/split_quality.json``, a table to stdout,
and ``OUT/split_quality.png`` draws, per case, the measured time of every
split beside the time the cost model predicted for it.

A grid too long for one sitting runs in parts (a process per model, say);
``--merge`` joins the parts' results into one document, table and plot,
with one summary over all their cases and each part's settings kept.

    python benchmarks/split_quality.py --quick
    python benchmarks/split_quality.py --models alexnet resnet18 resnet50 \\
        --bandwidths 5 25 125 --batch_sizes 16 32
    python benchmarks/split_quality.py --merge PART_DIR [PART_DIR ...] --out GRID_DIR
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from shaped import CommandFailed, TwoTier, add_two_tier_arguments
from tl_benchmark import (
    TRAINER,
    load_dataset,
    python,
    run_measured,
    say,
    warm_up,
    write_json,
)

from hapi import zoo

FORMAT = "hapi-split-quality/1"
TIE_SHARE = 0.01  # bytes and compute this close are the same work
RESULTS = "split_quality.json"
PRESETS = {
    "quick": {"models": ["resnet18"], "bandwidths": [25], "batch_sizes": [8, 16],
              "iterations": 4, "shard_size": 4},
    "full": {"models": ["alexnet", "resnet18", "resnet50"], "bandwidths": [5, 25, 125],
             "batch_sizes": [16, 32], "iterations": 8, "shard_size": 16},
}


def run_flags(settings, model, batch):
    """client/main.py's flags for ``iterations`` steps of ``batch`` (no split, no --metrics)."""
    return ["--dataset", settings["container"], "--model", model, "--weights", "seed:0",
            "--batch_size", batch, "--num_epochs", 1, "--holdout", 0,
            "--end", settings["iterations"] * batch, "--threads", settings["threads"],
            "--cpuonly", "--no-progress", "--freeze"]


def train_time(metrics):
    return metrics["epochs"][-1]["train"]["time_s"]


def format_flags(metrics, split):
    """The trainer's flags pinning the wire format an automatic run's cost
    model gave ``split``, or the format the run used where it has no row."""
    selection = metrics.get("split_selection") or {}
    rows = {row["split"]: row for row in (selection.get("decision") or {}).get("rows", ())}
    name = (rows.get(split) or {}).get("wire_format") or selection.get("wire_format")
    return wire_flags(name) if name else []


def wire_flags(name):
    """The trainer's flags for the wire format ``name``, ``DTYPE[+ENCODING]``."""
    dtype, _, encoding = name.partition("+")
    return ["--wire_dtype", dtype, "--wire_encoding", encoding or "raw"]


def carried_split(metrics):
    """The split most of an automatic run's training samples came at (its
    ``samples_per_split``); on a tie, the split the run ended at if it is
    one of them, else the deepest; with none recorded, the split it ended at."""
    counts = {int(s): n for s, n in
              (metrics.get("split_selection") or {}).get("samples_per_split", {}).items()}
    final = metrics["split"]
    return max(counts, key=lambda s: (counts[s], s == final, s), default=final)


def tied_splits(metrics, split):
    """The splits the automatic run's cost model counts as the same work as
    ``split``: the same wire format, the same bytes on the wire, the same
    storage and trainer compute, each within :data:`TIE_SHARE`."""
    decision = (metrics.get("split_selection") or {}).get("decision")
    rows = {row["split"]: row for row in (decision or {}).get("rows", ())}
    mine = rows.get(split)
    if mine is None:
        return [split]

    def same(row, key):
        a, b = row[key], mine[key]
        return abs(a - b) <= TIE_SHARE * max(abs(a), abs(b))

    return sorted(s for s, row in rows.items()
                  if s == split or (row["feasible"] and row["wire_format"] == mine["wire_format"]
                                    and all(same(row, key) for key in
                                            ("wire_bytes", "storage_s", "trainer_compute_s"))))


def predicted_epoch_s(metrics):
    """{split: the cost model's predicted time of this run} from the decision, if any."""
    decision = (metrics.get("split_selection") or {}).get("decision")
    if not decision:
        return None
    return {row["split"]: row["epoch_s"] for row in decision["rows"] if row["feasible"]}


def timed_run(tiers, flags, split, name, out_dir, limit=None):
    """One run at ``split`` with ``flags(split)`` (``tiers.measure``'s record)."""
    command = python(TRAINER, *flags(split), "--manual_split", "--split_idx", split)
    return run_measured(tiers, tiers.trainer_command(command), name, out_dir, limit)


def screen(tiers, settings, flags, tag, order, out_dir):
    """{split: [its training-pass time]}, None for a split stopped early.

    One run per split. A run that goes on past ``cutoff`` times the shortest
    complete run so far (wall times, start-up included) is stopped: with
    start-ups alike, its training pass is then over ``cutoff`` times the
    best one's, so it can be neither the best nor within the tolerance, and
    a slow split at a low bandwidth (megabytes per image) no longer costs
    minutes.
    """
    times, shortest = {}, None
    for split in order:
        limit = settings["cutoff"] * shortest if shortest and settings["cutoff"] else None
        try:
            run = timed_run(tiers, flags, split, f"{tag}-s{split}-r0", out_dir, limit)
        except subprocess.TimeoutExpired:
            times[split] = None
            continue
        times[split] = [train_time(run.metrics)]
        shortest = run.run_s if shortest is None else min(shortest, run.run_s)
    return times


def confirm(tiers, settings, flags, tag, times, chosen, out_dir):
    """Time the contenders again, in interleaved rounds, until each has
    ``repeats`` runs; returns the contenders.

    One run per split screens; but the fastest of many single runs is
    fast partly by luck (the minimum of noisy times is biased low), so the
    chosen split and every split screened within ``confirm_within`` of the
    fastest run again, round after round (a slow minute of the host then
    hits them all alike), and the medians decide. The band is drawn from
    that lucky minimum, so a split screened outside it may still beat
    every contender's median with its one run: it is confirmed too, until
    the fastest split is the median of ``repeats`` runs.
    """
    fastest = min(t[0] for t in times.values() if t)
    contenders = sorted({chosen, *(s for s, t in times.items()
                                   if t and t[0] <= (1 + settings["confirm_within"]) * fastest)})
    repeat_runs(tiers, settings, flags, tag, times, contenders, out_dir)
    while len(times[best := fastest_split(times)]) < settings["repeats"]:
        contenders = sorted({*contenders, best})
        repeat_runs(tiers, settings, flags, tag, times, [best], out_dir)
    return contenders


def repeat_runs(tiers, settings, flags, tag, times, splits, out_dir):
    """Time ``splits`` in interleaved rounds until each has ``repeats`` runs in ``times``."""
    for repeat in range(1, settings["repeats"]):
        for split in splits:
            run = timed_run(tiers, flags, split, f"{tag}-s{split}-r{repeat}", out_dir)
            times[split].append(train_time(run.metrics))


def fastest_split(times):
    """The split of ``times`` ({split: its runs, None when stopped}) with the lowest median."""
    return min((s for s, t in times.items() if t), key=lambda s: statistics.median(times[s]))


def verdict_runs(tiers, settings, flags, tag, chosen, best, out_dir):
    """{split: fresh training-pass times} of ``chosen`` and ``best``,
    ``repeats`` each, in alternating order (a slow moment of the host then
    falls on both alike)."""
    runs = {chosen: [], best: []}
    for repeat in range(settings["repeats"]):
        for split in (chosen, best) if repeat % 2 == 0 else (best, chosen):
            run = timed_run(tiers, flags, split, f"{tag}-s{split}-v{repeat}", out_dir)
            runs[split].append(train_time(run.metrics))
    return runs


def judge(times, chosen, best, verdict, tolerance):
    """The case's verdict fields: with no ``verdict`` runs the chosen split
    is the ``best`` or tied with it (a hit, at the selection medians
    ``times``); else the fresh runs of the two alone decide."""
    if verdict is None:
        return {"chosen_s": times[chosen], "best_split": best, "best_s": times[best],
                "ratio": 1.0, "hit": True, "miss_within_noise": False}
    chosen_s, best_s = (statistics.median(verdict[s]) for s in (chosen, best))
    ratio = chosen_s / best_s
    hit = ratio <= 1 + tolerance
    return {"chosen_s": chosen_s, "best_split": best, "best_s": best_s, "ratio": ratio,
            "hit": hit,
            "miss_within_noise": not hit and min(verdict[chosen]) <= max(verdict[best])}


def run_case(tiers, settings, model, rate, batch, out_dir):
    """The automatic choice and every split's measured time for one case.

    The chosen split is timed first and the rest from the freeze index
    down (small features first), so that the cutoff has a good reference
    early and never stops the chosen split; then the contenders are timed
    again (:func:`confirm`).
    """
    freeze = zoo.MODELS[model].default_freeze
    base = run_flags(settings, model, batch)
    tag = f"{model}-{rate}mbit-b{batch}"
    auto = run_measured(tiers, tiers.trainer_command(python(TRAINER, *base)),
                        f"{tag}-auto", out_dir).metrics
    chosen = carried_split(auto)
    auto_s = train_time(auto)

    def flags(split):
        return [*base, *format_flags(auto, split)]

    order = [chosen, *(s for s in range(freeze, -1, -1) if s != chosen)]
    runs = screen(tiers, settings, flags, tag, order, out_dir)
    contenders = confirm(tiers, settings, flags, tag, runs, chosen, out_dir)
    times = {s: statistics.median(t) if t else None for s, t in sorted(runs.items())}
    best = fastest_split(runs)
    tied = tied_splits(auto, chosen)
    verdict = None if best in tied else \
        verdict_runs(tiers, settings, flags, tag, chosen, best, out_dir)
    judged = judge(times, chosen, best, verdict, settings["tolerance"])
    return {"model": model, "bandwidth_mbit": rate, "batch_size": batch,
            "iterations": settings["iterations"], "freeze": freeze, "times_s": times,
            "runs_s": dict(sorted(runs.items())), "contenders": contenders,
            "stopped": [s for s, t in times.items() if t is None],
            "chosen_split": chosen, "final_split": auto["split"],
            "samples_per_split": auto["split_selection"].get("samples_per_split"),
            "tied": tied, "verdict_runs_s": verdict, **judged,
            "wire_format": auto["split_selection"].get("wire_format"),
            "is_best": chosen == best,
            "decided": predicted_epoch_s(auto) is not None,
            "predicted_s": predicted_epoch_s(auto), "auto_run_s": auto_s,
            "auto_ratio": auto_s / judged["best_s"],
            "history": auto["split_selection"].get("history")}


def run_all(settings, out_dir, log=say):
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "settings": settings, "setup": None, "cases": [],
           "summary": None}
    with TwoTier(out_dir, settings["bandwidths"][-1], network=settings["network"],
                 threads=settings["threads"], link=settings["link"], log=log) as tiers:
        doc["setup"] = tiers.describe()
        load_dataset(tiers, settings)
        for model in settings["models"]:
            warm_up(tiers, settings, model, out_dir, f"{model}-warm-up")
            for rate in settings["bandwidths"]:
                tiers.set_rate(rate)
                for batch in settings["batch_sizes"]:
                    case = run_case(tiers, settings, model, rate, batch, out_dir)
                    doc["cases"].append(case)
                    log(f"{model} {rate} Mbit/s batch {batch}: chose {case['chosen_split']}, "
                        f"best {case['best_split']}, {case['ratio']:.3f}x the best")
                    write_json(doc, out_dir / RESULTS)
    doc["summary"] = summarise(doc["cases"], settings["tolerance"])
    write_json(doc, out_dir / RESULTS)
    return doc


def merge(parts):
    """One document of the results in ``parts`` (directories holding a
    split_quality.json, or the files): their cases in order, each part's
    settings and set-up, and one summary. A part whose run was stopped
    counts the cases it finished; parts must judge hits at one tolerance,
    and a case (model, rate, batch) may come from one part only."""
    docs, seen, tolerances = [], {}, set()
    for part in parts:
        path = part / RESULTS if part.is_dir() else part
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err})") from None
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path}: format {doc.get('format')!r}, not {FORMAT!r}")
        try:
            keys = [(case["model"], case["bandwidth_mbit"], case["batch_size"])
                    for case in doc["cases"]]
            tolerances.add(doc["settings"]["tolerance"])
            setup = {"shaped": doc["setup"]["shaped"], "note": doc["setup"]["note"]}
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: no field {err}") from None
        for key in keys:
            if key in seen:
                raise ValueError(f"{path}: {key[0]} at {key[1]} Mbit/s and batch {key[2]} "
                                 f"is also in {seen[key]}")
            seen[key] = path
        docs.append((path.parent.name, doc, setup))
    if len(tolerances) != 1:
        raise ValueError(f"the parts judge hits at different tolerances: {sorted(tolerances)}")
    [tolerance] = tolerances
    cases = [case for _, doc, _ in docs for case in doc["cases"]]
    return {"format": FORMAT, "settings": {"tolerance": tolerance},
            "setup": {"shaped": all(setup["shaped"] for _, _, setup in docs),
                      "note": "; ".join(setup["note"] for _, _, setup in docs if setup["note"])},
            "parts": [{"source": name, "settings": doc["settings"], "setup": doc["setup"],
                       "cases": len(doc["cases"])} for name, doc, _ in docs],
            "cases": cases, "summary": summarise(cases, tolerance)}


def summarise(cases, tolerance):
    hits = sum(case["hit"] for case in cases)
    best = sum(case["is_best"] for case in cases)
    return {"cases": len(cases), "hits": hits, "best": best,
            "hit_share": hits / len(cases) if cases else None,
            "best_share": best / len(cases) if cases else None, "tolerance": tolerance,
            "misses_within_noise": sum(case["miss_within_noise"] for case in cases),
            "undecided": sum(not case["decided"] for case in cases)}


def verdict(case):
    if case["hit"]:
        return "yes"
    return "no, within noise" if case["miss_within_noise"] else "NO"


def format_table(doc):
    head = (f"{'model':<19}{'Mbit/s':>7}{'batch':>6}{'chosen':>7}{'best':>5}{'chosen s':>10}"
            f"{'best s':>8}{'ratio':>7}{'run/best':>9}{'stopped':>8}  hit")
    lines = [head, "-" * len(head)]
    for c in doc["cases"]:
        lines.append(f"{c['model']:<19}{c['bandwidth_mbit']:>7}{c['batch_size']:>6}"
                     f"{c['chosen_split']:>7}{c['best_split']:>5}{c['chosen_s']:>10.2f}"
                     f"{c['best_s']:>8.2f}{c['ratio']:>7.3f}{c['auto_ratio']:>9.3f}"
                     f"{len(c['stopped']):>8}"
                     f"  {verdict(c)}"
                     + ("" if c["decided"] else "  (no decision: the split stayed at f)"))
    s = doc["summary"]
    lines.append(f"\nchosen split best or within {s['tolerance']:.0%} of it: {s['hits']} of "
                 f"{s['cases']} cases ({s['hit_share']:.1%}); exactly the best: "
                 f"{s['best']} ({s['best_share']:.1%}); misses within the noise of the "
                 f"runs: {s['misses_within_noise']}\n(run/best: the automatic run's own "
                 "training pass over the best split's median)")
    if not doc["setup"]["shaped"]:
        lines.append(f"UNSHAPED run on loopback ({doc['setup']['note']}): bandwidths were "
                     "not applied")
    return "\n".join(lines)


def plot(doc, path):
    """Measured time per split (bars) and the cost model's prediction (line), per case."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    cases = doc["cases"]
    cols = min(len(cases), 4)
    rows = -(-len(cases) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
    for ax, case in zip(axes.flat, cases, strict=False):
        measured = {s: t for s, t in case["times_s"].items() if t is not None}
        ax.bar(list(measured), list(measured.values()), color="lightsteelblue",
               label="measured")
        for split in case["stopped"]:
            ax.annotate("stopped", (split, 0), rotation=90, ha="center", va="bottom",
                        fontsize="x-small", color="grey")
        if case["predicted_s"]:
            predicted = sorted(case["predicted_s"].items())
            ax.plot(*zip(*predicted, strict=True), "k.-", label="predicted")
        ax.axvline(case["chosen_split"], color="tab:red", label="chosen")
        ax.set_title(f"{case['model']}, {case['bandwidth_mbit']} Mbit/s, "
                     f"batch {case['batch_size']}", fontsize="small")
        ax.set_xlabel("split")
        ax.set_ylabel("s per run")
    for ax in axes.flat[len(cases):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a few minutes: {PRESETS['quick']} (flags given win)")
    parser.add_argument("--models", nargs="+", choices=sorted(zoo.MODELS),
                        help=f"default: {PRESETS['full']['models']}")
    parser.add_argument("--bandwidths", nargs="+", type=int, metavar="MBIT",
                        help=f"link rates in Mbit/s (default: {PRESETS['full']['bandwidths']})")
    parser.add_argument("--batch_sizes", nargs="+", type=int,
                        help=f"training batch sizes (default: {PRESETS['full']['batch_sizes']})")
    parser.add_argument("--iterations", type=int, help="training iterations per run")
    parser.add_argument("--shard_size", type=int, help="images per shard")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each contender, the median counts (default: 3)")
    parser.add_argument("--confirm_within", type=float, default=0.15,
                        help="splits whose first run is this close to the fastest are "
                             "contenders, timed --repeats times (default: 0.15)")
    parser.add_argument("--cutoff", type=float, default=1.5,
                        help="stop a split's run past this many times the shortest run so "
                             "far; 0: never (default: 1.5)")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="a choice this close to the best is a hit (default: 0.05)")
    parser.add_argument("--image_size", type=int, default=224, help="JPEG side in pixels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    add_two_tier_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("bench-results/split_quality"))
    parser.add_argument("--merge", nargs="+", type=Path, metavar="PART",
                        help="join these runs' results (directories or their "
                             f"{RESULTS}) into one in --out; runs nothing")
    args = parser.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.bandwidths) <= 0 or min(args.batch_sizes) < 1 or args.iterations < 1 \
            or args.repeats < 1:
        parser.error("--bandwidths, --batch_sizes, --iterations and --repeats must be positive")
    return args


def settings_from(args):
    images = args.iterations * max(args.batch_sizes)
    return {"models": args.models, "bandwidths": sorted(args.bandwidths),
            "batch_sizes": args.batch_sizes, "iterations": args.iterations,
            "repeats": args.repeats, "confirm_within": args.confirm_within,
            "cutoff": args.cutoff, "tolerance": args.tolerance, "images": images,
            "shard_size": args.shard_size, "image_size": args.image_size,
            "quality": args.quality, "classes": 10, "threads": args.threads,
            "network": args.network, "link": args.link, "weights": "seed:0",
            "container": f"hapi-splits-{args.image_size}px-{images}"}


def main(argv=None):
    args = parse_args(argv)
    out_dir = args.out.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    if args.merge:
        try:
            doc = merge(args.merge)
        except (OSError, ValueError) as err:
            print(f"error: cannot merge: {err}", file=sys.stderr)
            return 1
        write_json(doc, out_dir / RESULTS)
    else:
        try:
            doc = run_all(settings_from(args), out_dir)
        except CommandFailed as err:
            print(f"error: a run failed: {err}", file=sys.stderr)
            return 1
    print(format_table(doc))
    plot(doc, out_dir / "split_quality.png")
    print(f"wrote {out_dir / RESULTS} and {out_dir / 'split_quality.png'} "
          f"in {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
