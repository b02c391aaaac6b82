"""The operator's options, shared by the filter's ``[filter:hapi]`` section
and the standalone server's ``[hapi]`` section (same names, same defaults)."""

import re
import threading
from dataclasses import dataclass

from hapi import protocol, zoo
from hapi.middleware.admission import MemoryBudget
from hapi.middleware.engine import FeatureEngine
from hapi.middleware.options import OPTION_DEFAULTS

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)


@dataclass(frozen=True)
class Settings:
    """The operator's options, parsed once for the filter or the server."""

    limits: protocol.Limits
    max_concurrent: int
    max_shard_bytes: int
    device: str
    threads: int
    weights_dir: str
    max_image_pixels: int
    max_cached_models: int
    memory_budget: int | None
    queue_timeout: float
    min_batch: int
    feature_cache_container: str = ""
    feature_cache_max_bytes: int = 10 << 30

    @classmethod
    def from_conf(cls, conf):
        """Parse a mapping of option names to strings; absent options take
        :data:`OPTION_DEFAULTS`. Raises ValueError naming a bad option."""
        def get(name):
            return str(conf.get(name, OPTION_DEFAULTS[name])).strip()

        def integer(name, minimum=1):
            try:
                value = int(get(name))
            except ValueError:
                value = minimum - 1
            if value < minimum:
                raise ValueError(f"option {name} must be an integer >= {minimum}, "
                                 f"got {get(name)!r}")
            return value

        try:
            queue_timeout = float(get("queue_timeout"))
        except ValueError:
            queue_timeout = -1.0
        if not 0 <= queue_timeout < float("inf"):
            raise ValueError(f"option queue_timeout must be a number of seconds >= 0, "
                             f"got {get('queue_timeout')!r}")
        models = tuple(zoo.canonical_name(m.strip()) for m in get("models").split(",")
                       if m.strip())
        limits = protocol.Limits(max_batch=integer("max_batch"),
                                 default_batch=integer("default_batch"),
                                 models=models or tuple(zoo.MODELS),
                                 weights_dir_enabled=bool(get("weights_dir")))
        if limits.default_batch > limits.max_batch:
            raise ValueError(f"option default_batch ({limits.default_batch}) is above "
                             f"max_batch ({limits.max_batch})")
        cache_container = get("feature_cache_container")
        if "/" in cache_container:
            raise ValueError(f"option feature_cache_container must be a container name, "
                             f"got {cache_container!r}")
        min_batch = integer("min_batch")
        if min_batch > limits.max_batch:
            raise ValueError(f"option min_batch ({min_batch}) is above "
                             f"max_batch ({limits.max_batch})")
        return cls(limits=limits, max_concurrent=integer("max_concurrent"),
                   max_shard_bytes=integer("max_shard_bytes"), device=get("device"),
                   threads=integer("threads", minimum=0), weights_dir=get("weights_dir"),
                   max_image_pixels=integer("max_image_pixels"),
                   max_cached_models=integer("max_cached_models"),
                   memory_budget=parse_memory_budget(get("memory_budget")),
                   queue_timeout=queue_timeout, min_batch=min_batch,
                   feature_cache_container=cache_container,
                   feature_cache_max_bytes=parse_size("feature_cache_max_bytes",
                                                      get("feature_cache_max_bytes")))

    def make_engine(self, threading_module=threading):
        """The engine these options describe; ``threading_module`` gives its
        OS-thread locks (eventlet's original ``threading`` in Swift's proxy)."""
        return FeatureEngine(device=self.device, threads=self.threads,
                             max_image_pixels=self.max_image_pixels,
                             weights_dir=self.weights_dir,
                             max_cached_models=self.max_cached_models,
                             memory_budget=self.memory_budget,
                             threading_module=threading_module)

    def make_budget(self, engine):
        """The admission bookkeeping of one front end, over ``engine``'s memory."""
        return MemoryBudget(engine.memory_capacity, min_batch=self.min_batch,
                            queue_timeout=self.queue_timeout)


def parse_memory_budget(text):
    """``auto`` (None) or a size in bytes (:func:`parse_size`)."""
    if text.lower() == "auto":
        return None
    return parse_size("memory_budget", text, "'auto' or ")


def parse_size(name, text, alternatives=""):
    """A size in bytes of option ``name``: digits with an optional k, M, G or
    T suffix (powers of 1024; a trailing B or iB is allowed)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"option {name} must be {alternatives}a size such as 512M or "
                         f"2G, got {text!r}")
    number, unit = match.groups()
    size = int(float(number) * 1024 ** " kmgt".index(unit.lower() or " "))
    if size <= 0:
        raise ValueError(f"option {name} must be above zero, got {text!r}")
    return size
