"""`imagegw generate`: a command-line client of a running gateway, with a progress bar on the terminal.

It submits with `Prefer: respond-async`, follows the job on the `/image-progress` Socket.IO namespace (falling
back to reading the job when Socket.IO is unreachable) and writes the images. Ctrl-C cancels the job.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import pybase64
import socketio

from service.constants import EVENT_COMPLETED, EVENT_FAILED, EVENT_PROGRESS, PROGRESS_NAMESPACE

SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
POLL_SECONDS = 1.0


@dataclass
class GenerateOptions:
    prompt: str
    output: Path
    url: str
    api_key: str
    model: str | None = None
    size: str | None = None
    n: int = 1
    quality: str | None = None
    output_format: str | None = None

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": self.prompt, "n": self.n, "response_format": "b64_json"}
        fmt = self.output_format or SUFFIX_FORMATS.get(self.output.suffix.lower())
        optional = {
            "model": self.model,
            "size": self.size,
            "quality": self.quality,
            "output_format": fmt if fmt != "png" else None,
        }  # png is every model's default
        return body | {k: v for k, v in optional.items() if v is not None}


class ClientError(Exception):
    """What the gateway said went wrong, ready to print."""


class ProgressBar:
    """One redrawn line on a terminal; one line per change otherwise (logs, CI)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last: tuple[int, str] | None = None

    def show(self, percent: int, stage: str) -> None:
        if (percent, stage) == self.last:
            return
        self.last = (percent, stage)
        if not self.tty:
            print(f"{percent:3d}% {stage}", file=self.stream, flush=True)
            return
        width = max(10, min(40, shutil.get_terminal_size().columns - 30))
        filled = width * percent // 100
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {percent:3d}% {stage}"
        print(
            line[: shutil.get_terminal_size().columns - 1].ljust(width + 30),
            end="",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.tty and self.last is not None:
            print(file=self.stream, flush=True)


async def _json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        data: dict[str, Any] = await resp.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        raise ClientError(f"HTTP {resp.status} from {resp.url}: not a JSON answer") from None
    if resp.status >= 400:
        error = data.get("error") or {}
        detail = ", ".join(
            str(x)
            for x in (
                f"HTTP {resp.status}",
                error.get("code"),
                error.get("param") and f"param {error['param']}",
            )
            if x
        )
        raise ClientError(f"{error.get('message') or 'request failed'} ({detail})")
    return data


class Follower:
    """Waits for the job's end on Socket.IO, drawing its progress; the result arrives with `completed`."""

    def __init__(self, job_id: str, bar: ProgressBar) -> None:
        self.job_id = job_id
        self.bar = bar
        self.done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.sio = socketio.AsyncClient(reconnection=True)
        self.sio.on(EVENT_PROGRESS, self._progress, namespace=PROGRESS_NAMESPACE)
        self.sio.on(EVENT_COMPLETED, self._end, namespace=PROGRESS_NAMESPACE)
        self.sio.on(EVENT_FAILED, self._end, namespace=PROGRESS_NAMESPACE)
        self.sio.on("connect", self._subscribe, namespace=PROGRESS_NAMESPACE)  # again after a reconnect

    async def _progress(self, event: dict[str, Any]) -> None:
        if event.get("job_id") == self.job_id:
            self.bar.show(int(event.get("progress") or 0), str(event.get("stage") or event.get("status")))

    async def _end(self, event: dict[str, Any]) -> None:
        if event.get("job_id") == self.job_id and not self.done.done():
            self.done.set_result(event)

    async def _subscribe(self) -> None:
        asyncio.get_running_loop().create_task(self._ask())

    async def _ask(self) -> None:
        answer = await self.sio.call(
            "subscribe", {"job_id": self.job_id}, namespace=PROGRESS_NAMESPACE, timeout=10
        )
        if isinstance(answer, dict) and "error" in answer and not self.done.done():
            self.done.set_exception(ClientError(answer["error"].get("message", "subscription refused")))

    async def run(self, url: str, api_key: str) -> dict[str, Any]:
        await self.sio.connect(
            url,
            namespaces=[PROGRESS_NAMESPACE],
            auth={"api_key": api_key},
            transports=["websocket", "polling"],
            wait_timeout=10,
        )
        try:
            return await self.done
        finally:
            await self.sio.disconnect()


async def poll(
    http: aiohttp.ClientSession, url: str, api_key: str, job_id: str, bar: ProgressBar
) -> dict[str, Any]:
    """The slow path when Socket.IO is unreachable: the job record has the same state."""
    while True:
        async with http.get(
            f"{url}/v1/images/jobs/{job_id}", headers={"Authorization": f"Bearer {api_key}"}
        ) as resp:
            job = await _json(resp)
        bar.show(int(job.get("progress") or 0), str(job.get("stage") or job["status"]))
        if job["status"] == "succeeded":
            return {"status": "succeeded", "result": job.get("result")}
        if job["status"] in ("failed", "cancelled"):
            return {"status": job["status"], "error": job.get("error")}
        await asyncio.sleep(POLL_SECONDS)


def output_paths(output: Path, count: int) -> list[Path]:
    """`out.png` for one image; `out-1.png`, `out-2.png`... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(1, count + 1)]


async def generate(options: GenerateOptions, stream: TextIO = sys.stderr) -> list[Path]:
    """Run one generation to the end and write its images; raises ClientError with the gateway's message."""
    url = options.url.rstrip("/")
    bar = ProgressBar(stream)
    auth = {"Authorization": f"Bearer {options.api_key}"}
    async with aiohttp.ClientSession() as http:
        try:
            async with http.post(
                f"{url}/v1/images/generations",
                json=options.body(),
                headers={**auth, "Prefer": "respond-async"},
            ) as resp:
                job = await _json(resp)
        except aiohttp.ClientConnectionError as exc:
            raise ClientError(f"cannot reach the gateway at {url}: {exc}") from None
        job_id = job["id"]
        bar.show(int(job.get("progress") or 0), str(job.get("stage") or job["status"]))
        try:
            end = await _follow(http, url, options.api_key, job_id, bar)
        except asyncio.CancelledError:
            bar.close()
            async with http.delete(
                f"{url}/v1/images/jobs/{job_id}", headers=auth
            ):  # Ctrl-C: not wanted any more
                pass
            raise
        succeeded = end["status"] == "succeeded"
        bar.show(100 if succeeded else int(end.get("progress") or 0), "done" if succeeded else end["status"])
        bar.close()
        if not succeeded:
            error = end.get("error") or {}
            raise ClientError(
                f"job {job_id} {end['status']}: {error.get('message', 'no reason given')}"
                + (f" ({error['code']})" if error.get("code") else "")
            )
        return await _write(http, end["result"]["data"], options.output)


async def _follow(
    http: aiohttp.ClientSession, url: str, api_key: str, job_id: str, bar: ProgressBar
) -> dict[str, Any]:
    try:
        return await Follower(job_id, bar).run(url, api_key)
    except socketio.exceptions.ConnectionError as exc:
        print(f"live progress unavailable ({exc}); polling the job", file=bar.stream)
        return await poll(http, url, api_key, job_id, bar)


async def _write(http: aiohttp.ClientSession, data: list[dict[str, Any]], output: Path) -> list[Path]:
    paths = output_paths(output, len(data))
    for item, path in zip(data, paths, strict=True):
        if item.get("b64_json"):
            content = pybase64.b64decode(item["b64_json"])
        else:  # a signed link: it is its own credential (S3 refuses a second one)
            async with http.get(item["url"]) as resp:
                resp.raise_for_status()
                content = await resp.read()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return paths


def add_generate_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = commands.add_parser("generate", help="generate images on a running gateway, with a progress bar")
    cmd.add_argument("prompt")
    cmd.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="image file to write (its suffix picks the format); with --n above 1: NAME-1.EXT, ...",
    )
    cmd.add_argument("--model", help="default: the gateway's default model")
    cmd.add_argument("--size", help="e.g. 1024x1024; default: the model's")
    cmd.add_argument("--n", type=int, default=1, help="number of images (default 1)")
    cmd.add_argument("--quality", help="e.g. low, medium, high, standard, hd")
    cmd.add_argument(
        "--format",
        dest="output_format",
        choices=sorted(set(SUFFIX_FORMATS.values())),
        help="default: from the output file's suffix",
    )
    cmd.add_argument(
        "--url",
        default=os.environ.get("IMAGEGW_URL", "http://127.0.0.1:8080"),
        help="the gateway (default $IMAGEGW_URL or http://127.0.0.1:8080)",
    )
    cmd.add_argument(
        "--api-key",
        default=os.environ.get("IMAGEGW_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        help="default $IMAGEGW_API_KEY, then $OPENAI_API_KEY",
    )


def run_generate(args: argparse.Namespace) -> int:
    options = GenerateOptions(
        prompt=args.prompt,
        output=args.output,
        url=args.url,
        api_key=args.api_key or "dev",
        model=args.model,
        size=args.size,
        n=args.n,
        quality=args.quality,
        output_format=args.output_format,
    )
    try:
        paths = asyncio.run(generate(options))
    except ClientError as exc:
        print(f"imagegw generate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imagegw generate: cancelled", file=sys.stderr)
        return 130
    for path in paths:
        print(path)
    return 0
