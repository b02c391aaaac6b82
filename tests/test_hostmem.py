"""The host's memory: the C allocator keeps what freed tensors give back."""

import json
import platform
import subprocess
import sys

import pytest

from hapi import hostmem
from hapi.client.autosplit.profilecache import times_key
from hapi.zoo import build_model

GLIBC = platform.libc_ver()

# In a fresh process: how many bytes glibc maps for a block of 8 MiB
# (mallinfo2's hblkhd before and after), with and without keep_freed_memory().
MAPPED = """
import ctypes, json, sys
from hapi import hostmem

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
kept = hostmem.keep_freed_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2().hblkhd
block = libc.malloc(8 << 20)
mapped = libc.mallinfo2().hblkhd - before
libc.free(block)
print(json.dumps({"kept": kept, "mapped": mapped, "allocator": hostmem.allocator()}))
"""


def mapped(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", MAPPED, mode], capture_output=True,
                          text=True, check=True, timeout=60)
    return json.loads(done.stdout)


@pytest.mark.skipif(GLIBC[0] != "glibc" or tuple(map(int, GLIBC[1].split("."))) < (2, 33),
                    reason=f"mallinfo2 needs glibc 2.33 or later; this C library is {GLIBC}")
def test_a_process_that_keeps_freed_memory_serves_large_blocks_from_its_heap():
    default, kept = mapped("default"), mapped("keep")
    assert default["mapped"] >= 8 << 20 and default["allocator"] == "default"
    assert kept["kept"] is True and kept["mapped"] == 0
    assert kept["allocator"] == "glibc, freed memory kept"


def test_times_cached_with_the_default_allocator_are_not_read_with_memory_kept(monkeypatch):
    model = build_model("alexnet", seed=0)
    # A trainer run in this process (an end-to-end test) kept freed memory.
    monkeypatch.setattr(hostmem, "_freed_memory_kept", False)
    default = times_key(model, (3, 224, 224), 5, 8, "cpu")
    monkeypatch.setattr(hostmem, "_freed_memory_kept", True)
    kept = times_key(model, (3, 224, 224), 5, 8, "cpu")
    assert default["allocator"] == "default" and kept["allocator"] != "default"
    assert {**kept, "allocator": "default"} == default


def test_keeping_freed_memory_is_refused_off_glibc(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(hostmem, "_freed_memory_kept", False)
    assert hostmem.keep_freed_memory() is False
    assert hostmem.allocator() == "default"
