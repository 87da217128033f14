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
import logging
import os
import sys
import time

import torch

log = logging.getLogger("loraforge")


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


class CpuShare:
    """Torch threads that follow the CPUs other processes leave free, re-decided before every step.

    Two OpenMP threads on two cores, one of which another job holds, wait on each other at every barrier: on this
    project's VMs a demo step went from 5.2 s to 15.4 s (and to 100 s on another). One thread fewer then is faster
    (8.8 s); on an idle machine all of them are (bench/contention.py). Other processes' load over the last step is
    the busy time of the CPUs this process may use (/proc/stat) less this process's own CPU time (/proc/self/stat).
    Linux only; elsewhere the thread count stays as torch set it.
    """

    def __init__(self) -> None:
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.max = torch.get_num_threads()
        self.threads = self.max
        self._last = self._sample()
        if self._last is not None:
            time.sleep(0.2)  # a first look before the first step
            self.update()

    def _sample(self) -> tuple[int, int, float] | None:
        """(busy jiffies of our CPUs, this process's jiffies, wall time) now, or None where /proc is missing."""
        try:
            busy = 0
            with open("/proc/stat") as fh:
                for line in fh:
                    name, *fields = line.split()
                    if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cpus:
                        values = [int(v) for v in fields[:8]]
                        busy += sum(values) - values[3] - values[4]  # all but idle and iowait
            with open("/proc/self/stat") as fh:
                own = fh.read().rsplit(")", 1)[1].split()
            return busy, int(own[11]) + int(own[12]), time.monotonic()  # utime + stime, every thread
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> CpuShare:
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.max)  # what the process had before the run

    def update(self) -> int:
        """Set and return the thread count for the next step: the CPUs free of other processes, at least one."""
        now = self._sample()
        if now is None or self._last is None or self.max < 2:
            return self.threads
        (busy0, own0, t0), (busy1, own1, t1) = self._last, now
        self._last = now
        elapsed = (t1 - t0) * os.sysconf("SC_CLK_TCK")
        if elapsed <= 0:
            return self.threads
        others = max(0.0, (busy1 - busy0 - (own1 - own0)) / elapsed)  # cores other processes kept busy
        want = max(1, min(self.max, len(self.cpus) - int(others + 0.5)))
        if want != self.threads:
            log.info("threads: %d -> %d (other processes are using %.1f of %d CPUs)", self.threads, want, others,
                     len(self.cpus))
            torch.set_num_threads(want)
            self.threads = want
        return want
