"""The shard format: WebDataset's member naming rule, in the reader, the
writer and through the storage tier."""

import io
import json
import tarfile

import pytest
from helpers import feature_request, png, raw_get

from hapi import protocol
from hapi.shards import Sample, ShardError, read_shard, split_member_name, write_shard


def tar_of(*members):
    """A tar of ``(name, payload)`` members, in the order given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.mark.parametrize(("name", "key", "ext"), [
    ("000001.jpg", "000001", "jpg"),
    ("a.b.jpg", "a", "b.jpg"),
    ("a.seg.PNG", "a", "seg.png"),
    ("train/cat.001.cls", "train/cat", "001.cls"),
    ("v1.2/x.png", "v1.2/x", "png"),
    ("noext", "noext", ""),
])
def test_key_ends_at_the_first_dot_of_the_last_component(name, key, ext):
    assert split_member_name(name) == (key, ext)


def test_members_with_a_longer_extension_belong_to_the_sample():
    """``a.seg.png`` is field ``seg.png`` of sample ``a`` (ignored), not an
    image of a sample ``a.seg`` without a label."""
    image = png(1)
    shard = tar_of(("a.png", image), ("a.cls", b"3"), ("a.seg.png", png(2)),
                   ("a.meta.json", b"{}"))
    assert read_shard(shard) == [Sample(key="a", image=image, ext="png", label=3)]


def test_folders_are_part_of_the_key():
    shard = tar_of(("v1.0/x.png", png(1)), ("v1.0/x.cls", b"1"), ("x.png", png(2)),
                   ("x.cls", b"2"))
    assert [(s.key, s.label) for s in read_shard(shard)] == [("v1.0/x", 1), ("x", 2)]


@pytest.mark.parametrize(("members", "culprit", "words"), [
    ([("a.png", b"1"), ("a.cls", b"1"), ("a.PNG", b"2")], "a.PNG", "two members with extension"),
    ([("a.png", b"1"), ("a.cls", b"1"), ("a.cls", b"2")], "a.cls", "two members with extension"),
    ([("a.png", b"1"), ("a.jpg", b"2"), ("a.cls", b"1")], "a.jpg", "two images"),
    ([("a", b"1"), ("a.cls", b"1")], "a", "no key or no extension"),
    ([(".png", b"1")], ".png", "no key or no extension"),
])
def test_ambiguous_samples_are_refused_naming_the_member(members, culprit, words):
    with pytest.raises(ShardError, match=words) as err:
        read_shard(tar_of(*members))
    assert err.value.member == culprit


@pytest.mark.parametrize(("sample", "words"), [
    (Sample("a.b", b"x", "png", 1), "would not read back"),
    (Sample("", b"x", "png", 1), "would not read back"),
    (Sample("a", b"x", "cls", 1), "is not one of"),
    (Sample("a", b"x", "seg.png", 1), "is not one of"),
])
def test_writer_refuses_what_would_not_read_back(sample, words):
    with pytest.raises(ShardError, match=words):
        write_shard([sample])


def test_writer_refuses_a_key_twice():
    with pytest.raises(ShardError, match="used twice") as err:
        write_shard([Sample("a", b"x", "png", 1), Sample("a", b"y", "jpg", 2)])
    assert err.value.member == "a.jpg"


def test_writer_round_trips_keys_with_folders():
    samples = [Sample("d.1/a", png(1), "png", 1), Sample("d.1/b", png(2), "JPG", 2)]
    assert read_shard(write_shard(samples)) == [
        samples[0], Sample("d.1/b", png(2), "jpg", 2)]


def test_storage_tier_answers_422_naming_the_duplicate_member(swift_cluster, swift_conn):
    container = "test-shards-duplicate"
    swift_conn.put_container(container)
    swift_conn.put_object(container, "dup.tar", tar_of(
        ("000001.png", png(1)), ("000001.cls", b"1"), ("000001.png", png(2))))
    swift_conn.get_auth()
    request = feature_request("mobilenet_v3_small")
    status, body = raw_get(f"{swift_conn.url}/{container}/dup.tar",
                           {**protocol.request_headers(request),
                            "X-Auth-Token": swift_conn.token})
    assert status == 422, body
    doc = json.loads(body)
    assert doc["member"] == "000001.png" and "two members with extension" in doc["error"]
