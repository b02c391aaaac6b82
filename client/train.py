"""The compute tier's training loop: layers [split, end) run on the trainer.

With split ``s`` and freeze index ``f`` (``s <= f``) the storage tier sends
the output of layers [0, s) (or, for ``s = 0``, the raw shards are
preprocessed here); the trainer runs layers [s, f) frozen (eval mode, no
gradients), then layers [f, end) in training mode and trains those. The
optimizer always sees batches of the user's batch size (see
``hapi.client.data``).

The split is fixed (``--manual_split``) or chosen while training
(``hapi.client.autosplit.AutomaticSplit``): the run starts at ``f``, and a
decision made on what the first shards measured applies to the requests
still to send. Each part of a batch carries the split it was produced at,
and the trainer runs layers [s, f) of each part itself, so a change of split
changes where the frozen layers run, not what the optimizer sees.

Every random draw is a function of the seed: the new head's initial
weights, the shard and sample order of each epoch, and the random state of
each step (dropout), which is reseeded from (seed, epoch, step). A run is
therefore the same computation whatever the split, the storage batch, the
prefetch depth, the timing or the requests that failed and were retried
(``hapi.client.retry``), and a run resumed from a checkpoint continues
exactly where the interrupted one stopped.

Under torchrun (``hapi.client.distributed``) each rank trains on its share
of each epoch's shards (``hapi.client.data.rank_share``) through
DistributedDataParallel over the trained layers; ``--batch_size`` is then
the batch of each rank. Each step's gradient is the mean over the step's
samples on every rank: each rank's loss is weighted by its share of the
step's samples, known in advance from the partition. Every rank takes the
same number of steps: a rank whose share runs out first takes its remaining
steps on no samples (a zero gradient that still joins the all-reduce), so
uneven shares never hang. The split is fixed for the whole run (the freeze
index unless ``--split_idx`` says otherwise), so every rank asks for the
same features. Rank 0 alone writes checkpoints and metrics and runs the
held-out evaluation while the others go on to the next epoch; a run is
resumed by as many ranks as wrote its checkpoint.
"""

import contextlib
import dataclasses
import itertools
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from functools import partial

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from hapi import names, protocol, weights, zoo
from hapi.client import checkpoint, data, distributed, feature_cache
from hapi.client.autosplit import AutomaticSplit
from hapi.client.autosplit.wireformats import pinned
from hapi.client.retry import DEFAULT_RETRIES, RetryPolicy
from hapi.preprocess import preset_size

METRICS_FORMAT = "hapi-metrics/1"
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class TrainingError(RuntimeError):
    """The run cannot go ahead as configured."""


class RunComplete(Exception):
    """``--resume`` found every epoch of the run already trained: nothing to do."""


@dataclass(frozen=True)
class TrainConfig:
    container: str
    model: str
    weights: protocol.WeightsRef
    freeze: int
    split: int | None  # None: chosen automatically (AutomaticSplit)
    preset: str
    batch_size: int = 32
    epochs: int = 1
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    storage_batch: int | None = None  # None: data.streaming_batch of the largest shard
    wire_dtype: str = names.WIRE_AUTO  # auto: chosen with the split (a fixed split: float32)
    wire_encoding: str = names.WIRE_AUTO  # auto: chosen with the split (a fixed split: raw)
    split_tie: float = names.SPLIT_TIE  # automatic split: this close, fewer bytes win
    holdout: float = 0.2
    start: int = 0
    end: int | None = None
    prefetch: int = 4  # requests in flight at most (0: none, sequential)
    prefetch_samples: int | None = None  # None: two training batches plus the largest shard
    max_buffered_bytes: int = data.DEFAULT_MAX_BUFFERED_BYTES
    device: str = "cpu"
    checkpoint_every: int = 0
    retries: int = DEFAULT_RETRIES
    intermediate_url: str | None = None  # the standalone HAPI server, else the proxy
    # Several endpoints the shard requests are spread over (data.ShardSource)
    storage_urls: tuple | None = None
    cache_dir: str | None = None  # the feature cache's folder (hapi.client.feature_cache)
    cache_bytes: int = feature_cache.DEFAULT_MAX_BYTES

    def identity(self):
        """What a checkpoint must share with this run to be resumed by it. The
        split, storage batch, prefetch depth, device, retries, the feature
        cache and where the features come from may change: they move work
        around, they do not change what is computed."""
        return {"container": self.container, "model": self.model,
                "weights": str(self.weights), "freeze": self.freeze, "preset": self.preset,
                "batch_size": self.batch_size, "optimizer": self.optimizer, "lr": self.lr,
                "momentum": self.momentum,
                "weight_decay": self.weight_decay, "seed": self.seed,
                "holdout": self.holdout, "start": self.start, "end": self.end}


@dataclass
class Traffic:
    """What crossed the network for a pass, and what it cost to get it.

    ``bytes_received``: the response bodies of the pass's shard requests
    (features, or raw shards at split 0); ``raw_shard_bytes``: the raw shards
    of the same samples, what vanilla training moves. ``fetch_s``: the wall
    time during which at least one of the pass's shard requests was in
    flight (from sending it until its shard was loaded: read, checked and,
    for a raw shard, preprocessed). Requests overlap (``--prefetch``), so
    this is the union of their intervals, not their sum, and never more than
    the pass's ``time_s``. ``storage_compute_s``: the storage tier's compute
    for the pass's frames, as its frames report it (each request's share of
    the storage device). With the feature cache: ``cache_hits``, the shards
    read from it (no request: nothing received, nothing computed in
    storage), ``cache_misses``, the feature requests sent, and
    ``cache_read_bytes``, the bytes the hits read from the trainer's disk.
    """

    shards: int = 0
    bytes_received: int = 0
    raw_shard_bytes: int = 0
    fetch_s: float = 0.0
    storage_compute_s: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_read_bytes: int = 0


@dataclass
class PassMetrics:
    """One pass over a list of shards: an epoch's training or an evaluation.

    ``wait_s`` is the time the trainer waited for data, ``compute_s`` the
    time it computed (forward, and for training backward and step).
    """

    samples: int = 0
    steps: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    time_s: float = 0.0
    wait_s: float = 0.0
    compute_s: float = 0.0
    traffic: Traffic = field(default_factory=Traffic)

    @property
    def loss(self):
        return self.loss_sum / self.samples if self.samples else None

    @property
    def accuracy(self):
        return self.correct / self.samples if self.samples else None

    def to_dict(self):
        return {**asdict(self), "loss": self.loss, "accuracy": self.accuracy}

    @classmethod
    def from_dict(cls, doc):
        counters = {f.name: doc[f.name] for f in fields(cls) if f.name != "traffic"}
        return cls(**counters, traffic=Traffic(**doc["traffic"]))


@dataclass
class EpochMetrics:
    """An epoch's training pass and held-out evaluation; ``epoch`` counts
    from 1, as the console does."""

    epoch: int
    train: PassMetrics = field(default_factory=PassMetrics)
    holdout: PassMetrics | None = None
    step_loss: list = field(default_factory=list)
    step_batch: list = field(default_factory=list)
    rank_samples: list | None = None  # under torchrun: each rank's training samples

    def to_dict(self):
        doc = {"epoch": self.epoch, "loss": self.train.loss,
               "accuracy": self.holdout.accuracy if self.holdout else None,
               "time_s": self.train.time_s, "train": self.train.to_dict(),
               "holdout": self.holdout.to_dict() if self.holdout else None,
               "step_loss": self.step_loss, "step_batch": self.step_batch}
        if self.rank_samples is not None:
            doc["rank_samples"] = self.rank_samples
        return doc

    @classmethod
    def from_dict(cls, doc):
        return cls(epoch=doc["epoch"], train=PassMetrics.from_dict(doc["train"]),
                   holdout=PassMetrics.from_dict(doc["holdout"]) if doc["holdout"] else None,
                   step_loss=list(doc["step_loss"]), step_batch=list(doc["step_batch"]),
                   rank_samples=doc.get("rank_samples"))

    @classmethod
    def combined(cls, ranks):
        """One epoch from each rank's share of it (``ranks``, in rank order):
        counts and traffic add up; ``steps`` are the optimizer's (every rank
        takes them all); ``time_s`` and ``fetch_s`` are the longest rank's,
        ``wait_s`` and ``compute_s`` the ranks' mean; each step's loss is the
        mean over the step's samples on every rank."""
        trains = [r.train for r in ranks]
        train = PassMetrics(
            samples=sum(t.samples for t in trains), steps=max(t.steps for t in trains),
            loss_sum=sum(t.loss_sum for t in trains), correct=sum(t.correct for t in trains),
            time_s=max(t.time_s for t in trains),
            wait_s=sum(t.wait_s for t in trains) / len(trains),
            compute_s=sum(t.compute_s for t in trains) / len(trains),
            traffic=Traffic(**{f.name: sum(getattr(t.traffic, f.name) for t in trains)
                               for f in fields(Traffic)}))
        train.traffic.fetch_s = max(t.traffic.fetch_s for t in trains)
        step_loss, step_batch = [], []
        for step in range(train.steps):
            taken = [(r.step_loss[step], r.step_batch[step]) for r in ranks
                     if step < len(r.step_batch)]
            samples = sum(n for _, n in taken)
            step_loss.append(sum(loss * n for loss, n in taken) / samples)
            step_batch.append(samples)
        return cls(ranks[0].epoch, train, step_loss=step_loss, step_batch=step_batch,
                   rank_samples=[t.samples for t in trains])


@dataclass(frozen=True)
class StepRecord:
    """What ``on_step`` hears after each optimizer step. ``epoch`` and
    ``step`` are indices from 0 (those the seeds are derived from); the
    console and the metrics number epochs from 1."""

    epoch: int
    step: int
    global_step: int
    loss: float
    keys: list
    wait_s: float
    compute_s: float


def build_model(config, num_classes, conn):
    """The zoo model with the run's weights, a new seeded head of
    ``num_classes`` outputs, frozen below ``config.freeze``, on the device."""
    ref = config.weights
    if ref.kind == "seed":
        model = zoo.build_model(config.model, seed=int(ref.value))
    elif ref.kind == "pretrained":
        model = zoo.build_model(config.model,
                                state_dict=weights.pretrained_state_dict(config.model))
    elif ref.kind == "swift":
        container, _, name = ref.value.partition("/")
        _, body = conn.get_object(container, name)
        model = zoo.build_model(config.model, state_dict=weights.load_state_dict_bytes(
            body, source=str(ref)))
    else:
        raise TrainingError(f"weights {ref} live on the storage server only; the trainer "
                            "needs the same weights: use 'pretrained', 'seed:N' or 'swift:...'")
    if not 0 <= config.freeze <= len(model):
        raise TrainingError(f"freeze index {config.freeze} is outside [0, {len(model)}], "
                            f"the layers of {config.model}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data.derived_seed("head", config.seed))
        model.replace_head(num_classes)
    return model.freeze(config.freeze).to(config.device)


def make_optimizer(model, config):
    """SGD with momentum, or Adam, over the trainable parameters."""
    return optimizer_for([p for p in model.parameters() if p.requires_grad], config)


def optimizer_for(params, config):
    """The optimizer ``config`` names (``--optimizer`` and its settings) over ``params``."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


class Trainer:
    """Runs a configured training (or evaluation) against a data set in Swift.

    ``connect()`` returns a new authenticated ``swiftclient.Connection``
    (feature requests go through it to ``config.intermediate_url`` when set);
    ``store`` is a checkpoint store (``hapi.client.checkpoint``) or None;
    ``on_step(StepRecord)`` is called after every optimizer step, after any
    checkpoint of that step (an exception it raises stops the run there);
    ``progress`` shows tqdm bars (None: only on a terminal); ``ranks``
    (``hapi.client.distributed``) places the process among torchrun's.
    """

    def __init__(self, config, connect, store=None, on_step=None, progress=None,
                 log=print, ranks=distributed.SINGLE):
        if ranks.distributed and config.split is None:
            config = dataclasses.replace(config, split=config.freeze)
            log(f"{ranks.world_size} ranks: the split stays at the freeze index "
                f"{config.freeze} for the whole run (--manual_split --split_idx N sets another)")
        if config.split is not None and not 0 <= config.split <= config.freeze:
            raise TrainingError(f"split {config.split} must be between 0 and the freeze "
                                f"index {config.freeze}")
        self.config = config
        self.ranks = ranks
        self.connect = connect
        self.store = store
        self.on_step = on_step
        self.progress = progress
        self.log = log
        self.device = torch.device(config.device)
        self.conn = connect()
        try:
            manifest, sizes = data.open_dataset(self.conn, config.container)
            self.plan = data.plan_data(manifest, sizes, config.start, config.end,
                                       config.holdout)
            largest = max(ref.selected for ref in self.plan.train + self.plan.holdout)
            if config.storage_batch is None:
                config = self.config = dataclasses.replace(
                    config, storage_batch=data.streaming_batch(largest))
            self.model = build_model(config, len(self.plan.classes), self.conn)
            self.selector = data.FixedSplit(config.split) if config.split is not None else \
                AutomaticSplit.measured(self.model, config, self.plan, self.conn, log,
                                        optimizer=partial(optimizer_for, config=config))
            self.cache = feature_cache.ShardCache.open(
                feature_cache.FeatureCache(config.cache_dir, config.cache_bytes), self.conn,
                config.container, self._request()) if config.cache_dir else None
        except BaseException:
            self.conn.close()
            raise
        self.optimizer = None
        self.trained = self.model  # what the training steps call: under torchrun, DDP's
        self.step_samples = None  # under torchrun: the epoch's samples per step, all ranks
        self.criterion = nn.CrossEntropyLoss()
        self.retry = RetryPolicy(config.retries, log=log)
        self.loader = data.ShardLoader(
            data.ShardSource(config.container, self._request(), config.intermediate_url,
                             self.cache, config.storage_urls),
            connect, config.prefetch, _FetchedOnly(self.selector), self.retry,
            lookahead_samples=config.prefetch_samples or 2 * config.batch_size + largest,
            max_buffered_bytes=config.max_buffered_bytes)
        self.storage_devices = set()
        self.storage_batches = set()
        self.reduced_shards = 0
        self.samples_per_split = Counter()
        self._began, self._wall_before = None, 0.0  # see _wall_s

    def _request(self):
        """The run's feature request (the loader sets each request's split)."""
        config = self.config
        return protocol.FeatureRequest(
            model=config.model, split=config.freeze, freeze=config.freeze,
            batch=config.storage_batch, weights=config.weights, preset=config.preset,
            dtype=pinned(config.wire_dtype, names.DEFAULT_WIRE_DTYPE),
            encoding=pinned(config.wire_encoding, names.DEFAULT_WIRE_ENCODING))

    def close(self):
        self.loader.close()
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Training ------------------------------------------------------------------

    def train(self, resume=False):
        """Train ``config.epochs`` epochs, checkpointing after each (and every
        ``checkpoint_every`` steps); returns the metrics document. With
        ``resume``, raises :class:`RunComplete` when the store's checkpoint
        has every epoch trained already."""
        config = self.config
        if config.freeze >= len(self.model):
            raise TrainingError(f"freeze index {config.freeze} leaves none of the "
                                f"{len(self.model)} layers of {config.model} to train")
        self._check_last_batch()
        if self.ranks.distributed:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.trained = DistributedDataParallel(self.model, device_ids=device_ids)
        self.optimizer = make_optimizer(self.model, config)
        self._began, self._wall_before = time.perf_counter(), 0.0
        done, current, mine = [], None, None
        if resume:
            done, current, mine = self._resume()
        resumed_from = _position(done, current) if resume else None
        global_step = sum(e.train.steps for e in done) + (current.train.steps if current else 0)
        for epoch in range(len(done), config.epochs):
            metrics = mine if mine is not None else EpochMetrics(epoch + 1)
            resumed_steps = current.train.steps if current is not None else 0
            current = mine = None
            order = self._share(data.epoch_order(self.plan.train, config.seed, epoch))
            if resumed_from is not None and epoch + 1 == resumed_from["epoch"]:
                self._resume_selector(epoch, order, metrics.train.samples)
            self.model.train()
            steps = self._pass(order, metrics.train, partial(self._train_step, epoch=epoch),
                               shuffle_epoch=epoch, desc=f"epoch {epoch + 1}")
            padding = self._padding(epoch, metrics.train, resumed_steps)
            with contextlib.closing(steps):
                for batch, loss in itertools.chain(steps, padding):
                    global_step += 1
                    if batch is not None:
                        metrics.step_loss.append(loss)
                        metrics.step_batch.append(len(batch))
                    if config.checkpoint_every and global_step % config.checkpoint_every == 0:
                        self._save(global_step, epoch, done, metrics)
                    if self.on_step is not None and batch is not None:
                        self.on_step(StepRecord(epoch, metrics.train.steps, global_step, loss,
                                                batch.keys, metrics.train.wait_s,
                                                metrics.train.compute_s))
            if self.ranks.distributed:
                metrics = EpochMetrics.combined([EpochMetrics.from_dict(doc) for doc in
                                                 self.ranks.gather_json(metrics.to_dict())])
                if not self.ranks.leader:
                    done.append(metrics)
                    continue
            if self.plan.holdout:
                metrics.holdout = self._evaluate(self.plan.holdout, f"held-out {epoch + 1}")
            done.append(metrics)
            self._save(global_step, epoch + 1, done, None)
            self.log(_epoch_line(metrics, config.epochs))
        passes = [e.train for e in done] + [e.holdout for e in done if e.holdout]
        return self._report(passes, done, self._wall_s(), resumed_from)

    def _check_last_batch(self):
        """Refuse, before any step, an epoch whose last batch would be a single
        sample when a trained layer holds a BatchNorm: in training mode it
        cannot normalise one sample, and the epoch would fail at its end.
        Under torchrun, each rank's last batch of each epoch is checked."""
        config = self.config
        single = None
        if self.plan.train_samples % config.batch_size == 1 and not self.ranks.distributed:
            single = (f"the last batch of each epoch would hold 1 of the "
                      f"{self.plan.train_samples} training samples")
        for epoch in range(config.epochs if self.ranks.distributed else 0):
            order = data.epoch_order(self.plan.train, config.seed, epoch)
            for rank in range(self.ranks.world_size):
                share = sum(ref.selected for ref in
                            data.rank_share(order, rank, self.ranks.world_size))
                if single is None and share % config.batch_size == 1:
                    single = (f"rank {rank}'s last batch of epoch {epoch + 1} would hold 1 of "
                              f"its {share} training samples")
        if single is None:
            return
        trained = self.model.layers[config.freeze:]
        if any(isinstance(module, BATCH_NORMS) for layer in trained
               for module in layer.modules()):
            raise TrainingError(
                f"{single}, and the trained layers of {config.model} (from "
                f"{config.freeze}) have BatchNorm, which cannot train on one sample: change "
                "--batch_size, --start/--end or --holdout, or freeze more layers")

    def _train_step(self, batch, step, epoch):
        """One optimizer step; returns (mean loss, correct predictions)."""
        config = self.config
        torch.manual_seed(data.derived_seed("step", config.seed, epoch, step))
        began = time.perf_counter()
        with torch.no_grad():
            x = self._inputs_at(batch, config.freeze)
        y = batch.labels.to(self.device, non_blocking=True)
        with self._collectives():
            logits = self.trained(x, config.freeze)
            timed = self.selector.wants_step_times
            loss, loss_s = self._timed(timed, self.criterion, logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            self._objective(loss, len(batch), step).backward()
            _, step_s = self._timed(timed, self.optimizer.step)
        if timed:
            self.selector.observe_step(loss_s + step_s)
        result = loss.item(), (logits.argmax(1) == y).sum().item()  # waits for the device
        self.selector.observe_iteration([(part.split, len(part.inputs)) for part in batch.parts],
                                        time.perf_counter() - began)
        return result

    def _objective(self, loss, samples, step):
        """What a step differentiates: its mean loss, or under torchrun the
        rank's loss weighted by its share of the step's samples on every rank
        (DDP averages the ranks' gradients: the result is the mean over all of
        them)."""
        if self.step_samples is None:
            return loss
        return loss * (samples * self.ranks.world_size / self.step_samples[step])

    def _collectives(self):
        """Where the ranks exchange tensors: a lost rank ends this one with one line."""
        if not self.ranks.distributed:
            return contextlib.nullcontext()
        return distributed.lost_rank_errors(self.ranks.rank)

    def _share(self, order):
        """This rank's shards of the epoch's ``order`` (all of them in a single
        process), noting the epoch's samples per step on every rank."""
        if not self.ranks.distributed:
            return order
        size = self.config.batch_size
        shares = [data.rank_share(order, rank, self.ranks.world_size)
                  for rank in range(self.ranks.world_size)]
        totals = [sum(ref.selected for ref in share) for share in shares]
        steps = max(math.ceil(total / size) for total in totals)
        self.step_samples = [sum(min(size, max(0, total - step * size)) for total in totals)
                             for step in range(steps)]
        return shares[self.ranks.rank]

    def _padding(self, epoch, metrics, resumed_steps):
        """Under torchrun, the steps this rank takes on no samples once its
        share of the epoch is trained, until every rank has taken the epoch's
        steps; yields (None, None) after each. Reads ``metrics.steps`` when
        the share is done (the steps taken on samples)."""
        if self.step_samples is None:
            return
        config = self.config
        size = preset_size(config.preset)
        for step in range(max(metrics.steps, resumed_steps), len(self.step_samples)):
            torch.manual_seed(data.derived_seed("step", config.seed, epoch, step))
            with torch.no_grad():
                nothing = self.model(torch.zeros(0, 3, size, size, device=self.device), 0,
                                     config.freeze)
            with self._collectives():
                logits = self.trained(nothing, config.freeze)
                self.optimizer.zero_grad(set_to_none=True)
                (logits.sum() * 0).backward()
                self.optimizer.step()
            yield None, None

    def _inputs_at(self, batch, stop):
        """The batch at boundary ``stop``: each part runs layers [its split, stop) here."""
        outputs = [self.model(part.inputs.to(self.device, torch.float32, non_blocking=True),
                              part.split, stop) for part in batch.parts]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _timed(self, synchronize, fn, *args):
        """``fn(*args)`` and its duration; ``synchronize`` waits for a GPU to finish."""
        sync = synchronize and self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        began = time.perf_counter()
        result = fn(*args)
        if sync:
            torch.cuda.synchronize(self.device)
        return result, time.perf_counter() - began

    # Evaluation ----------------------------------------------------------------

    def evaluate(self):
        """Inference only (``--testonly``) over every selected sample, with the
        trained layers of the store's latest checkpoint when there is one."""
        began = time.perf_counter()
        ckpt = checkpoint.load_checkpoint(self.store) if self.store is not None else None
        if ckpt is not None:
            self._check_identity(ckpt.state, ("container", "model", "weights", "freeze"))
            ckpt.restore(self.model)
            self.log(f"evaluating the trained layers of {self.store} (step {ckpt.state['step']})")
        else:
            self.log("no checkpoint given: evaluating the untrained head")
        metrics = self._evaluate(self.plan.train + self.plan.holdout, "test")
        self.log(f"test: loss {metrics.loss:.4f}, accuracy {metrics.accuracy:.2%} "
                 f"({metrics.samples} samples, {metrics.samples / metrics.time_s:.1f} samples/s)")
        report = self._report([metrics], [], time.perf_counter() - began, None)
        report["samples"] = {"test": metrics.samples}
        report["accuracy"] = metrics.accuracy
        report["test"] = metrics.to_dict()
        return report

    def _evaluate(self, refs, desc):
        metrics = PassMetrics()
        self.model.eval()
        for _ in self._pass(refs, metrics, self._eval_step, desc=desc):
            pass
        return metrics

    @torch.inference_mode()
    def _eval_step(self, batch, step):
        logits = self._inputs_at(batch, len(self.model))
        y = batch.labels.to(self.device, non_blocking=True)
        loss = nn.functional.cross_entropy(logits, y)
        return loss.item(), (logits.argmax(1) == y).sum().item()

    # Passes over shards ----------------------------------------------------------

    def _pass(self, refs, metrics, step_fn, shuffle_epoch=None, desc=""):
        """Run ``step_fn(batch, step) -> (loss, correct)`` over the batches of
        ``refs``; yield (batch, loss) after each step, accounting time and
        traffic in ``metrics``. A training pass (``shuffle_epoch``) continues
        after the ``metrics.samples`` samples it has already trained on."""
        config = self.config
        first, skip = data.resume_point(refs, metrics.samples)
        shards = self.loader(refs[first:])
        stream = self._received(shards, metrics.traffic)
        if shuffle_epoch is not None:
            stream = (data.shuffled(shard, config.seed, shuffle_epoch) for shard in stream)
        batches = data.rebatch(stream, config.batch_size, skip)
        total = sum(ref.selected for ref in refs)
        bar = tqdm(total=total, initial=metrics.samples, desc=desc, unit="img",
                   unit_scale=True, leave=False, dynamic_ncols=True,
                   disable=None if self.progress is None else not self.progress)
        began = time.perf_counter()
        with contextlib.closing(shards), bar:
            try:
                while True:
                    waited = time.perf_counter()
                    batch = next(batches, None)
                    computed = time.perf_counter()
                    if batch is None:
                        break
                    loss, correct = step_fn(batch, metrics.steps)
                    metrics.wait_s += computed - waited
                    metrics.compute_s += time.perf_counter() - computed
                    metrics.steps += 1
                    metrics.samples += len(batch)
                    metrics.loss_sum += loss * len(batch)
                    metrics.correct += correct
                    bar.set_postfix(loss=f"{loss:.3f}", refresh=False,
                                    MB=f"{metrics.traffic.bytes_received / 1e6:.1f}")
                    bar.update(len(batch))
                    yield batch, loss
            finally:
                metrics.time_s += time.perf_counter() - began

    def _received(self, shards, traffic):
        fetched_until = float("-inf")  # the end of the requests' intervals counted so far
        for shard in shards:
            traffic.shards += 1
            traffic.bytes_received += shard.bytes_received
            traffic.raw_shard_bytes += shard.ref.bytes
            # Requests go out in the order their shards arrive in: adding the
            # part of each interval past the previous ends gives their union.
            sent, loaded = shard.transfer.sent_at, shard.transfer.sent_at + shard.load_s
            traffic.fetch_s += max(0.0, loaded - max(sent, fetched_until))
            fetched_until = max(fetched_until, loaded)
            traffic.storage_compute_s += shard.storage.get("compute_s", 0.0)
            traffic.cache_hits += shard.cache == "hit"
            traffic.cache_misses += shard.cache == "miss"
            traffic.cache_read_bytes += shard.cache_read_bytes
            self.samples_per_split[shard.split] += len(shard.keys)
            if shard.storage:
                self.storage_devices.add(shard.storage["device"])
                self.storage_batches.add(shard.storage["batch_used"])
                if shard.storage["batch_used"] < self.config.storage_batch:
                    self.reduced_shards += 1
            yield shard

    # Checkpoints -----------------------------------------------------------------

    def _save(self, global_step, epoch, done, current):
        """Checkpoint (rank 0 only). Under torchrun, within an epoch, every rank
        calls this at the same step: the checkpoint keeps each rank's part of
        the epoch (``current_ranks``) as well as the whole (``current``)."""
        if self.store is None:
            return
        state = {"current": current.to_dict() if current else None}
        if self.ranks.distributed:
            state["world_size"] = self.ranks.world_size
            if current is not None:
                parts = self.ranks.gather_json(current.to_dict())
                state["current_ranks"] = parts
                state["current"] = EpochMetrics.combined(
                    [EpochMetrics.from_dict(doc) for doc in parts]).to_dict()
            if not self.ranks.leader:
                return
        checkpoint.save_checkpoint(self.store, self.model, self.config.freeze, self.optimizer, {
            "step": global_step, "epoch": epoch, "run": self.config.identity(),
            "wall_s": self._wall_s(),
            "epochs": [e.to_dict() for e in done],
            **state,
        })

    def _resume(self):
        if self.store is None:
            raise TrainingError("--resume needs a checkpoint store (--checkpoint_dir or "
                                "--checkpoint_container)")
        ckpt = checkpoint.load_checkpoint(self.store)
        if ckpt is None:
            raise TrainingError(f"--resume: there is no checkpoint in {self.store}")
        self._check_identity(ckpt.state, tuple(self.config.identity()))
        saved_ranks = ckpt.state.get("world_size", 1)
        if saved_ranks != self.ranks.world_size:
            raise TrainingError(
                f"the checkpoint in {self.store} was written by {saved_ranks} rank(s) and this "
                f"run has {self.ranks.world_size}: resume it with {saved_ranks} (torchrun "
                f"--nproc_per_node {saved_ranks}, or without torchrun for 1)")
        done = [EpochMetrics.from_dict(doc) for doc in ckpt.state["epochs"]]
        if len(done) >= self.config.epochs:
            raise RunComplete(f"the run in {self.store} is already complete: {len(done)} of "
                              f"{self.config.epochs} epochs trained, nothing to resume (a "
                              "higher --num_epochs trains on)")
        ckpt.restore(self.model, self.optimizer)
        self._wall_before = ckpt.state["wall_s"]
        current = ckpt.state["current"]
        current = EpochMetrics.from_dict(current) if current else None
        mine = current
        if current is not None and self.ranks.distributed:
            mine = EpochMetrics.from_dict(ckpt.state["current_ranks"][self.ranks.rank])
        position = _position(done, current)
        self.log(f"resuming from {self.store}: epoch {position['epoch']} after its step "
                 f"{position['step']} (global step {ckpt.state['step']})")
        return done, current, mine

    def _resume_selector(self, epochs, order, trained):
        """Tell the split selector where the job resumes: after ``epochs``
        whole epochs and, of the next one's ``order`` (this rank's shards),
        the shards wholly before the one its pass resumes in, having
        ``trained`` samples of it."""
        first, _ = data.resume_point(order, trained)
        self.selector.resumed(epochs, sum(ref.selected for ref in order[:first]))

    def _wall_s(self):
        """The training's wall time: this process's, plus that of the runs it
        resumed, up to their last checkpoint (whose epochs it reports)."""
        return self._wall_before + time.perf_counter() - self._began

    def _check_identity(self, state, keys):
        saved, ours = state["run"], self.config.identity()
        differ = [f"{key} {saved.get(key)!r} (now {ours[key]!r})" for key in keys
                  if saved.get(key) != ours[key]]
        if differ:
            raise TrainingError(f"the checkpoint in {self.store} belongs to another run: "
                                + "; ".join(differ))

    # Report ------------------------------------------------------------------------

    def _report(self, passes, epochs, wall_s, resumed_from):
        """The metrics document of a run of ``passes`` (:class:`PassMetrics`),
        ``epochs`` of them training (:class:`EpochMetrics`), in ``wall_s``.

        Units are in the key names: ``_s`` seconds, ``_bytes`` (or
        ``bytes_``) bytes; counts (samples, steps, shards, layers) have none.
        Epochs count from 1, as the console does. The totals over the
        passes: ``bytes_received``, ``raw_shard_bytes``, ``fetch_s`` and
        ``storage_compute_s`` as in :class:`Traffic`; ``wait_s`` (the trainer
        waiting for data) and ``compute_s`` (the trainer computing), whose
        sum is the passes' time; ``wall_s``, the whole run's wall time (the
        passes, checkpoints and reports; for a resumed run, with the time of
        the runs before it up to their last checkpoint), is at least each of
        them. ``cache_hits``, ``cache_misses``, ``cache_read_bytes``: the
        feature cache's use by the passes (:class:`Traffic`), and ``cache``
        the cache itself (folder, size bound, size now, this process's
        entries written, evicted and found corrupt), or None without one.
        ``endpoints``: per storage endpoint (``hapi.client.endpoints``), the
        shard requests sent to it and those of them that failed in a way
        worth retrying (feature cache hits send none).
        ``accuracy`` is the last epoch's held-out accuracy
        (``--testonly``: the test accuracy); ``resumed_from``, for a resumed
        run, the epoch it continued in and the steps of it already trained.
        """
        config = self.config
        split = self.selector.split
        return {
            "format": METRICS_FORMAT, "world_size": self.ranks.world_size,
            "dataset": config.container, "model": config.model, "weights": str(config.weights),
            "mode": "split" if split else "vanilla", "split": split, "freeze": config.freeze,
            "split_selection": {**self.selector.report(), "samples_per_split": {
                str(s): n for s, n in sorted(self.samples_per_split.items())}},
            "layers": len(self.model), "batch_size": config.batch_size,
            "storage_batch": {"requested": config.storage_batch if config.split != 0 else None,
                              "used": sorted(self.storage_batches),
                              "reduced_shards": self.reduced_shards},
            "storage_endpoint": config.intermediate_url or "proxy",
            "endpoints": self.loader.source.endpoints_report(),
            "retries": self.retry.report(),
            "prefetch": config.prefetch, "preset": config.preset, "seed": config.seed,
            "devices": {"trainer": str(self.device),
                        "storage": sorted(self.storage_devices) or None},
            "samples": {"train": self.plan.train_samples, "holdout": self.plan.holdout_samples},
            "bytes_received": sum(p.traffic.bytes_received for p in passes),
            "raw_shard_bytes": sum(p.traffic.raw_shard_bytes for p in passes),
            "wait_s": sum(p.wait_s for p in passes),
            "compute_s": sum(p.compute_s for p in passes),
            "fetch_s": sum(p.traffic.fetch_s for p in passes),
            "storage_compute_s": sum(p.traffic.storage_compute_s for p in passes),
            "cache_hits": sum(p.traffic.cache_hits for p in passes),
            "cache_misses": sum(p.traffic.cache_misses for p in passes),
            "cache_read_bytes": sum(p.traffic.cache_read_bytes for p in passes),
            "cache": self.cache.report() if self.cache is not None else None,
            "wall_s": wall_s,
            "accuracy": epochs[-1].holdout.accuracy if epochs and epochs[-1].holdout else None,
            "resumed_from": resumed_from,
            "epochs": [e.to_dict() for e in epochs],
        }


class _FetchedOnly:
    """The split selector as the loader sees it: shards read from the feature
    cache are not shown to it (no request went out: there is nothing to
    learn about the link or the storage tier from them)."""

    def __init__(self, selector):
        self._selector = selector

    @property
    def split(self):
        return self._selector.split

    @property
    def route(self):
        return self._selector.route

    def opened(self):
        return self._selector.opened()

    def on_link(self, request, start, end, nbytes, arriving=False):
        self._selector.on_link(request, start, end, nbytes, arriving)

    def closed(self, request, shard):
        self._selector.closed(request, None if shard is not None and shard.cache == "hit"
                              else shard)

    def observe(self, shard):
        if shard.cache != "hit":
            self._selector.observe(shard)


def _position(done, current):
    """Where a resumed run continues: the epoch (from 1) and its steps already trained."""
    return {"epoch": len(done) + 1, "step": current.train.steps if current else 0}


def _epoch_line(metrics, epochs):
    train, held = metrics.train, metrics.holdout
    line = (f"epoch {metrics.epoch}/{epochs}: loss {train.loss:.4f}, "
            f"{train.time_s:.1f} s ({train.wait_s:.1f} s waiting for data), "
            f"{train.traffic.bytes_received / 1e6:.1f} MB received")
    if train.traffic.cache_hits:
        line += (f" ({train.traffic.cache_read_bytes / 1e6:.1f} MB read from the feature "
                 f"cache)")
    if held:
        line += f"; held-out accuracy {held.accuracy:.2%} ({held.samples} samples)"
    return line
