"""Data sets as WebDataset-style tar shards plus a JSON manifest.

A shard is a tar of ``<key>.<ext>`` members grouped by key: ``000123.jpg``
holds the encoded image and ``000123.cls`` its class index as ASCII digits.
The manifest (``manifest.json`` in the same container) lists the shards, the
sample count and the class names.

Member names follow WebDataset's rule: the key is the name up to the first
dot of its last path component, the extension everything after it
(``a.b.jpg`` is key ``a``, extension ``b.jpg``; ``dir/a.jpg`` is key
``dir/a``). A sample is the image member (an extension of
:data:`IMAGE_EXTENSIONS`) and the ``cls`` member of one key; members with
other extensions are carried along and ignored.
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


def split_member_name(name):
    """``(key, extension)`` of a member name by WebDataset's rule: the key ends
    at the first dot of the last path component; the extension is lower-cased.
    The extension is empty when the name has no dot there."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def write_shard(samples):
    """Pack ``samples`` (an iterable of :class:`Sample`) into tar bytes.

    Raises :class:`ShardError` for a sample whose members would not read back
    as its own: a key with a dot in its last path component (WebDataset would
    end the key there), an extension that is not an image's, or a key used
    twice.
    """
    buf = io.BytesIO()
    seen = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            _check_writable(sample, seen)
            for name, payload in ((f"{sample.key}.{sample.ext}", sample.image),
                                  (f"{sample.key}.cls", str(sample.label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _check_writable(sample, seen):
    name = f"{sample.key}.{sample.ext}"
    if split_member_name(name) != (sample.key, sample.ext.lower()) or not sample.key:
        raise ShardError(f"sample key {sample.key!r} would not read back: a key has no dot "
                         "after its last '/' (WebDataset ends the key at the first dot)", name)
    if sample.ext.lower() not in IMAGE_EXTENSIONS:
        raise ShardError(f"image extension {sample.ext!r} is not one of "
                         f"{', '.join(IMAGE_EXTENSIONS)}", name)
    if sample.key in seen:
        raise ShardError(f"sample key {sample.key!r} is used twice in one shard", name)
    seen.add(sample.key)


def read_shard(data):
    """Parse tar bytes into a list of :class:`Sample`, in key order.

    The tar is read in memory only: member names are dictionary keys, never
    paths, so ``../x.jpg`` or ``/etc/x.jpg`` name a sample and nothing is
    ever written to disk. Directories are skipped.

    Raises :class:`ShardError` for anything that is not a well-formed shard:
    not a tar, truncated or broken (even between members), a member that is
    not a regular file (a symbolic or hard link, a device, a sparse file,
    whose content would not be the bytes stored in the tar), a name with no
    extension, two members of one sample with the same extension, or two
    images in one sample, a key without an image or without a label, no
    sample at all, or a label that is not an integer in [0, :data:`MAX_LABEL`].
    """
    images, labels, members = {}, {}, set()
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
                key, ext = split_member_name(name)
                if not key or not ext:
                    raise ShardError("member name has no key or no extension (a sample's "
                                     "members are named <key>.<extension>)", name)
                if (key, ext) in members:
                    raise ShardError(f"sample {key!r} has two members with extension "
                                     f"{ext!r}", name)
                members.add((key, ext))
                payload = tar.extractfile(member).read()
                if ext == "cls":
                    labels[key] = (name, payload)
                elif ext in IMAGE_EXTENSIONS:
                    if key in images:
                        raise ShardError(f"sample {key!r} has two images "
                                         f"({images[key][2]} and this one)", name)
                    images[key] = (ext, payload, name)
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
        ext, image, image_name = images[key]
        if key not in labels:
            raise ShardError("sample has no .cls label", image_name)
        name, raw = labels[key]
        samples.append(Sample(key=key, image=image, ext=ext, label=parse_label(raw, name)))
    return samples


def leading_images(prefix):
    """The encoded images of the members wholly inside ``prefix``, the first
    bytes of a shard (a ranged GET): enough to time decoding without
    downloading the shard. Not a validation: a member cut short ends the list."""
    images = []
    try:
        with tarfile.open(fileobj=io.BytesIO(prefix), mode="r:") as tar:
            for member in tar:
                if member.offset_data + member.size > len(prefix):
                    break
                _, ext = split_member_name(member.name)
                if member.isfile() and ext in IMAGE_EXTENSIONS:
                    images.append(tar.extractfile(member).read())
    except (tarfile.TarError, EOFError):
        pass
    return images


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
