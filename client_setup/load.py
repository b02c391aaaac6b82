"""Put a data set into Swift as WebDataset-style tar shards plus a manifest.

Command ``hapi-load`` (or ``python -m hapi.client_setup.load``)::

    hapi-load digits --container digits --auth http://127.0.0.1:8080/auth/v1.0 \\
        --user test:tester --key testing
    hapi-load folder --path ~/flowers --container flowers --shard-size 128
    hapi-load synthetic --count 5000 --size 224 --classes 10 --out /tmp/synthetic

Shards are named ``shard-000000.tar``, ``shard-000001.tar``, ... Without
``--shard-size``, a shard holds at most 256 samples and few enough for 10
shards: the trainer holds out whole shards. Writing a data
set again to the same container or folder replaces it: the old manifest is
removed first, the new shards and manifest are written, and shards left over
from a bigger earlier data set are deleted.
"""

import argparse
import itertools
import logging
import math
import re
import sys
import time

from requests.exceptions import RequestException
from swiftclient.client import ClientException, Connection
from tqdm import tqdm

from hapi.client_setup import datasets
from hapi.shards import MANIFEST_NAME, Manifest, ShardError, write_shard
from hapi.stores import DirectoryStore, SwiftStore
from hapi.swiftauth import CredentialsError, connection_options

SHARD_PREFIX = "shard-"
SHARD_PATTERN = re.compile(rf"{SHARD_PREFIX}\d{{6,}}\.tar")
SHARD_CONTENT_TYPE = "application/x-tar"
MANIFEST_CONTENT_TYPE = "application/json"
# The trainer holds out whole shards (20% by default): hapi-load aims at this
# many shards so that the hold-out is one shard in five, not all or nothing.
TARGET_SHARDS = 10
DEFAULT_SHARD_SIZE = 256


class LoadError(RuntimeError):
    """The data set cannot be loaded: an empty source, a missing manifest, bad credentials."""


def shard_name(index):
    return f"{SHARD_PREFIX}{index:06d}.tar"


def pack(samples, shard_size=256):
    """Pack ``samples`` into shards: yields ``(name, tar_bytes, n_samples)`` lazily."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    samples = iter(samples)
    for index in itertools.count():
        batch = list(itertools.islice(samples, shard_size))
        if not batch:
            return
        yield shard_name(index), write_shard(batch), len(batch)


def choose_shard_size(count, requested=None):
    """``(samples per shard, a note for the user or None)`` for ``count`` samples.

    Without ``requested``: at most :data:`DEFAULT_SHARD_SIZE`, small enough
    for :data:`TARGET_SHARDS` shards when there are that many samples. A
    requested size is kept; the note says when it makes fewer shards than that.
    """
    fitting = max(1, math.ceil(count / TARGET_SHARDS))
    if requested is None:
        return min(DEFAULT_SHARD_SIZE, fitting), None
    shards = math.ceil(count / requested)
    if shards >= min(TARGET_SHARDS, count):
        return requested, None
    return requested, (f"{count} samples in shards of {requested} make {shards}; the trainer "
                       "holds out whole shards (20% by default) and needs at least 2, so few "
                       f"shards make a coarse hold-out: --shard-size {fitting} makes "
                       f"{math.ceil(count / fitting)}")


def store_dataset(store, samples, class_names, shard_size=DEFAULT_SHARD_SIZE, on_shard=None):
    """Write ``samples`` as shards plus a manifest to ``store``; return the :class:`Manifest`.

    ``on_shard(name, n_samples, n_bytes)`` is called after each shard is written.
    Raises :class:`LoadError`, before touching the store, if there are no samples.
    """
    shards = pack(samples, shard_size)
    first = next(shards, None)
    if first is None:
        raise LoadError("the source holds no samples")
    store.delete(MANIFEST_NAME)
    manifest = Manifest(classes=list(class_names))
    for name, data, count in itertools.chain([first], shards):
        store.put(name, data, SHARD_CONTENT_TYPE)
        manifest.shards.append({"name": name, "samples": count})
        if on_shard:
            on_shard(name, count, len(data))
    store.put(MANIFEST_NAME, manifest.to_json(), MANIFEST_CONTENT_TYPE)
    _remove_stale_shards(store, {shard["name"] for shard in manifest.shards})
    return manifest


def _remove_stale_shards(store, keep):
    for name in store.names(SHARD_PREFIX):
        if SHARD_PATTERN.fullmatch(name) and name not in keep:
            store.delete(name)


def upload_dataset(conn, container, samples, class_names, shard_size=DEFAULT_SHARD_SIZE,
                   on_shard=None):
    """Upload ``samples`` to ``container`` over swiftclient's ``conn``: :func:`store_dataset`."""
    return store_dataset(SwiftStore(conn, container), samples, class_names, shard_size, on_shard)


def load_manifest(conn, container):
    """The :class:`Manifest` of the data set in ``container``."""
    try:
        _, body = conn.get_object(container, MANIFEST_NAME)
    except ClientException as err:
        if err.http_status == 404:
            raise LoadError(f"container {container!r} holds no {MANIFEST_NAME}: "
                            "not a HAPI data set (put one there with hapi-load)") from None
        raise
    try:
        return Manifest.from_json(body)
    except ShardError as err:
        raise LoadError(f"{container}/{MANIFEST_NAME}: {err}") from None


def connect(auth=None, user=None, key=None, storage_url=None, token=None, retries=5):
    """A swiftclient :class:`Connection` from these values and the environment.

    Each value falls back as in :mod:`hapi.swiftauth` (python-swiftclient's
    order: the value given, then ``ST_*``, then ``OS_*``). As with the
    ``swift`` command, a storage URL and token are used first when there are
    both, and the key then renews the token when it expires.
    """
    try:
        options = connection_options(auth=auth, user=user, key=key, storage_url=storage_url,
                                     token=token)
    except CredentialsError as err:
        raise LoadError(f"{err}; as flags: --auth, --user, --key, or --os-storage-url and "
                        "--os-auth-token (or --out DIR to write locally)") from None
    return Connection(retries=retries, **options)


def open_source(args):
    """The :class:`datasets.Source` that the parsed command line names."""
    if args.source == "folder":
        return datasets.image_folder(args.path, seed=args.seed)
    if args.source == "digits":
        return datasets.digits()
    return datasets.synthetic(args.count, size=args.size, classes=args.classes,
                              seed=args.seed, quality=args.quality)


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    target = common.add_argument_group("where to").add_mutually_exclusive_group(required=True)
    target.add_argument("--container", help="Swift container to upload to (created if missing)")
    target.add_argument("--out", metavar="DIR", help="write shards and manifest to DIR instead")
    opts = common.add_argument_group("packing")
    opts.add_argument("--shard-size", type=positive_int, metavar="N",
                      help=f"samples per shard (default: at most {DEFAULT_SHARD_SIZE}, few "
                      f"enough for {TARGET_SHARDS} shards)")
    opts.add_argument("--limit", type=positive_int, metavar="N", help="only the first N samples")
    creds = common.add_argument_group("Swift credentials (default: the environment)")
    creds.add_argument("--auth", help="auth URL (ST_AUTH, else OS_AUTH_URL)")
    creds.add_argument("--user", help="user name (ST_USER, else OS_USERNAME)")
    creds.add_argument("--key", help="key (ST_KEY, else OS_PASSWORD)")
    creds.add_argument("--os-storage-url", help="storage URL (OS_STORAGE_URL); with a token")
    creds.add_argument("--os-auth-token", help="auth token (OS_AUTH_TOKEN)")
    creds.add_argument("--retries", type=int, default=5, help="retries per request (default 5)")

    parser = argparse.ArgumentParser(
        prog="hapi-load", description="Pack a data set into tar shards and put it into Swift.")
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    folder = sources.add_parser("folder", parents=[common],
                                help="an image folder, one subfolder per class")
    folder = folder.add_argument_group("source")
    folder.add_argument("--path", required=True, help="the folder")
    folder.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    sources.add_parser("digits", parents=[common],
                       help="scikit-learn's 1,797 8x8 digits as PNG")
    synth = sources.add_parser("synthetic", parents=[common], help="synthetic photo-like JPEGs")
    synth = synth.add_argument_group("source")
    synth.add_argument("--count", type=positive_int, default=1000, help="images (default 1000)")
    synth.add_argument("--size", type=synthetic_size, default=224, metavar="N|imagenet",
                       help="side in pixels, or 'imagenet': sides of 300-500 x 250-450 px "
                       "drawn per image, JPEGs of about 110 KB at quality 90, as ImageNet's "
                       "photos (default 224)")
    synth.add_argument("--classes", type=positive_int, default=10, help="classes (default 10)")
    synth.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    synth.add_argument("--quality", type=int, default=90, choices=range(1, 101),
                       metavar="1..100", help="JPEG quality (default 90)")
    return parser


def synthetic_size(text):
    """``synthetic --size``: a positive int, or ``imagenet`` for ImageNet-like sizes."""
    if text == datasets.IMAGENET_LIKE:
        return text
    if not text.isdigit() or int(text) < 8:
        raise argparse.ArgumentTypeError(
            f"a side in pixels of at least 8, or {datasets.IMAGENET_LIKE!r}; got {text!r}")
    return int(text)


def positive_int(text):
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args):
    """Carry out the parsed command line; return the :class:`Manifest` written."""
    source = open_source(args)
    if args.out:
        store = DirectoryStore(args.out)
    else:
        conn = connect(args.auth, args.user, args.key, args.os_storage_url, args.os_auth_token,
                       args.retries)
        store = SwiftStore(conn, args.container)
    samples = itertools.islice(source.samples, args.limit)
    total = min(source.count, args.limit or source.count)
    shard_size, note = choose_shard_size(total, args.shard_size)
    if note:
        print(f"hapi-load: note: {note}", file=sys.stderr, flush=True)
    with tqdm(total=total, unit="img", disable=None) as bar:
        written = 0

        def on_shard(name, count, size):
            nonlocal written
            written += size
            bar.set_postfix_str(f"{name}, {written / 1e6:.1f} MB", refresh=False)
            bar.update(count)

        return store_dataset(store, samples, source.classes, shard_size, on_shard)


def main(argv=None):
    logging.basicConfig(format="hapi-load: %(levelname)s: %(message)s", level=logging.WARNING)
    args = build_parser().parse_args(argv)
    start = time.monotonic()
    try:
        manifest = run(args)
    except ClientException as err:
        sys.exit(f"hapi-load: error: Swift: {_describe(err)}")
    except RequestException as err:  # before OSError, its base class
        sys.exit(f"hapi-load: error: cannot reach Swift: {err}")
    except (LoadError, datasets.SourceError, OSError) as err:
        sys.exit(f"hapi-load: error: {err}")
    where = args.out or f"container {args.container!r}"
    print(f"wrote {manifest.samples} samples in {len(manifest.shards)} shards "
          f"({len(manifest.classes)} classes) to {where} in {time.monotonic() - start:.1f} s")


def _describe(err):
    if err.http_status == 401:
        return "authentication failed (check --user/--key or the token)"
    if err.http_status == 403:
        return "access denied to the container (check the account's ACLs)"
    return str(err)


if __name__ == "__main__":
    main()
