"""Local image storage: names that cannot escape the root, and images deleted after the job lifetime."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from service.storage import LocalStorage, UrlSigner, image_name, input_name

OLD_JOB, NEW_JOB = "a" * 32, "b" * 32


async def test_purge_deletes_only_jobs_older_than_the_cutoff(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, UrlSigner(b"k", 60))
    for job in (OLD_JOB, NEW_JOB):
        await storage.put(image_name(job, 0, "png"), b"png")
        await storage.put(image_name(job, 1, "png"), b"png")
    two_days_ago = time.time() - 2 * 86400
    for f in storage.files(OLD_JOB):
        os.utime(f, (two_days_ago, two_days_ago))
    assert await storage.purge_older_than(datetime.now(UTC) - timedelta(days=1)) == 2
    assert storage.files(OLD_JOB) == [] and await storage.get(image_name(OLD_JOB, 0, "png")) is None
    assert await storage.get(image_name(NEW_JOB, 0, "png")) == b"png"
    assert len(storage.files(NEW_JOB)) == 2


async def test_a_job_s_files_are_deleted_alone(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, UrlSigner(b"k", 60))
    neighbour = OLD_JOB[:-1] + "b"  # same folder
    for job in (OLD_JOB, neighbour):
        await storage.put(image_name(job, 0, "png"), b"png")
        await storage.put(input_name(job, 0, "png"), b"input")
    await storage.delete_job(OLD_JOB)
    assert storage.files(OLD_JOB) == [] and await storage.get(image_name(OLD_JOB, 0, "png")) is None
    assert [await storage.get(image_name(neighbour, 0, "png")), len(storage.files(neighbour))] == [b"png", 2]


@pytest.mark.parametrize("name", ["../etc/passwd", f"{OLD_JOB}/../../x.png", "/etc/passwd", f"{OLD_JOB}/0.exe"])
async def test_names_outside_the_pattern_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        await LocalStorage(tmp_path, UrlSigner(b"k", 60)).get(name)
