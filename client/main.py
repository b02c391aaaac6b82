"""Fine-tune a pre-trained network on a data set stored in Swift (``hapi-train``).

The storage tier (the HAPI filter in the Swift proxy) runs the frozen layers
[0, split) next to the data; this trainer runs layers [split, end) and trains
those above the freeze index. ``--split_idx 0`` is vanilla training: raw
shards cross the network and every layer runs here. ``--help`` shows examples.

The original HAPI client's flags keep their meaning: ``--freeze`` freezes the
layers below ``--freeze_idx`` (the model's default index when not given;
without ``--freeze`` every layer trains and the split is 0), ``--model`` takes
its ``my`` prefix (``myalexnet`` is ``alexnet``), ``--manual_split
--split_idx N`` fixes the split. With frozen layers and no fixed split, the
split is chosen automatically while training: the run starts at the freeze
index, measures both tiers and the network on its first shards, picks the
split its cost model predicts fastest (vanilla included), and re-decides
when the bandwidth or the storage tier's speed drifts. The decision table
goes to the log and the metrics, its plot next to the metrics (``--plot``).

``--use_intermediate`` sends the feature requests to the standalone HAPI
server (``hapi-server``, at ``--intermediate_url`` or $HAPI_INTERMEDIATE_URL)
instead of the proxy's filter, with the same token; the manifest, raw shards
(vanilla) and checkpoints still come from Swift. A shard request that fails
on the way (503 at capacity, a lost connection, a stream cut short) is
retried whole, up to ``--retries`` times (``hapi.client.retry``).

Under torchrun (``torchrun --nproc_per_node N client/main.py ...``) the
trainer runs on N processes with DistributedDataParallel; each trains on its
share of each epoch's shards at ``--batch_size``, and rank 0 alone logs,
evaluates and writes the checkpoints and metrics (``hapi.client.train``).

The flags are checked once, right after parsing and before any network call:
a combination that cannot work ends the program with one line naming the
flag and what to do (exit status 2). Until then only the standard library,
python-swiftclient and the torch-free :mod:`hapi.names` and
:mod:`hapi.client.retry` are imported; torch and the modules that need it
come after, so ``--help`` answers at once.
"""

import argparse
import contextlib
import json
import os
import sys
import urllib.parse
from pathlib import Path

from requests.exceptions import RequestException
from swiftclient import ClientException, Connection

from hapi import names, swiftauth
from hapi.client.retry import DEFAULT_RETRIES, RetriesExhausted


class SwiftAuthError(RuntimeError):
    """No credentials, or Swift refused them."""


class ConfigError(ValueError):
    """A flag, or a combination of flags, that cannot work: the message names
    the flag and what to do."""


def expected_errors():
    """What a run can fail with that is worth a one-line message, not a traceback."""
    from hapi import weights, wire
    from hapi.client.autosplit import SplitSelectionError
    from hapi.client.checkpoint import CheckpointError
    from hapi.client.data import DataError
    from hapi.client.distributed import RankLost
    from hapi.client.train import TrainingError

    return (SwiftAuthError, TrainingError, DataError, CheckpointError, ClientException,
            SplitSelectionError, RetriesExhausted, weights.WeightsError, wire.FrameError,
            RequestException, RankLost)


def __getattr__(name):
    """``EXPECTED_ERRORS``, for callers of :func:`run`: resolved on first use,
    as its classes live in modules that import torch."""
    if name == "EXPECTED_ERRORS":
        return expected_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def program_name(argv0=None):
    """How the trainer was started, for its usage line and examples:
    ``hapi-train`` (the console script) or ``python client/main.py``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if argv0.endswith(".py"):
        return f"python {argv0}"
    return os.path.basename(argv0) or "hapi-train"


def examples(prog):
    return f"""\
examples:
  export ST_AUTH=http://127.0.0.1:8080/auth/v1.0 ST_USER=test:tester ST_KEY=testing

  # fine-tune EfficientNet-Lite0's head; the split is chosen while training
  {prog} --dataset digits --model myefficientnet_lite0 --freeze \\
      --preset resize-112 --num_epochs 5 --metrics metrics.json

  # a fixed split, checkpoints in a folder; after an interruption, the same
  # command with --resume continues where the last checkpoint left off
  {prog} --dataset digits --model resnet18 --weights seed:0 --freeze \\
      --manual_split --split_idx 4 --checkpoint_dir ckpt

  # vanilla training: raw shards to this machine, every layer here
  {prog} --dataset digits --model resnet18 --split_idx 0

  # the features from the standalone HAPI server instead of the proxy
  {prog} --dataset digits --model resnet18 --freeze \\
      --use_intermediate --intermediate_url http://storage-node:8090

  # accuracy of the latest checkpoint's trained layers, no training
  {prog} --dataset digits --model resnet18 --freeze --testonly --checkpoint_dir ckpt
"""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, not the usage then the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog=None):
    """The trainer's flags. Imports nothing heavy: ``--help`` answers at once."""
    env = os.environ.get
    prog = prog or program_name()
    parser = OneLineParser(prog=prog, description=__doc__.split("\n\n")[0],
                           epilog=examples(prog),
                           formatter_class=argparse.RawDescriptionHelpFormatter)

    job = parser.add_argument_group("the job (the original HAPI client's flags)")
    job.add_argument("--dataset", "--container", dest="dataset", required=True,
                     help="Swift container holding the data set (shards and manifest)")
    job.add_argument("--model", required=True,
                     help=f"model of the zoo, 'my' prefix allowed: {', '.join(names.MODELS)}")
    job.add_argument("--num_epochs", type=int, default=1, help="default: %(default)s")
    job.add_argument("--batch_size", type=int, default=32,
                     help="training batch size, of each rank under torchrun (default: "
                          "%(default)s)")
    job.add_argument("--freeze", action="store_true",
                     help="freeze the layers below the freeze index")
    job.add_argument("--freeze_idx", type=int,
                     help="freeze index (implies --freeze; default: the model's)")
    job.add_argument("--manual_split", action="store_true",
                     help="split at --split_idx (giving --split_idx is enough); without it "
                          "the split is chosen automatically")
    job.add_argument("--split_idx", type=int,
                     help="split index: layers below it run in Swift; 0 is vanilla")
    job.add_argument("--use_intermediate", action="store_true",
                     help="extract features in the standalone HAPI server instead of the "
                          "Swift proxy (its URL: --intermediate_url)")
    job.add_argument("--cpuonly", action="store_true", help="train on the CPU even with a GPU")
    job.add_argument("--sequential", action="store_true",
                     help="no overlap: fetch each shard only when the trainer needs it")
    job.add_argument("--testonly", action="store_true",
                     help="inference only over the selected samples, with the trained "
                          "layers of the latest checkpoint when one is given")
    job.add_argument("--start", type=int, default=0,
                     help="first sample, in the manifest's order (default: 0)")
    job.add_argument("--end", type=int, help="end of the sample range (default: all)")

    training = parser.add_argument_group("training")
    training.add_argument("--weights", default=names.DEFAULT_WEIGHTS,
                          help="'pretrained', 'seed:N' (random init) or "
                               "'swift:CONTAINER/OBJECT' (safetensors in your account); "
                               "default: %(default)s")
    training.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"),
                          help="default: %(default)s")
    training.add_argument("--lr", type=float, default=0.01,
                          help="learning rate (default: %(default)s)")
    training.add_argument("--momentum", type=float, default=0.9,
                          help="SGD momentum (default: %(default)s)")
    training.add_argument("--weight_decay", type=float, default=0.0,
                          help="default: %(default)s")
    training.add_argument("--seed", type=int, default=0, help="seeds the head, the data "
                          "order and each step's dropout (default: %(default)s)")
    training.add_argument("--holdout", type=float, default=0.2, help="fraction of the shards "
                          "held out to measure accuracy per epoch (default: %(default)s)")
    training.add_argument("--threads", type=int, default=0,
                          help="torch CPU threads on the trainer (0: torch's default); "
                               "1 avoids oversubscription where the cores are shared")
    training.add_argument("--preset", default=names.DEFAULT_PRESET, choices=names.PRESETS,
                          metavar="PRESET", help="preprocessing, the same on either tier: "
                          f"{', '.join(names.PRESETS)} (default: %(default)s)")

    storage = parser.add_argument_group("storage tier and data movement")
    storage.add_argument("--storage_batch", type=int,
                         help="batch size asked of the storage tier, which may use another "
                              "(default: a quarter of the largest shard, at most 64, so that "
                              "each shard streams as several frames)")
    storage.add_argument("--wire_dtype", default=names.WIRE_AUTO,
                         choices=(*names.WIRE_DTYPES, names.WIRE_AUTO),
                         help="dtype of the features on the wire; uint8 is per-channel "
                              "affine quantization, dequantized here; auto: chosen with the "
                              "split among float32, float16 and uint8 (with a fixed split: "
                              f"{names.DEFAULT_WIRE_DTYPE}) (default: %(default)s)")
    storage.add_argument("--wire_encoding", default=names.WIRE_AUTO,
                         choices=(*names.WIRE_ENCODINGS, names.WIRE_AUTO),
                         help="compression of the features on the wire: zstd (lossless) or "
                              "raw; auto: chosen with the split (with a fixed split: "
                              f"{names.DEFAULT_WIRE_ENCODING}) (default: %(default)s)")
    storage.add_argument("--split_tie", type=float, default=names.SPLIT_TIE, metavar="SHARE",
                         help="automatic split: splits and wire formats predicted within this "
                              "share of the fastest are ties, won by the fewest bytes on the "
                              "link; the default only breaks ties within the measurements' "
                              "noise, a larger one (e.g. 0.2) trades up to that much predicted "
                              "time for fewer bytes (default: %(default)s)")
    storage.add_argument("--prefetch", type=int, default=4, help="shard requests in flight "
                         "at most while the trainer computes (default: %(default)s)")
    storage.add_argument("--prefetch_samples", type=int,
                         help="samples requested ahead of the trainer; a new request goes out "
                              "when one completes (default: two training batches plus the "
                              "largest shard)")
    storage.add_argument("--max_buffered_mb", type=int, default=512,
                         help="loaded shards waiting for the trainer, at most, in MB of "
                              "tensors; requests pause beyond it (default: %(default)s)")
    storage.add_argument("--intermediate_url", default=env("HAPI_INTERMEDIATE_URL"),
                         help="the standalone HAPI server, http://HOST:PORT, for "
                              "--use_intermediate [HAPI_INTERMEDIATE_URL]")
    storage.add_argument("--storage_urls", default=env("HAPI_STORAGE_URLS"),
                         metavar="URL,URL...",
                         help="spread the shard requests over these endpoints, round robin, "
                              "each http://HOST:PORT: Swift proxies of the cluster (the "
                              "account path comes from the auth's storage URL), or with "
                              "--use_intermediate standalone HAPI servers instead of "
                              "--intermediate_url; a failed request is retried on another, "
                              "and an endpoint that fails is skipped for a while "
                              "[HAPI_STORAGE_URLS]")
    storage.add_argument("--timeout", type=float, default=120,
                         help="seconds without a byte from Swift or the HAPI server before a "
                              "request counts as failed (and is retried) (default: "
                              "%(default)s)")
    storage.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                         help="retries of a failed shard request (after a 503's Retry-After, "
                              "else with exponential backoff) and of any other failed Swift "
                              "request (default: %(default)s)")
    storage.add_argument("--cache_dir", help="keep each shard's features in this folder once "
                         "they arrive, so that later epochs (and later runs with the same "
                         "model, weights, split, preset and dtype) read them from disk "
                         "instead of the network ('default': ~/.cache/hapi/features, or under "
                         "$XDG_CACHE_HOME); default: no cache, every epoch is fetched")
    storage.add_argument("--cache_size", default="1G",
                         help="most the feature cache holds, least recently used shards "
                              "evicted first: bytes, or with K, M, G, T (default: "
                              "%(default)s)")

    output = parser.add_argument_group("output")
    output.add_argument("--metrics", help="write the run's metrics to this JSON file")
    output.add_argument("--plot", help="draw the automatic split decision to this PNG "
                        "(default: next to --metrics, as NAME-split.png)")
    where = output.add_mutually_exclusive_group()
    where.add_argument("--checkpoint_dir", help="checkpoint into this folder")
    where.add_argument("--checkpoint_container",
                       help="checkpoint into this Swift container of your account")
    output.add_argument("--checkpoint_every", type=int, default=0,
                        help="also checkpoint every N steps (0: after each epoch only)")
    output.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint")
    output.add_argument("--progress", action=argparse.BooleanOptionalAction,
                        help="progress bars (default: on a terminal)")

    auth = parser.add_argument_group(
        "Swift credentials (as python-swiftclient's swift command takes them: each flag, "
        "else its ST_* variable, else its OS_* one)")
    auth.add_argument("-A", "--auth", help="auth URL [ST_AUTH]")
    auth.add_argument("-U", "--user", help="user [ST_USER]")
    auth.add_argument("-K", "--key", help="key [ST_KEY]")
    auth.add_argument("-V", "--auth-version",
                      help="auth version [ST_AUTH_VERSION, OS_AUTH_VERSION, "
                           "OS_IDENTITY_API_VERSION; default 1.0, or 3 with OS_AUTH_URL]")
    for name, var in (
            ("os-auth-url", "OS_AUTH_URL"), ("os-username", "OS_USERNAME"),
            ("os-password", "OS_PASSWORD"),
            ("os-project-name", "OS_PROJECT_NAME, OS_TENANT_NAME"),
            ("os-user-domain-name", "OS_USER_DOMAIN_NAME"),
            ("os-project-domain-name", "OS_PROJECT_DOMAIN_NAME"),
            ("os-region-name", "OS_REGION_NAME"),
            ("os-identity-api-version", "as -V"),
            ("os-storage-url", "OS_STORAGE_URL"), ("os-auth-token", "OS_AUTH_TOKEN")):
        auth.add_argument(f"--{name}", help=f"[{var}]")
    return parser


# Flags that must be at least 1, and flags that cannot be negative.
POSITIVE_FLAGS = ("num_epochs", "batch_size", "storage_batch", "prefetch_samples",
                  "max_buffered_mb")
NON_NEGATIVE_FLAGS = ("start", "freeze_idx", "split_idx", "prefetch", "checkpoint_every",
                      "threads", "retries", "lr", "momentum", "weight_decay")


def parse_args(argv=None):
    """The flags, parsed and checked (:func:`check_args`). Anything that
    cannot work exits here, before any network call, with one line naming the
    flag (exit status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ConfigError as err:
        parser.error(str(err))
    return args


def check_args(args):
    """Check the parsed flags, resolving in place the model's zoo name, the
    weights reference and the standalone server's URL; raise
    :class:`ConfigError` for the first flag that cannot work."""
    for name in POSITIVE_FLAGS:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name} {getattr(args, name)}: must be at least 1")
    for name in NON_NEGATIVE_FLAGS:
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ConfigError(f"--{name} {value}: cannot be negative")
    if args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout:g}: must be above 0 seconds")
    if not 0 <= args.split_tie < 1:
        raise ConfigError(f"--split_tie {args.split_tie:g}: must be in [0, 1) (a share of the "
                          "fastest split's predicted time)")
    if not 0 <= args.holdout < 1:
        raise ConfigError(f"--holdout {args.holdout:g}: must be in [0, 1) (0: hold nothing out)")
    if args.end is not None and args.end <= args.start:
        raise ConfigError(f"--end {args.end}: must be above --start {args.start}")
    if args.manual_split and args.split_idx is None:
        raise ConfigError("--manual_split needs --split_idx N")
    if args.manual_split and args.split_tie != names.SPLIT_TIE:
        raise ConfigError(f"--split_tie {args.split_tie:g} widens the automatic choice of the "
                          "split, and --manual_split fixes the split: drop one")
    store = args.checkpoint_dir or args.checkpoint_container
    if args.resume and args.testonly:
        raise ConfigError("--resume continues a training, --testonly only evaluates (the "
                          "latest checkpoint, without --resume): drop one of them")
    if args.resume and not store:
        raise ConfigError("--resume needs --checkpoint_dir or --checkpoint_container (where "
                          "the run's checkpoints are)")
    if args.checkpoint_every and not store:
        raise ConfigError("--checkpoint_every needs --checkpoint_dir or "
                          "--checkpoint_container (where to write the checkpoints)")
    args.storage_urls = storage_urls(args.storage_urls)
    if args.use_intermediate and args.storage_urls:
        if args.intermediate_url:
            raise ConfigError("--use_intermediate takes the standalone HAPI servers from "
                              "--storage_urls or from --intermediate_url, and both are given "
                              "(or set: HAPI_STORAGE_URLS, HAPI_INTERMEDIATE_URL): drop one")
        args.intermediate_url = args.storage_urls[0]  # the HAPI servers are the list
    elif args.use_intermediate:
        args.intermediate_url = intermediate_url(args.intermediate_url)

    from hapi import zoo  # torch: only once the flags parsed
    from hapi.preprocess import preset_size

    _check_cache(args)

    try:
        args.model = zoo.canonical_name(args.model)
    except zoo.UnknownModel as err:
        raise ConfigError(f"--model: {err}") from None
    args.weights = trainer_weights(args.weights)
    info = zoo.MODELS[args.model]
    if info.fixed_input_size and preset_size(args.preset) != info.input_size:
        raise ConfigError(f"--preset {args.preset}: {args.model} takes only "
                          f"{info.input_size} px inputs; use a -{info.input_size} preset")
    _check_layers(args)


def _check_cache(args):
    """``--cache_size`` in bytes, and ``--cache_dir`` resolved ('default')."""
    from hapi.client import feature_cache

    try:
        args.cache_size = feature_cache.parse_size(str(args.cache_size))
    except ValueError as err:
        raise ConfigError(f"--cache_size: {err}") from None
    if args.cache_size < 1:
        raise ConfigError("--cache_size 0: must be above 0 bytes (leave out --cache_dir for "
                          "no cache)")
    if args.cache_dir == "default":
        args.cache_dir = feature_cache.default_dir()
    if args.cache_dir and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        raise ConfigError(f"--cache_dir {args.cache_dir}: is a file, not a folder")


def trainer_weights(raw):
    """The ``--weights`` reference, one the trainer can load itself."""
    from hapi import protocol

    try:
        ref = protocol.parse_weights(raw, protocol.Limits(weights_dir_enabled=True))
    except protocol.BadParameter as err:
        raise ConfigError(f"--weights: {err.message}") from None
    if ref.kind == "file":
        raise ConfigError(f"--weights {raw}: 'file:' names weights in a storage server's own "
                          "folder, which the trainer cannot read: upload them to your account "
                          "and use swift:CONTAINER/OBJECT (or pretrained, seed:N)")
    return ref


def layer_count(model):
    """How many layers the zoo's ``model`` has, from its architecture alone
    (built on torch's meta device: no memory, no weights, no download)."""
    import torch

    from hapi import zoo

    info = zoo.MODELS[model]
    with torch.device("meta"):
        return len(info.decompose(info.builder()))


def freeze_index(args):
    """The run's freeze index: --freeze_idx, else the model's with --freeze, else 0."""
    from hapi import zoo

    if args.freeze_idx is not None:
        return args.freeze_idx
    return zoo.MODELS[args.model].default_freeze if args.freeze else 0


def _check_layers(args):
    """The freeze index and the split against the model's layers."""
    layers, freeze = layer_count(args.model), freeze_index(args)
    if freeze > layers:
        raise ConfigError(f"--freeze_idx {freeze}: {args.model} has {layers} layers; use at "
                          f"most {layers - 1}")
    if freeze == layers and not args.testonly:
        raise ConfigError(f"--freeze_idx {freeze} freezes all {layers} layers of {args.model}, "
                          f"leaving nothing to train: use at most {layers - 1}")
    if args.split_idx is not None and args.split_idx > freeze:
        why = "" if args.freeze or args.freeze_idx is not None else \
            " (nothing is frozen without --freeze or --freeze_idx)"
        raise ConfigError(f"--split_idx {args.split_idx} must be between 0 and the freeze "
                          f"index {freeze}: the storage tier only runs frozen layers{why}")
    if args.plot and (args.split_idx is not None or freeze == 0):
        raise ConfigError("--plot draws the automatic split decision, and this run's split is "
                          "fixed (--split_idx, or nothing frozen): drop --plot")


def intermediate_url(url):
    """The standalone server's base URL for --use_intermediate, checked."""
    if not url:
        raise ConfigError("--use_intermediate needs the standalone HAPI server's URL: "
                          "--intermediate_url http://HOST:PORT or HAPI_INTERMEDIATE_URL")
    return base_url("--intermediate_url", url, "the standalone HAPI server")


def storage_urls(text):
    """--storage_urls as a tuple of base URLs, checked (None when not given)."""
    if text is None:
        return None
    urls = [item.strip() for item in text.split(",")]
    if not any(urls):
        raise ConfigError("--storage_urls is empty: give URL,URL... (http://HOST:PORT each), "
                          "or leave it out to use the auth's storage URL")
    checked = [base_url("--storage_urls", url, "a Swift proxy or standalone HAPI server")
               for url in urls]
    repeated = sorted({url for url in checked if checked.count(url) > 1})
    if repeated:
        raise ConfigError(f"--storage_urls names {', '.join(repeated)} more than once: "
                          "list each endpoint once")
    return tuple(checked)


def base_url(flag, url, what):
    """``url`` without its trailing slash, if it is a base URL ``http(s)://HOST:PORT``."""
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        parts = parts._replace(scheme="")
    if parts.scheme not in ("http", "https") or not parts.hostname or \
            parts.path.strip("/") or parts.query:
        raise ConfigError(f"{flag} {url!r}: expected http://HOST:PORT ({what})")
    return url.rstrip("/")


def train_config(args, log=print):
    """The run's :class:`TrainConfig` (``args`` as :func:`parse_args` returns
    them); says how the freeze index and split were chosen."""
    import torch

    from hapi.client.train import TrainConfig

    freeze = freeze_index(args)
    if not freeze:
        log("nothing frozen: every layer trains on the trainer, split 0 (vanilla); "
            "--freeze freezes the model's lower layers")
    if args.split_idx is not None:
        split = args.split_idx
    elif freeze:
        split = None
        log(f"automatic split selection among splits 0 to {freeze}: from the storage tier's "
            "layer costs when it has them, else profiling at the freeze index first (fix a "
            "split with --manual_split --split_idx N)")
    else:
        split = 0
    return TrainConfig(
        container=args.dataset, model=args.model, weights=args.weights, freeze=freeze,
        split=split, preset=args.preset, batch_size=args.batch_size, epochs=args.num_epochs,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, seed=args.seed,
        storage_batch=args.storage_batch, wire_dtype=args.wire_dtype,
        wire_encoding=args.wire_encoding, split_tie=args.split_tie,
        holdout=0.0 if args.testonly else args.holdout, start=args.start, end=args.end,
        prefetch=0 if args.sequential else args.prefetch,
        prefetch_samples=args.prefetch_samples, max_buffered_bytes=args.max_buffered_mb << 20,
        device="cuda" if torch.cuda.is_available() and not args.cpuonly else "cpu",
        checkpoint_every=args.checkpoint_every, retries=args.retries,
        intermediate_url=args.intermediate_url if args.use_intermediate else None,
        storage_urls=args.storage_urls,
        cache_dir=args.cache_dir, cache_bytes=args.cache_size)


def connection_options(args):
    """python-swiftclient ``Connection`` arguments from the flags and the
    environment, resolved as hapi-load resolves them (:mod:`hapi.swiftauth`)."""
    keystone = {"project_name": args.os_project_name,
                "user_domain_name": args.os_user_domain_name,
                "project_domain_name": args.os_project_domain_name,
                "region_name": args.os_region_name}
    try:
        return swiftauth.connection_options(
            auth=args.auth, user=args.user, key=args.key,
            auth_version=args.auth_version or args.os_identity_api_version,
            os_auth_url=args.os_auth_url, os_username=args.os_username,
            os_password=args.os_password, os_options=keystone,
            storage_url=args.os_storage_url, token=args.os_auth_token)
    except swiftauth.CredentialsError as err:
        raise SwiftAuthError(f"{err}; as flags: -A/-U/-K, or --os-storage-url and "
                             "--os-auth-token") from None


def swift_connector(args):
    """Authenticate once; return ``connect()``, which makes a new connection
    with that token (one per thread: connections are not thread-safe)."""
    options = {**connection_options(args), "timeout": args.timeout}
    has_token = "preauthtoken" in options
    where = options["preauthurl"] if has_token else options["authurl"]
    probe = Connection(**options, retries=1)
    try:
        if has_token:
            probe.head_account()
            url, token = probe.url, probe.token  # renewed by the key if it had expired
        else:
            url, token = probe.get_auth()
    except ClientException as err:
        if err.http_status in (401, 403):
            who = "the given token" if has_token else options["user"]
            raise SwiftAuthError(f"Swift at {where} refused {who}: {err.http_status} "
                                 f"{err.http_reason}") from None
        raise
    except RequestException as err:
        raise SwiftAuthError(f"cannot reach Swift at {where}: {err}") from None
    finally:
        probe.close()
    return lambda: Connection(**{**options, "preauthurl": url, "preauthtoken": token},
                              retries=args.retries)


def plot_path(args):
    """Where the split decision's plot goes: --plot, else next to --metrics."""
    if args.plot or not args.metrics:
        return args.plot
    metrics = Path(args.metrics)
    return str(metrics.with_name(f"{metrics.stem}-split.png"))


def run(args, on_step=None, log=print):
    """Train (or, with ``--testonly``, evaluate) as ``args`` say; return the
    metrics document (``hapi.client.train``), also written to ``--metrics``.
    With ``--resume`` on a run whose epochs are all trained, say so and
    return None: nothing trains, and ``--metrics`` keeps what it holds."""
    import dataclasses

    import torch

    from hapi import hostmem
    from hapi.client import distributed
    from hapi.client.train import RunComplete, Trainer
    from hapi.stores import DirectoryStore, SwiftStore

    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone speaks
        log = _silent
    config = train_config(args, log)
    if args.threads:
        torch.set_num_threads(args.threads)
    hostmem.keep_freed_memory()
    ranks, device = distributed.from_environment(config.device)
    config = dataclasses.replace(config, device=device)
    connect = swift_connector(args)
    with contextlib.ExitStack() as stack:
        store = None
        if args.checkpoint_dir:
            store = DirectoryStore(args.checkpoint_dir)
        elif args.checkpoint_container:
            conn = connect()
            stack.callback(conn.close)
            store = SwiftStore(conn, args.checkpoint_container)
        trainer = stack.enter_context(Trainer(
            config, connect, store, on_step=on_step, log=log, ranks=ranks,
            progress=args.progress if ranks.leader else False))
        plan = trainer.plan
        samples = f"evaluating {plan.train_samples + plan.holdout_samples} samples" \
            if args.testonly else \
            f"{plan.train_samples} training and {plan.holdout_samples} held-out samples"
        log(f"{config.model}: {len(trainer.model)} layers, freeze {config.freeze}, "
            f"{data_path(config)}; {samples}; trainer on {config.device}"
            + (f", rank 0 of {ranks.world_size}" if ranks.distributed else ""))
        if args.testonly and not ranks.leader:  # rank 0 evaluates on its own
            ranks.close()
            return None
        try:
            metrics = trainer.evaluate() if args.testonly else trainer.train(resume=args.resume)
        except RunComplete as complete:
            log(str(complete))
            return None
        plot = plot_path(args)
        if plot and trainer.selector.automatic and trainer.selector.plot(plot):
            metrics["split_selection"]["plot"] = plot
            log(f"split decision plotted to {plot}")
    ranks.close()
    if not ranks.leader:
        return metrics
    if args.metrics:
        with open(args.metrics, "w") as out:
            json.dump(metrics, out, indent=1)
    log(traffic_line(metrics, features_from(config)))
    return metrics


def _silent(line):
    """The log of a rank other than 0."""


def features_from(config):
    """Where the features come from, in words."""
    return f"the HAPI server at {config.intermediate_url}" if config.intermediate_url \
        else "the Swift proxy"


def data_path(config):
    """The split, and what crosses the network at it, in words."""
    if config.split == 0:
        return "split 0 (vanilla: raw shards from Swift, preprocessed and run here)"
    if config.split is None:
        return (f"split automatic (features from {features_from(config)}, or raw shards "
                "from Swift if it chooses split 0)")
    return f"split {config.split} (features from {features_from(config)})"


def traffic_line(metrics, source):
    """What the run received, beside what vanilla would have moved."""
    received, raw = metrics["bytes_received"] / 1e6, metrics["raw_shard_bytes"] / 1e6
    splits = set(metrics["split_selection"]["samples_per_split"])
    if splits == {"0"}:
        return f"received {received:.1f} MB of raw shards from Swift"
    what = f"from {source}" if "0" not in splits else f"from {source} and raw shards from Swift"
    return (f"received {received:.1f} MB {what}; the raw shards (what vanilla moves) are "
            f"{raw:.1f} MB")


def main(argv=None):
    """The ``hapi-train`` console script (and ``python client/main.py``):
    returns the exit status: 0 done, 1 the run failed (one line on stderr),
    2 flags that cannot work (one line), 130 interrupted."""
    try:
        args = parse_args(argv)
    except SystemExit as stop:  # --help, or flags that cannot work: already said
        return stop.code
    try:
        run(args)
    except expected_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
