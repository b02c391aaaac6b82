"""Automatic split selection while training: measurements in, a split out.

:class:`AutomaticSplit` is the trainer's split selector when no split is
fixed (``hapi.client.data.FixedSplit`` is the other). It measures what the
trainer can measure on its own before the first request, then learns from
every loaded shard (its frames' timings and its transfer) and lets
``hapi.client.split.AutoSplit`` decide, and re-decide on drift.
"""

import math
import statistics
import time

import torch
from swiftclient import ClientException

from hapi.client import data
from hapi.client.estimator import OnlineEstimator
from hapi.client.profiling import (
    free_memory_bytes,
    measure_copy_rate,
    measure_decode,
    measure_trainer_layers,
    profile_from_model,
)
from hapi.client.split import AutoSplit, plot_decision
from hapi.preprocess import DecodeError, preset_size


class SplitSelectionError(RuntimeError):
    """The cost model cannot choose a split for this run."""


DRIFT_THRESHOLD = 0.25  # relative change of bandwidth or storage speed that re-decides
DRIFT_SPREAD_FACTOR = 2.0  # ... if also this many times the observations' own scatter
MARGIN = 0.05  # a new split must be predicted this much faster to replace the one in use
DRIFT_WINDOW = 8  # drift is judged on up to this many observations since the last decision
DRIFT_MIN_OBSERVATIONS = 4  # ... once there are at least this many
PACED = 1.25  # link time this much above the request's storage compute: the link paced it
DECODE_PROBE_SAMPLES = 32  # images of the probe shard decoded to time vanilla's decode
STEP_SAMPLES = 16  # optimizer steps timed for the profile's trainer_step_s


class LinkClock:
    """Feeds the requests' :class:`hapi.client.data.Transfer` to an estimator,
    in the order they were sent, as link time.

    A request's latency is its wait for the response headers less the
    storage compute before them (the first frame). Its link time is the part
    of its body's interval (headers to last byte) not already covered by the
    bodies before it: requests in flight together share the link, so their
    bytes count over the union of their intervals, not over each interval.
    That time measures the link only when the link paced it, when it was
    clearly longer than the storage tier's compute for the request;
    otherwise the transfer hid behind the compute (its time is the storage
    tier's, and the bandwidth is only known to be higher), and it is not
    counted.
    """

    def __init__(self, estimator):
        self.estimator = estimator
        self.covered_until = -math.inf

    def observe(self, transfer):
        self.estimator.observe_latency(
            transfer.answered_at - transfer.sent_at - transfer.storage_early_s)
        link_s = transfer.done_at - max(transfer.answered_at, self.covered_until)
        self.covered_until = max(self.covered_until, transfer.done_at)
        if link_s > PACED * transfer.storage_s:
            self.estimator.observe_transfer(transfer.nbytes, link_s)


def summed_timings(frames):
    """The ``timings`` of frames of one split, added up."""
    layers = zip(*(frame.timings.get("layers_s", ()) for frame in frames), strict=True)
    return {"decode_s": sum(frame.timings.get("decode_s", 0.0) for frame in frames),
            "layers_s": [sum(times) for times in layers],
            "to_wire_s": sum(frame.timings.get("to_wire_s", 0.0) for frame in frames)}


def measure_profile(model, config, plan, conn, link):
    """What the trainer measures before its first request, as a
    :class:`hapi.client.profiling.Profile`: every layer's time here at the
    training batch, the boundary sizes, the bytes per raw sample, vanilla's
    decode time (on a raw shard of median size, downloaded once; its transfer
    goes to ``link`` and gives the first bandwidth), the cost of copying
    received features, free memory. Returns (profile, what the probe cost)."""
    side = preset_size(config.preset)
    input_shape = (3, side, side)
    device = torch.device(config.device)
    inputs = torch.randn(config.batch_size, *input_shape,
                         generator=torch.Generator().manual_seed(config.seed))
    trainer = measure_trainer_layers(model, inputs.to(device), config.freeze)
    refs = plan.train + plan.holdout
    probe = sorted(refs, key=lambda ref: ref.bytes)[len(refs) // 2]  # a typical shard
    try:
        samples, transfer = data.raw_samples(conn, config.container, probe)
    except ClientException as err:
        raise data.storage_error(err, config.container, probe.name) from None
    link.observe(transfer)
    images = [sample.image for sample in samples[:DECODE_PROBE_SAMPLES]]
    try:
        decode_s, _ = measure_decode(images, config.preset, config.model)
    except DecodeError as err:
        raise data.decode_error(err, config.container, probe.name, samples) from None
    profile = profile_from_model(
        model, input_shape=input_shape, freeze=config.freeze, batch_size=config.batch_size,
        trainer=trainer, raw_bytes=sum(r.bytes for r in refs) / sum(r.samples for r in refs),
        bandwidth=link.estimator.bandwidth, wire_dtype=config.wire_dtype, trainer_decode_s=decode_s,
        trainer_copy_s_per_byte=measure_copy_rate(wire_dtype=config.wire_dtype),
        samples_per_request=round(sum(r.samples for r in refs) / len(refs)),
        storage_batch=config.storage_batch, prefetch_depth=config.prefetch,
        trainer_free_bytes=free_memory_bytes(device),
        trainer_host_free_bytes=free_memory_bytes("cpu") if device.type == "cuda" else None,
        epoch_samples=plan.train_samples)
    return profile, {"probe_shard": probe.name, "probe_bytes": transfer.nbytes}


class AutomaticSplit:
    """Chooses the split of each request while the run trains (``hapi.client.split``).

    Before the first request it measures what the trainer can measure on its
    own (:func:`measure_profile`). The run starts at the freeze index, so
    that the first frames time every frozen layer on the storage tier; those
    iterations train like any other. Every shard then feeds the estimator
    (its frames' timings and its transfer), and ``AutoSplit.update`` makes
    the first decision within a bounded number of shards and re-decides when
    the bandwidth or the storage tier's speed drifts. Each decision is
    logged as a table. Its ``split`` applies to the requests still to send.
    """

    automatic = True

    def __init__(self, model, config, plan, conn, log=print):
        began = time.perf_counter()
        estimator = OnlineEstimator(min_observations=DRIFT_MIN_OBSERVATIONS,
                                    drift_window=DRIFT_WINDOW,
                                    spread_factor=DRIFT_SPREAD_FACTOR)
        self.link = LinkClock(estimator)
        profile, probe = measure_profile(model, config, plan, conn, self.link)
        self.auto = AutoSplit(profile, estimator=estimator, epoch_samples=plan.train_samples,
                              drift_threshold=DRIFT_THRESHOLD, margin=MARGIN)
        self.profiling = {**probe, "seconds": time.perf_counter() - began}
        self.step_times = []
        self.log = log

    @property
    def split(self):
        return self.auto.split

    @property
    def wants_step_times(self):
        return len(self.step_times) < STEP_SAMPLES

    def observe_step(self, seconds):
        """One iteration's loss and optimizer step, besides the layers."""
        self.step_times.append(seconds)
        self.auto.profile.trainer_step_s = statistics.median(self.step_times)

    def observe(self, shard):
        """Learn from a loaded shard, then decide or re-decide when it is time."""
        if shard.frames:
            # One observation per shard: per-sample times over all its frames,
            # so that a small last frame does not weigh like a full one.
            features = sum(frame.feature_bytes for frame in shard.frames)
            samples = sum(frame.samples for frame in shard.frames)
            self.auto.estimator.observe_frame(summed_timings(shard.frames), samples, features)
            self.auto.profile.frame_overhead_bytes = (shard.bytes_received - features) / samples
        self.link.observe(shard.transfer)
        decisions = len(self.auto.decisions)
        try:
            self.auto.update()
        except ValueError as err:
            raise SplitSelectionError(f"automatic split selection: {err} (choose a split "
                                      "with --manual_split --split_idx N)") from None
        if len(self.auto.decisions) > decisions:
            step = self.auto.history[-1]
            self.log(f"split selection after {step['shard']} shard(s), {step['why']}: split "
                     f"{step['from']} -> {step['to']}\n{self.auto.decision.format_table()}")

    def report(self):
        """The decision (its table too), how it came about, and what it was made from."""
        decision = self.auto.decision
        return {"automatic": True, "split": self.split,
                "decision": decision.to_dict() if decision else None,
                "table": decision.format_table() if decision else None,
                "history": self.auto.history, "profiling": self.profiling,
                "profile": self.auto.current_profile().to_dict()}

    def plot(self, path):
        """Draw the last decision to ``path``; False when none was made yet."""
        if self.auto.decision is None:
            return False
        plot_decision(self.auto.decision, path, self.auto.current_profile())
        return True
