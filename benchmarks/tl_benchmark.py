"""Transfer learning on a shaped network: vanilla, HAPI and ALL_IN_COS compared (issue 6).

Builds the two-tier set-up of ``benchmarks/shaped.py`` (Swift with the HAPI
filter in a network namespace behind a tc-shaped veth, the trainer in
another, one core and one torch thread each), puts synthetic 224 px JPEG
shards into Swift, and for every model and bandwidth runs the real trainer
command, ``client/main.py``, in each mode:

- ``vanilla``: split 0; raw shards cross the link, every layer runs on the
  trainer (the same frozen layers, the same training);
- ``hapi_auto``: ``--freeze`` alone, the trainer's automatic split selection;
- ``hapi_freeze``: split = freeze index, every frozen layer runs in storage;
- ``hapi_sequential``: split = freeze index with ``--sequential``, no overlap
  between the tiers (what pipelining buys);
- ``all_in_cos``: the whole job runs in the storage tier
  (``benchmarks/all_in_cos.py train``), then the trainer downloads the
  trained layers across the link (``all_in_cos.py fetch``).

Each run records the epoch time, the bytes across the link (the veth's
counters) and the trainer's own count, the time each tier computed and
waited, the chosen split, the held-out accuracy, and the bound
max(storage compute, transfer, trainer compute) of a pipelined HAPI run.
The transfer counts at the link's goodput, measured at each rate in the same
run (``benchmarks/link_probe.py``: a timed GET across the link), as a tbf
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
import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from shaped import DEFAULT_LINK, NETWORKS, CommandFailed, TwoTier

from hapi import zoo

FORMAT = "hapi-tl-benchmark/1"
REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "client" / "main.py"
ALL_IN_COS = REPO / "benchmarks" / "all_in_cos.py"
LINK_PROBE = REPO / "benchmarks" / "link_probe.py"
RESULTS_CONTAINER = "hapi-results"
PROBE_OBJECT = f"{RESULTS_CONTAINER}/link-probe"
RESULTS = "results.json"

MODES = ("vanilla", "hapi_auto", "hapi_freeze", "hapi_sequential", "all_in_cos")

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
    "model", "mode", "bandwidth_mbit", "link_goodput_mbit", "shaped", "split", "freeze",
    "epoch_s", "epoch_times_s",
    "run_s", "link_bytes", "link_bytes_to_trainer", "link_bytes_to_storage", "trainer_bytes",
    "raw_shard_bytes", "trainer_compute_s", "trainer_wait_s", "storage_compute_s",
    "storage_wait_s", "storage_frames_s", "storage_cpu_s", "trainer_cpu_s", "transfer_s",
    "bound_s", "bound_ratio", "accuracy", "train_samples", "samples_per_split", "runs",
)


# Progress lines go out at once, also into a pipe or a log file.
say = functools.partial(print, flush=True)


def run_measured(tiers, command, name, out_dir, timeout_s=None):
    """``tiers.measure`` with the run's metrics and log under ``OUT/runs/NAME.*``."""
    runs = out_dir / "runs"
    return tiers.measure(command, runs / f"{name}.json", runs / f"{name}.log", timeout_s)


def trainer_flags(settings, model):
    """client/main.py's flags shared by every mode (no split, no --metrics)."""
    return ["--dataset", settings["container"], "--model", model, "--weights", "seed:0",
            "--batch_size", settings["batch_size"], "--num_epochs", settings["epochs"],
            "--holdout", settings["holdout"], "--threads", settings["threads"],
            "--wire_dtype", settings["wire_dtype"], "--cpuonly", "--no-progress"]


def mode_flags(mode, freeze):
    return {
        "vanilla": ["--freeze", "--manual_split", "--split_idx", 0],
        "hapi_auto": ["--freeze"],
        "hapi_freeze": ["--freeze", "--manual_split", "--split_idx", freeze],
        "hapi_sequential": ["--freeze", "--manual_split", "--split_idx", freeze, "--sequential"],
    }[mode]


def python(script, *args):
    return [sys.executable, str(script), *map(str, args)]


# -- one run per mode ----------------------------------------------------------------------


def run_mode(tiers, settings, model, mode, link, out_dir):
    """Run ``mode`` once at the link's current rate; return its record.

    ``link``: {"rate": the nominal Mbit/s, "goodput": the measured one, or None}."""
    rate = link["rate"]
    name = f"{model}-{rate}mbit-{mode}"
    freeze = zoo.MODELS[model].default_freeze
    flags = trainer_flags(settings, model)
    if mode == "all_in_cos":
        return all_in_cos_record(tiers, model, freeze, flags, link, name, out_dir)
    measured = run_measured(tiers, tiers.trainer_command(
        python(TRAINER, *flags, *mode_flags(mode, freeze))), name, out_dir)
    return trainer_record(measured, model, mode, link, tiers.shaped, [name])


def storage_busy_s(measured):
    """The storage tier's CPU seconds attributable to the last training pass.

    Swift's CPU over the whole run, times that pass's share of the samples
    the run fetched: each sample costs the storage tier the same whichever
    pass asks for it. Not the frames' own compute times, which add up the
    wall time of requests that shared the storage core.
    """
    epochs = measured.metrics["epochs"]
    served = sum(e["train"]["samples"] + (e["holdout"] or {"samples": 0})["samples"]
                 for e in epochs)
    return measured.storage_cpu_s * epochs[-1]["train"]["samples"] / served if served else 0.0


def trainer_record(measured, model, mode, link, shaped, runs):
    """The record of a trainer run: epoch figures from its last epoch's training pass."""
    metrics = measured.metrics
    train = metrics["epochs"][-1]["train"]
    epoch_s = train["time_s"]
    storage_compute_s = storage_busy_s(measured)
    transfer_s = _transfer_s(train["traffic"]["bytes_received"], link["goodput"])
    split = metrics["split"]
    bound_s = (max(storage_compute_s, transfer_s, train["compute_s"])
               if split and transfer_s is not None else None)
    return _record(
        measured, model=model, mode=mode, bandwidth_mbit=link["rate"],
        link_goodput_mbit=link["goodput"], shaped=shaped, split=split,
        freeze=metrics["freeze"], epoch_s=epoch_s,
        epoch_times_s=[e["time_s"] for e in metrics["epochs"]],
        trainer_bytes=metrics["bytes_received"], raw_shard_bytes=metrics["raw_shard_bytes"],
        trainer_compute_s=train["compute_s"], trainer_wait_s=train["wait_s"],
        storage_compute_s=storage_compute_s,
        storage_wait_s=max(epoch_s - storage_compute_s, 0.0),
        storage_frames_s=train["traffic"]["storage_compute_s"], transfer_s=transfer_s,
        bound_s=bound_s, bound_ratio=epoch_s / bound_s if bound_s else None,
        accuracy=metrics["accuracy"], train_samples=metrics["samples"]["train"],
        samples_per_split=metrics.get("split_selection", {}).get("samples_per_split"),
        runs=runs)


def all_in_cos_record(tiers, model, freeze, flags, link, name, out_dir):
    """ALL_IN_COS: the job in the storage tier, then the trained layers to the trainer.

    Its epoch time is the storage tier's training epoch plus the download of
    the trained layers spread over the epochs; the trainer waits all along.
    """
    result = f"{RESULTS_CONTAINER}/{name}.safetensors"
    job = run_measured(tiers, tiers.storage_command(python(
        ALL_IN_COS, "train", "--result", result, *flags, "--freeze")), f"{name}-job", out_dir)
    fetch = run_measured(tiers, tiers.trainer_command(python(
        ALL_IN_COS, "fetch", "--result", result, "--model", model, "--freeze_idx", freeze)),
        f"{name}-fetch", out_dir)
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
        combined, model=model, mode="all_in_cos", bandwidth_mbit=link["rate"],
        link_goodput_mbit=link["goodput"], shaped=tiers.shaped,
        split=0, freeze=metrics["freeze"], epoch_s=epoch_s,
        epoch_times_s=[e["time_s"] + got["fetch_s"] / epochs for e in metrics["epochs"]],
        trainer_bytes=got["bytes"], raw_shard_bytes=metrics["raw_shard_bytes"],
        trainer_compute_s=0.0, trainer_wait_s=epoch_s,
        storage_compute_s=train["compute_s"], storage_wait_s=train["wait_s"],
        storage_frames_s=None,
        transfer_s=_transfer_s(got["bytes"], link["goodput"]), bound_s=None,
        bound_ratio=None, accuracy=metrics["accuracy"],
        train_samples=metrics["samples"]["train"], samples_per_split={"0": train["samples"]},
        runs=[f"{name}-job", f"{name}-fetch"])


def _record(measured, **figures):
    """A record of FIELDS: ``figures`` plus what ``measured`` saw from outside.

    ``runs`` names the runs' metrics and logs in OUT/runs (NAME.json, NAME.log);
    ``trainer_cpu_s`` is the CPU of the trainer tier's command."""
    link = (None if measured.to_trainer is None
            else measured.to_trainer + measured.to_storage)
    record = {**figures, "run_s": measured.run_s, "link_bytes": link,
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


def warm_up(tiers, container, model, threads, out_dir):
    """One small untimed HAPI request, so that no timed run pays for the proxy
    building and caching the model (its cache key does not depend on the split)."""
    freeze = zoo.MODELS[model].default_freeze
    flags = ["--dataset", container, "--model", model, "--weights", "seed:0",
             "--batch_size", 1, "--end", 1, "--holdout", 0, "--threads", threads,
             "--cpuonly", "--no-progress", *mode_flags("hapi_freeze", freeze)]
    run_measured(tiers, tiers.trainer_command(python(TRAINER, *flags)), f"{model}-warm-up",
                 out_dir)


def run_all(settings, out_dir, log=say):
    """Every model x bandwidth x mode; returns the results document."""
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "settings": settings, "setup": None, "results": [],
           "summary": None}
    with TwoTier(out_dir, settings["bandwidths"][-1], network=settings["network"],
                 threads=settings["threads"], link=settings["link"], log=log) as tiers:
        doc["setup"] = tiers.describe()
        load_dataset(tiers, settings)
        for model in settings["models"]:
            tiers.set_rate(max(settings["bandwidths"]))
            warm_up(tiers, settings["container"], model, settings["threads"], out_dir)
            for rate in settings["bandwidths"]:
                tiers.set_rate(rate)
                link = probe_link(tiers, rate, f"{model}-{rate}mbit-link", out_dir)
                for mode in settings["modes"]:
                    record = run_mode(tiers, settings, model, mode, link, out_dir)
                    doc["results"].append(record)
                    log(_progress_line(record))
                    write_json(doc, out_dir / RESULTS)
    doc["summary"] = summarise(doc["results"])
    write_json(doc, out_dir / RESULTS)
    return doc


def write_json(doc, path):
    """Replace ``path`` at once: an interrupted run leaves the last complete document."""
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(doc, indent=1))
    os.replace(partial, path)


def _progress_line(r):
    return (f"{r['model']} {r['bandwidth_mbit']} Mbit/s {r['mode']}: split {r['split']}, "
            f"epoch {r['epoch_s']:.1f} s, {_mb(_bytes(r))} MB")


# -- summary, table, plots -------------------------------------------------------------------


def _bytes(record):
    """Bytes across the link when it is counted, else the trainer's own count."""
    return record["link_bytes"] if record["link_bytes"] is not None else record["trainer_bytes"]


def _mb(nbytes):
    return f"{nbytes / 1e6:.2f}"


def _find(results, model, mode, rate):
    return next((r for r in results if (r["model"], r["mode"], r["bandwidth_mbit"])
                 == (model, mode, rate)), None)


def _ratio(results, model, rate, modes, key):
    """key(record of modes[0]) / key(record of modes[1]); None if either is missing."""
    num, den = (_find(results, model, mode, rate) for mode in modes)
    return key(num) / key(den) if num and den and key(den) else None


def _epoch(record):
    return record["epoch_s"]


def summarise(results):
    """The issue's target figures, per model (None where a mode was not run)."""
    summary = {}
    for model in dict.fromkeys(r["model"] for r in results):
        rates = sorted({r["bandwidth_mbit"] for r in results if r["model"] == model})
        low, high = rates[0], rates[-1]
        bounds = [r["bound_ratio"] for r in results
                  if r["model"] == model and r["mode"] in ("hapi_auto", "hapi_freeze")
                  and r["bound_ratio"] is not None]
        summary[model] = {
            "speedup_auto_vs_vanilla_lowest_bw": _ratio(
                results, model, low, ("vanilla", "hapi_auto"), _epoch),
            "bytes_vanilla_over_freeze": _ratio(
                results, model, low, ("vanilla", "hapi_freeze"), _bytes),
            "pipeline_bound_ratio_max": max(bounds) if bounds else None,
            "auto_over_vanilla_highest_bw": _ratio(
                results, model, high, ("hapi_auto", "vanilla"), _epoch),
            "lowest_bw_mbit": low, "highest_bw_mbit": high,
        }
    return summary


def format_table(doc):
    head = (f"{'model':<19}{'Mbit/s':>7} {'mode':<16}{'split':>5}{'epoch s':>9}{'link MB':>9}"
            f"{'own MB':>8}{'T comp':>8}{'T wait':>8}{'S comp':>8}{'S wait':>8}{'bound x':>8}"
            f"{'acc':>6}")
    lines = [head, "-" * len(head)]
    for r in doc["results"]:
        link = _mb(r["link_bytes"]) if r["link_bytes"] is not None else "-"
        bound = f"{r['bound_ratio']:.2f}" if r["bound_ratio"] is not None else "-"
        acc = f"{r['accuracy']:.2f}" if r["accuracy"] is not None else "-"
        lines.append(
            f"{r['model']:<19}{r['bandwidth_mbit']:>7} {r['mode']:<16}{r['split']:>5}"
            f"{r['epoch_s']:>9.2f}{link:>9}{_mb(r['trainer_bytes']):>8}"
            f"{r['trainer_compute_s']:>8.2f}{r['trainer_wait_s']:>8.2f}"
            f"{r['storage_compute_s']:>8.2f}{r['storage_wait_s']:>8.2f}{bound:>8}{acc:>6}")
    lines.append("")
    for model, s in (doc["summary"] or {}).items():
        lines.append(
            f"{model}: HAPI auto vs vanilla at {s['lowest_bw_mbit']} Mbit/s "
            f"{_x(s['speedup_auto_vs_vanilla_lowest_bw'])} faster; vanilla moves "
            f"{_x(s['bytes_vanilla_over_freeze'])} the bytes of split = freeze; "
            f"HAPI epoch / pipeline bound <= {_x(s['pipeline_bound_ratio_max'])}; "
            f"auto / vanilla at {s['highest_bw_mbit']} Mbit/s "
            f"{_x(s['auto_over_vanilla_highest_bw'])}")
    if not doc["setup"]["shaped"]:
        lines.append(f"UNSHAPED run on loopback ({doc['setup']['note']}): bandwidths were "
                     "not applied; 'own MB' is the trainer's count")
    return "\n".join(lines)


def _x(value):
    return f"{value:.2f}x" if value is not None else "-"


def plot(doc, out_dir):
    """epoch_time.png, bytes.png and split.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    results, models = doc["results"], doc["settings"]["models"]
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    paths = []
    for name, draw in (("epoch_time", _plot_epoch_time), ("bytes", _plot_bytes),
                       ("split", _plot_split)):
        fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
        for ax, model in zip(axes[0], models, strict=True):
            draw(ax, [r for r in results if r["model"] == model], modes)
            ax.set_title(model)
        if not doc["setup"]["shaped"]:
            fig.suptitle("UNSHAPED (loopback): bandwidths not applied")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_epoch_time(ax, results, modes):
    for mode in modes:
        points = sorted((r["bandwidth_mbit"], r["epoch_s"]) for r in results if r["mode"] == mode)
        ax.plot(*zip(*points, strict=True), marker="o", label=mode)
    ax.set_xscale("log")
    ax.set_yscale("log")  # ALL_IN_COS's download can dwarf the rest
    ax.set_xlabel("bandwidth (Mbit/s)")
    ax.set_ylabel("epoch time (s)")
    ax.legend(fontsize="small")


def _plot_bytes(ax, results, modes):
    rates = sorted({r["bandwidth_mbit"] for r in results})
    width = 0.8 / len(rates)
    for i, rate in enumerate(rates):
        values = [_bytes(_find(results, results[0]["model"], mode, rate) or {"link_bytes": 0})
                  / 1e6 for mode in modes]
        ax.bar([m + i * width for m in range(len(modes))], values, width,
               label=f"{rate} Mbit/s")
    ax.set_xticks([m + width * (len(rates) - 1) / 2 for m in range(len(modes))], modes,
                  rotation=30, ha="right", fontsize="small")
    ax.set_yscale("log")
    ax.set_ylabel("MB across the link per run")
    ax.legend(fontsize="small")


def _plot_split(ax, results, _modes):
    auto = sorted((r["bandwidth_mbit"], r["split"]) for r in results if r["mode"] == "hapi_auto")
    if auto:
        ax.plot(*zip(*auto, strict=True), marker="o", label="hapi_auto: chosen split")
        ax.axhline(results[0]["freeze"], linestyle="--", color="grey", label="freeze index")
    ax.set_xscale("log")
    ax.set_xlabel("bandwidth (Mbit/s)")
    ax.set_ylabel("split index")
    ax.legend(fontsize="small")


# -- command line ------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a few minutes: {PRESETS['quick']} (flags given win)")
    parser.add_argument("--models", nargs="+", choices=sorted(zoo.MODELS),
                        help=f"default: {PRESETS['full']['models']}")
    parser.add_argument("--bandwidths", nargs="+", type=int, metavar="MBIT",
                        help=f"link rates in Mbit/s (default: {PRESETS['full']['bandwidths']})")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--images", type=int, help="synthetic images in the data set")
    parser.add_argument("--shard_size", type=int, help="images per shard")
    parser.add_argument("--batch_size", type=int, help="training batch size")
    parser.add_argument("--epochs", type=int, help="epochs per run")
    parser.add_argument("--image_size", type=int, default=224, help="JPEG side in pixels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--holdout", type=float, default=0.2,
                        help="share of the shards held out for the accuracy")
    parser.add_argument("--wire_dtype", default="float32",
                        choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per tier")
    parser.add_argument("--network", choices=NETWORKS, default="auto",
                        help="shaped needs root; auto falls back to loopback (default: auto)")
    parser.add_argument("--link", default=DEFAULT_LINK, metavar="SUBNET",
                        help=f"private subnet of the shaped link (default: {DEFAULT_LINK})")
    parser.add_argument("--out", type=Path, default=Path("bench-results/tl"))
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.bandwidths) <= 0 or args.images < 1 or args.shard_size < 1:
        parser.error("--bandwidths, --images and --shard_size must be positive")
    return args


def settings_from(args):
    return {"models": args.models, "bandwidths": sorted(args.bandwidths), "modes": args.modes,
            "images": args.images, "shard_size": args.shard_size,
            "batch_size": args.batch_size, "epochs": args.epochs,
            "image_size": args.image_size, "quality": args.quality, "classes": args.classes,
            "holdout": args.holdout, "wire_dtype": args.wire_dtype, "threads": args.threads,
            "network": args.network, "link": args.link, "weights": "seed:0",
            "container": f"hapi-bench-{args.image_size}px-{args.images}"}


def main(argv=None):
    args = parse_args(argv)
    out_dir = args.out.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
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
