"""Putting data sets into Swift: the sources, packing into shards, hapi-load."""

import io
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from hapi.client_setup import datasets
from hapi.client_setup.load import (
    LoadError,
    choose_shard_size,
    connect,
    load_manifest,
    main,
    pack,
    shard_name,
    store_dataset,
    upload_dataset,
)
from hapi.shards import MANIFEST_NAME, Manifest, Sample, read_shard
from hapi.stores import DirectoryStore


def make_samples(count, classes=3):
    return [Sample(key=datasets.sample_key(i, count), image=bytes([i % 256]) * (i + 1),
                   ext="png", label=i % classes) for i in range(count)]


def decode(image):
    return Image.open(io.BytesIO(image))


# -- packing ------------------------------------------------------------------

def test_pack_round_trip_keeps_keys_labels_and_bytes():
    samples = make_samples(7)
    shards = list(pack(samples, shard_size=3))
    assert [(name, count) for name, _, count in shards] == [
        ("shard-000000.tar", 3), ("shard-000001.tar", 3), ("shard-000002.tar", 1)]
    assert [s for _, data, _ in shards for s in read_shard(data)] == samples


def test_pack_is_lazy_and_checks_shard_size():
    shards = pack(iter(make_samples(5)), shard_size=2)
    assert next(shards)[2] == 2
    with pytest.raises(ValueError, match="at least 1"):
        next(pack(make_samples(1), shard_size=0))
    assert list(pack([], shard_size=4)) == []


def test_sample_keys_are_zero_padded_and_sort_in_order():
    assert datasets.sample_key(7, 1797) == "000007"
    keys = [datasets.sample_key(i, 2_000_000) for i in (5, 999_999, 1_000_000)]
    assert keys == sorted(keys) and len({len(k) for k in keys}) == 1


# -- sources ------------------------------------------------------------------

def test_digits_source_is_the_real_data_as_8x8_png():
    source = datasets.digits()
    samples = list(source.samples)
    reference = load_digits()
    assert source.classes == [str(d) for d in range(10)]
    assert source.count == len(samples) == 1797
    assert [s.label for s in samples] == reference.target.tolist()
    assert [s.key for s in samples] == sorted(s.key for s in samples)
    for index in (0, 1000, 1796):
        image = decode(samples[index].image)
        assert (image.format, image.mode, image.size) == ("PNG", "L", (8, 8))
        expected = np.rint(reference.images[index] * 255 / 16)
        assert np.array_equal(np.asarray(image), expected)


def test_synthetic_is_deterministic_and_photo_sized():
    first = list(datasets.synthetic(6, size=224, classes=4, seed=3).samples)
    again = list(datasets.synthetic(6, size=224, classes=4, seed=3).samples)
    other = list(datasets.synthetic(6, size=224, classes=4, seed=4).samples)
    assert first == again
    assert all(a.image != b.image for a, b in zip(first, other, strict=True))
    assert [s.label for s in first] == [0, 1, 2, 3, 0, 1]
    for sample in first:
        image = decode(sample.image)
        assert (sample.ext, image.format, image.mode, image.size) == ("jpg", "JPEG", "RGB",
                                                                     (224, 224))
        assert 15_000 < len(sample.image) < 60_000  # photo-like: real 224 px photos are 12-30 KB


def test_synthetic_classes_differ_more_than_images_within_a_class():
    def mean_colour(label):
        return np.mean([datasets.synthetic_image(0, i, label, 4, 64).mean(axis=(0, 1))
                        for i in range(8)], axis=0)

    colours = [mean_colour(label) for label in range(4)]
    spread = min(np.abs(a - b).max() for i, a in enumerate(colours) for b in colours[i + 1:])
    assert spread > 10


def test_synthetic_rejects_bad_parameters():
    with pytest.raises(datasets.SourceError, match="quality"):
        datasets.synthetic(10, quality=0)


def write_image(path, fmt, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), colour).save(path, fmt)
    return path.read_bytes()


def test_image_folder_source(tmp_path, caplog):
    files = {
        tmp_path / "cat" / "a.jpg": write_image(tmp_path / "cat" / "a.jpg", "JPEG", "red"),
        tmp_path / "cat" / "b.PNG": write_image(tmp_path / "cat" / "b.PNG", "PNG", "blue"),
        tmp_path / "ant" / "c.png": write_image(tmp_path / "ant" / "c.png", "PNG", "green"),
    }
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "README").write_text("a file at the top is not a class")
    with caplog.at_level(logging.WARNING):
        source = datasets.image_folder(tmp_path, seed=1)
    assert "skipped 1 non-image files" in caplog.text
    assert source.classes == ["ant", "cat"]
    samples = list(source.samples)
    assert source.count == len(samples) == 3
    assert [s.key for s in samples] == ["000000", "000001", "000002"]
    labels = {files[p]: label for p, label in ((tmp_path / "cat" / "a.jpg", 1),
                                               (tmp_path / "cat" / "b.PNG", 1),
                                               (tmp_path / "ant" / "c.png", 0))}
    assert {s.image: s.label for s in samples} == labels
    assert sorted(s.ext for s in samples) == ["jpg", "png", "png"]
    again = list(datasets.image_folder(tmp_path, seed=1).samples)
    assert again == samples


def test_image_folder_errors(tmp_path):
    with pytest.raises(datasets.SourceError, match="does not exist"):
        datasets.image_folder(tmp_path / "missing")
    (tmp_path / "loose.jpg").write_bytes(b"")
    with pytest.raises(datasets.SourceError, match="no class subfolders"):
        datasets.image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(datasets.SourceError, match="holds no images"):
        datasets.image_folder(tmp_path)


# -- storing ------------------------------------------------------------------

def stored_manifest(path):
    return Manifest.from_json((path / MANIFEST_NAME).read_bytes())


def test_store_writes_shards_and_manifest_and_reports_progress(tmp_path):
    progress = []
    manifest = store_dataset(DirectoryStore(tmp_path), make_samples(10), ["a", "b", "c"],
                             shard_size=4, on_shard=lambda *args: progress.append(args))
    assert manifest == stored_manifest(tmp_path)
    assert manifest.classes == ["a", "b", "c"] and manifest.samples == 10
    assert [(s["name"], s["samples"]) for s in manifest.shards] == [
        (shard_name(0), 4), (shard_name(1), 4), (shard_name(2), 2)]
    assert [(name, count) for name, count, _ in progress] == [
        (s["name"], s["samples"]) for s in manifest.shards]
    assert [size for *_, size in progress] == [
        (tmp_path / s["name"]).stat().st_size for s in manifest.shards]
    doc = json.loads((tmp_path / MANIFEST_NAME).read_bytes())
    assert doc["samples"] == 10


def test_rewriting_removes_stale_shards_only(tmp_path):
    store_dataset(DirectoryStore(tmp_path), make_samples(10), ["a", "b", "c"], shard_size=3)
    (tmp_path / "notes.txt").write_text("kept")
    manifest = store_dataset(DirectoryStore(tmp_path), make_samples(5), ["a", "b", "c"],
                             shard_size=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        MANIFEST_NAME, "notes.txt", shard_name(0), shard_name(1)]
    assert stored_manifest(tmp_path) == manifest and manifest.samples == 5
    assert read_shard((tmp_path / shard_name(1)).read_bytes()) == make_samples(5)[3:]


@pytest.mark.parametrize(("count", "requested", "size", "noted"), [
    (1797, None, 180, False),   # 10 shards, not 8 of 256
    (100_000, None, 256, False),
    (37, None, 4, False),
    (5, None, 1, False),        # as many shards as samples
    (30, 16, 16, True),         # 2 shards: said, with the size that makes 10
    (30, 3, 3, False),
    (5, 1, 1, False),
])
def test_shard_size_makes_several_shards(count, requested, size, noted):
    chosen, note = choose_shard_size(count, requested)
    assert chosen == size and (note is not None) == noted
    if noted:
        assert "--shard-size 3 makes 10" in note


def test_cli_chooses_shard_size_and_says_when_given_one_makes_few(tmp_path, capsys):
    main(["digits", "--out", str(tmp_path / "auto"), "--limit", "300"])
    out, err = capsys.readouterr()
    assert "wrote 300 samples in 10 shards" in out and err == ""
    main(["digits", "--out", str(tmp_path / "big"), "--limit", "300", "--shard-size", "256"])
    out, err = capsys.readouterr()
    assert "wrote 300 samples in 2 shards" in out
    assert err.strip() == ("hapi-load: note: 300 samples in shards of 256 make 2; the trainer "
                           "holds out whole shards (20% by default) and needs at least 2, so few "
                           "shards make a coarse hold-out: --shard-size 30 makes 10")


def test_a_file_that_does_not_decode_is_refused_naming_it(tmp_path):
    for index in range(3):
        write_image(tmp_path / "src" / "cat" / f"{index}.png", "PNG", "red")
    broken = tmp_path / "src" / "cat" / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(SystemExit) as err:
        main(["folder", "--path", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    assert str(err.value) == (f"hapi-load: error: {broken}: not a decodable image: not a "
                              "JPEG, PNG, WebP, BMP or PPM image; remove or replace the file "
                              "and load again")
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_empty_source_fails_before_writing(tmp_path):
    with pytest.raises(LoadError, match="no samples"):
        store_dataset(DirectoryStore(tmp_path / "out"), [], ["a"])
    assert not (tmp_path / "out").exists()


# -- the command --------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    """No Swift credentials in the environment; ``monkeypatch`` to set some."""
    for name in ("ST_AUTH", "ST_USER", "ST_KEY", "ST_AUTH_VERSION", "OS_STORAGE_URL",
                 "OS_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_cli_out_writes_a_local_data_set(tmp_path, capsys):
    main(["digits", "--out", str(tmp_path), "--shard-size", "500", "--limit", "1200"])
    assert "wrote 1200 samples in 3 shards (10 classes)" in capsys.readouterr().out
    manifest = stored_manifest(tmp_path)
    assert [s["samples"] for s in manifest.shards] == [500, 500, 200]
    samples = read_shard((tmp_path / shard_name(2)).read_bytes())
    assert samples[0].key == "001000" and samples[-1].key == "001199"


def test_module_runs_as_a_command(tmp_path):
    subprocess.run([sys.executable, "-m", "hapi.client_setup.load", "synthetic", "--count", "5",
                    "--size", "32", "--out", str(tmp_path)], check=True, capture_output=True)
    assert stored_manifest(tmp_path).samples == 5


@pytest.mark.parametrize(("argv", "message"), [
    (["folder", "--path", "/nonexistent/hapi", "--out", "x"], "does not exist"),
    (["digits", "--container", "c"], "no Swift credentials"),
    (["synthetic", "--count", "1", "--size", "8", "--container", "c", "--retries", "0",
      "--auth", "http://127.0.0.1:9/auth/v1.0", "--user", "a:b", "--key", "k"],
     "cannot reach Swift"),
])
def test_cli_errors_are_clear(argv, message, clean_env):
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_cli_needs_one_target(capsys):
    with pytest.raises(SystemExit):
        main(["digits"])
    assert "one of the arguments --container --out is required" in capsys.readouterr().err


def test_connect_uses_a_token_first_and_keeps_the_key_to_renew_it(clean_env):
    clean_env.setenv("OS_STORAGE_URL", "http://swift.example/v1/AUTH_x")
    clean_env.setenv("OS_AUTH_TOKEN", "tok")
    clean_env.setenv("ST_AUTH", "http://swift.example/auth/v1.0")
    conn = connect(user="acct:me", key="secret", token="flag-tok")
    assert (conn.url, conn.token) == ("http://swift.example/v1/AUTH_x", "flag-tok")
    assert (conn.authurl, conn.user, conn.key) == ("http://swift.example/auth/v1.0", "acct:me",
                                                   "secret")


def test_connect_without_credentials_names_the_flags(clean_env):
    clean_env.setenv("ST_USER", "acct:me")
    with pytest.raises(LoadError, match=r"missing the auth URL .*, the key .*--os-auth-token"):
        connect()


# -- against a real Swift -----------------------------------------------------

def test_token_for_the_cli(swift_cluster, clean_env, capsys):
    url, token = swift_cluster.connection().get_auth()
    main(["digits", "--limit", "5", "--container", "test-load-token", "--os-storage-url", url,
          "--os-auth-token", token])
    assert "wrote 5 samples" in capsys.readouterr().out


def test_upload_digits_to_swift(swift_conn):
    source = datasets.digits()
    samples = list(source.samples)[:250]
    manifest = upload_dataset(swift_conn, "test-load-digits", samples, source.classes,
                              shard_size=100)
    _, objects = swift_conn.get_container("test-load-digits")
    names = [shard_name(i) for i in range(3)]
    assert sorted(o["name"] for o in objects) == sorted([MANIFEST_NAME, *names])
    assert load_manifest(swift_conn, "test-load-digits") == manifest
    assert [s["samples"] for s in manifest.shards] == [100, 100, 50]
    headers, body = swift_conn.get_object("test-load-digits", shard_name(2))
    assert headers["content-type"] == "application/x-tar"
    assert read_shard(body) == samples[200:]

    upload_dataset(swift_conn, "test-load-digits", samples[:120], source.classes, shard_size=100)
    _, objects = swift_conn.get_container("test-load-digits")
    assert sorted(o["name"] for o in objects) == sorted([MANIFEST_NAME, *names[:2]])
    assert load_manifest(swift_conn, "test-load-digits").samples == 120


def test_cli_uploads_with_environment_credentials(swift_cluster, clean_env, capsys):
    user, key = swift_cluster.users["tester"]
    clean_env.setenv("ST_AUTH", swift_cluster.auth_url)
    clean_env.setenv("ST_USER", user)
    clean_env.setenv("ST_KEY", key)
    main(["synthetic", "--count", "30", "--size", "64", "--container", "test-load-synth",
          "--shard-size", "16"])
    assert "to container 'test-load-synth'" in capsys.readouterr().out
    manifest = load_manifest(swift_cluster.connection(), "test-load-synth")
    assert [s["samples"] for s in manifest.shards] == [16, 14]
    assert manifest.classes[0] == "class_0"


def test_swift_errors_are_clear(swift_cluster, clean_env):
    with pytest.raises(LoadError, match="not a HAPI data set"):
        load_manifest(swift_cluster.connection(), "test-load-missing")
    user, _ = swift_cluster.users["tester"]
    with pytest.raises(SystemExit, match="authentication failed"):
        main(["digits", "--limit", "10", "--container", "test-load-denied",
              "--auth", swift_cluster.auth_url, "--user", user, "--key", "wrong"])
    reader, key = swift_cluster.users["reader"]
    with pytest.raises(SystemExit, match="access denied"):
        main(["digits", "--limit", "10", "--container", "test-load-denied",
              "--auth", swift_cluster.auth_url, "--user", reader, "--key", key])
