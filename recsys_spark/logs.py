"""Structured logging: every record is an event name plus fields, as ``key=value`` text or JSON.

Logs go to standard error so standard output stays free for results (``--json`` prints one object
as the last line of standard output).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

_FIELDS = "fields"


def event_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields ``log_event`` attached to ``record`` (empty for other records)."""
    return getattr(record, _FIELDS, {})


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        parts = [stamp, record.levelname, record.name, record.getMessage()]
        for key, value in event_fields(record).items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            parts.append(f"{key}={text}" if " " not in text else f"{key}={json.dumps(text)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            **event_fields(record),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Route the project's loggers to standard error; quieten py4j's chatter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger("recsys")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    logging.getLogger("py4j").setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``recsys`` hierarchy (``recsys.ingest``, ``recsys.storage``...)."""
    return logging.getLogger(f"recsys.{name}")


def log_event(logger: logging.Logger, event: str, /, **fields: Any) -> None:
    """Log ``event`` with structured ``fields`` (at INFO)."""
    logger.log(logging.INFO, event, extra={_FIELDS: fields})


def log_event_at(logger: logging.Logger, level: int, event: str, /, **fields: Any) -> None:
    """Log ``event`` with structured ``fields`` at ``level`` (``logging.WARNING``...)."""
    logger.log(level, event, extra={_FIELDS: fields})


@contextmanager
def timed(logger: logging.Logger, event: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """Log ``<event>.start`` and ``<event>.done`` with the elapsed seconds.

    The yielded dict collects extra fields for the ``done`` line.
    """
    log_event(logger, f"{event}.start", **fields)
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    yield extra
    log_event(
        logger, f"{event}.done", seconds=round(time.perf_counter() - start, 2), **fields, **extra
    )
