"""structlog set-up and the audit record: one JSON line per decision."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

AUDIT_EVENT = "mount-decision"


def configure(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send JSON lines to `stream` (stderr by default): audit records and the few operational events.

    Mount data can carry credentials, so it is logged only at debug level (``--verbose``).
    """
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def logger(**bound: Any) -> Any:
    return structlog.get_logger("mountwarden").bind(**bound)
