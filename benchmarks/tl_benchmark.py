"""Transfer learning on a shaped network: vanilla, HAPI and ALL_IN_COS compared.

Builds the two-tier set-up of ``benchmarks/shaped.py`` (Swift with the HAPI
filter in a network namespace behind a tc-shaped veth, the trainer in
another, one core and one torch thread each), puts synthetic JPEG shards
into Swift (by default ImageNet-like photos of about 400 x 350 px and
110 KB, which the storage tier resizes; ``--image_size 224``: fixed 224 px
images), and for every model, bandwidth, mode and wire encoding runs the real
trainer command, ``client/main.py``:

- ``vanilla``: split 0; raw shards cross the link, every layer runs on the
  trainer (the same frozen layers, the same training);
- ``hapi_auto``: ``--freeze`` alone, the trainer's automatic split selection;
- ``hapi_freeze``: split = freeze index, every frozen layer runs in storage;
- ``hapi_sequential``: split = freeze index with ``--sequential``, no overlap
  between the tiers (what pipelining buys);
- ``all_in_cos``: the whole job runs in the storage tier
  (``benchmarks/all_in_cos.py train``), then the trainer downloads the
  trained layers across the link (``all_in_cos.py fetch``).

The HAPI modes run once per wire encoding (``--encodings``: the features'
dtype, and ``+zstd`` for lossless compression of their bytes); vanilla and
ALL_IN_COS move no features and run once per round. The whole grid runs
``--repeats`` times, interleaved (every cell once, then every cell again), so
that a slow drift of the host hits every cell alike; the table and the
summary give medians and min-max spreads, and ratios between modes are taken
within each round before their median.

Each run records the epoch time, the bytes across the link (the veth's
counters) and the trainer's own count, the time each tier computed and
waited, the chosen split, the held-out accuracy, and the bound
max(storage compute, transfer, trainer compute) of a pipelined HAPI run.
The transfer counts at the link's goodput, measured at each rate in each
round (``benchmarks/link_probe.py``: a timed GET across the link), as a tbf
link shaped to R carries a little less than R of payload.
Results go to ``OUT/results.json`` (rewritten after every run), the
trainers' metrics and logs to ``OUT/runs/``, a table to stdout, and plots to
``OUT/epoch_time.png``, ``OUT/bytes.png`` and ``OUT/split.png``.

    python benchmarks/tl_benchmark.py --quick
    python benchmarks/tl_benchmark.py --models alexnet resnet18 resnet50 \\
        --bandwidths 5 20 80 320 --images 512

Run it as root for the shaped link; elsewhere it runs unshaped on loopback
and says so (no rate, no link counters).
"""

import argparse
import bisect
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from shaped import CommandFailed, TwoTier, add_two_tier_arguments

from hapi import names, zoo
from hapi.client_setup.datasets import IMAGENET_LIKE
from hapi.client_setup.load import synthetic_size

FORMAT = "hapi-tl-benchmark/2"
REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "client" / "main.py"
ALL_IN_COS = REPO / "benchmarks" / "all_in_cos.py"
LINK_PROBE = REPO / "benchmarks" / "link_probe.py"
RESULTS_CONTAINER = "hapi-results"
PROBE_OBJECT = f"{RESULTS_CONTAINER}/link-probe"
RESULTS = "results.json"

MODES = ("vanilla", "hapi_auto", "hapi_freeze", "hapi_sequential", "all_in_cos")
# The modes that move features, and so run once per wire encoding.
FEATURE_MODES = ("hapi_auto", "hapi_freeze", "hapi_sequential")
DEFAULT_ENCODINGS = ["float32", "uint8+zstd"]

# Settings of --quick and of a full run; flags given on the command line win.
PRESETS = {
    "quick": {"models": ["alexnet"], "bandwidths": [5, 20, 320], "images": 96,
              "shard_size": 16, "batch_size": 16, "epochs": 1},
    "full": {"models": ["alexnet", "resnet18", "resnet50"],
             "bandwidths": [2, 8, 32, 128, 512],
             "images": 512, "shard_size": 32, "batch_size": 32, "epochs": 1},
}

# Every record has every field; None where a mode has no such figure.
FIELDS = (
    "model", "mode", "encoding", "repeat", "bandwidth_mbit", "link_goodput_mbit", "shaped",
    "split", "freeze", "epoch_s", "epoch_times_s",
    "run_s", "link_bytes", "link_bytes_to_trainer", "link_bytes_to_storage", "trainer_bytes",
    "raw_shard_bytes", "trainer_compute_s", "trainer_wait_s", "storage_compute_s",
    "storage_wait_s", "storage_frames_s", "storage_cpu_s", "trainer_cpu_s", "transfer_s",
    "bound_s", "bound_ratio", "accuracy", "train_samples", "samples_per_split",
    "profiling_s", "split_changes", "link_estimate_mbit", "cache_hits", "runs",
)
# The figures a cell (the repeats of one model, bandwidth, mode and encoding) gives
# as {"median", "min", "max"}; "bytes" is the link's count, else the trainer's.
CELL_FIGURES = (
    "epoch_s", "bytes", "link_bytes", "trainer_bytes", "link_goodput_mbit",
    "trainer_compute_s", "trainer_wait_s", "storage_compute_s", "storage_wait_s",
    "transfer_s", "bound_s", "bound_ratio", "accuracy", "split", "link_estimate_mbit",
)


# Progress lines go out at once, also into a pipe or a log file.
say = functools.partial(print, flush=True)


def parse_encoding(text):
    """``DTYPE`` or ``DTYPE+ENCODING`` (e.g. ``uint8+zstd``) -> its label, as written
    without the default ``+raw``; argparse type of ``--encodings``."""
    if text == names.WIRE_AUTO:
        return text  # the trainer chooses dtype and encoding with the split
    dtype, _, encoding = text.partition("+")
    encoding = encoding or names.DEFAULT_WIRE_ENCODING
    if dtype not in names.WIRE_DTYPES or encoding not in names.WIRE_ENCODINGS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not DTYPE or DTYPE+ENCODING with DTYPE one of "
            f"{', '.join(names.WIRE_DTYPES)} and ENCODING one of "
            f"{', '.join(names.WIRE_ENCODINGS)} (e.g. uint8+zstd)")
    return dtype if encoding == names.DEFAULT_WIRE_ENCODING else f"{dtype}+{encoding}"


def wire_flags(label):
    """The trainer's ``--wire_dtype`` and ``--wire_encoding`` for an encoding label."""
    if label == names.WIRE_AUTO:
        return ["--wire_dtype", label, "--wire_encoding", label]
    dtype, _, encoding = label.partition("+")
    return ["--wire_dtype", dtype,
            "--wire_encoding", encoding or names.DEFAULT_WIRE_ENCODING]


def run_measured(tiers, command, name, out_dir, timeout_s=None):
    """``tiers.measure`` with the run's metrics and log under ``OUT/runs/NAME.*``."""
    runs = out_dir / "runs"
    return tiers.measure(command, runs / f"{name}.json", runs / f"{name}.log", timeout_s)


def trainer_flags(settings, model):
    """client/main.py's flags shared by every mode (no split, no wire, no --metrics)."""
    return ["--dataset", settings["container"], "--model", model, "--weights", "seed:0",
            "--batch_size", settings["batch_size"], "--num_epochs", settings["epochs"],
            "--holdout", settings["holdout"], "--threads", settings["threads"],
            "--cpuonly", "--no-progress"]


def mode_flags(mode, freeze, split_tie=names.SPLIT_TIE):
    return {
        "vanilla": ["--freeze", "--manual_split", "--split_idx", 0],
        "hapi_auto": ["--freeze", "--split_tie", split_tie],
        "hapi_freeze": ["--freeze", "--manual_split", "--split_idx", freeze],
        "hapi_sequential": ["--freeze", "--manual_split", "--split_idx", freeze, "--sequential"],
    }[mode]


def python(script, *args):
    return [sys.executable, str(script), *map(str, args)]


# -- one run per mode ----------------------------------------------------------------------


def cells(settings):
    """The (mode, encoding) pairs of one bandwidth: the feature modes once per
    encoding, the others once with encoding None."""
    return [(mode, encoding) for mode in settings["modes"]
            for encoding in (settings["encodings"] if mode in FEATURE_MODES else [None])]


def run_name(model, rate, mode, encoding, repeat):
    return "-".join([model, f"{rate}mbit", mode, *([encoding] if encoding else []),
                     f"r{repeat}"])


def run_mode(tiers, settings, model, mode, encoding, repeat, link, out_dir):
    """Run ``mode`` once at the link's current rate; return its record.

    ``link``: {"rate": the nominal Mbit/s, "goodput": the measured one, or None}."""
    name = run_name(model, link["rate"], mode, encoding, repeat)
    freeze = zoo.MODELS[model].default_freeze
    flags = trainer_flags(settings, model)
    where = {"model": model, "mode": mode, "encoding": encoding, "repeat": repeat, "link": link}
    if mode == "all_in_cos":
        return all_in_cos_record(tiers, freeze, flags, where, name, out_dir)
    cache = out_dir / "cache" / name
    extra = ["--cache_dir", cache] if settings["cache"] else []
    try:
        measured = run_measured(tiers, tiers.trainer_command(python(
            TRAINER, *flags, *mode_flags(mode, freeze, settings["split_tie"]),
            *wire_flags(encoding or "float32"), *extra)), name, out_dir)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return trainer_record(measured, where, tiers.shaped, [name])


def storage_busy_s(measured):
    """The storage tier's CPU seconds attributable to the last training pass.

    Swift's CPU over the whole run, times that pass's share of the samples
    the run fetched: each sample costs the storage tier the same whichever
    pass asks for it; shards read from the trainer's feature cache cost it
    nothing. Not the frames' own compute times, which add up the wall time
    of requests that shared the storage core.
    """
    epochs = measured.metrics["epochs"]
    passes = [p for e in epochs for p in (e["train"], e["holdout"]) if p]
    served = sum(map(_fetched_samples, passes))
    last = _fetched_samples(epochs[-1]["train"])
    return measured.storage_cpu_s * last / served if served else 0.0


def _fetched_samples(metrics_pass):
    """The samples of a pass that came from the storage tier, not from the feature cache."""
    traffic = metrics_pass["traffic"]
    if not traffic["shards"]:
        return metrics_pass["samples"]
    return metrics_pass["samples"] * (1 - traffic["cache_hits"] / traffic["shards"])


def trainer_record(measured, where, shaped, runs):
    """The record of a trainer run: epoch figures from its last epoch's training pass."""
    metrics, link = measured.metrics, where["link"]
    train = metrics["epochs"][-1]["train"]
    epoch_s = train["time_s"]
    storage_compute_s = storage_busy_s(measured)
    transfer_s = _transfer_s(train["traffic"]["bytes_received"], link["goodput"])
    split = metrics["split"]
    bound_s = (max(storage_compute_s, transfer_s, train["compute_s"])
               if split and transfer_s is not None else None)
    return _record(
        measured, where, shaped=shaped, split=split,
        freeze=metrics["freeze"], epoch_s=epoch_s,
        epoch_times_s=[e["time_s"] for e in metrics["epochs"]],
        trainer_bytes=metrics["bytes_received"], raw_shard_bytes=metrics["raw_shard_bytes"],
        trainer_compute_s=train["compute_s"], trainer_wait_s=train["wait_s"],
        storage_compute_s=storage_compute_s,
        storage_wait_s=max(epoch_s - storage_compute_s, 0.0),
        storage_frames_s=train["traffic"]["storage_compute_s"], transfer_s=transfer_s,
        bound_s=bound_s, bound_ratio=epoch_s / bound_s if bound_s else None,
        accuracy=metrics["accuracy"], train_samples=metrics["samples"]["train"],
        samples_per_split=metrics["split_selection"]["samples_per_split"],
        profiling_s=profiling_s(metrics), split_changes=split_changes(metrics),
        link_estimate_mbit=link_estimate_mbit(metrics), cache_hits=metrics["cache_hits"],
        runs=runs)


def profiling_s(metrics):
    """What the automatic split's measurements took before the first request
    (outside the epochs' times); 0 for a fixed split."""
    return (metrics["split_selection"].get("profiling") or {}).get("seconds", 0.0)


def link_estimate_mbit(metrics):
    """The automatic split's last estimate of the link's rate, in Mbit/s, to
    set beside the goodput measured from outside; None for a fixed split."""
    rate = (metrics["split_selection"].get("profile") or {}).get("bandwidth_bytes_per_s")
    return rate * 8 / 1e6 if rate else None


def split_changes(metrics):
    """How many times the split moved in each epoch: the selector's decisions
    that changed it, each in the epoch of the shard it came after (the
    selector counts every shard it is shown, training and held-out). A
    decision before the first shard (from the storage tier's layer costs)
    chooses where the run starts: no request had gone out at the split it
    replaces, so it is not a change."""
    ends, shards = [], 0
    for epoch in metrics["epochs"]:
        shards += sum(p["traffic"]["shards"] for p in (epoch["train"], epoch["holdout"]) if p)
        ends.append(shards)
    counts = [0] * len(ends)
    for step in metrics["split_selection"].get("history", ()):
        if step["from"] != step["to"] and step["shard"] > 0:
            counts[min(bisect.bisect_left(ends, step["shard"]), len(ends) - 1)] += 1
    return counts


def all_in_cos_record(tiers, freeze, flags, where, name, out_dir):
    """ALL_IN_COS: the job in the storage tier, then the trained layers to the trainer.

    Its epoch time is the storage tier's training epoch plus the download of
    the trained layers spread over the epochs; the trainer waits all along.
    """
    result = f"{RESULTS_CONTAINER}/{name}.safetensors"
    job = run_measured(tiers, tiers.storage_command(python(
        ALL_IN_COS, "train", "--result", result, *flags, "--freeze")), f"{name}-job", out_dir)
    fetch = run_measured(tiers, tiers.trainer_command(python(
        ALL_IN_COS, "fetch", "--result", result, "--model", where["model"],
        "--freeze_idx", freeze)), f"{name}-fetch", out_dir)
    metrics, got = job.metrics, fetch.metrics
    train = metrics["epochs"][-1]["train"]
    epochs = len(metrics["epochs"])
    epoch_s = train["time_s"] + got["fetch_s"] / epochs
    # The job ran in the storage tier: its own CPU is the storage tier's.
    combined = replace(
        job, run_s=job.run_s + fetch.run_s,
        to_trainer=_sum(job.to_trainer, fetch.to_trainer),
        to_storage=_sum(job.to_storage, fetch.to_storage),
        storage_cpu_s=job.storage_cpu_s + job.command_cpu_s + fetch.storage_cpu_s,
        command_cpu_s=fetch.command_cpu_s)
    return _record(
        combined, where, shaped=tiers.shaped,
        split=0, freeze=metrics["freeze"], epoch_s=epoch_s,
        epoch_times_s=[e["time_s"] + got["fetch_s"] / epochs for e in metrics["epochs"]],
        trainer_bytes=got["bytes"], raw_shard_bytes=metrics["raw_shard_bytes"],
        trainer_compute_s=0.0, trainer_wait_s=epoch_s,
        storage_compute_s=train["compute_s"], storage_wait_s=train["wait_s"],
        storage_frames_s=None,
        transfer_s=_transfer_s(got["bytes"], where["link"]["goodput"]), bound_s=None,
        bound_ratio=None, accuracy=metrics["accuracy"],
        train_samples=metrics["samples"]["train"], samples_per_split={"0": train["samples"]},
        profiling_s=0.0, split_changes=None, link_estimate_mbit=None, cache_hits=None,
        runs=[f"{name}-job", f"{name}-fetch"])


def _record(measured, where, **figures):
    """A record of FIELDS: ``where`` the run's cell and round, ``figures`` plus
    what ``measured`` saw from outside.

    ``runs`` names the runs' metrics and logs in OUT/runs (NAME.json, NAME.log);
    ``trainer_cpu_s`` is the CPU of the trainer tier's command."""
    link = (None if measured.to_trainer is None
            else measured.to_trainer + measured.to_storage)
    record = {**figures, "model": where["model"], "mode": where["mode"],
              "encoding": where["encoding"], "repeat": where["repeat"],
              "bandwidth_mbit": where["link"]["rate"],
              "link_goodput_mbit": where["link"]["goodput"],
              "run_s": measured.run_s, "link_bytes": link,
              "link_bytes_to_trainer": measured.to_trainer,
              "link_bytes_to_storage": measured.to_storage,
              "storage_cpu_s": measured.storage_cpu_s,
              "trainer_cpu_s": measured.command_cpu_s}
    missing = set(FIELDS) ^ set(record)
    assert not missing, f"record fields differ from FIELDS: {sorted(missing)}"
    return {name: record[name] for name in FIELDS}


def _sum(a, b):
    return None if a is None else a + b


def _transfer_s(nbytes, goodput_mbit):
    """Time the link needs for ``nbytes`` at its measured goodput (None when unshaped)."""
    return nbytes * 8 / (goodput_mbit * 1e6) if goodput_mbit else None


def probe_link(tiers, rate, name, out_dir):
    """{"rate": rate, "goodput": the Mbit/s a GET across the link got now}; no
    goodput when unshaped (loopback has no rate to measure against)."""
    if not tiers.shaped:
        return {"rate": rate, "goodput": None}
    measured = run_measured(tiers, tiers.trainer_command(python(
        LINK_PROBE, "get", "--object", PROBE_OBJECT, "--nominal_mbit", rate)), name, out_dir)
    return {"rate": rate, "goodput": measured.metrics["goodput_mbit"]}


# -- the run --------------------------------------------------------------------------------


def load_dataset(tiers, settings):
    """Synthetic JPEG shards into Swift, from inside the storage tier (not over the link)."""
    command = tiers.storage_command([
        sys.executable, "-m", "hapi.client_setup.load", "synthetic",
        "--container", settings["container"], "--count", settings["images"],
        "--size", settings["image_size"], "--quality", settings["quality"],
        "--shard-size", settings["shard_size"], "--classes", settings["classes"]])
    subprocess.run(command, env=tiers.env(), check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL)
    subprocess.run(tiers.storage_command(python(LINK_PROBE, "put", "--object", PROBE_OBJECT)),
                   env=tiers.env(), check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL)


def warm_up(tiers, settings, model, out_dir, name):
    """One untimed HAPI request, so that no timed run pays for the proxy
    building and caching the model (its cache key does not depend on the
    split). It asks for one whole shard, so the trainer asks the storage tier
    for the batch the timed runs ask for (a quarter of the shard), and the
    storage tier measures its layer costs at that batch: every timed
    automatic run then finds them and decides before its first request."""
    freeze = zoo.MODELS[model].default_freeze
    flags = ["--dataset", settings["container"], "--model", model, "--weights", "seed:0",
             "--batch_size", 1, "--end", settings["shard_size"], "--holdout", 0,
             "--threads", settings["threads"],
             "--cpuonly", "--no-progress", *mode_flags("hapi_freeze", freeze)]
    run_measured(tiers, tiers.trainer_command(python(TRAINER, *flags)), name, out_dir)


def run_all(settings, out_dir, log=say):
    """Every round x model x bandwidth x (mode, encoding); returns the results document.

    Rounds outermost: each cell runs once per round, so the repeats of a cell
    are spread over the whole run rather than taken back to back."""
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "settings": settings, "setup": None, "results": [],
           "cells": None, "summary": None}
    with TwoTier(out_dir, settings["bandwidths"][-1], network=settings["network"],
                 threads=settings["threads"], link=settings["link"], log=log) as tiers:
        doc["setup"] = tiers.describe()
        load_dataset(tiers, settings)
        for repeat in range(1, settings["repeats"] + 1):
            for model in settings["models"]:
                tiers.set_rate(max(settings["bandwidths"]))
                warm_up(tiers, settings, model, out_dir, f"{model}-warm-up-r{repeat}")
                for rate in settings["bandwidths"]:
                    tiers.set_rate(rate)
                    link = probe_link(tiers, rate, f"{model}-{rate}mbit-link-r{repeat}",
                                      out_dir)
                    for mode, encoding in cells(settings):
                        record = run_mode(tiers, settings, model, mode, encoding, repeat,
                                          link, out_dir)
                        doc["results"].append(record)
                        log(_progress_line(record, settings["repeats"]))
                        write_json(doc, out_dir / RESULTS)
    doc["cells"] = summarise_cells(doc["results"])
    doc["summary"] = summarise(doc["results"], settings["encodings"])
    write_json(doc, out_dir / RESULTS)
    return doc


def write_json(doc, path):
    """Replace ``path`` at once: an interrupted run leaves the last complete document."""
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(doc, indent=1))
    os.replace(partial, path)


def write_results(doc, out, name):
    """``doc`` as ``out/NAME.json`` (the folder made if need be), said on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    write_json(doc, path)
    print(f"wrote {path}")


def _progress_line(r, repeats):
    encoding = f" {r['encoding']}" if r["encoding"] else ""
    return (f"[{r['repeat']}/{repeats}] {r['model']} {r['bandwidth_mbit']} Mbit/s "
            f"{r['mode']}{encoding}: split {r['split']}, epoch {r['epoch_s']:.1f} s, "
            f"{_mb(_bytes(r))} MB")


# -- medians, summary, table, plots ---------------------------------------------------------


def _bytes(record):
    """Bytes across the link when it is counted, else the trainer's own count."""
    return record["link_bytes"] if record["link_bytes"] is not None else record["trainer_bytes"]


def _mb(nbytes):
    return f"{nbytes / 1e6:.2f}"


def spread(values):
    """{"median", "min", "max"} of the values that are not None (all None when none are)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def with_spread(values):
    """The values and their :func:`spread`."""
    return {"values": values, **spread(values)}


def _cell_key(record):
    return record["model"], record["bandwidth_mbit"], record["mode"], record["encoding"]


def summarise_cells(results):
    """One entry per (model, bandwidth, mode, encoding), in the order first run:
    the repeats' medians and min-max spreads of CELL_FIGURES, their splits and runs."""
    groups = {}
    for record in results:
        groups.setdefault(_cell_key(record), []).append(record)
    cells_out = []
    for (model, rate, mode, encoding), records in groups.items():
        figures = {name: spread(_bytes(r) if name == "bytes" else r[name] for r in records)
                   for name in CELL_FIGURES}
        cells_out.append({"model": model, "bandwidth_mbit": rate, "mode": mode,
                          "encoding": encoding, "repeats": len(records),
                          "splits": [r["split"] for r in records], **figures,
                          "runs": [run for r in records for run in r["runs"]]})
    return cells_out


def _find(results, model, mode, rate, encoding, repeat):
    """The record of that cell in that round; None if it was not run."""
    key = (model, rate, mode, encoding if mode in FEATURE_MODES else None)
    return next((r for r in results if _cell_key(r) == key and r["repeat"] == repeat), None)


def _ratio(results, model, rate, modes, encoding, key):
    """key(modes[0]) / key(modes[1]) within each round, as a spread over the rounds."""
    per_round = []
    for repeat in sorted({r["repeat"] for r in results}):
        num, den = (_find(results, model, mode, rate, encoding, repeat) for mode in modes)
        if num and den and key(den):
            per_round.append(key(num) / key(den))
    return spread(per_round)


def _epoch(record):
    return record["epoch_s"]


def _bound_max(results, model, encoding):
    """The worst HAPI epoch / bound of each round, as a spread over the rounds."""
    per_round = []
    for repeat in sorted({r["repeat"] for r in results}):
        bounds = [r["bound_ratio"] for r in results
                  if (r["model"], r["encoding"], r["repeat"]) == (model, encoding, repeat)
                  and r["mode"] in ("hapi_auto", "hapi_freeze") and r["bound_ratio"] is not None]
        if bounds:
            per_round.append(max(bounds))
    return spread(per_round)


def _with_profiling(record):
    """A one-epoch run's time as its user waits for it: the epoch and, for the
    automatic split, its measurements before the first request."""
    return record["epoch_s"] + (record["profiling_s"] or 0.0)


def auto_over_best(results, model, rate, encoding):
    """The automatic run (its profiling included) over the faster of vanilla
    and split = freeze, within each round, as a spread over the rounds."""
    per_round = []
    for repeat in sorted({r["repeat"] for r in results}):
        auto = _find(results, model, "hapi_auto", rate, encoding, repeat)
        others = [_find(results, model, mode, rate, encoding, repeat)
                  for mode in ("vanilla", "hapi_freeze")]
        others = [_epoch(r) for r in others if r]
        if auto and others:
            per_round.append(_with_profiling(auto) / min(others))
    return spread(per_round)


def _split_changes_max(results, model, encoding):
    """The most changes of split in one epoch of one automatic run."""
    counts = [count for r in results if (r["model"], r["mode"], r["encoding"])
              == (model, "hapi_auto", encoding) for count in r.get("split_changes") or ()]
    return max(counts) if counts else None


def _targets(results, model, low, high, encoding):
    """The target figures of one model and encoding: each a spread over the rounds."""
    return {
        "speedup_auto_vs_vanilla_lowest_bw": _ratio(
            results, model, low, ("vanilla", "hapi_auto"), encoding, _epoch),
        "bytes_vanilla_over_freeze": _ratio(
            results, model, low, ("vanilla", "hapi_freeze"), encoding, _bytes),
        "pipeline_bound_ratio_max": _bound_max(results, model, encoding),
        "auto_over_vanilla_highest_bw": _ratio(
            results, model, high, ("hapi_auto", "vanilla"), encoding, _epoch),
    }


TARGETS = ("speedup_auto_vs_vanilla_lowest_bw", "bytes_vanilla_over_freeze",
           "pipeline_bound_ratio_max", "auto_over_vanilla_highest_bw")


def summarise(results, encodings):
    """The target figures per model (None where a mode was not run).

    Each target is the median over the rounds of its value within a round,
    with ``TARGET_spread`` its [min, max]; the top-level figures are those of
    the first encoding (``encoding``), ``by_encoding`` has every encoding's."""
    summary = {}
    for model in dict.fromkeys(r["model"] for r in results):
        rates = sorted({r["bandwidth_mbit"] for r in results if r["model"] == model})
        low, high = rates[0], rates[-1]
        by_encoding = {}
        for encoding in encodings:
            targets = _targets(results, model, low, high, encoding)
            by_rate = {str(rate): auto_over_best(results, model, rate, encoding)
                       for rate in rates}
            medians = [c["median"] for c in by_rate.values() if c["median"] is not None]
            by_encoding[encoding] = {
                **{name: targets[name]["median"] for name in TARGETS},
                **{f"{name}_spread": [targets[name]["min"], targets[name]["max"]]
                   for name in TARGETS},
                "auto_over_best_max": max(medians) if medians else None,
                "auto_over_best": by_rate,
                "split_changes_per_epoch_max": _split_changes_max(results, model, encoding)}
        summary[model] = {**by_encoding[encodings[0]], "encoding": encodings[0],
                          "lowest_bw_mbit": low, "highest_bw_mbit": high,
                          "by_encoding": by_encoding}
    return summary


def format_table(doc):
    """One row per cell: medians, the epoch time's min-max, and the summary lines."""
    head = (f"{'model':<19}{'Mbit/s':>7} {'mode':<16}{'encoding':<13}{'split':>6}{'epoch s':>9}"
            f"{'min-max':>14}{'link MB':>9}{'own MB':>8}{'T comp':>8}{'T wait':>8}"
            f"{'S comp':>8}{'S wait':>8}{'bound x':>8}{'acc':>6}")
    lines = [head, "-" * len(head)]
    for c in doc["cells"]:
        epoch = c["epoch_s"]
        link = _mb(c["link_bytes"]["median"]) if c["link_bytes"]["median"] is not None else "-"
        bound = _fixed(c["bound_ratio"]["median"])
        splits = "/".join(map(str, sorted(set(c["splits"]))))
        epoch_range = f"{epoch['min']:.2f}-{epoch['max']:.2f}"
        lines.append(
            f"{c['model']:<19}{c['bandwidth_mbit']:>7} {c['mode']:<16}"
            f"{c['encoding'] or '-':<13}{splits:>6}{epoch['median']:>9.2f}"
            f" {epoch_range:>13}{link:>9}"
            f"{_mb(c['trainer_bytes']['median']):>8}"
            f"{c['trainer_compute_s']['median']:>8.2f}{c['trainer_wait_s']['median']:>8.2f}"
            f"{c['storage_compute_s']['median']:>8.2f}{c['storage_wait_s']['median']:>8.2f}"
            f"{bound:>8}{_fixed(c['accuracy']['median']):>6}")
    lines.append("")
    repeats = doc["settings"]["repeats"]
    lines.append(f"medians of {repeats} round(s); ratios taken within each round, "
                 "[min-max] over the rounds")
    for model, s in (doc["summary"] or {}).items():
        for encoding, t in s["by_encoding"].items():
            lines.append(
                f"{model} {encoding}: HAPI auto vs vanilla at {s['lowest_bw_mbit']} Mbit/s "
                f"{_x(t, 'speedup_auto_vs_vanilla_lowest_bw')} faster; vanilla moves "
                f"{_x(t, 'bytes_vanilla_over_freeze')} the bytes of split = freeze; "
                f"HAPI epoch / pipeline bound <= {_x(t, 'pipeline_bound_ratio_max')}; "
                f"auto / vanilla at {s['highest_bw_mbit']} Mbit/s "
                f"{_x(t, 'auto_over_vanilla_highest_bw')}; auto (its profiling included) / "
                f"the better of vanilla and freeze <= {_times(t['auto_over_best_max'])} "
                f"in every cell; at most {t['split_changes_per_epoch_max']} change(s) of "
                "split per epoch")
    if not doc["setup"]["shaped"]:
        lines.append(f"UNSHAPED run on loopback ({doc['setup']['note']}): bandwidths were "
                     "not applied; 'own MB' is the trainer's count")
    return "\n".join(lines)


def _fixed(value):
    return f"{value:.2f}" if value is not None else "-"


def _times(value):
    return f"{value:.2f}x" if value is not None else "-"


def _x(targets, name):
    """``median x [min-max]`` of a target, or ``-``."""
    value, (low, high) = targets[name], targets[f"{name}_spread"]
    if value is None:
        return "-"
    return _times(value) + (f" [{low:.2f}-{high:.2f}]" if low != high else "")


def _series(cells_of_model, modes):
    """The (mode, encoding) pairs of ``modes`` that were run, in run order, and their label."""
    pairs = dict.fromkeys((c["mode"], c["encoding"]) for c in cells_of_model
                          if c["mode"] in modes)
    return [(mode, encoding, f"{mode} {encoding}" if encoding else mode)
            for mode, encoding in pairs]


def _error_bar(figures, scale=1.0):
    """(median, [[below], [above]]) of a {"median", "min", "max"} for matplotlib."""
    median = figures["median"] * scale
    return median, [[median - figures["min"] * scale], [figures["max"] * scale - median]]


def plot(doc, out_dir):
    """epoch_time.png, bytes.png and split.png, medians with min-max error bars;
    returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    models = doc["settings"]["models"]
    paths = []
    for name, draw in (("epoch_time", _plot_epoch_time), ("bytes", _plot_bytes),
                       ("split", _plot_split)):
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5),
                                 squeeze=False)
        for ax, model in zip(axes[0], models, strict=True):
            draw(ax, [c for c in doc["cells"] if c["model"] == model])
            ax.set_title(model)
        title = f"medians of {doc['settings']['repeats']} round(s), bars: min-max"
        if not doc["setup"]["shaped"]:
            title = f"UNSHAPED (loopback): bandwidths not applied; {title}"
        fig.suptitle(title, fontsize="medium")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_epoch_time(ax, model_cells):
    for mode, encoding, label in _series(model_cells, MODES):
        points = sorted((c["bandwidth_mbit"], *_error_bar(c["epoch_s"])) for c in model_cells
                        if (c["mode"], c["encoding"]) == (mode, encoding))
        rates, medians, bars = zip(*points, strict=True)
        ax.errorbar(rates, medians, yerr=[[b[0][0] for b in bars], [b[1][0] for b in bars]],
                    marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")  # ALL_IN_COS's download can dwarf the rest
    ax.set_xlabel("bandwidth (Mbit/s)")
    ax.set_ylabel("epoch time (s)")
    ax.legend(fontsize="x-small")


def _plot_bytes(ax, model_cells):
    series = _series(model_cells, MODES)
    rates = sorted({c["bandwidth_mbit"] for c in model_cells})
    width = 0.8 / len(rates)
    for i, rate in enumerate(rates):
        bars = [next((_error_bar(c["bytes"], 1e-6) for c in model_cells
                      if (c["bandwidth_mbit"], c["mode"], c["encoding"]) == (rate, mode, enc)),
                     (0.0, [[0.0], [0.0]]))
                for mode, enc, _label in series]
        ax.bar([s + i * width for s in range(len(series))], [b[0] for b in bars], width,
               yerr=[[b[1][0][0] for b in bars], [b[1][1][0] for b in bars]], capsize=2,
               label=f"{rate} Mbit/s")
    ax.set_xticks([s + width * (len(rates) - 1) / 2 for s in range(len(series))],
                  [label for _mode, _enc, label in series], rotation=30, ha="right",
                  fontsize="x-small")
    ax.set_yscale("log")
    ax.set_ylabel("MB across the link per run")
    ax.legend(fontsize="small")


def _plot_split(ax, model_cells):
    for _mode, encoding, label in _series(model_cells, ("hapi_auto",)):
        points = sorted((c["bandwidth_mbit"], *_error_bar(c["split"])) for c in model_cells
                        if (c["mode"], c["encoding"]) == ("hapi_auto", encoding))
        rates, medians, bars = zip(*points, strict=True)
        ax.errorbar(rates, medians, yerr=[[b[0][0] for b in bars], [b[1][0] for b in bars]],
                    marker="o", capsize=3, label=f"{label}: chosen split")
    freeze = zoo.MODELS[model_cells[0]["model"]].default_freeze
    ax.axhline(freeze, linestyle="--", color="grey", label="freeze index")
    ax.set_xscale("log")
    ax.set_xlabel("bandwidth (Mbit/s)")
    ax.set_ylabel("split index")
    ax.legend(fontsize="small")


# -- command line ------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a few minutes a round: {PRESETS['quick']} (flags given win)")
    parser.add_argument("--models", nargs="+", choices=sorted(zoo.MODELS),
                        help=f"default: {PRESETS['full']['models']}")
    parser.add_argument("--bandwidths", nargs="+", type=int, metavar="MBIT",
                        help=f"link rates in Mbit/s (default: {PRESETS['full']['bandwidths']})")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--encodings", nargs="+", type=parse_encoding, metavar="DTYPE[+zstd]",
                        help="wire encodings of the HAPI modes' features, each the trainer's "
                        "--wire_dtype with +zstd for --wire_encoding zstd: "
                        f"{', '.join(names.WIRE_DTYPES)}, or auto: chosen with the split "
                        "(the automatic mode; a fixed split takes float32) (default: "
                        f"{' '.join(DEFAULT_ENCODINGS)})")
    parser.add_argument("--wire_dtype", choices=names.WIRE_DTYPES,
                        help="the same as --encodings WIRE_DTYPE")
    parser.add_argument("--split_tie", type=float, default=names.SPLIT_TIE, metavar="SHARE",
                        help="the automatic mode's --split_tie: predictions within this share "
                             "of the fastest are won by the fewest bytes (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds over the whole grid; medians and min-max (default: 3)")
    parser.add_argument("--images", type=int, help="synthetic images in the data set")
    parser.add_argument("--shard_size", type=int, help="images per shard")
    parser.add_argument("--batch_size", type=int, help="training batch size")
    parser.add_argument("--epochs", type=int, help="epochs per run")
    parser.add_argument("--cache", action="store_true",
                        help="the trainer keeps the features in a feature cache of its own "
                        "per run (--cache_dir), so that epochs after the first read them "
                        "from its disk; with --epochs 2 or more")
    parser.add_argument("--image_size", type=synthetic_size, default=IMAGENET_LIKE,
                        metavar="N|imagenet",
                        help="JPEG side in pixels, or 'imagenet': ImageNet-like photos of "
                        "300-500 x 250-450 px, about 110 KB each (default: imagenet)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--holdout", type=float, default=0.2,
                        help="share of the shards held out for the accuracy")
    add_two_tier_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("bench-results/tl"))
    parser.add_argument("--resummarise", type=Path, metavar="RESULTS_JSON",
                        help="run nothing: recompute an earlier run's summary, table and "
                             "plots (and the figures read from its runs' metrics) in place")
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.bandwidths) <= 0 or args.images < 1 or args.shard_size < 1 or args.repeats < 1:
        parser.error("--bandwidths, --images, --shard_size and --repeats must be positive")
    if args.wire_dtype and args.encodings:
        parser.error("give --encodings or --wire_dtype, not both")
    if args.cache and args.epochs < 2:
        parser.error("--cache helps from the second epoch on: give --epochs 2 or more")
    args.encodings = list(dict.fromkeys(
        args.encodings or ([args.wire_dtype] if args.wire_dtype else DEFAULT_ENCODINGS)))
    return args


def settings_from(args):
    size = args.image_size if args.image_size == IMAGENET_LIKE else f"{args.image_size}px"
    return {"models": args.models, "bandwidths": sorted(args.bandwidths), "modes": args.modes,
            "encodings": args.encodings, "split_tie": args.split_tie, "repeats": args.repeats,
            "images": args.images, "shard_size": args.shard_size,
            "batch_size": args.batch_size, "epochs": args.epochs, "cache": args.cache,
            "image_size": args.image_size, "quality": args.quality, "classes": args.classes,
            "holdout": args.holdout, "threads": args.threads,
            "network": args.network, "link": args.link, "weights": "seed:0",
            "container": f"hapi-bench-{size}-{args.images}"}


def resummarise(path):
    """An earlier run's results document with the figures read from its
    runs' metrics (``runs/NAME.json`` beside it), its cells and its summary
    computed again by this version of the script, written back in place."""
    doc = json.loads(path.read_text())
    for index, record in enumerate(doc["results"]):
        figures = {"profiling_s": 0.0, "split_changes": None, "link_estimate_mbit": None}
        if record["mode"] != "all_in_cos":
            metrics = json.loads((path.parent / "runs" / f"{record['runs'][0]}.json").read_text())
            figures = {"profiling_s": profiling_s(metrics),
                       "split_changes": split_changes(metrics),
                       "link_estimate_mbit": link_estimate_mbit(metrics)}
        doc["results"][index] = {name: {**record, **figures}[name] for name in FIELDS}
    doc["cells"] = summarise_cells(doc["results"])
    doc["summary"] = summarise(doc["results"], doc["settings"]["encodings"])
    write_json(doc, path)
    return doc


def main(argv=None):
    args = parse_args(argv)
    began = time.monotonic()
    if args.resummarise:
        doc, out_dir = resummarise(args.resummarise), args.resummarise.parent
    else:
        out_dir = args.out.absolute()
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            doc = run_all(settings_from(args), out_dir)
        except CommandFailed as err:
            print(f"error: a run failed: {err}", file=sys.stderr)
            return 1
    print(format_table(doc))
    for path in plot(doc, out_dir):
        print(f"wrote {path}")
    print(f"wrote {out_dir / RESULTS} in {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
