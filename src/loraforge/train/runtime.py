"""Process-level memory housekeeping for training on a CPU.

glibc's malloc serves big blocks with mmap and unmaps them on free, but each time it frees such a block it raises its
mmap threshold to that block's size (up to 32 MB). From the second training step on, the activation buffers (a few
MB each) come from the heap instead, and the heap fragments: free pages stay resident. On the default model
(bench/train_throughput.py's q_proj,v_proj setup) peak RSS went from 2.2 GB in step 1 to 3.6 GB by step 3 with no
more memory in use. Handing the heap's free pages back after each step (`malloc_trim`) took the peak to 3.1 GB at no
measurable cost in step time.

Measured and rejected: a fixed mmap threshold (1 MiB) keeps the peak at step 1's level, but every activation
buffer is then a fresh mapping, and the page faults doubled the step time on this VM (3.6 s -> 7.5 s); fixed at 4 MiB
it changed nothing; MALLOC_ARENA_MAX=1 changed nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Give the allocator's free pages back to the OS (glibc's malloc_trim). True if the call was made (whether or
    not there was anything to give back), False where there is no such call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
