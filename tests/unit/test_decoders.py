"""Decoders: happy paths on real files built here (or bundled with pydicom), every
reason code each decoder can raise, and fuzzing that nothing but RecordError escapes."""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib
from pathlib import Path

import av
import numpy as np
import pydicom
import pydicom.data
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps

from pipeline.config import Limits
from pipeline.decode import (
    contact_sheet,
    decode_audio,
    decode_image,
    decode_video,
    is_dicom,
    load_audio,
    load_image,
    load_keyframes,
    to_model_input,
)
from pipeline.decode.dicom import load_dicom
from pipeline.errors import Reason, RecordError
from pipeline.features import log_mel, mel_filterbank
from pipeline.spec import AudioPrep, ImagePrep

LIMITS = Limits()
RNG = np.random.default_rng(1234)


def _raises(code: Reason, fn, *args, **kwargs) -> RecordError:
    with pytest.raises(RecordError) as info:
        fn(*args, **kwargs)
    assert info.value.code is code, info.value
    return info.value


# ---------------------------------------------------------------- builders


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise_rgb(w: int = 32, h: int = 24) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def _png_claiming(w: int, h: int) -> bytes:
    """A tiny, well-formed-looking PNG whose IHDR claims w x h 8-bit gray pixels."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _wav(x: np.ndarray, sr: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def _tone(sr: int, seconds: float, hz: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


FRAME_COLOURS = [((i * 20) % 256, 255 - (i * 20) % 256, (i * 60) % 256) for i in range(12)]


def _video(
    codec: str = "libx264", fmt: str = "mp4", n: int = 12, w: int = 64, h: int = 48, rate: int = 12
) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.empty((h, w, 3), np.uint8)
            img[:] = FRAME_COLOURS[i % len(FRAME_COLOURS)]
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _audio_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        for _ in range(5):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate = 16000
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


_DICOM_DIR = Path(pydicom.data.__file__).parent / "test_files"


def _bundled(name: str) -> Path:
    """Only files shipped inside the installed pydicom (never get_testdata_file's download path)."""
    path = _DICOM_DIR / name
    if not path.is_file():
        pytest.skip(f"{name} not bundled with this pydicom")
    return path


def _dcm_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# ---------------------------------------------------------------- images: happy paths


def test_jpeg_rgb():
    out = load_image(_save(Image.new("RGB", (32, 24), (200, 40, 10)), "JPEG", quality=95), LIMITS)
    assert out.shape == (24, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[12, 16], np.array([200, 40, 10]) / 255, atol=0.03)


def test_png_rgb_8bit_exact():
    arr = _noise_rgb()
    out = load_image(_save(Image.fromarray(arr), "PNG"), LIMITS)
    assert out.shape == (24, 32, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, arr.astype(np.float32) / 255)


def test_png_gray_8bit_stays_one_channel():
    arr = RNG.integers(0, 256, size=(20, 30), dtype=np.uint8)
    out = load_image(_save(Image.fromarray(arr), "PNG"), LIMITS)
    assert out.shape == (20, 30, 1)
    np.testing.assert_array_equal(out[..., 0], arr.astype(np.float32) / 255)


def test_png_gray_16bit_keeps_precision_and_order():
    arr = (np.arange(40 * 30, dtype=np.uint32) * 53 % 65536).astype(np.uint16).reshape(30, 40)
    data = _save(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = load_image(data, LIMITS)
    assert out.shape == (30, 40, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], arr / 65535.0, rtol=0, atol=1e-7)
    flat_in, flat_out = arr.ravel(), out.ravel()
    assert np.array_equal(np.argsort(flat_in, kind="stable"), np.argsort(flat_out, kind="stable"))
    # values that differ only below 8 bits must still differ
    assert len(np.unique(flat_out)) == len(np.unique(flat_in))


def test_webp_lossless_exact():
    arr = _noise_rgb(16, 16)
    out = load_image(_save(Image.fromarray(arr), "WEBP", lossless=True), LIMITS)
    np.testing.assert_array_equal(out, arr.astype(np.float32) / 255)


def test_exif_orientation_6_rotates():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(img, "JPEG", exif=exif.tobytes(), quality=95)
    out = load_image(data, LIMITS)
    assert out.shape == (40, 20, 3)  # rotated 90 degrees clockwise
    assert out[2, 10, 0] > 0.8 and out[2, 10, 2] < 0.2  # the left (red) side is now on top
    assert out[-3, 10, 2] > 0.8 and out[-3, 10, 0] < 0.2
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))), dtype=np.float32) / 255
    np.testing.assert_array_equal(out, expected)


def test_rgba_composited_on_white():
    arr = np.zeros((2, 3, 4), np.uint8)
    arr[0, 0] = (255, 0, 0, 255)  # opaque red
    arr[0, 1] = (0, 0, 0, 0)  # fully transparent -> white
    arr[0, 2] = (0, 0, 0, 128)  # half black
    out = load_image(_save(Image.fromarray(arr, "RGBA"), "PNG"), LIMITS)
    assert out.shape == (2, 3, 3)
    np.testing.assert_allclose(out[0, 0], [1, 0, 0])
    np.testing.assert_allclose(out[0, 1], [1, 1, 1])
    np.testing.assert_allclose(out[0, 2], [127 / 255] * 3, atol=1e-3)


def test_palette_and_palette_transparency_to_rgb():
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    out = load_image(_save(pal, "PNG"), LIMITS)
    assert out.shape == (4, 4, 3)
    np.testing.assert_allclose(out[0, 0], np.array([10, 200, 30]) / 255)
    out = load_image(_save(pal, "PNG", transparency=1), LIMITS)
    np.testing.assert_allclose(out[0, 0], [1, 1, 1])


def test_gray_alpha_and_cmyk():
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")
    out = load_image(_save(la, "PNG"), LIMITS)
    assert out.shape == (1, 2, 1)
    np.testing.assert_allclose(out[0, :, 0], [1.0, 0.0])
    cmyk = load_image(_save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95), LIMITS)
    assert cmyk.shape == (8, 8, 3)
    assert cmyk[4, 4, 0] > 0.8 and cmyk[4, 4, 1] < 0.2


def test_animated_png_and_webp_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for fmt, kw in (("PNG", {}), ("WEBP", {"lossless": True})):
        data = _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **kw)
        assert Image.open(io.BytesIO(data)).n_frames == 3
        out = load_image(data, LIMITS)
        np.testing.assert_allclose(out[4, 4], [1, 0, 0], atol=0.02)


def test_to_model_input_channels_resize_normalise():
    rgb_prep = ImagePrep(size=16, channels=3, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    gray_prep = ImagePrep(size=8, channels=1, mean=[0.5], std=[0.25])
    flat = np.full((10, 30, 1), 0.75, np.float32)
    out = to_model_input(flat, rgb_prep)
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0, atol=1e-6)
    red = np.zeros((5, 7, 3), np.float32)
    red[..., 0] = 1.0
    g = to_model_input(red, gray_prep)
    assert g.shape == (1, 8, 8)
    np.testing.assert_allclose(g, (0.299 - 0.5) / 0.25, atol=1e-5)
    noise = RNG.random((50, 70, 3), dtype=np.float32)
    np.testing.assert_array_equal(to_model_input(noise, rgb_prep), to_model_input(noise.copy(), rgb_prep))
    with pytest.raises(ValueError):
        to_model_input(np.zeros((4, 4, 4), np.float32), rgb_prep)


def test_decode_image_end_to_end():
    out = decode_image(_save(Image.fromarray(_noise_rgb()), "JPEG"), ImagePrep(), LIMITS)
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    gray = decode_image(
        _save(Image.fromarray(_noise_rgb()), "PNG"), ImagePrep(channels=1, mean=[0.5], std=[0.25]), LIMITS
    )
    assert gray.shape == (1, 64, 64)


# ---------------------------------------------------------------- images: reason codes


def test_image_truncated_is_corrupt():
    jpeg = _save(Image.fromarray(_noise_rgb(64, 64)), "JPEG", quality=90)
    png = _save(Image.fromarray(_noise_rgb(64, 64)), "PNG")
    webp = _save(Image.fromarray(_noise_rgb(64, 64)), "WEBP", quality=80)
    for data in (jpeg, png, webp):
        for cut in (len(data) // 2, 20, 12):
            _raises(Reason.IMAGE_CORRUPT, load_image, data[:cut], LIMITS)
    _raises(Reason.IMAGE_CORRUPT, load_image, b"\x89PNG\r\n\x1a\n" + RNG.bytes(200), LIMITS)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_image_unsupported_formats():
    _raises(Reason.IMAGE_UNSUPPORTED_FORMAT, load_image, RNG.bytes(1000), LIMITS)
    _raises(Reason.IMAGE_UNSUPPORTED_FORMAT, load_image, b"", LIMITS)
    for fmt, name in (("PPM", "Netpbm"), ("ICO", "ICO"), ("PDF", "PDF"), ("JPEG2000", "JPEG 2000")):
        err = _raises(
            Reason.IMAGE_UNSUPPORTED_FORMAT, load_image, _save(Image.new("RGB", (16, 16)), fmt), LIMITS
        )
        assert name in err.message, err.message  # the error names the format it saw
    err = _raises(Reason.IMAGE_UNSUPPORTED_FORMAT, load_image, _video(), LIMITS)
    assert "MP4" in err.message


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "AVIF", "HEIF"])
def test_more_formats_accepted_under_the_same_limits(fmt):
    img = Image.fromarray(_noise_rgb(40, 30))
    data = _save(img, fmt, **({"quality": 100} if fmt in ("AVIF", "HEIF") else {}))
    out = load_image(data, LIMITS)
    assert out.shape == (30, 40, 3)
    if fmt in ("BMP", "TIFF"):
        np.testing.assert_array_equal(out, np.asarray(img, np.float32) / 255)
    _raises(Reason.IMAGE_TOO_MANY_PIXELS, load_image, data, Limits(max_image_pixels=1199))
    _raises(Reason.IMAGE_TOO_LARGE, load_image, data, Limits(max_image_bytes=len(data) - 1))
    _raises(Reason.IMAGE_CORRUPT, load_image, data[: len(data) // 2], LIMITS)


def test_image_decompression_bombs():
    zeros = _save(Image.new("L", (100, 100)), "PNG")  # 10k pixels in a few dozen bytes
    assert len(zeros) < 200
    assert load_image(zeros, LIMITS).shape == (100, 100, 1)
    err = _raises(Reason.IMAGE_TOO_MANY_PIXELS, load_image, zeros, Limits(max_image_pixels=1000))
    assert "1000" in err.message
    # hand-crafted headers: above our limit only, and above Pillow's own hard limit too
    _raises(Reason.IMAGE_TOO_MANY_PIXELS, load_image, _png_claiming(8000, 6000), LIMITS)
    err = _raises(Reason.IMAGE_TOO_MANY_PIXELS, load_image, _png_claiming(20000, 20000), LIMITS)
    assert "20000x20000" in err.message  # Pillow's own guard fired first; the dimensions are still given
    # Pillow's DecompressionBombWarning, when warnings are errors, is mapped too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _raises(
            Reason.IMAGE_TOO_MANY_PIXELS,
            load_image,
            _png_claiming(12000, 12000),
            Limits(max_image_pixels=10**9),
        )
    # a header claiming a size under the limit with no data behind it is corrupt, not a crash
    _raises(Reason.IMAGE_CORRUPT, load_image, _png_claiming(100, 100), LIMITS)


def test_image_too_many_bytes():
    data = _save(Image.fromarray(_noise_rgb()), "PNG")
    _raises(Reason.IMAGE_TOO_LARGE, load_image, data, Limits(max_image_bytes=len(data) - 1))
    assert load_image(data, Limits(max_image_bytes=len(data))).shape == (24, 32, 3)


# ---------------------------------------------------------------- DICOM


def test_dicom_ct_small_minmax_and_rescale():
    data = _bundled("CT_small.dcm").read_bytes()
    assert is_dicom(data) and not is_dicom(data[:131])
    ds = pydicom.dcmread(io.BytesIO(data))
    assert "WindowCenter" not in ds
    out = load_image(data, LIMITS, allow_dicom=True)
    assert out.shape == (128, 128, 1) and out.dtype == np.float32
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(out[..., 0], (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)
    # a soft-tissue window set on the dataset is applied to rescaled (HU) values
    ds.WindowCenter, ds.WindowWidth = 40, 400
    windowed = load_dicom(_dcm_bytes(ds), LIMITS, "auto")[..., 0]
    expected = np.clip((hu - (40 - 0.5)) / (400 - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(windowed, expected, atol=1e-6)
    np.testing.assert_allclose(load_dicom(_dcm_bytes(ds), LIMITS, "minmax"), out, atol=1e-6)


def test_dicom_mr_small_window_multivalue_and_monochrome1():
    data = _bundled("MR_small.dcm").read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    raw = ds.pixel_array.astype(np.float64)
    auto = load_dicom(data, LIMITS, "auto")[..., 0]
    np.testing.assert_allclose(auto, np.clip((raw - (c - 0.5)) / (w - 1) + 0.5, 0, 1), atol=1e-6)
    minmax = load_dicom(data, LIMITS, "minmax")[..., 0]
    assert minmax.min() == 0.0 and minmax.max() == 1.0
    assert not np.allclose(auto, minmax)
    ds.WindowCenter, ds.WindowWidth = [c, 100.0], [w, 50.0]
    np.testing.assert_allclose(load_dicom(_dcm_bytes(ds), LIMITS)[..., 0], auto, atol=1e-6)
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_allclose(load_dicom(_dcm_bytes(ds), LIMITS)[..., 0], 1.0 - auto, atol=1e-6)


def test_dicom_via_decode_image_and_multiframe():
    data = _bundled("MR_small.dcm").read_bytes()
    out = decode_image(data, ImagePrep(channels=1, mean=[0.5], std=[0.25]), LIMITS, allow_dicom=True)
    assert out.shape == (1, 64, 64) and out.dtype == np.float32
    rgb = decode_image(data, ImagePrep(), LIMITS, allow_dicom=True)
    assert rgb.shape == (3, 64, 64)
    multi = load_image(_bundled("SC_rgb_rle_2frame.dcm").read_bytes(), LIMITS, allow_dicom=True)
    assert multi.shape == (100, 100, 1)
    assert multi.min() >= 0.0 and multi.max() <= 1.0


def test_dicom_invalid_values_are_not_echoed(caplog):
    """pydicom's validation warnings quote element values (patient data): none may surface."""
    ds = pydicom.dcmread(_bundled("MR_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = "123456", "654321"
    data = _dcm_bytes(ds)
    assert data.count(b"123456") == 1
    data = data.replace(b"123456", b"SECRET")
    with caplog.at_level(logging.DEBUG, logger="pydicom"), warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = load_dicom(data, LIMITS, "auto")
    assert not any("SECRET" in str(w.message) for w in rec)
    assert "SECRET" not in caplog.text
    # an unusable window falls back to min/max
    np.testing.assert_allclose(out, load_dicom(data, LIMITS, "minmax"))


def test_dicom_reason_codes():
    ct = _bundled("CT_small.dcm").read_bytes()
    _raises(Reason.IMAGE_UNSUPPORTED_FORMAT, load_image, ct, LIMITS)  # not allowed by this workload
    _raises(Reason.IMAGE_UNSUPPORTED_FORMAT, decode_image, ct, ImagePrep(), LIMITS)
    _raises(Reason.IMAGE_TOO_LARGE, load_image, ct, Limits(max_image_bytes=1000), allow_dicom=True)
    _raises(Reason.IMAGE_TOO_MANY_PIXELS, load_image, ct, Limits(max_image_pixels=1000), allow_dicom=True)
    ds = pydicom.dcmread(io.BytesIO(ct))
    ds.Rows, ds.Columns = 60000, 60000  # claim, checked before pixel data is touched
    _raises(Reason.IMAGE_TOO_MANY_PIXELS, load_image, _dcm_bytes(ds), LIMITS, allow_dicom=True)
    # no pixel data
    ds = pydicom.dcmread(io.BytesIO(ct))
    del ds.PixelData
    _raises(Reason.DICOM_NO_PIXELS, load_image, _dcm_bytes(ds), LIMITS, allow_dicom=True)
    _raises(Reason.DICOM_NO_PIXELS, load_dicom, _bundled("rtplan.dcm").read_bytes(), LIMITS)
    # corrupt: truncated, short pixel data, garbage after the marker, no marker
    _raises(Reason.DICOM_CORRUPT, load_image, ct[:1000], LIMITS, allow_dicom=True)
    _raises(Reason.DICOM_CORRUPT, load_image, ct[:140], LIMITS, allow_dicom=True)
    _raises(Reason.DICOM_CORRUPT, load_dicom, _bundled("MR_truncated.dcm").read_bytes(), LIMITS)
    _raises(
        Reason.DICOM_CORRUPT, load_image, b"\0" * 128 + b"DICM" + RNG.bytes(500), LIMITS, allow_dicom=True
    )
    _raises(Reason.DICOM_CORRUPT, load_dicom, b"not dicom", LIMITS)


def test_dicom_transfer_syntax_without_decoder_has_its_own_reason():
    """A valid file in an encoding nothing installed decodes is not corrupt."""
    from pydicom.uid import MPEG4HP41

    ds = pydicom.dcmread(_bundled("MR_small_jpeg_ls_lossless.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG4HP41  # pydicom has no decoder for video transfer syntaxes
    err = _raises(
        Reason.DICOM_UNSUPPORTED_TRANSFER_SYNTAX, load_image, _dcm_bytes(ds), LIMITS, allow_dicom=True
    )
    assert "MPEG-4" in err.message and MPEG4HP41 in err.message and "no installed decoder" in err.message
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"  # outside the registry: not quoted
    err = _raises(
        Reason.DICOM_UNSUPPORTED_TRANSFER_SYNTAX, load_image, _dcm_bytes(ds), LIMITS, allow_dicom=True
    )
    assert "1.2.3.4.5.6.7" not in err.message


def test_dicom_compressed_frame_size_checked_before_decoding():
    """An encapsulated JPEG 2000 frame larger than Rows x Columns claims is
    refused from its own header, before any decoder allocates it."""
    ds = pydicom.dcmread(_bundled("JPEG2000.dcm"))
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    assert load_image(_dcm_bytes(ds), LIMITS, allow_dicom=True).shape == (1024, 256, 1)
    ds.Rows, ds.Columns = 8, 8  # 64 pixels claimed, 256x1024 in the codestream
    err = _raises(
        Reason.IMAGE_TOO_MANY_PIXELS,
        load_image,
        _dcm_bytes(ds),
        Limits(max_image_pixels=1000),
        allow_dicom=True,
    )
    assert "compressed frame" in err.message


def test_dicom_deflated_and_deflate_bomb():
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    assert load_image(_bundled("image_dfl.dcm").read_bytes(), LIMITS, allow_dicom=True).shape == (512, 512, 1)
    ds = pydicom.dcmread(_bundled("CT_small.dcm"))
    ds.Rows, ds.Columns = 1, 1
    ds.PixelData = b"\0" * (20 * 2**20)  # inflates to 20 MiB while declaring one pixel
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = _dcm_bytes(ds)
    assert len(data) < 100_000
    _raises(Reason.IMAGE_TOO_MANY_PIXELS, load_image, data, Limits(max_image_pixels=1000), allow_dicom=True)


# ---------------------------------------------------------------- audio and features


@pytest.mark.parametrize("sr", [8000, 16000, 22050, 44100, 48000])
def test_wav_resampled_to_16k(sr):
    x = _tone(sr, 1.0)
    out = load_audio(_wav(x, sr), LIMITS, 16000)
    assert out.dtype == np.float32 and out.ndim == 1
    assert out.shape == (16000,)
    assert 0.3 < np.abs(out[1000:-1000]).max() < 0.6  # amplitude survives resampling


def test_wav_stereo_mixed_to_mono_and_float_subtypes():
    n = 8000
    stereo = np.stack([np.full(n, 0.5, np.float32), np.full(n, 0.1, np.float32)], axis=1)
    out = load_audio(_wav(stereo, 8000, subtype="FLOAT"), LIMITS, 8000)
    assert out.shape == (n,)
    np.testing.assert_allclose(out, 0.3, atol=1e-6)
    same = load_audio(_wav(stereo[:, 0], 16000, subtype="PCM_24"), LIMITS, 16000)
    np.testing.assert_allclose(same, 0.5, atol=1e-6)


def test_flac_and_ogg():
    x = _tone(44100, 0.5)
    out = load_audio(_wav(x, 44100, subtype="PCM_16", fmt="FLAC"), LIMITS, 16000)
    assert out.shape == (8000,)
    if "OGG" in sf.available_formats():
        ogg = load_audio(_wav(x, 44100, subtype="VORBIS", fmt="OGG"), LIMITS, 16000)
        assert abs(ogg.shape[0] - 8000) <= 2


def test_wav_streaming_unknown_size_is_accepted():
    data = bytearray(_wav(_tone(8000, 0.5), 8000))
    assert data[36:40] == b"data"
    struct.pack_into("<I", data, 40, 0xFFFFFFFF)
    struct.pack_into("<I", data, 4, 0xFFFFFFFF)
    assert load_audio(bytes(data), LIMITS, 8000).shape == (4000,)


def test_mel_filterbank_cached_and_shape():
    fb = mel_filterbank(16000, 512, 32)
    assert fb.shape == (32, 257) and fb.dtype == np.float32
    assert mel_filterbank(16000, 512, 32) is fb
    assert not fb.flags.writeable
    assert (fb >= 0).all() and (fb.sum(axis=1) > 0).all()


@pytest.mark.parametrize(
    "prep",
    [
        AudioPrep(),
        AudioPrep(max_seconds=2.0, hop_length=256),
        AudioPrep(n_fft=401, hop_length=100, max_seconds=0.5),
    ],
)
def test_log_mel_shape_pad_crop(prep):
    n = int(prep.sample_rate * prep.max_seconds)
    for length in (1, n // 3, n, 3 * n):
        out = log_mel(_tone(prep.sample_rate, length / prep.sample_rate)[:length] + 0.0, prep)
        assert out.shape == (prep.n_mels, prep.frames) and out.dtype == np.float32
        assert np.isfinite(out).all()
    silence = log_mel(np.zeros(10, np.float32), prep)
    np.testing.assert_allclose(silence, np.log(1e-6), rtol=1e-6)


def test_log_mel_tone_peaks_in_right_band_and_is_deterministic():
    prep = AudioPrep(sample_rate=16000, n_fft=512, n_mels=40, hop_length=160, max_seconds=1.0)
    for hz in (300.0, 1000.0, 4000.0):
        spec = log_mel(_tone(16000, 1.0, hz=hz), prep)
        fb = mel_filterbank(16000, 512, 40)
        expected_band = int(np.argmax(fb[:, round(hz * 512 / 16000)]))
        assert int(np.argmax(spec.mean(axis=1))) == expected_band
    x = RNG.standard_normal(16000).astype(np.float32)
    np.testing.assert_array_equal(log_mel(x, prep), log_mel(x.copy(), prep))
    # crop from the start: the first max_seconds are what is kept
    longer = np.concatenate([x, RNG.standard_normal(8000).astype(np.float32)])
    np.testing.assert_array_equal(log_mel(longer, prep), log_mel(x, prep))


def test_decode_audio_shape():
    prep = AudioPrep(max_seconds=2.0, hop_length=256)
    out = decode_audio(_wav(_tone(44100, 1.0), 44100), prep, LIMITS)
    assert out.shape == (32, prep.frames) and out.dtype == np.float32


def test_audio_too_long_from_header():
    # a WAV header claiming 10 hours over a few bytes: rejected from the header
    data = bytearray(_wav(_tone(8000, 0.01), 8000))
    declared = 10 * 3600 * 8000 * 2
    struct.pack_into("<I", data, 40, declared)
    struct.pack_into("<I", data, 4, declared + 36)
    _raises(Reason.AUDIO_TOO_LONG, load_audio, bytes(data), LIMITS, 16000)
    # a genuinely long but tiny FLAC of silence
    flac = _wav(np.zeros(8000 * 200, np.float32), 8000, fmt="FLAC")
    assert len(flac) < 100_000
    err = _raises(Reason.AUDIO_TOO_LONG, load_audio, flac, LIMITS, 16000)
    assert "200.0 s" in err.message
    assert load_audio(flac, Limits(max_audio_seconds=300), 8000).shape == (8000 * 200,)
    _raises(
        Reason.AUDIO_TOO_LONG, load_audio, _wav(_tone(8000, 2.0), 8000), Limits(max_audio_seconds=1), 8000
    )


def test_audio_corrupt_and_truncated():
    wav = _wav(_tone(8000, 1.0), 8000)
    for cut in (12, 30, 40):  # inside the header
        _raises(Reason.AUDIO_CORRUPT, load_audio, wav[:cut], LIMITS, 16000)
    _raises(Reason.AUDIO_CORRUPT, load_audio, wav[:44], LIMITS, 16000)  # header only: zero frames
    err = _raises(Reason.AUDIO_CORRUPT, load_audio, wav[: len(wav) // 2], LIMITS, 16000)
    assert "truncated" in err.message
    flac = _wav(_tone(8000, 1.0), 8000, fmt="FLAC")
    for cut in (30, 60, len(flac) // 2):
        _raises(Reason.AUDIO_CORRUPT, load_audio, flac[:cut], LIMITS, 16000)
    bad = _tone(8000, 0.1)
    bad[100] = np.nan
    _raises(Reason.AUDIO_CORRUPT, load_audio, _wav(bad, 8000, subtype="FLOAT"), LIMITS, 16000)
    bad[100] = np.inf
    _raises(Reason.AUDIO_CORRUPT, load_audio, _wav(bad, 8000, subtype="FLOAT"), LIMITS, 16000)
    _raises(Reason.AUDIO_CORRUPT, load_audio, b"RIFF\x10\x00\x00\x00WAVE" + RNG.bytes(300), LIMITS, 16000)


def test_audio_unsupported_and_too_large():
    _raises(Reason.AUDIO_UNSUPPORTED_FORMAT, load_audio, RNG.bytes(2000), LIMITS, 16000)
    _raises(Reason.AUDIO_UNSUPPORTED_FORMAT, load_audio, b"", LIMITS, 16000)
    aiff = _wav(_tone(8000, 0.1), 8000, fmt="AIFF")
    _raises(Reason.AUDIO_UNSUPPORTED_FORMAT, load_audio, aiff, LIMITS, 16000)
    data = bytearray(_wav(_tone(8000, 0.1), 8000))
    struct.pack_into("<II", data, 24, 1_000_000, 2_000_000)  # absurd sample rate / byte rate
    _raises(Reason.AUDIO_UNSUPPORTED_FORMAT, load_audio, bytes(data), LIMITS, 16000)
    wav = _wav(_tone(8000, 0.5), 8000)
    _raises(Reason.AUDIO_TOO_LARGE, load_audio, wav, Limits(max_audio_bytes=len(wav) - 1), 16000)


# ---------------------------------------------------------------- video


@pytest.fixture(scope="module")
def mp4() -> bytes:
    return _video("libx264" if "libx264" in av.codecs_available else "mpeg4")


def test_keyframes_evenly_spaced_and_distinct(mp4):
    frames = load_keyframes(mp4, LIMITS, 4)
    assert len(frames) == 4
    for f in frames:
        assert f.shape == (48, 64, 3) and f.dtype == np.float32
        assert f.min() >= 0.0 and f.max() <= 1.0
    means = [f.reshape(-1, 3).mean(axis=0) for f in frames]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(means[i] - means[j]).max() > 0.1
    # 12 frames, 4 targets: centres of four equal segments -> frames 1, 4, 7, 10
    for got, idx in zip(means, (1, 4, 7, 10)):
        np.testing.assert_allclose(got, np.array(FRAME_COLOURS[idx]) / 255, atol=0.06)


@pytest.mark.parametrize(("codec", "fmt"), [("mpeg4", "avi"), ("mpeg4", "matroska")])
def test_keyframes_other_containers(codec, fmt):
    frames = load_keyframes(_video(codec, fmt), LIMITS, 3)
    assert len(frames) == 3 and all(f.shape == (48, 64, 3) for f in frames)


def test_short_video_repeats_last_frame():
    frames = load_keyframes(_video("mpeg4", "mp4", n=2), LIMITS, 4)
    assert len(frames) == 4
    assert not np.allclose(frames[0], frames[1], atol=0.05)
    np.testing.assert_array_equal(frames[1], frames[2])
    np.testing.assert_array_equal(frames[1], frames[3])


def test_keyframes_max_side_shrinks(mp4):
    frames = load_keyframes(mp4, LIMITS, 2, max_side=32)
    assert all(f.shape == (24, 32, 3) for f in frames)


def test_contact_sheet_shapes():
    f = np.full((10, 20, 3), 0.5, np.float32)
    assert contact_sheet([f]).shape == (10, 20, 3)
    assert contact_sheet([f] * 4).shape == (20, 40, 3)
    assert contact_sheet([f] * 6).shape == (20, 60, 3)  # 2 rows x 3 columns
    assert contact_sheet([f] * 9).shape == (30, 60, 3)
    three = contact_sheet([f, f, f])
    assert three.shape == (20, 40, 3)
    assert (three[10:, 20:] == 0).all()  # unused cell is black
    mixed = contact_sheet([f, np.ones((5, 5, 1), np.float32)])
    assert mixed.shape == (10, 40, 3) and mixed.dtype == np.float32
    np.testing.assert_allclose(mixed[:, 20:], 1.0)
    with pytest.raises(ValueError):
        contact_sheet([])


def test_decode_video_to_model_input(mp4):
    out = decode_video(mp4, ImagePrep(), LIMITS)
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    gray = decode_video(mp4, ImagePrep(channels=1, mean=[0.5], std=[0.25], video_frames=6), LIMITS)
    assert gray.shape == (1, 64, 64)


def test_video_reason_codes(mp4):
    _raises(Reason.VIDEO_TOO_LARGE, load_keyframes, mp4, Limits(max_video_bytes=len(mp4) - 1), 4)
    _raises(Reason.VIDEO_TOO_LONG, load_keyframes, mp4, Limits(max_video_seconds=0.5), 4)
    _raises(Reason.VIDEO_TOO_MANY_PIXELS, load_keyframes, mp4, Limits(max_image_pixels=1000), 4)
    for bad in (RNG.bytes(4096), mp4[:200], mp4[:40], b""):
        err = _raises(Reason.VIDEO_CORRUPT, load_keyframes, bad, LIMITS, 4)
        assert "not a readable video container" in err.message
    # a container FFmpeg can read but that is not on the video whitelist
    err = _raises(Reason.VIDEO_CORRUPT, load_keyframes, _wav(_tone(8000, 0.5), 8000), LIMITS, 4)
    assert "not a readable video container" in err.message
    _raises(Reason.VIDEO_NO_FRAMES, load_keyframes, _audio_only_mp4(), LIMITS, 4)
    _raises(Reason.VIDEO_NO_FRAMES, decode_video, _audio_only_mp4(), ImagePrep(), LIMITS)


def test_video_corrupt_packets():
    """Garbage in every coded frame: a RecordError (which code depends on how
    FFmpeg's decoder copes), never anything else."""
    data = bytearray(_video("mpeg4", "avi"))
    start = data.find(b"movi")
    assert start > 0
    for i in range(start + 40, len(data) - 200, 7):
        data[i] ^= 0x5A
    try:
        frames = load_keyframes(bytes(data), LIMITS, 4)
    except RecordError as exc:
        assert exc.code in (Reason.VIDEO_CORRUPT, Reason.VIDEO_NO_FRAMES)
    else:
        assert len(frames) == 4


# ---------------------------------------------------------------- fuzzing: RecordError or a valid array

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
FUZZ_LIMITS = Limits(
    max_image_pixels=2_000_000, max_audio_seconds=20, max_video_seconds=60, max_image_bytes=2**20
)


@st.composite
def _mutated(draw, bases: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(bases)))
    n = len(data)
    head = st.integers(0, min(n, 512) - 1)
    for pos, val in draw(
        st.lists(st.tuples(st.one_of(head, st.integers(0, n - 1)), st.integers(0, 255)), max_size=8)
    ):
        data[pos] = val
    if draw(st.booleans()):
        del data[draw(st.integers(0, n)) :]
    return bytes(data)


def _arbitrary(*magics: bytes) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, plain or behind a format's magic number (so the decoder proper is reached)."""
    tail = st.binary(max_size=4096)
    return st.one_of(tail, st.tuples(st.sampled_from(magics), tail).map(lambda t: t[0] + t[1]))


def _check(fn, shape: tuple[int, ...] | None, data: bytes) -> None:
    try:
        out = fn(data)
    except RecordError:
        return
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    if shape is not None:
        assert out.shape == shape
    assert np.isfinite(out).all()


IMAGE_BASES = [
    _save(Image.fromarray(_noise_rgb(16, 12)), "JPEG"),
    _save(Image.fromarray(_noise_rgb(16, 12)), "PNG"),
    _save(Image.fromarray((np.arange(96).reshape(8, 12) * 600).astype(np.uint16)), "PNG"),
    _save(Image.fromarray(_noise_rgb(16, 12)), "WEBP"),
    _save(Image.new("P", (9, 9), 3), "PNG", transparency=3),
]
_IMG_PREP = ImagePrep(size=16)


def _decode_img(data: bytes) -> np.ndarray:
    return decode_image(data, _IMG_PREP, FUZZ_LIMITS, allow_dicom=True)


@FUZZ
@given(_arbitrary(b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBP"))
def test_fuzz_image_arbitrary_bytes(data):
    _check(_decode_img, (3, 16, 16), data)


@FUZZ
@given(_mutated(IMAGE_BASES))
def test_fuzz_image_mutated(data):
    _check(_decode_img, (3, 16, 16), data)
    _check(lambda d: load_image(d, FUZZ_LIMITS), None, data)


DICOM_BASES = [
    p.read_bytes() for p in (_DICOM_DIR / "MR_small.dcm", _DICOM_DIR / "CT_small.dcm") if p.is_file()
]


@pytest.mark.skipif(not DICOM_BASES, reason="pydicom test files not bundled")
@FUZZ
@given(st.data())
def test_fuzz_dicom_mutated(data):
    blob = data.draw(_mutated(DICOM_BASES) if DICOM_BASES else st.just(b""))
    _check(_decode_img, (3, 16, 16), blob)
    _check(lambda d: load_dicom(d, FUZZ_LIMITS, "minmax"), None, blob)


@FUZZ
@given(st.binary(max_size=4096).map(lambda b: b"\0" * 128 + b"DICM" + b))
def test_fuzz_dicom_arbitrary_bytes(data):
    _check(_decode_img, (3, 16, 16), data)


AUDIO_BASES = [
    _wav(_tone(8000, 0.2), 8000),
    _wav(np.stack([_tone(11025, 0.1), _tone(11025, 0.1, hz=800)], axis=1), 11025, subtype="FLOAT"),
    _wav(_tone(16000, 0.2), 16000, fmt="FLAC"),
]
_AUDIO_PREP = AudioPrep(max_seconds=0.5, hop_length=256)


@FUZZ
@given(_arbitrary(b"RIFF\0\0\0\0WAVE", b"fLaC", b"OggS"))
def test_fuzz_audio_arbitrary_bytes(data):
    _check(lambda d: decode_audio(d, _AUDIO_PREP, FUZZ_LIMITS), (32, _AUDIO_PREP.frames), data)


@FUZZ
@given(_mutated(AUDIO_BASES))
def test_fuzz_audio_mutated(data):
    _check(lambda d: decode_audio(d, _AUDIO_PREP, FUZZ_LIMITS), (32, _AUDIO_PREP.frames), data)


VIDEO_BASES = [_video("mpeg4", "mp4", n=6), _video("mpeg4", "avi", n=6), _video("mpeg4", "matroska", n=6)]
_VIDEO_PREP = ImagePrep(size=16, video_frames=4)


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_video_arbitrary_bytes(data):
    _check(lambda d: decode_video(d, _VIDEO_PREP, FUZZ_LIMITS), (3, 16, 16), data)


@FUZZ
@given(_mutated(VIDEO_BASES))
def test_fuzz_video_mutated(data):
    _check(lambda d: decode_video(d, _VIDEO_PREP, FUZZ_LIMITS), (3, 16, 16), data)


@pytest.mark.parametrize(("degrees", "turns"), [(0, 0), (90, 1), (180, 2), (270, 3), (-90, 3)])
def test_video_display_matrix_applied(degrees, turns):
    """Frames come out as the display matrix shows them (counter-clockwise
    quarter turns, as FFmpeg's autorotate): a left-white frame rotated."""
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :32] = 255
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.set_display_rotation(degrees)
        for _ in range(3):
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    frame = load_keyframes(buf.getvalue(), LIMITS, 1)[0]
    want = np.rot90(img, turns).astype(np.float32) / 255
    assert frame.shape == want.shape
    assert np.abs(frame - want).mean() < 0.05
