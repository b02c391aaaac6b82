"""Data sets as WebDataset-style tar shards plus a JSON manifest.

A shard is a tar of ``<key>.<ext>`` members grouped by key: ``000123.jpg``
holds the encoded image and ``000123.cls`` its class index as ASCII digits.
The manifest (``manifest.json`` in the same container) lists the shards, the
sample count and the class names.
"""

import io
import json
import tarfile
from dataclasses import dataclass, field

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "hapi-webdataset/1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")


class ShardError(ValueError):
    """The object is not a valid shard; ``member`` names the culprit if any."""

    def __init__(self, message, member=None):
        super().__init__(message)
        self.member = member


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    ext: str
    label: int


@dataclass
class Manifest:
    classes: list
    shards: list = field(default_factory=list)  # [{"name": str, "samples": int}]

    @property
    def samples(self):
        return sum(s["samples"] for s in self.shards)

    def to_json(self):
        return json.dumps({
            "format": MANIFEST_FORMAT,
            "samples": self.samples,
            "classes": self.classes,
            "shards": self.shards,
        }, indent=1).encode()

    @classmethod
    def from_json(cls, data):
        try:
            doc = json.loads(data)
        except ValueError as err:
            raise ShardError(f"manifest is not JSON: {err}") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise ShardError(f"manifest format is not {MANIFEST_FORMAT!r}")
        return cls(classes=list(doc["classes"]), shards=list(doc["shards"]))


def write_shard(samples):
    """Pack ``samples`` (an iterable of :class:`Sample`) into tar bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for name, payload in ((f"{sample.key}.{sample.ext}", sample.image),
                                  (f"{sample.key}.cls", str(sample.label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def read_shard(data):
    """Parse tar bytes into a list of :class:`Sample`, in key order.

    Raises :class:`ShardError` for anything that is not a well-formed shard:
    not a tar, truncated, a key without an image or without a label, or a
    label that is not a non-negative integer.
    """
    images, labels = {}, {}
    name = None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                name = member.name
                if not member.isfile():
                    continue
                key, _, ext = name.rpartition(".")
                ext = ext.lower()
                if not key:
                    raise ShardError("member name has no extension", name)
                payload = tar.extractfile(member).read()
                if ext == "cls":
                    labels[key] = (name, payload)
                elif ext in IMAGE_EXTENSIONS:
                    images[key] = (ext, payload)
    except (tarfile.TarError, EOFError) as err:
        if name is None:
            raise ShardError(f"not a valid tar shard: {err}") from None
        raise ShardError(f"shard is truncated or corrupt: {err}", name) from None
    if not images:
        raise ShardError("shard holds no samples")
    samples = []
    for key in sorted(images):
        ext, image = images[key]
        if key not in labels:
            raise ShardError("sample has no .cls label", f"{key}.{ext}")
        name, raw = labels[key]
        text = raw.decode("ascii", "replace").strip()
        if not text.isdigit():
            raise ShardError(f"label {text[:20]!r} is not a non-negative integer", name)
        samples.append(Sample(key=key, image=image, ext=ext, label=int(text)))
    return samples
