"""HAPI: near-data transfer learning on OpenStack Swift.

This package holds what both tiers import: the layer-indexed model zoo, the
request protocol, the wire format of the feature stream and the shard format.
The storage tier lives in ``hapi.middleware`` (top-level ``middleware/``), the
trainer in ``hapi.client`` (top-level ``client/``).
"""

__version__ = "0.1.0"
