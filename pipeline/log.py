"""Structured JSON logging that never carries record content.

Log calls pass an event name and explicit fields; nothing in mmpipe logs a
record, a text, or media bytes.  Record ids are logged as is, or as a keyed
pseudonym (HMAC-SHA256 with a secret from ``MMPIPE_ID_HASH_KEY``) when the
workload's privacy rules say ids are sensitive (medical accession numbers).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import sys
import time
import warnings
from pathlib import PurePath
from typing import Any

from pipeline.errors import ConfigError

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": "decoder_log" if _is_decoder_logger(record.name) else record.getMessage(),
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
    capture_decoder_output()


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    logger.log(level, event, extra=fields)


# Loggers of the libraries that parse record bytes.  Their messages quote
# what they parsed (pydicom: element values, i.e. patient data), so only the
# logger name and level of each record survive.
DECODER_LOGGERS = ("pydicom", "PIL", "libav", "pillow_heif", "pylibjpeg", "openjpeg", "libjpeg", "gdcm")
_log = logging.getLogger("mmpipe.warnings")


class _RedactDecoderLog(logging.Filter):
    """Replaces a third-party decoder's log message with a fixed event name,
    and drops its warnings and chatter below ERROR.

    Attached to the decoder's own logger, so it runs before the record
    propagates to any handler (ours, pytest's, a user's)."""

    _mmpipe = True

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            # pydicom logs each warning it also raises (once per element:
            # dozens of lines per file); the warning itself is logged once
            return False
        record.msg, record.args = "decoder_log", None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.decoder = record.name
        return True


def _is_decoder_logger(name: str) -> bool:
    return name.split(".", 1)[0] in DECODER_LOGGERS


def _origin(filename: str) -> str:
    """The package a warning was raised in (``pydicom``, ``PIL``, ...): where
    it came from in code, never what it said."""
    parts = PurePath(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            rest = parts[parts.index(marker) + 1 :]
            return rest[0].removesuffix(".py") if rest else "unknown"
    return PurePath(filename).stem or "unknown"


def _showwarning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """``warnings.showwarning`` replacement: one JSON log line with the
    warning's category and origin.  The text is dropped because decoders'
    warnings quote the bytes they were given."""
    log_event(_log, logging.WARNING, "python_warning", kind=category.__name__, origin=_origin(filename))


def capture_decoder_output() -> None:
    """Route every Python warning and every decoder library's log record
    through JSON logging, keeping only their kind (idempotent, process-wide).
    Child loggers created later (``PIL.TiffImagePlugin``) are redacted by
    ``JsonFormatter`` itself.

    Called by ``setup_logging`` and when the decoders are imported, so a
    worker that decodes without configuring logging is covered too.  A
    warning filter set to ``error`` still raises (decoders map that to a
    reason code); ``warnings.catch_warnings`` blocks (tests) still see them."""
    warnings.showwarning = _showwarning
    names = [n for n in list(logging.Logger.manager.loggerDict) if _is_decoder_logger(n)]
    for name in {*DECODER_LOGGERS, *names}:
        logger = logging.getLogger(name)
        if not any(getattr(f, "_mmpipe", False) for f in logger.filters):
            logger.addFilter(_RedactDecoderLog())


ID_KEY_ENV = "MMPIPE_ID_HASH_KEY"
"""Environment variable holding the secret key of record-id pseudonyms."""


def id_hash_key() -> bytes | None:
    """The pseudonym key from the environment (None when unset or empty)."""
    value = os.environ.get(ID_KEY_ENV, "")
    return value.encode("utf-8") if value else None


def require_id_hash_key(workload: str) -> None:
    """Refuse to start a workload that hashes ids without a key: an
    unkeyed hash of an accession number is recovered by hashing every
    candidate, so it would only look private."""
    if id_hash_key() is None:
        raise ConfigError(
            f"workload {workload!r} pseudonymises record ids in logs (privacy.hash_ids) but no key is set: "
            f"set {ID_KEY_ENV} to a secret of at least 16 characters (for example `export {ID_KEY_ENV}=$(openssl "
            "rand -hex 32)`, or from a Kubernetes Secret: the Helm chart's privacy.idHashKeySecret)"
        )


def safe_id(record_id: str, hash_ids: bool, key: bytes | None = None) -> str:
    """Record id as it may appear in logs: as is, or a keyed pseudonym
    (HMAC-SHA256 with the secret key, first 16 hex digits) that nobody
    without the key can link back to the id."""
    if not hash_ids:
        return record_id
    secret = key if key is not None else id_hash_key()
    if secret is None:
        return "h:unkeyed"  # never an unkeyed digest of the id
    return "h:" + hmac.new(secret, record_id.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:16]
