"""The garbage collector's settings for the long-running processes, `serve` and `worker`."""

from __future__ import annotations

import gc

# A request makes thousands of short-lived objects (models, futures, dicts): at the default threshold of 700
# the young generation is collected several times per request. Reference counting frees nearly all of them;
# collecting every 50,000 allocations instead lets a few MB of cyclic garbage wait, for about a tenth of a
# request's CPU on the bench's 2 cores (bench/README.md).
YOUNG_THRESHOLD = 50_000


def settle_heap() -> None:
    """After start-up: what it made lives as long as the process, so it is kept out of every collection (a full
    one costs a fraction: 60-120 ms of CPU less with 1,000 Socket.IO clients); young objects are collected
    less often."""
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
