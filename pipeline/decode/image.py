"""Image decoding: JPEG, PNG, WebP, GIF, TIFF, BMP, AVIF, HEIC/HEIF (and DICOM
for workloads that allow it).

Only formats we sniff ourselves reach Pillow, and Pillow is told which single
plugin to use, so a hostile record cannot steer us into a rarely exercised
decoder.  Pixel counts are checked from the header before any pixel is
decoded (``Image.open`` is lazy for every accepted format), which is the
decompression-bomb guard; Pillow's own global ``MAX_IMAGE_PIXELS`` is not
relied on or modified.

The model path (``decode_image``) does only the work the model needs: a JPEG
larger than the target is decoded at a reduced DCT scale (Pillow's draft
mode: 1/2, 1/4 or 1/8, never below the target), every channel is resized in
one Pillow call on 8-bit data, and only the target-sized result becomes
float.  ``load_image`` keeps the full-resolution float decode for callers that
want the picture itself.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable
from io import BytesIO
from typing import TypeVar

import numpy as np
from PIL import Image

from pipeline.config import Limits
from pipeline.decode.dicom import is_dicom, load_dicom
from pipeline.errors import Reason, RecordError
from pipeline.spec import ImagePrep

try:  # HEIC/HEIF through libheif; without it those images are refused by name
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_AVAILABLE = True
except ImportError:  # pragma: no cover - the dependency is declared
    HEIF_AVAILABLE = False


def _quiet_libtiff() -> bool:
    """Switch off libtiff's process-wide error and warning handlers.

    libtiff prints its diagnostics straight to the C stderr ("More samples per
    pixel than can be decoded: 27648"), bypassing Python: values read from the
    file, and lines that break the JSON log format.  Pillow still learns of
    every failure from libtiff's return codes (an ``OSError``, so
    ``image_corrupt``).  Finds the libtiff Pillow actually loaded and changes
    only that one; returns whether it could."""
    import ctypes
    import os

    from PIL import _imaging  # noqa: F401 -- loads Pillow's libtiff

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if "/libtiff" in line}
        for path in sorted(paths):
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            for name in ("TIFFSetErrorHandler", "TIFFSetWarningHandler"):
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
                fn(None)
        return bool(paths)
    except (OSError, AttributeError):
        return False


LIBTIFF_QUIET = _quiet_libtiff()
# Load every Pillow plugin now, so their loggers exist when the decoders'
# log redaction is installed (pipeline.log.capture_decoder_output).
Image.init()
T = TypeVar("T")
ACCEPTED = "JPEG, PNG, WebP, GIF, TIFF, BMP, AVIF or HEIC/HEIF"
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_VIDEO_BRANDS = {b"isom", b"iso2", b"mp41", b"mp42", b"M4V ", b"qt  ", b"3gp4", b"3gp5", b"avc1", b"dash"}

# Same mapping as PIL.ImageOps.exif_transpose.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


def _ftyp_brands(data: bytes) -> tuple[bytes, set[bytes]] | None:
    """(major brand, compatible brands) of an ISO base media file, or None."""
    if len(data) < 16 or data[4:8] != b"ftyp":
        return None
    size = min(struct.unpack(">I", data[:4])[0], len(data), 4096)
    compat = {data[i : i + 4] for i in range(16, size - 3, 4)}
    return data[8:12], compat


def sniff_image_format(data: bytes) -> str | None:
    """Pillow format name for the formats we accept, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[:2] == b"BM" and len(data) >= 26:
        return "BMP"
    brands = _ftyp_brands(data)
    if brands is not None:
        major, compat = brands
        if major in _AVIF_BRANDS or (major in (b"mif1", b"msf1", b"miaf") and compat & _AVIF_BRANDS):
            return "AVIF"
        if major in _HEIF_BRANDS or compat & {b"heic", b"heix"}:
            return "HEIF" if HEIF_AVAILABLE else None
    return None


def _seen_format(data: bytes) -> str | None:
    """Name of a recognisable format we do not accept (from magic numbers only)."""
    brands = _ftyp_brands(data)
    if brands is not None:
        major, compat = brands
        if major in _HEIF_BRANDS or compat & _HEIF_BRANDS:
            return "HEIC/HEIF (no HEIF decoder installed)"
        if major in _VIDEO_BRANDS or major == b"M4A ":
            return "MP4/QuickTime media"
        return "ISO media (unknown brand)"
    for magic, name in (
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
        (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
        (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
        (b"\xff\x0a", "JPEG XL codestream"),
        (b"8BPS", "Photoshop PSD"),
        (b"\x00\x00\x01\x00", "ICO"),
        (b"%PDF", "PDF"),
        (b"RIFF", "RIFF (not WebP)"),
        (b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
        (b"OggS", "Ogg"),
        (b"fLaC", "FLAC"),
        (b"ID3", "MP3"),
    ):
        if data.startswith(magic):
            return name
    if data[:2] in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6"):
        return "Netpbm"
    if data.lstrip()[:1] == b"<":
        return "XML/SVG text"
    return None


def _describe_unsupported(data: bytes) -> str:
    seen = _seen_format(data)
    if seen is not None:
        return f"{seen} images are not accepted ({ACCEPTED} only)"
    return f"not a recognised image format ({ACCEPTED} only)"


def _too_many(w: int, h: int, limits: Limits) -> RecordError:
    return RecordError(
        Reason.IMAGE_TOO_MANY_PIXELS, f"image is {w}x{h} = {w * h} pixels, limit {limits.max_image_pixels}"
    )


def _to_array(img: Image.Image) -> np.ndarray:
    """Pillow image -> float32 HxWxC in [0, 1]; alpha is composited on white."""
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(img).astype(np.float32)
        return (np.clip(arr, 0.0, 65535.0) / 65535.0)[..., None]
    if mode in ("1", "L"):
        return (np.asarray(img.convert("L"), dtype=np.float32) / 255.0)[..., None]
    if mode in ("LA", "La"):
        la = np.asarray(img.convert("LA"), dtype=np.float32) / 255.0
        a = la[..., 1:2]
        return la[..., 0:1] * a + (1.0 - a)
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        a = rgba[..., 3:4]
        return rgba[..., :3] * a + (1.0 - a)
    if mode != "RGB":  # P, CMYK, YCbCr, ...
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.float32) / 255.0


def _exif_orientation(img: Image.Image) -> int | None:
    """EXIF orientation, or None when absent or unreadable (a malformed EXIF
    block should not cost us an otherwise good image)."""
    try:
        value = img.getexif().get(0x0112)
        return int(value) if value is not None else None
    except Exception:
        return None


def _check_bytes(data: bytes, limits: Limits) -> None:
    if len(data) > limits.max_image_bytes:
        raise RecordError(
            Reason.IMAGE_TOO_LARGE, f"image is {len(data)} bytes, limit {limits.max_image_bytes}"
        )


def _header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """The size an image's header declares, read by the format's plugin
    without Pillow's bomb check (used only to word that check's refusal)."""
    factory = Image.OPEN[fmt][0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = factory(BytesIO(data), "")
        return im.size
    except Exception:
        return None


def _bomb(data: bytes, fmt: str, limits: Limits) -> RecordError:
    size = _header_size(data, fmt)
    dims = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels, " if size else ""
    return RecordError(
        Reason.IMAGE_TOO_MANY_PIXELS,
        f"{fmt} image is {dims}above the decoder's decompression-bomb limit "
        f"(configured limit {limits.max_image_pixels})",
    )


def _with_image(data: bytes, limits: Limits, finish: Callable[[Image.Image, str], T]) -> T:
    """Sniff, open lazily, check the header's size against the limits, then
    hand the still-undecoded image to ``finish``; every failure becomes a
    ``RecordError`` with the format named."""
    fmt = sniff_image_format(data)
    if fmt is None:
        raise RecordError(Reason.IMAGE_UNSUPPORTED_FORMAT, _describe_unsupported(data))
    try:
        with Image.open(BytesIO(data), formats=[fmt]) as img:
            w, h = img.size
            if w <= 0 or h <= 0:
                raise RecordError(Reason.IMAGE_CORRUPT, f"{fmt} header declares an empty image {w}x{h}")
            if w * h > limits.max_image_pixels:
                raise _too_many(w, h, limits)
            return finish(img, fmt)
    except RecordError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard (fires above 2x its MAX_IMAGE_PIXELS, or always when
        # warnings are errors); our limit normally triggers first.
        raise _bomb(data, fmt, limits) from None
    except Exception as exc:
        raise RecordError(
            Reason.IMAGE_CORRUPT, f"{fmt} image is truncated or corrupt ({type(exc).__name__})"
        ) from None


def _oriented(img: Image.Image) -> Image.Image:
    """Decode now (truncation surfaces here as an error) and apply EXIF orientation."""
    img.load()
    orientation = _exif_orientation(img)
    if orientation in _ORIENTATION:
        return img.transpose(_ORIENTATION[orientation])
    return img


def load_image(
    data: bytes, limits: Limits, *, allow_dicom: bool = False, dicom_window: str = "auto"
) -> np.ndarray:
    """Decode image bytes to float32 ``HxWxC`` in [0, 1] (C is 1 or 3), full size.

    Grayscale stays one channel (8-bit / 255, 16-bit / 65535); everything
    else becomes RGB.  EXIF orientation is applied; animations and multi-page
    files yield their first frame.  Every failure is a ``RecordError``.
    """
    _check_bytes(data, limits)
    if is_dicom(data):
        return _load_dicom(data, limits, allow_dicom, dicom_window)
    return _with_image(data, limits, _full_array)


def _load_dicom(data: bytes, limits: Limits, allow_dicom: bool, window: str) -> np.ndarray:
    if not allow_dicom:
        raise RecordError(Reason.IMAGE_UNSUPPORTED_FORMAT, "DICOM images are not accepted by this workload")
    return load_dicom(data, limits, window)


def _full_array(img: Image.Image, fmt: str) -> np.ndarray:
    arr = _to_array(_oriented(img))
    if arr.size == 0:
        raise RecordError(Reason.IMAGE_CORRUPT, f"{fmt} image decoded to no pixels")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("LA", "La", "RGBA", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info)


def _on_white(img: Image.Image) -> Image.Image:
    """Alpha composited on white, in 8-bit RGB (or L for gray+alpha)."""
    gray = img.mode in ("LA", "La")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    out = Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return out.convert("L") if gray else out


def _resizable(img: Image.Image, channels: int) -> tuple[Image.Image, float]:
    """The image in the mode its one resize runs in, and the scale to [0, 1]:
    8-bit ``L`` or ``RGB`` (all channels resized in one call), or ``F`` for
    16/32-bit gray so no precision is lost.  RGB -> gray is Pillow's ITU-R
    601 luma, the same weights as ``_LUMA``."""
    if img.mode in _SIXTEEN_BIT:
        arr = np.clip(np.asarray(img).astype(np.float32), 0.0, 65535.0)
        return Image.fromarray(arr), 1.0 / 65535.0
    if img.mode in ("1", "L"):
        img = img.convert("L")
    elif _has_alpha(img):
        img = _on_white(img)
    elif img.mode != "RGB":  # P, CMYK, YCbCr, ...
        img = img.convert("RGB")
    if channels == 1 and img.mode == "RGB":
        img = img.convert("L")
    return img, 1.0 / 255.0


def _draft_for(img: Image.Image, fmt: str, prep: ImagePrep) -> None:
    """Ask libjpeg for a 1/2, 1/4 or 1/8 scale decode when the target is
    smaller (never below the target size), and for luma only when the model
    takes one channel."""
    if fmt != "JPEG" or img.mode not in ("RGB", "L"):
        return
    mode = "L" if prep.channels == 1 else img.mode
    img.draft(mode, (2 * prep.size, 2 * prep.size))


def _model_array(img: Image.Image, fmt: str, prep: ImagePrep) -> np.ndarray:
    _draft_for(img, fmt, prep)
    small, scale = _resizable(_oriented(img), prep.channels)
    if small.width == 0 or small.height == 0:
        raise RecordError(Reason.IMAGE_CORRUPT, f"{fmt} image decoded to no pixels")
    if small.size != (prep.size, prep.size):
        small = small.resize((prep.size, prep.size), Image.Resampling.BILINEAR)
    x = np.asarray(small, dtype=np.float32) * np.float32(scale)
    if x.ndim == 2:
        x = x[..., None]
    if x.shape[-1] != prep.channels:
        x = np.repeat(x, prep.channels, axis=-1)
    return _normalise(x, prep)


def _normalise(x: np.ndarray, prep: ImagePrep) -> np.ndarray:
    """``size x size x C`` in [0, 1] -> ``(x - mean) / std`` as ``[C, size, size]``."""
    mean = np.asarray(prep.mean, dtype=np.float32)
    std = np.asarray(prep.std, dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1), dtype=np.float32)


def resize_plane(ch: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize one 2-D float plane with Pillow bilinear on an 'F' image:
    deterministic, and antialiased when shrinking (Pillow widens the kernel by
    the scale factor).  Shared by image and video so both resize identically."""
    if ch.shape == (height, width):
        return np.asarray(ch, dtype=np.float32)
    im = Image.fromarray(np.ascontiguousarray(ch, dtype=np.float32))
    return np.asarray(im.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def to_model_input(img: np.ndarray, prep: ImagePrep) -> np.ndarray:
    """``HxWxC`` in [0, 1] -> normalised float32 ``[prep.channels, size, size]``.

    RGB -> BT.601 luma first when the model takes one channel; each plane is
    resized to a square (aspect ratio is not kept, matching training) in
    float, a gray plane once and then repeated; then ``(x - mean) / std``
    per channel.  Used for DICOM and video; encoded images take the 8-bit
    path in ``decode_image``.
    """
    x = np.asarray(img, dtype=np.float32)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3) or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"expected an HxWx1 or HxWx3 image, got shape {x.shape}")
    c = x.shape[-1]
    if prep.channels == 1 and c == 3:
        x = (x @ _LUMA)[..., None]
    planes = [resize_plane(x[..., i], prep.size, prep.size) for i in range(x.shape[-1])]
    y = np.stack(planes, axis=-1)
    if y.shape[-1] != prep.channels:  # gray -> repeated after the (single) resize
        y = np.repeat(y, prep.channels, axis=-1)
    return _normalise(y, prep)


def decode_image(data: bytes, prep: ImagePrep, limits: Limits, *, allow_dicom: bool = False) -> np.ndarray:
    """Record bytes -> model input ``[channels, size, size]`` (DICOM windowed per ``prep.dicom_window``).

    Same limits and reason codes as ``load_image``; the pixels match
    ``to_model_input(load_image(...))`` within the tolerance stated in the
    README (8-bit rounding before the resize, and JPEG's reduced-scale decode)."""
    _check_bytes(data, limits)
    if is_dicom(data):
        return to_model_input(_load_dicom(data, limits, allow_dicom, prep.dicom_window), prep)
    return _with_image(data, limits, lambda img, fmt: _model_array(img, fmt, prep))
