"""The trainer's layer times at the training batch against times extrapolated from smaller batches.

Before its first request the trainer times every layer (``hapi.client.
autosplit.profiling.trainer_times``) and the cost model adds them up per
split. This measures, per model, what that sum predicts for an iteration at
split 0 (every frozen layer forward without gradients, the rest forward and
backward; the split whose compute the trainer does all of) when the layers
are timed at the training batch itself, and when they are timed at two
smaller batches and extrapolated (``profiling.at_batch``), against training
iterations timed whole at 224 px (``allocator.iteration_s``: the loss and an SGD
step included). Each repeat times all three again in this process, pinned
to ``--cpu``, with freed memory kept (``hapi.hostmem``) as the trainer does.

Output: a table and ``OUT/batch_times.json`` (per model: each repeat's
three times, the two predictions over the iteration, with their medians,
minima and maxima, and the last repeat's per-layer times both ways).

    .venv/bin/python benchmarks/batch_times.py --models resnet50 mobilenet_v3_small --cpu 1
"""

import argparse
import os
from pathlib import Path

from allocator import iteration_s
from tl_benchmark import with_spread, write_results

FORMAT = "hapi-batch-times/1"


def _split0_s(times, freeze: int) -> float:
    """An iteration at split 0 by per-sample ``times``: the frozen layers'
    forward and the trained layers' forward and backward, the whole batch."""
    return times.batch_size * (sum(times.forward_s[:freeze]) + sum(times.train_s[freeze:]))


def measure(name: str, batch: int, anchors: tuple[int, int], repeats: int) -> dict:
    import torch

    from hapi.client.autosplit import profiling
    from hapi.zoo import build_model

    model = build_model(name, seed=0)
    freeze = model.default_freeze
    model.freeze(freeze)
    generator = torch.Generator().manual_seed(0)

    def timed_at(samples: int):
        inputs = torch.randn(samples, 3, 224, 224, generator=generator)
        return profiling.measure_trainer_layers(model, inputs, freeze)

    rounds = []
    for _ in range(repeats):
        at_batch = timed_at(batch)
        large, small = timed_at(max(anchors)), timed_at(min(anchors))
        extrapolated = profiling.at_batch(small, large, batch)
        rounds.append({"at_batch_s": _split0_s(at_batch, freeze),
                       "extrapolated_s": _split0_s(extrapolated, freeze),
                       "iteration_s": iteration_s(model, freeze, batch)})
    figures = {key: with_spread([r[key] for r in rounds])
               for key in ("at_batch_s", "extrapolated_s", "iteration_s")}
    for key in ("at_batch_s", "extrapolated_s"):
        ratios = [r[key] / r["iteration_s"] for r in rounds]
        figures[key.replace("_s", "_over_iteration")] = with_spread(ratios)
    figures["layers"] = [{"name": layer, "at_batch_s": a * batch, "extrapolated_s": e * batch}
                         for layer, a, e in zip(model.layer_names, at_batch.forward_s,
                                                extrapolated.forward_s, strict=True)]
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v3_small"])
    parser.add_argument("--batch", type=int, default=32, help="the training batch")
    parser.add_argument("--anchors", type=int, nargs=2, default=[8, 2],
                        help="the two smaller batches extrapolated from")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--cpu", type=int, help="pin this process to this core")
    parser.add_argument("--out", type=Path, default=Path("bench-results/batch-times"))
    args = parser.parse_args(argv)
    if not min(args.anchors) < max(args.anchors) < args.batch:
        parser.error("--anchors must be two different batches below --batch")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    import torch

    from hapi import hostmem
    hostmem.keep_freed_memory()
    torch.set_num_threads(args.threads)
    doc = {"format": FORMAT, "settings": {**vars(args), "out": None},
           "allocator": hostmem.allocator(), "results": {}}
    print(f"{'model':<20}{'iteration s':>24}{'timed at the batch':>26}{'extrapolated':>26}")
    for name in args.models:
        figures = measure(name, args.batch, tuple(args.anchors), args.repeats)
        doc["results"][name] = figures
        cells = [f"{figures['iteration_s']['median']:.3f} [{figures['iteration_s']['min']:.3f}-"
                 f"{figures['iteration_s']['max']:.3f}]"]
        for key in ("at_batch_over_iteration", "extrapolated_over_iteration"):
            ratio = figures[key]
            cells.append(f"{ratio['median']:.2f}x [{ratio['min']:.2f}-{ratio['max']:.2f}]")
        print(f"{name:<20}{cells[0]:>24}{cells[1]:>26}{cells[2]:>26}")
    write_results(doc, args.out, "batch_times")


if __name__ == "__main__":
    main()
