"""The C allocator's settings of `serve` and `worker`: a large answer's buffers, freed, are reused by the next one
instead of being mapped afresh from the kernel, page fault by page fault."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# ten buffers of a large answer's size, made and freed three times; the page faults of the third round
ROUNDS = """
import resource, sys
from service.heap import keep_large_buffers
if sys.argv[1] == "kept":
    keep_large_buffers()
def answer():
    held = [b"x" * (5 * 2**20 + i * 4096) for i in range(10)]
    del held
answer(); answer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
answer()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    return int(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_buffers_are_reused_not_mapped_afresh() -> None:
    pages = 10 * 5 * 2**20 // 4096
    assert faults("default") > pages // 2  # glibc alone: most pages fault again
    assert faults("kept") < pages // 50


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_operators_own_malloc_variables_win() -> None:
    pages = 10 * 5 * 2**20 // 4096
    assert faults("kept", MALLOC_MMAP_THRESHOLD_=str(128 * 1024), MALLOC_TRIM_THRESHOLD_=str(128 * 1024)) > pages // 2
