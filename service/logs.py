"""Structured logs: one JSON object per line, carrying the request id and job id of whatever is being done.

The ids travel in context variables: the HTTP middleware sets the request id for the handler's task, the
dispatcher and the job function set the job id, so every log call below them is tagged without passing ids
around. Log messages hold ids, names, statuses and timings only: never an API key, a prompt or image data.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

REQUEST_ID: ContextVar[str | None] = ContextVar("imagegw_request_id", default=None)
JOB_ID: ContextVar[str | None] = ContextVar("imagegw_job_id", default=None)

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
# attributes every LogRecord has; anything else on a record came through `extra=` and is logged as a field
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime",
                                                                                 "taskName"}


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-ID when it is a sane token (so its logs and ours line up), else a new one."""
    if header and _VALID_REQUEST_ID.match(header):
        return header
    return secrets.token_hex(16)  # a uuid4's 32 hex digits, at a fifth of the cost


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, var in (("request_id", REQUEST_ID), ("job_id", JOB_ID)):
            value = getattr(record, name, None) or var.get()
            if value:
                entry[name] = value
        for name, value in vars(record).items():
            if name not in _STANDARD and name not in entry:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
