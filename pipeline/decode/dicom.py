"""DICOM pixel decoding for the medical workload.

Returns the first frame as float32 ``HxWx1`` in [0, 1] after the modality
rescale and a VOI window, i.e. roughly what a reader sees on screen.  Error
messages never quote pydicom's exception text: it can echo element values,
and element values are patient data.  For the same reason pydicom's reading
validation is switched to IGNORE (process-wide, idempotent): its warnings
quote invalid values into ``warnings`` and the ``pydicom`` logger.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from typing import Any

import numpy as np

from pipeline.config import Limits
from pipeline.errors import Reason, RecordError

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DEFLATED = "1.2.840.10008.1.2.1.99"
# Slack for non-pixel elements when bounding a deflated dataset's inflated size.
_DEFLATE_META_SLACK = 16 * 2**20
_MAX_BYTES_PER_PIXEL = 8  # 64-bit float pixel data, or 16-bit RGB rounded up


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry ``DICM`` after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _corrupt(what: str, exc: BaseException | None = None) -> RecordError:
    suffix = f" ({type(exc).__name__})" if exc is not None else ""
    return RecordError(Reason.DICOM_CORRUPT, f"{what}{suffix}")


def _check_deflated(data: bytes, limits: Limits) -> None:
    """pydicom inflates a Deflated Explicit VR dataset in one unbounded
    ``zlib.decompress``; refuse datasets that would inflate past what the
    pixel limit can justify before pydicom sees them (zip-bomb guard)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        ts = str(meta.get("TransferSyntaxUID", ""))
    except Exception as exc:
        raise _corrupt("DICOM file meta information could not be parsed", exc) from None
    if ts != _DEFLATED:
        return
    bound = limits.max_image_pixels * _MAX_BYTES_PER_PIXEL + _DEFLATE_META_SLACK
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflater.decompress(data[fp.tell() :], bound)
    except zlib.error as exc:
        raise _corrupt("deflated DICOM dataset could not be inflated", exc) from None
    if inflater.unconsumed_tail:
        raise RecordError(
            Reason.IMAGE_TOO_MANY_PIXELS,
            f"deflated DICOM dataset inflates beyond {bound} bytes (limit {limits.max_image_pixels} pixels)",
        )


class _ReadTracker(BytesIO):
    """The file as pydicom reads it, remembering every read that came back short.

    pydicom stops quietly at end of file, so a cut file parses as a shorter
    dataset.  A complete file ends exactly on an element boundary: pydicom's
    last read is the 8-byte header read that finds nothing.  Any other short
    read (a value, a header or an item cut part way, or anything read after
    the data ran out) means the file ends inside a data element.  This knows
    nothing of the dataset's structure, so a file whose last element is an
    undefined-length sequence is judged like any other."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.short: list[tuple[int, int]] = []  # (asked, got) per short read
        self.reads_after_short = 0
        self._tail = b""

    def read(self, size: int | None = -1, /) -> bytes:
        out = super().read(size)
        if self.short:
            self.reads_after_short += 1
        if size is not None and size > 0 and len(out) < size:
            self.short.append((size, len(out)))
            self._tail = out
        return out

    def truncated(self) -> bool:
        if not self.short:
            return False
        if len(self.short) > 1 or self.reads_after_short:
            return True
        asked = self.short[0][0]
        # the clean end, or up to 7 zero bytes of padding after the last element
        return not (asked == 8 and not any(self._tail))


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def _codestream_dims(frame: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG / JPEG-LS SOF or JPEG 2000 SIZ header.

    Compressed frames are decoded by Pillow & co. at the size *their own*
    header declares, which need not match Rows/Columns; checking it first
    keeps the pixel limit meaningful for encapsulated pixel data."""
    if frame[:2] == b"\xff\xd8":
        i = 2
        for _ in range(512):
            if i + 9 > len(frame) or frame[i] != 0xFF:
                return None
            marker = frame[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in _JPEG_SOF:
                h, w = struct.unpack(">HH", frame[i + 5 : i + 9])
                return (w, h) if h > 0 else None  # height 0: defined later by DNL
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:
                i += 2
                continue
            i += 2 + struct.unpack(">H", frame[i + 2 : i + 4])[0]
        return None
    at = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC then SIZ (raw or inside a JP2 box)
    if at >= 0 and at + 26 <= len(frame):
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", frame[at + 8 : at + 24])
        return max(0, xsiz - xo), max(0, ysiz - yo)
    return None


def _check_codestream(ds: Any, frames: int, limits: Limits) -> None:
    from pydicom.encaps import get_frame

    try:
        first = get_frame(ds.PixelData, 0, number_of_frames=frames)
        dims = _codestream_dims(bytes(first[:65536]))
    except Exception:
        return  # malformed encapsulation: the decoder reports it
    if dims is not None and dims[0] * dims[1] > limits.max_image_pixels:
        w, h = dims
        raise RecordError(
            Reason.IMAGE_TOO_MANY_PIXELS,
            f"DICOM compressed frame declares {w}x{h} = {w * h} pixels, limit {limits.max_image_pixels}",
        )


def _unsupported(ts: Any) -> RecordError:
    """A valid file whose encoding no installed pixel-data plugin reads: not
    the file's fault, so not ``dicom_corrupt``.  The UID and its registry name
    are public constants, not patient data."""
    from pydicom.uid import UID_dictionary

    # a UID outside the DICOM registry is file content: not quoted
    label = f"{ts.name} ({ts})" if str(ts) in UID_dictionary else "outside the DICOM registry"
    return RecordError(
        Reason.DICOM_UNSUPPORTED_TRANSFER_SYNTAX,
        f"transfer syntax {label}: no installed decoder reads this pixel encoding",
    )


def _decodable(ts: Any) -> bool:
    """Whether an installed pydicom pixel-data plugin reads this transfer syntax."""
    from pydicom.pixels import get_decoder

    try:
        if not ts.is_transfer_syntax:
            return False
        return not ts.is_compressed or bool(get_decoder(ts).is_available)
    except Exception:
        return False


def _int_attr(ds: Any, name: str, default: int | None = None) -> int:
    value = ds.get(name, default)
    if value is None or value == "":
        if default is None:
            raise _corrupt(f"DICOM attribute {name} is missing")
        value = default
    try:
        return int(value)
    except Exception as exc:
        raise _corrupt(f"DICOM attribute {name} is not an integer", exc) from None


def _first_float(ds: Any, name: str, default: float | None = None) -> float | None:
    """First value of a possibly multi-valued DS element, or None when unusable."""
    try:
        value = ds.get(name, default)
        if value is None or value == "":
            value = default
        if value is None:
            return None
        if not isinstance(value, (str, bytes, int, float)) and hasattr(value, "__len__"):
            if len(value) == 0:
                return None
            value = value[0]
        out = float(value)
    except Exception:
        return None
    return out if np.isfinite(out) else None


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def _window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear VOI window as defined in DICOM PS3.3 C.11.2.1.2.1."""
    if width <= 1.0:
        return (x > center - 0.5).astype(np.float64)
    y = (x - (center - 0.5)) / (width - 1.0) + 0.5
    return np.clip(y, 0.0, 1.0)


def _color_to_gray(arr: np.ndarray, ds: Any, photometric: str) -> np.ndarray:
    """Colour DICOM (rare in this workload) -> ITU-R 601 luma in [0, 1]."""
    from pydicom.pixels import apply_color_lut

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        scale = float(np.iinfo(arr.dtype).max) if np.issubdtype(arr.dtype, np.integer) else 1.0
    else:
        bits = _int_attr(ds, "BitsStored", 8)
        scale = float(2 ** min(max(bits, 1), 32) - 1)
    rgb = np.clip(arr.astype(np.float64) / scale, 0.0, 1.0)
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise _corrupt(f"DICOM colour pixel data has unexpected shape {rgb.shape}")
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def load_dicom(data: bytes, limits: Limits, window: str = "auto") -> np.ndarray:
    """First frame of a DICOM file as float32 ``HxWx1`` in [0, 1].

    ``window="auto"`` uses the file's WindowCenter/WindowWidth (first value)
    when present and valid, otherwise min/max; ``"minmax"`` always min/max.
    MONOCHROME1 (bright = low values) is inverted so bright is always 1.
    """
    if window not in ("auto", "minmax"):
        raise ValueError(f"unknown DICOM window mode {window!r}")
    if len(data) > limits.max_image_bytes:
        raise RecordError(
            Reason.IMAGE_TOO_LARGE, f"image is {len(data)} bytes, limit {limits.max_image_bytes}"
        )
    if not is_dicom(data):
        raise RecordError(Reason.DICOM_CORRUPT, "no DICM marker at offset 128: not a DICOM Part 10 file")
    try:
        return _load_dicom(data, limits, window)
    except RecordError:
        raise
    except Exception as exc:
        raise _corrupt("DICOM pixel data could not be decoded", exc) from None


def _load_dicom(data: bytes, limits: Limits, window: str) -> np.ndarray:
    import pydicom

    # pydicom's value-validation warnings quote element values (patient data)
    # into warnings and its logger; validation adds nothing for decoding.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    _check_deflated(data, limits)
    fp = _ReadTracker(data)
    try:
        ds = pydicom.dcmread(fp, force=False)
    except Exception as exc:
        raise _corrupt("DICOM file could not be parsed", exc) from None
    # (a deflated dataset is inflated in one read; _check_deflated bounds it and
    # zlib itself refuses a cut stream)
    if fp.truncated() and getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) != _DEFLATED:
        raise _corrupt("DICOM file is truncated: it ends inside a data element")
    if len(ds) == 0:
        raise _corrupt("DICOM file holds no data elements after its meta information (truncated?)")
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise RecordError(Reason.DICOM_NO_PIXELS, "DICOM dataset has no pixel data element")

    rows = _int_attr(ds, "Rows")
    cols = _int_attr(ds, "Columns")
    frames = _int_attr(ds, "NumberOfFrames", 1)
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise _corrupt(f"DICOM declares invalid dimensions {rows}x{cols} with {frames} frame(s)")
    pixels = rows * cols * frames
    if pixels > limits.max_image_pixels:
        raise RecordError(
            Reason.IMAGE_TOO_MANY_PIXELS,
            f"DICOM declares {rows}x{cols}x{frames} = {pixels} pixels, limit {limits.max_image_pixels}",
        )

    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is not None and not _decodable(ts):
        raise _unsupported(ts)
    if ts is not None and ts.is_compressed and "PixelData" in ds and ts.is_encapsulated:
        _check_codestream(ds, frames, limits)

    try:
        ds.pixel_array_options(index=0)
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:
        ts_name = getattr(ts, "name", None) or "unknown transfer syntax"
        raise _corrupt(f"DICOM pixel data could not be decoded ({ts_name})", exc) from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if (arr.ndim == 3 and arr.shape[-1] in (3, 4)) or photometric == "PALETTE COLOR":
        x = _color_to_gray(arr, ds, photometric)
    else:
        if arr.ndim != 2:
            raise _corrupt(f"DICOM pixel data has unexpected shape {arr.shape}")
        x = arr.astype(np.float64)
        slope = _first_float(ds, "RescaleSlope", 1.0)
        intercept = _first_float(ds, "RescaleIntercept", 0.0)
        if slope is None or intercept is None:
            raise _corrupt("DICOM RescaleSlope/RescaleIntercept is not a finite number")
        if not np.isfinite(x).all():
            raise _corrupt("DICOM pixel data contains non-finite values")
        x = x * slope + intercept
        center = width = None
        if window == "auto":
            center = _first_float(ds, "WindowCenter")
            width = _first_float(ds, "WindowWidth")
        win = (center, width) if center is not None and width is not None and width > 0 else None
        x = _minmax(x) if win is None else _window(x, *win)
        if photometric == "MONOCHROME1":
            x = 1.0 - x
    if x.size == 0 or not np.isfinite(x).all():
        raise _corrupt("DICOM pixel data is empty or non-finite after rescale")
    return np.ascontiguousarray(x, dtype=np.float32)[..., None]
