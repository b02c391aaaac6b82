"""Hostile shards through a real Swift proxy: every malformed shard is a 4xx
naming the culprit, the proxy's memory stays bounded, the proxy keeps
serving; and property-based tests of the shard reader and the engine on
arbitrary bytes and arbitrary tars.

The proxy of this module's cluster has a small ``max_shard_bytes`` (64 KiB)
so that the 413 needs no large object; every shard here is far smaller.
"""

import io
import json
import struct
import tarfile
import time
import uuid
import zlib
from pathlib import Path
from unittest import mock

import pytest
from helpers import feature_request, huge_png_header, png, raw_get, samples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from hapi import protocol, wire
from hapi.middleware.engine import FeatureEngine
from hapi.shards import Sample, ShardError, read_shard, write_shard

CONTAINER = "hapi-hostile"
MAX_SHARD_BYTES = 64 << 10
# A small model, so that loading it does not blur the memory readings.
MODEL = "mobilenet_v3_small"
REQUEST = feature_request(MODEL, weights="seed:0")
# The proxy's peak RSS may grow by at most this much while it refuses a bomb.
RSS_BOUND = 48 << 20


# Hostile shards ------------------------------------------------------------------


def tar_of(*members):
    """A tar of ``(TarInfo fields, payload)`` members, written as given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for fields, payload in members:
            info = tarfile.TarInfo(fields.pop("name"))
            for key, value in fields.items():
                setattr(info, key, value)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if info.isreg() else None)
    return buf.getvalue()


def sample_tar(image, label, key="000001", ext="png"):
    return tar_of(({"name": f"{key}.{ext}"}, image), ({"name": f"{key}.cls"}, label))


def jpeg_declaring(width, height):
    """A JPEG whose frame header declares ``width`` x ``height`` pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline frame: length, precision, height, width
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def png_of_zeros(width, height):
    """A real, fully decodable black PNG: a few KB whatever its size."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + b"\0" * 3 * width for _ in range(height))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def other_format(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format=fmt)
    return buf.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"


def sparse_tar(real_size):
    """A 10 KiB tar whose member is a GNU sparse file of ``real_size`` bytes:
    reading it would allocate that much (a tar decompression bomb)."""
    assert real_size < 8**11
    data = bytearray(sample_tar(b"x", b"1"))
    data[156:157] = b"S"  # GNU sparse; one map entry (offset 0, 1 byte); real size
    data[386:410] = b"%011o\0%011o\0" % (0, 1)
    data[483:495] = b"%011o\0" % real_size  # up to 8 GiB - 1
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\0 " % sum(data[:512])
    return bytes(data)


GOOD = write_shard(samples(2))
with tarfile.open(fileobj=io.BytesIO(GOOD)) as _tar:
    OFFSETS = {m.name: m.offset for m in _tar}


def broken_header(data, offset):
    data = bytearray(data)
    data[offset + 148] ^= 0xFF  # the header's checksum
    return bytes(data)


# name -> (object bytes, the member the 422 names, words of its message)
BAD_SHARDS = {
    "cut-in-first-header": (GOOD[:300], None, "not a valid tar"),
    "cut-in-member-data": (GOOD[:700], "000000.png", "truncated"),
    "cut-in-a-header": (GOOD[:OFFSETS["000000.cls"] + 100], "000000.png", "truncated"),
    # tarfile alone reads these two as a whole shard of one sample.
    "cut-between-samples": (GOOD[:OFFSETS["000001.png"]], "000000.cls", "truncated"),
    "broken-header-between-samples": (broken_header(GOOD, OFFSETS["000001.png"]),
                                      "000000.cls", "truncated or corrupt"),
    "text-as-jpg": (sample_tar(b"hello, world", b"1", ext="jpg"), "000001.jpg",
                    "not a decodable image"),
    "tiff-as-png": (sample_tar(other_format("TIFF"), b"1"), "000001.png",
                    "not a decodable image"),
    "gif-as-jpg": (sample_tar(other_format("GIF"), b"1", ext="jpg"), "000001.jpg",
                   "not a decodable image"),
    "eps-as-jpg": (sample_tar(EPS, b"1", ext="jpg"), "000001.jpg", "not a decodable image"),
    "png-bomb": (sample_tar(huge_png_header(100_000, 100_000), b"1"), "000001.png",
                 "pixel limit"),
    "jpeg-bomb": (sample_tar(jpeg_declaring(65_000, 65_000), b"1", ext="jpg"), "000001.jpg",
                  "pixel limit"),
    "jpeg-above-limit": (sample_tar(jpeg_declaring(8_000, 8_000), b"1", ext="jpg"),
                         "000001.jpg", "8000x8000, above the 40000000-pixel limit"),
    # 600,000 pixels, but resized for imagenet-64 it would be 73 x 43.8 million.
    "aspect-ratio-bomb": (sample_tar(png_of_zeros(600_000, 1), b"1"), "000001.png",
                          "would resize it to 43800000x73"),
    "sparse-member-bomb": (sparse_tar(4 << 30), "000001.png", "sparse file"),
    "empty-tar": (tar_of(), None, "holds no samples"),
    "only-labels": (tar_of(({"name": "000001.cls"}, b"1"), ({"name": "000002.cls"}, b"2")),
                    "000001.cls", "holds no samples"),
    "label-not-a-number": (sample_tar(png(1), b"cat"), "000001.cls", "'cat' is not an integer"),
    "label-negative": (sample_tar(png(1), b"-1"), "000001.cls", "'-1' is not an integer"),
    "label-fraction": (sample_tar(png(1), b"1.5"), "000001.cls", "is not an integer"),
    "label-empty": (sample_tar(png(1), b""), "000001.cls", "'' is not an integer"),
    "label-10**30": (sample_tar(png(1), str(10**30).encode()), "000001.cls",
                     "is not an integer between 0 and 9223372036854775807"),
    "label-5000-digits": (sample_tar(png(1), b"7" * 5000), "000001.cls", "is not an integer"),
    "label-unicode-digit": (sample_tar(png(1), "\u0663".encode()), "000001.cls",
                            "is not an integer"),
    "symlink-member": (tar_of(({"name": "000001.png", "type": tarfile.SYMTYPE,
                                "linkname": "/etc/passwd"}, b""),
                              ({"name": "000001.cls"}, b"1")),
                       "000001.png", "symbolic link"),
    "hardlink-member": (tar_of(({"name": "000000.png"}, png(0)), ({"name": "000000.cls"}, b"0"),
                               ({"name": "000001.png", "type": tarfile.LNKTYPE,
                                 "linkname": "000000.png"}, b""),
                               ({"name": "000001.cls"}, b"1")),
                        "000001.png", "hard link"),
    "fifo-member": (tar_of(({"name": "000001.png", "type": tarfile.FIFOTYPE}, b""),
                           ({"name": "000001.cls"}, b"1")), "000001.png", "device or fifo"),
}
BOMBS = ("png-bomb", "jpeg-bomb", "aspect-ratio-bomb", "sparse-member-bomb")


# The cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(swift_cluster_factory):
    return swift_cluster_factory("hostile", hapi_conf={
        "threads": "1", "device": "cpu", "max_shard_bytes": str(MAX_SHARD_BYTES)})


@pytest.fixture(scope="module")
def conn(cluster):
    connection = cluster.connection()
    connection.put_container(CONTAINER)
    connection.put_object(CONTAINER, "good.tar", GOOD)
    for name, (data, _, _) in BAD_SHARDS.items():
        assert len(data) < MAX_SHARD_BYTES, name
        connection.put_object(CONTAINER, name, data)
    connection.get_auth()
    yield connection
    connection.close()


def hapi_get(conn, name, req=REQUEST):
    return raw_get(f"{conn.url}/{CONTAINER}/{name}",
                   {**protocol.request_headers(req), "X-Auth-Token": conn.token})


def frames_of(body):
    return list(wire.read_frames(io.BytesIO(body).read))


def assert_serving(cluster, conn):
    """The proxy is alive: healthcheck, a plain GET, a feature request."""
    assert raw_get(f"{cluster.proxy_url}/healthcheck", {}) == (200, b"OK")
    assert conn.get_object(CONTAINER, "good.tar")[1] == GOOD
    status, body = hapi_get(conn, "good.tar")
    assert status == 200
    frames = frames_of(body)
    assert frames[-1].kind == "end" and frames[-1].meta["samples"] == "2"


def memory(pid):
    """(VmRSS, VmHWM) of ``pid`` in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if line.startswith(("VmRSS", "VmHWM")))
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))


# Through the proxy -------------------------------------------------------------


@pytest.mark.parametrize("name", list(BAD_SHARDS))
def test_bad_shard_is_422_naming_the_member(cluster, conn, name):
    _, member, words = BAD_SHARDS[name]
    started = time.monotonic()
    status, body = hapi_get(conn, name)
    elapsed = time.monotonic() - started
    assert status == 422, body
    doc = json.loads(body)
    assert doc["member"] == member and words in doc["error"], doc
    assert elapsed < 5, f"{name} took {elapsed:.1f} s to refuse"
    assert_serving(cluster, conn)


def peak_growth(cluster, conn, name):
    """The proxy's answer to a feature request for ``name``, and how far its
    peak RSS (VmHWM, reset just before) rose above its RSS before it."""
    pid = cluster.status()["proxy"]["pid"]
    assert_serving(cluster, conn)  # the model and its memory cost are cached
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before, _ = memory(pid)
    status, body = hapi_get(conn, name)
    after, peak = memory(pid)
    print(f"\n{name}: proxy RSS {before / 2**20:.1f} MiB before, {after / 2**20:.1f} MiB "
          f"after, peak {peak / 2**20:.1f} MiB ({(peak - before) / 2**20:+.1f} MiB)")
    return status, body, peak - before


@pytest.mark.parametrize("name", BOMBS)
def test_bombs_leave_the_proxy_memory_bounded(cluster, conn, name):
    """Peak RSS while refusing a bomb stays within RSS_BOUND of the RSS before
    it. Without the checks: the aspect-ratio bomb's 1.8 KB PNG would be
    resized to 3.2 giga-pixels, the sparse member's 10 KB tar read as 4 GiB."""
    status, body, growth = peak_growth(cluster, conn, name)
    assert status == 422 and json.loads(body)["member"] == BAD_SHARDS[name][1]
    assert growth < RSS_BOUND
    assert_serving(cluster, conn)


def test_the_memory_reading_sees_a_large_image(cluster, conn):
    """The control for the bombs: a real 9-megapixel image (a 27 KB PNG), which
    the proxy decodes, shows in the same reading."""
    conn.put_object(CONTAINER, "large-image.tar", sample_tar(png_of_zeros(3000, 3000), b"1"))
    status, body, growth = peak_growth(cluster, conn, "large-image.tar")
    assert status == 200 and frames_of(body)[-1].meta["samples"] == "1"
    assert growth > 3000 * 3000 * 3


def test_member_names_are_names_not_paths(cluster, conn):
    """Traversing and absolute member names come back as sample keys; nothing
    is written where they point (the proxy's working folder is the cluster's)."""
    marker = f"hapi-hostile-{uuid.uuid4().hex}"
    keys = [f"../../{marker}", f"/tmp/{marker}", f"a/../../../{marker}"]
    shard = write_shard([Sample(key, png(i), "png", i) for i, key in enumerate(keys)])
    conn.put_object(CONTAINER, "traversal.tar", shard)
    status, body = hapi_get(conn, "traversal.tar")
    assert status == 200
    frames = frames_of(body)
    assert sorted(k for f in frames[:-1] for k in f.keys) == sorted(keys)
    for folder in (cluster.root, cluster.root.parent, cluster.root.parent.parent, Path("/tmp")):
        assert not list(folder.glob(f"{marker}*")), folder
    assert_serving(cluster, conn)


def test_shard_above_max_shard_bytes_is_413(cluster, conn):
    big = write_shard(samples(30, size=48))
    assert len(big) > MAX_SHARD_BYTES
    conn.put_object(CONTAINER, "big.tar", big)
    status, body = hapi_get(conn, "big.tar")
    assert status == 413
    assert f"above max_shard_bytes {MAX_SHARD_BYTES}" in json.loads(body)["error"]
    assert_serving(cluster, conn)


def test_large_object_made_of_small_segments_is_413(cluster, conn):
    """A dynamic large object whose every segment is small: its assembled size counts."""
    big = write_shard(samples(30, size=48))
    third = len(big) // 3 + 1
    for i in range(3):
        conn.put_object(CONTAINER, f"segments/big/{i:02d}", big[i * third:(i + 1) * third])
    conn.put_object(CONTAINER, "dlo.tar", b"",
                    headers={"X-Object-Manifest": f"{CONTAINER}/segments/big/"})
    assert conn.get_object(CONTAINER, "dlo.tar")[1] == big
    status, body = hapi_get(conn, "dlo.tar")
    assert status == 413, body
    assert_serving(cluster, conn)


def test_undeclared_length_is_cut_at_max_shard_bytes():
    """A body without Content-Length (a chunked response) is read only up to
    the limit, then refused: the rest is never pulled into memory."""
    from hapi.middleware.filter import HapiMiddleware
    pulled = []

    def endless():
        while True:
            pulled.append(1)
            yield b"x" * 16384

    def app(env, start_response):
        start_response("200 OK", [("Content-Type", "application/x-tar")])
        return endless()

    middleware = HapiMiddleware(app, {"max_shard_bytes": str(MAX_SHARD_BYTES), "device": "cpu"})
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/v1/AUTH_x/c/o", "SERVER_NAME": "x",
           "SERVER_PORT": "80", "wsgi.input": io.BytesIO(),
           **{"HTTP_" + k.upper().replace("-", "_"): v
              for k, v in protocol.request_headers(REQUEST).items()}}
    statuses = []
    body = b"".join(middleware(env, lambda status, headers: statuses.append(status)))
    assert statuses[0].startswith("413"), (statuses, body)
    assert "above max_shard_bytes" in json.loads(body)["error"]
    assert len(pulled) == MAX_SHARD_BYTES // 16384 + 1


# The engine never writes a member anywhere -----------------------------------------


def test_engine_reads_shards_in_memory_only(tmp_path, monkeypatch):
    """open_shard and extract on a shard of traversing names, with every way
    to write a file from Python made to fail: nothing is written."""
    monkeypatch.chdir(tmp_path)
    keys = ["../../etc/passwd", "/etc/hapi-absolute", "ok"]
    shard = write_shard([Sample(key, png(i), "png", i) for i, key in enumerate(keys)])
    engine = FeatureEngine(device="cpu")
    model = engine.load_model((MODEL, "seed:0"), MODEL, REQUEST.weights)
    real_open = open

    def read_only_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise AssertionError(f"write to {file}")
        return real_open(file, mode, *args, **kwargs)

    refuse = mock.Mock(side_effect=AssertionError("tar extraction"))
    with mock.patch("builtins.open", read_only_open), \
            mock.patch.object(tarfile.TarFile, "extract", refuse), \
            mock.patch.object(tarfile.TarFile, "extractall", refuse), \
            mock.patch.object(tarfile.TarFile, "makefile", refuse):
        opened = engine.open_shard(shard, REQUEST.preset)
        frame = wire.decode_frame(engine.extract(model, opened, REQUEST, 0)[wire.LENGTH.size:])
    assert sorted(frame.keys) == sorted(keys)
    assert not refuse.called and list(tmp_path.iterdir()) == []


# Property-based: arbitrary bytes and arbitrary tars ------------------------------

ENGINE = None


def engine():
    global ENGINE
    if ENGINE is None:
        ENGINE = FeatureEngine(device="cpu", max_image_pixels=1_000_000)
    return ENGINE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_fail_with_shard_error(data):
    for parse in (read_shard, engine().open_shard):
        try:
            parse(data)
        except ShardError:
            pass


def image_of(width, height, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (width % 256, 7, 99)).save(buf, format=fmt)
    return buf.getvalue()


def damaged(data, cut, flips):
    data = bytearray(data if cut is None else data[:cut % (len(data) + 1)])
    for at, value in flips:
        if data:
            data[at % len(data)] = value
    return bytes(data)


DAMAGE = st.tuples(st.one_of(st.none(), st.none(), st.integers(0, 1 << 16)),
                   st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=2))
GOOD_IMAGES = st.builds(image_of, st.integers(1, 24), st.integers(1, 24),
                        st.sampled_from(["PNG", "JPEG", "WEBP", "BMP", "PPM"]))
BAD_IMAGES = st.one_of(
    st.builds(lambda data, damage: damaged(data, *damage), GOOD_IMAGES, DAMAGE),
    st.sampled_from([huge_png_header(), jpeg_declaring(9000, 9000), png_of_zeros(5000, 1),
                     other_format("GIF"), EPS, b""]),
    st.binary(max_size=64),
)
GOOD_LABELS = st.integers(0, 2**63 - 1).map(lambda n: str(n).encode())
BAD_LABELS = st.one_of(st.integers(2**63, 10**30).map(lambda n: str(n).encode()),
                       st.sampled_from([b"-1", b"", b" 3\n", b"1e3", "\u0663".encode()]),
                       st.binary(max_size=8))


def mostly(draw, good, bad):
    """A draw of ``good`` five times in six, else of ``bad``."""
    return draw(good if draw(st.integers(0, 5)) else bad)


KEYS = st.sampled_from(["000001", "000002", "../../x", "/abs/k", "a/b", "dir/", "k.k"])
NAMES = st.builds(lambda stem, ext: f"{stem}.{ext}" if ext else stem or "x",
                  KEYS, st.sampled_from(["png", "jpg", "cls", "txt", ""]))
MEMBER_TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                tarfile.DIRTYPE, tarfile.FIFOTYPE])


@st.composite
def tars(draw):
    """Mostly well-formed shards of odd samples, sometimes with odd members,
    sometimes cut or with bytes flipped anywhere."""
    members = []
    for key in draw(st.lists(KEYS, max_size=4, unique=True)):
        ext = draw(st.sampled_from(["png", "jpg", "webp", "PNG"]))
        members += [({"name": f"{key}.{ext}"}, mostly(draw, GOOD_IMAGES, BAD_IMAGES)),
                    ({"name": f"{key}.cls"}, mostly(draw, GOOD_LABELS, BAD_LABELS))]
    odd_members = st.lists(st.tuples(NAMES, MEMBER_TYPES, st.binary(max_size=32)), max_size=1)
    for name, kind, payload in draw(odd_members) if draw(st.integers(0, 2)) == 0 else ():
        members.insert(draw(st.integers(0, len(members))),
                       ({"name": name, "type": kind, "linkname": "000001.png"},
                        payload if kind == tarfile.REGTYPE else b""))
    data = tar_of(*members)
    if draw(st.integers(0, 3)) == 0:
        data = damaged(data, *draw(DAMAGE))
    return data


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tars())
def test_arbitrary_tars_fail_with_shard_error_or_extract(data):
    """Whatever the members (names, types, payloads, cut or corrupted): the
    engine either extracts every batch or raises ShardError; labels fit int64."""
    try:
        opened = engine().open_shard(data, "resize-32")
    except ShardError:
        return
    assert opened and all(0 <= s.label < 2**63 for s in opened)
    req = feature_request(MODEL, split=1, weights="seed:0", preset="resize-32")
    model = engine().load_model((MODEL, "seed:0"), MODEL, req.weights)
    try:
        engine().extract(model, opened, req, 0)
    except ShardError:
        pass
