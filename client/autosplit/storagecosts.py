"""What each layer costs on the storage tier's device, asked before the first request.

The storage tier measures every layer of a model on its own device the first
time the model runs there at a preset and storage batch, and answers
``GET <base>/hapi/costs?model=M&preset=P&batch=B``
(:data:`hapi.protocol.COSTS_PATH`) with the seconds per sample of each
layer, or 404 while it has not. With those figures the split selector
(``hapi.client.autosplit.selector``) makes its first decision before the
first feature request instead of profiling at the freeze index.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from hapi import protocol
from hapi.client.autosplit.profiling import Profile

__all__ = ["COSTS_TIMEOUT_S", "StorageCosts", "fetch_layer_costs", "storage_base_url",
           "with_storage_costs"]

COSTS_TIMEOUT_S = 10.0  # an answer slower than this is no answer: the run starts as without


@dataclass(frozen=True)
class StorageCosts:
    """The storage tier's answer: ``layers_s_per_sample`` (one per layer of
    the model) and ``device``, or None and ``note`` saying why not."""

    url: str
    layers_s_per_sample: list[float] | None
    device: str = ""
    note: str = ""

    @property
    def known(self) -> bool:
        return self.layers_s_per_sample is not None


def storage_base_url(conn, intermediate_url: str | None = None) -> str:
    """Where feature requests go: the standalone server's URL when one is
    used, else the Swift storage URL's ``scheme://host:port`` (the proxy's)."""
    if intermediate_url:
        return intermediate_url.rstrip("/")
    if not conn.url:
        conn.get_auth()
    parts = urllib.parse.urlsplit(conn.url)
    return f"{parts.scheme}://{parts.netloc}"


def fetch_layer_costs(base_url: str, model: str, preset: str, batch: int, layers: int,
                      timeout: float = COSTS_TIMEOUT_S) -> StorageCosts:
    """Ask the storage tier at ``base_url`` for ``model``'s per-sample layer
    costs at ``preset`` and storage ``batch``. Any answer but a 200 with
    ``layers`` positive finite figures is "not known" with its reason in
    ``note``: the selector then starts as it does without them."""
    query = urllib.parse.urlencode({"model": model, "preset": preset, "batch": batch})
    url = f"{base_url}{protocol.COSTS_PATH}?{query}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        why = "not measured there yet" if err.code == 404 else f"HTTP {err.code}"
        return StorageCosts(url, None, note=f"{why}: {_error_text(err)}")
    except (OSError, ValueError) as err:
        return StorageCosts(url, None, note=f"no answer: {err}")
    try:
        doc = json.loads(body)
        costs = [float(seconds) for seconds in doc["layers_s_per_sample"]]
    except (ValueError, TypeError, KeyError) as err:
        return StorageCosts(url, None, note=f"unreadable answer ({err})")
    if len(costs) != layers or not all(math.isfinite(c) and c >= 0 for c in costs):
        return StorageCosts(url, None, note=f"{len(costs)} layer costs for a model of "
                                            f"{layers} layers, or not all finite")
    return StorageCosts(url, costs, device=str(doc.get("device", "")))


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(err.read())["error"])[:200]
    except (ValueError, TypeError, KeyError, OSError):
        return err.reason if isinstance(err.reason, str) else "no reason given"


def with_storage_costs(profile: Profile, costs: StorageCosts) -> Profile:
    """``profile`` (a copy) with the storage tier's time of every frozen
    layer from ``costs``. The storage tier's decode time is not among them
    (the frames tell it later): until then it is taken to be the trainer's
    own decode time of the probe shard, a conservative guess for a storage
    tier's host."""
    out = profile.with_measurements()
    for layer, seconds in zip(out.layers[:out.freeze], costs.layers_s_per_sample, strict=False):
        layer.storage_s = seconds
    if not out.storage_decode_s:
        out.storage_decode_s = out.trainer_decode_s
    return out
