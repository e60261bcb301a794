"""Structured logs: one JSON object per line on stderr, which journald keeps as-is and
people can still read. Every line has `ts`, `level` and `event`."""
from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO


class Log:
    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr

    def emit(self, level: str, event: str, **fields: Any) -> None:
        rec = {"ts": round(time.time(), 3), "level": level, "event": event, **fields}
        try:
            self.stream.write(json.dumps(rec, sort_keys=True, default=str) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take enforcement down with it

    def info(self, event: str, **fields: Any) -> None:
        self.emit("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.emit("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.emit("error", event, **fields)
