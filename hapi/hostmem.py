"""The host's memory: what is available, as both tiers read it, and how
the C allocator keeps what freed tensors give back."""

import ctypes
import os
import platform

# glibc's mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, not from mmap: glibc's largest
# threshold on a 64-bit host (half its largest heap).
MMAP_THRESHOLD_BYTES = 32 << 20
# Free memory at the top of the heap is given back to the system past this.
TRIM_THRESHOLD_BYTES = 1 << 30

_freed_memory_kept = False


def available_memory_bytes():
    """Memory available for new work now: Linux's MemAvailable, else the
    free physical pages; None when neither can be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory that freed tensors give back
    (:data:`MMAP_THRESHOLD_BYTES`, :data:`TRIM_THRESHOLD_BYTES`) for the
    rest of the process; False where the C library is not glibc.

    By default glibc maps every block above a threshold that starts at
    128 KiB and moves with the last one freed, and gives the heap's top
    back to the system: a CPU forward in a fresh process faults the pages
    of its activations in afresh, while one that has run many forwards
    has grown its heap. The trainer's speed, read from a few passes
    against the same passes timed where its layer times were measured,
    read resnet18 1.47x slower than it was in fresh processes on an idle
    core; with the thresholds set, 0.99 (``benchmarks/allocator.py``).
    The cost is memory: the process keeps the peak of what its tensors
    used, as a training process does anyway."""
    global _freed_memory_kept
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    _freed_memory_kept = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _freed_memory_kept


def allocator() -> str:
    """How this process's allocator treats freed memory (part of what a
    cached time was measured with)."""
    return "glibc, freed memory kept" if _freed_memory_kept else "default"
