"""Logging of every ``shiza`` command: ``--log-level``, ``-v``, ``--log-format text|json``.

``json`` writes one JSON object per line (python-json-logger) with ``timestamp``, ``level``,
``logger``, ``message`` and any context fields a call passes in ``extra=``: what journald,
docker logs and log shippers read. ``text`` is for people. Progress bars (tqdm, the hub's and
transformers') show only when stderr is a terminal: never in journald, docker logs or CI.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

__all__ = ["LEVELS", "configure", "level_of"]

LEVELS = ("debug", "info", "warning", "error")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def level_of(verbose: int, log_level: str | None) -> int:
    """``--log-level`` when given, else WARNING, INFO at ``-v``, DEBUG at ``-vv``."""
    if log_level is not None:
        return getattr(logging, log_level.upper())
    return [logging.WARNING, logging.INFO, logging.DEBUG][min(max(verbose, 0), 2)]


def configure(level: int, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every logger's records at ``level`` and above to ``stream`` (stderr) as ``fmt``."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(  # timestamp: ISO 8601 in UTC
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"}, timestamp=True))
    elif fmt == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        raise ValueError(f"--log-format must be text or json, not {fmt!r}")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if not _is_terminal(stream):
        # Read by tqdm (>= 4.66), huggingface_hub and transformers when they start a bar.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a file
        return False
