"""Memory settings for the long-running processes, `serve` and `worker`: the garbage collector's, and the C
allocator's."""

from __future__ import annotations

import ctypes
import gc
import os
import sys

# A request makes thousands of short-lived objects (models, futures, dicts): at the default threshold of 700
# the young generation is collected several times per request. Reference counting frees them all (a sync
# request leaves no cycle, tests/test_job_progress.py): collecting every 50,000 allocations saves about a
# tenth of a request's CPU on the bench's 2 cores (bench/README.md). A cycle made per request would pile up
# to that many objects, freed in one pause (it was 76 ms).
YOUNG_THRESHOLD = 50_000

# the glibc mallopt parameters set here, keyed by the variable that would set them at start-up: (parameter, value)
MALLOPTS = {
    "MALLOC_MMAP_THRESHOLD_": (-3, 32 * 2**20),  # M_MMAP_THRESHOLD: the largest glibc takes
    "MALLOC_TRIM_THRESHOLD_": (-1, 64 * 2**20),  # M_TRIM_THRESHOLD
}


def settle_heap() -> None:
    """After start-up: what it made lives as long as the process, so it is kept out of every collection (a full
    one costs a fraction: 60-120 ms of CPU less with 1,000 Socket.IO clients); young objects are collected
    less often; large buffers are reused."""
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    keep_large_buffers()


def keep_large_buffers() -> None:
    """glibc maps each buffer over its threshold (128 KiB, raised as such buffers are freed) fresh from the
    kernel and unmaps it when freed, so every page of a large answer's buffers (base64 text and image bytes,
    ~100 MB for ten 2048x2048 images) faulted on first touch: ~14,000 faults and about a third of the front end's
    CPU per such answer (bench/README.md). Served from the heap instead, freed buffers are reused, and up to
    64 MiB free at the heap's top is kept rather than given back. A setting the operator made with glibc's own
    variable is left as it is."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform.startswith("linux") else None
    if mallopt is None:
        return
    for variable, (parameter, value) in MALLOPTS.items():
        if variable not in os.environ:
            mallopt(parameter, value)
