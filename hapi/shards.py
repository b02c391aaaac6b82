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
# Labels are int64 on the wire (and in torch): at most 19 ASCII digits.
MAX_LABEL = 2**63 - 1


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

    The tar is read in memory only: member names are dictionary keys, never
    paths, so ``../x.jpg`` or ``/etc/x.jpg`` name a sample and nothing is
    ever written to disk. Directories are skipped.

    Raises :class:`ShardError` for anything that is not a well-formed shard:
    not a tar, truncated or broken (even between members), a member that is
    not a regular file (a symbolic or hard link, a device, a sparse file,
    whose content would not be the bytes stored in the tar), a key without
    an image or without a label, no sample at all, or a label that is not an
    integer in [0, :data:`MAX_LABEL`].
    """
    images, labels = {}, {}
    name = None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                name = member.name
                if member.isdir():
                    continue
                refused = _not_regular(member)
                if refused:
                    raise ShardError(refused, name)
                key, _, ext = name.rpartition(".")
                ext = ext.lower()
                if not key:
                    raise ShardError("member name has no extension", name)
                payload = tar.extractfile(member).read()
                if ext == "cls":
                    labels[key] = (name, payload)
                elif ext in IMAGE_EXTENSIONS:
                    images[key] = (ext, payload)
            # tarfile takes a cut or broken header after the first member for
            # the end of the archive: samples would silently go missing. A
            # whole tar ends with a zero block where the next header would be.
            if data[tar.offset:tar.offset + tarfile.BLOCKSIZE] != bytes(tarfile.BLOCKSIZE):
                raise tarfile.ReadError("no end-of-archive block after the last member")
    except (tarfile.TarError, EOFError) as err:
        if name is None:
            raise ShardError(f"not a valid tar shard: {err}") from None
        raise ShardError(f"shard is truncated or corrupt: {err}", name) from None
    if not images:
        orphan = next(iter(labels.values()), (None,))[0]
        raise ShardError("shard holds no samples (no image member"
                         + (f"; {orphan} has no image)" if orphan else ")"), orphan)
    samples = []
    for key in sorted(images):
        ext, image = images[key]
        if key not in labels:
            raise ShardError("sample has no .cls label", f"{key}.{ext}")
        name, raw = labels[key]
        samples.append(Sample(key=key, image=image, ext=ext, label=parse_label(raw, name)))
    return samples


def parse_label(raw, member):
    """The class index in a ``.cls`` member: ASCII digits, at most :data:`MAX_LABEL`."""
    text = raw.decode("ascii", "replace").strip()
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_LABEL)) \
            or int(text) > MAX_LABEL:
        raise ShardError(f"label {text[:20]!r} is not an integer between 0 and {MAX_LABEL}",
                         member)
    return int(text)


def _not_regular(member):
    """Why ``member`` cannot be a sample's file, or None if it is a regular file."""
    if member.issym():
        return f"member is a symbolic link (to {member.linkname[:60]!r}); shards hold " \
               "regular files only"
    if member.islnk():
        return f"member is a hard link (to {member.linkname[:60]!r}); shards hold " \
               "regular files only"
    if member.issparse():
        return "member is a sparse file; shards hold regular files only"
    if not member.isfile():
        return "member is a device or fifo; shards hold regular files only"
    return None
