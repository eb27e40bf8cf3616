"""Image decoding: JPEG, PNG, WebP (and DICOM for workloads that allow it).

Only formats we sniff ourselves reach Pillow, and Pillow is told which single
plugin to use, so a hostile record cannot steer us into a rarely exercised
decoder.  Pixel counts are checked from the header before any pixel is
decoded (``Image.open`` is lazy), which is the decompression-bomb guard;
Pillow's own global ``MAX_IMAGE_PIXELS`` is not relied on or modified.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image

from pipeline.config import Limits
from pipeline.decode.dicom import is_dicom, load_dicom
from pipeline.errors import Reason, RecordError
from pipeline.spec import ImagePrep

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


def sniff_image_format(data: bytes) -> str | None:
    """Pillow format name for the formats we accept, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _describe_unsupported(data: bytes) -> str:
    for magic, name in ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")):
        if data.startswith(magic):
            return f"{name} images are not accepted (JPEG, PNG or WebP only)"
    return "not a JPEG, PNG or WebP image"


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


def load_image(
    data: bytes, limits: Limits, *, allow_dicom: bool = False, dicom_window: str = "auto"
) -> np.ndarray:
    """Decode image bytes to float32 ``HxWxC`` in [0, 1] (C is 1 or 3).

    Grayscale stays one channel (8-bit / 255, 16-bit / 65535); everything
    else becomes RGB.  EXIF orientation is applied; animations yield their
    first frame.  Every failure is a ``RecordError``.
    """
    if len(data) > limits.max_image_bytes:
        raise RecordError(
            Reason.IMAGE_TOO_LARGE, f"image is {len(data)} bytes, limit {limits.max_image_bytes}"
        )
    if is_dicom(data):
        if not allow_dicom:
            raise RecordError(
                Reason.IMAGE_UNSUPPORTED_FORMAT, "DICOM images are not accepted by this workload"
            )
        return load_dicom(data, limits, dicom_window)
    fmt = sniff_image_format(data)
    if fmt is None:
        raise RecordError(Reason.IMAGE_UNSUPPORTED_FORMAT, _describe_unsupported(data))
    try:
        return _decode(data, fmt, limits)
    except RecordError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard (fires above 2x its MAX_IMAGE_PIXELS, or always when
        # warnings are errors); our limit normally triggers first.
        raise RecordError(
            Reason.IMAGE_TOO_MANY_PIXELS, f"{fmt} image exceeds the decoder's pixel safety limit"
        ) from None
    except Exception as exc:
        raise RecordError(
            Reason.IMAGE_CORRUPT, f"{fmt} image is truncated or corrupt ({type(exc).__name__})"
        ) from None


def _decode(data: bytes, fmt: str, limits: Limits) -> np.ndarray:
    with Image.open(BytesIO(data), formats=[fmt]) as img:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise RecordError(Reason.IMAGE_CORRUPT, f"{fmt} header declares an empty image {w}x{h}")
        if w * h > limits.max_image_pixels:
            raise _too_many(w, h, limits)
        img.load()  # full decode now, so truncation surfaces here as an error
        out: Image.Image = img
        orientation = _exif_orientation(img)
        if orientation in _ORIENTATION:
            out = img.transpose(_ORIENTATION[orientation])
        arr = _to_array(out)
    if arr.size == 0:
        raise RecordError(Reason.IMAGE_CORRUPT, f"{fmt} image decoded to no pixels")
    return np.ascontiguousarray(arr, dtype=np.float32)


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

    Channels are matched first (RGB -> BT.601 luma, gray -> repeated), then
    each channel is resized to a square (aspect ratio is not kept, matching
    training), then ``(x - mean) / std`` per channel.
    """
    x = np.asarray(img, dtype=np.float32)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3) or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"expected an HxWx1 or HxWx3 image, got shape {x.shape}")
    c = x.shape[-1]
    if prep.channels == 1 and c == 3:
        x = (x @ _LUMA)[..., None]
    elif prep.channels == 3 and c == 1:
        x = np.repeat(x, 3, axis=-1)
    out = np.empty((prep.channels, prep.size, prep.size), dtype=np.float32)
    for i in range(prep.channels):
        ch = resize_plane(x[..., i], prep.size, prep.size)
        out[i] = (ch - np.float32(prep.mean[i])) / np.float32(prep.std[i])
    return out


def decode_image(data: bytes, prep: ImagePrep, limits: Limits, *, allow_dicom: bool = False) -> np.ndarray:
    """Record bytes -> model input ``[channels, size, size]`` (DICOM windowed per ``prep.dicom_window``)."""
    img = load_image(data, limits, allow_dicom=allow_dicom, dicom_window=prep.dicom_window)
    return to_model_input(img, prep)
