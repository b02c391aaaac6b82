"""The trainer's speed read in a fresh process, with glibc's default
allocator and with freed memory kept (``hapi.hostmem.keep_freed_memory``).

Before its first request the trainer times a few passes of its first frozen
layers and divides them by the same passes timed when its layer times were
measured and cached (``hapi.client.autosplit.profiling.trainer_speed``): on
an unchanged host the ratio should read 1. For each model and allocator this
starts one process that measures the times and their passes into an empty
cache, then ``--processes`` fresh ones that read the speed from it, as the
trainer's later runs do, each also timing training iterations at split 0
(the frozen layers' forward without gradients, then the rest forward,
backward and an SGD step), the median after two.

Output: a table and ``OUT/allocator.json`` (per model and allocator: what
the measuring process and each fresh one read, and the fresh processes'
passes, speed and iteration time with their medians, minima and maxima).

    .venv/bin/python benchmarks/allocator.py --models resnet50 resnet18 --cpu 1
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tl_benchmark import with_spread, write_results

FORMAT = "hapi-allocator/1"
ALLOCATORS = ("default", "freed memory kept")
ITERATIONS = 8
UNTIMED_ITERATIONS = 2


def child(spec: dict) -> dict:
    """In this (fresh) process: the trainer's speed read against ``spec``'s
    cache (measured into it when empty) and its iterations' time."""
    if spec["cpu"] is not None:
        os.sched_setaffinity(0, {spec["cpu"]})
    import torch

    from hapi import hostmem
    from hapi.client.autosplit import profiling
    from hapi.client.autosplit.profilecache import TrainerTimesCache
    from hapi.zoo import build_model

    if spec["allocator"] == "freed memory kept" and not hostmem.keep_freed_memory():
        raise SystemExit("error: this C library is not glibc: freed memory cannot be kept")
    torch.set_num_threads(spec["threads"])
    model = build_model(spec["model"], seed=0)
    freeze = model.default_freeze
    model.freeze(freeze)
    cache, shape, cpu = TrainerTimesCache(spec["cache"]), (3, 224, 224), torch.device("cpu")
    times, cached = profiling.trainer_times(model, shape, freeze, spec["batch"], cpu, 0, cache)
    speed = profiling.trainer_speed(model, shape, freeze, times, cpu, 0, cache,
                                    times_cached=cached)
    passes = cache.get(profiling.speed_reference_key(model, shape, freeze, times.batch_size,
                                                     cpu))
    return {"times": "cached" if cached else "measured", "speed": speed,
            "reference_passes_s": passes["seconds"], "passes_s": speed * passes["seconds"],
            "iteration_s": iteration_s(model, freeze, spec["batch"])}


def iteration_s(model, freeze: int, batch: int) -> float:
    """The median time of a training iteration at split 0 on random images:
    the frozen layers without gradients, the rest trained."""
    import torch

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01,
                                momentum=0.9)
    seconds = []
    for _ in range(ITERATIONS):
        began = time.perf_counter()
        with torch.no_grad():
            features = model(images, 0, freeze)
        loss = torch.nn.functional.cross_entropy(model(features, freeze, len(model.layers)),
                                                 labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds[UNTIMED_ITERATIONS:])


def in_fresh_process(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise SystemExit(f"error: {spec['model']} with the {spec['allocator']} allocator: "
                         f"{done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--batch", type=int, default=8, help="the training batch")
    parser.add_argument("--processes", type=int, default=5,
                        help="fresh processes that read the speed, per model and allocator")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--cpu", type=int, help="pin every process to this core")
    parser.add_argument("--out", type=Path, default=Path("bench-results/allocator"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    doc = {"format": FORMAT, "settings": {**vars(args), "out": None}, "results": {}}
    print(f"{'model':<20}{'allocator':<19}{'passes ms then':>15}{'now: median [min-max]':>23}"
          f"{'speed read':>20}{'iteration s':>20}")
    for name in args.models:
        doc["results"][name] = {}
        for allocator in ALLOCATORS:
            with tempfile.TemporaryDirectory() as cache:
                spec = {"model": name, "allocator": allocator, "cache": cache,
                        "batch": args.batch, "threads": args.threads, "cpu": args.cpu}
                measured = in_fresh_process(spec)
                fresh = [in_fresh_process(spec) for _ in range(args.processes)]
            figures = {"measuring_process": measured, "fresh_processes": fresh,
                       **{key: with_spread([run[key] for run in fresh])
                          for key in ("passes_s", "speed", "iteration_s")}}
            doc["results"][name][allocator] = figures
            passes, speed, iteration = (figures[key] for key in
                                        ("passes_s", "speed", "iteration_s"))
            print(f"{name:<20}{allocator:<19}{measured['reference_passes_s'] * 1e3:>15.1f}"
                  f"{passes['median'] * 1e3:>9.1f} [{passes['min'] * 1e3:.1f}-"
                  f"{passes['max'] * 1e3:.1f}]"
                  f"{speed['median']:>9.2f} [{speed['min']:.2f}-{speed['max']:.2f}]"
                  f"{iteration['median']:>9.3f} [{iteration['min']:.3f}-"
                  f"{iteration['max']:.3f}]")
    write_results(doc, args.out, "allocator")


if __name__ == "__main__":
    main()
