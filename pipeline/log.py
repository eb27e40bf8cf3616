"""Structured JSON logging that never carries record content.

Log calls pass an event name and explicit fields; nothing in mmpipe logs a
record, a text, or media bytes.  Record ids are logged as is, or as a short
salted-free sha256 prefix when the workload's privacy rules say ids are
sensitive (medical accession numbers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # Type only: exception messages from decoders of third-party
            # libraries could quote input bytes.
            out["exc_type"] = record.exc_info[0].__name__
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the whole process."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_mmpipe", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._mmpipe = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("urllib3", "filelock", "PIL", "matplotlib", "h5py", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    logger.log(level, event, extra=fields)


def safe_id(record_id: str, hash_ids: bool) -> str:
    """Record id as it may appear in logs."""
    if not hash_ids:
        return record_id
    return "h:" + hashlib.sha256(record_id.encode("utf-8", "replace")).hexdigest()[:16]
