"""Reason codes for rejected records.

Every path (CLI, batch, stream, online) reports a rejected record the same
way: a stable machine-readable ``code`` plus a human ``message``.  Messages
describe *what* was wrong (sizes, formats, limits) and never quote record
content, because records may carry patient data.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Stable reason codes.  Dashboards and dead-letter consumers key on these,
    so existing values must never change meaning."""

    # envelope / schema
    BAD_JSON = "bad_json"
    BAD_RECORD = "bad_record"
    NO_MODALITY = "no_modality"
    UNKNOWN_WORKLOAD = "unknown_workload"
    WORKLOAD_MISMATCH = "workload_mismatch"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    BAD_BASE64 = "bad_base64"
    URI_NOT_ALLOWED = "uri_not_allowed"
    URI_NOT_FOUND = "uri_not_found"
    MODALITY_NOT_SUPPORTED = "modality_not_supported"
    # A Kafka message with a null value (a tombstone: a compaction delete
    # marker, not a record).  Its dead letter keeps the null value.
    TOMBSTONE = "tombstone"
    # text
    TEXT_TOO_LONG = "text_too_long"
    TEXT_INVALID = "text_invalid"
    # image (incl. DICOM)
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_TOO_MANY_PIXELS = "image_too_many_pixels"
    IMAGE_UNSUPPORTED_FORMAT = "image_unsupported_format"
    IMAGE_CORRUPT = "image_corrupt"
    DICOM_CORRUPT = "dicom_corrupt"
    DICOM_NO_PIXELS = "dicom_no_pixels"
    # a valid file whose pixel encoding no installed decoder reads
    DICOM_UNSUPPORTED_TRANSFER_SYNTAX = "dicom_unsupported_transfer_syntax"
    # audio
    AUDIO_TOO_LARGE = "audio_too_large"
    AUDIO_TOO_LONG = "audio_too_long"
    AUDIO_UNSUPPORTED_FORMAT = "audio_unsupported_format"
    AUDIO_CORRUPT = "audio_corrupt"
    # video
    VIDEO_TOO_LARGE = "video_too_large"
    VIDEO_TOO_LONG = "video_too_long"
    VIDEO_TOO_MANY_PIXELS = "video_too_many_pixels"
    VIDEO_CORRUPT = "video_corrupt"
    VIDEO_NO_FRAMES = "video_no_frames"
    # tabular
    TABULAR_INVALID = "tabular_invalid"
    # generation
    PROMPT_TOO_LONG = "prompt_too_long"
    # engine
    INFERENCE_FAILED = "inference_failed"


class RecordError(Exception):
    """A single record cannot be processed.  Never fails the batch it came in."""

    def __init__(self, code: Reason, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class PackageError(Exception):
    """A model package is missing, incomplete, tampered with or inconsistent."""


class ConfigError(Exception):
    """A configuration file or override is invalid."""
