"""Decoders on a corpus of real files nobody on this project wrote.

The corpus is built here from what installed packages and system tools carry:
pydicom's bundled test files and those of ``pydicom-data`` (installed, never
downloaded), scikit-image's sample photographs, ImageMagick conversions
(GIF, TIFF 8/16-bit, BMP, AVIF, HEIC), ffmpeg (MP3, M4A, ADTS AAC, a portrait
phone clip carrying a display matrix) and espeak-ng speech.  Each file's
expected outcome is asserted: a decoded array checked against an independent
reference, or a named reason code.  A missing tool skips locally and fails
under ``CI=true`` (the bootstrap installs them).
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from pipeline.config import Limits
from pipeline.decode import decode_image, load_audio, load_image, load_keyframes, to_model_input
from pipeline.decode.dicom import load_dicom
from pipeline.errors import Reason, RecordError
from pipeline.spec import ImagePrep

LIMITS = Limits()
ROOT = Path(__file__).resolve().parents[2]


def _missing(what: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} is not installed (.ci/bootstrap.sh installs it)")
    pytest.skip(f"{what} is not installed")


def _imagemagick() -> str:
    """The real ImageMagick ``convert`` (a stand-in of the same name may come first on PATH)."""
    for cand in (shutil.which("magick"), "/usr/bin/convert", shutil.which("convert")):
        if cand and os.path.exists(cand):
            out = subprocess.run([cand, "-version"], capture_output=True, text=True, check=False).stdout
            if "ImageMagick" in out:
                return cand
    _missing("ImageMagick")
    raise AssertionError  # unreachable


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        _missing(name)
    return str(path)


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def _code(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except RecordError as err:
        return err.code.value
    return "ok"


# ---------------------------------------------------------------- DICOM


def _dicom(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        _missing(f"pydicom test file {name} (pydicom / pydicom-data)")
    return Path(str(path)).read_bytes()


def _frame0(data: bytes) -> np.ndarray:
    ds = pydicom.dcmread(io.BytesIO(data))
    return load_dicom(data, LIMITS, "minmax"), ds


# lossless encodings whose frame must equal their uncompressed original exactly
LOSSLESS_PAIRS = [
    ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE Lossless
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS Lossless
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 Lossless
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ("emri_small_RLE.dcm", "emri_small.dcm"),
]


@pytest.mark.parametrize(("compressed", "original"), LOSSLESS_PAIRS)
def test_lossless_dicom_equals_its_uncompressed_original(compressed, original):
    got, ds = _frame0(_dicom(compressed))
    want, _ = _frame0(_dicom(original))
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_allclose(got, want, atol=1e-6)


# lossy / other encodings: decoded, and close to what pydicom itself decodes
DECODES = [
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline
    "JPGExtended.dcm",  # JPEG Extended, 12-bit
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless SV1, colour
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "JPEG-LL.dcm",  # JPEG Lossless SV1, 16-bit
    "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless, 16-bit
    "SC_rgb_jls_lossy_line.dcm",
    "JPEG2000.dcm",  # JPEG 2000 (lossy allowed)
    "US1_J2KI.dcm",
    "SC_rgb_rle_16bit.dcm",
    "examples_ybr_color.dcm",
    "image_dfl.dcm",  # deflated
    "MR_small_bigendian.dcm",
]


@pytest.mark.parametrize("name", DECODES)
def test_compressed_dicom_decodes(name):
    data = _dicom(name)
    out = load_image(data, LIMITS, allow_dicom=True)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert out.shape == (ds.Rows, ds.Columns, 1)
    assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0 and out.std() > 0.01
    model = decode_image(data, ImagePrep(channels=1, mean=[0.5], std=[0.25]), LIMITS, allow_dicom=True)
    assert model.shape == (1, 64, 64) and np.isfinite(model).all()


def test_multiframe_dicom_uses_its_first_frame():
    """Documented choice: a multi-frame DICOM is read as its first frame
    (what a viewer opens on), decoded alone."""
    data = _dicom("SC_rgb_rle_2frame.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    assert int(ds.NumberOfFrames) == 2
    frames = ds.pixel_array.astype(np.float64) / 255.0
    luma = frames[..., 0] * 0.299 + frames[..., 1] * 0.587 + frames[..., 2] * 0.114
    assert not np.allclose(luma[0], luma[1])
    out = load_dicom(data, LIMITS)[..., 0]
    np.testing.assert_allclose(out, luma[0], atol=1e-6)


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("reportsi.dcm", "dicom_no_pixels"),  # structured report ending in an undefined-length sequence
        ("reportsi_with_empty_number_tags.dcm", "dicom_no_pixels"),
        ("test-SR.dcm", "dicom_no_pixels"),
        ("rtplan.dcm", "dicom_no_pixels"),
        ("waveform_ecg.dcm", "dicom_no_pixels"),
        ("rtplan_truncated.dcm", "dicom_corrupt"),
        ("MR_truncated.dcm", "dicom_corrupt"),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", "dicom_corrupt"),
        # its JPEG stream breaks the standard (scan start/stop); no decoder reads it
        ("JPEG-lossy.dcm", "dicom_corrupt"),
        # its JPEG 2000 header claims 3722445056 x 1024 pixels
        ("JPEG2000-embedded-sequence-delimiter.dcm", "image_too_many_pixels"),
    ],
)
def test_dicom_outcomes(name, code):
    assert _code(load_dicom, _dicom(name), LIMITS) == code


def test_reportsi_ends_in_an_undefined_length_sequence():
    """The case that used to be called truncated: a complete file whose last
    top-level element is an undefined-length sequence."""
    data = _dicom("reportsi.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    last = ds[max(ds.keys())]
    assert last.VR == "SQ" and last.is_undefined_length
    assert data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # sequence delimitation item
    assert _code(load_dicom, data[:-4], LIMITS) == "dicom_corrupt"  # cut inside that delimiter


# ---------------------------------------------------------------- photographs


def _photo(name: str) -> np.ndarray:
    skdata = pytest.importorskip("skimage.data")
    return np.asarray(getattr(skdata, name)())


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> dict[str, tuple[bytes, np.ndarray]]:
    """skimage photos converted by ImageMagick: name -> (file bytes, source pixels)."""
    convert = _imagemagick()
    tmp = tmp_path_factory.mktemp("photos")
    chelsea, camera = _photo("chelsea"), _photo("camera")
    Image.fromarray(chelsea).save(tmp / "chelsea.png")
    Image.fromarray(camera).save(tmp / "camera.png")
    jobs = {
        "gif": ("chelsea.png", [], chelsea),
        "tiff8": ("chelsea.png", ["-depth", "8", "-compress", "lzw"], chelsea),
        "tiff16": ("camera.png", ["-depth", "16"], camera),
        "bmp": ("chelsea.png", [], chelsea),
        "avif": ("chelsea.png", ["-quality", "90"], chelsea),
        "heic": ("chelsea.png", ["-quality", "90"], chelsea),
    }
    out = {}
    for key, (src, opts, pixels) in jobs.items():
        ext = "tiff" if key.startswith("tiff") else key
        dst = tmp / f"{key}.{ext}"
        _run(convert, str(tmp / src), *opts, str(dst))
        out[key] = (dst.read_bytes(), pixels)
    animated = tmp / "anim.gif"
    _run(convert, "-delay", "10", str(tmp / "chelsea.png"), str(tmp / "camera.png"), str(animated))
    out["gif_animated"] = (animated.read_bytes(), chelsea)
    return out


@pytest.mark.parametrize(
    ("key", "tolerance"),
    [("bmp", 0.0), ("tiff8", 0.0), ("tiff16", 1e-6), ("gif", 0.03), ("gif_animated", 0.03), ("avif", 0.03),
     ("heic", 0.03)],
)
def test_image_formats_decode_close_to_the_source(photo_files, key, tolerance):
    data, src = photo_files[key]
    out = load_image(data, LIMITS)
    want = src.astype(np.float32) / 255.0
    if want.ndim == 2:
        want = want[..., None]
    assert out.shape == want.shape, (key, out.shape)
    assert float(np.abs(out - want).mean()) <= tolerance, key
    h, w = want.shape[:2]
    with pytest.raises(RecordError) as info:
        load_image(data, Limits(max_image_pixels=w * h - 1))
    err = info.value
    assert err.code is Reason.IMAGE_TOO_MANY_PIXELS and f"{w}x{h}" in err.message  # before decoding
    assert _code(load_image, data, Limits(max_image_bytes=len(data) - 1)) == "image_too_large"


def test_sixteen_bit_tiff_keeps_its_precision(photo_files):
    data, _ = photo_files["tiff16"]
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith("I;16")
        raw = np.asarray(im).astype(np.float32) / 65535.0
    np.testing.assert_allclose(load_image(data, LIMITS)[..., 0], raw, atol=1e-7)


# ---------------------------------------------------------------- fast model path

# Tolerance of decode_image against the full-resolution float reference
# to_model_input(load_image(...)), in [0, 1] pixel units (before mean/std):
# 8-bit rounding before the resize costs at most ~0.004; JPEG's reduced-scale
# DCT decode (only when the file is at least twice the target) a little more.
EXACT_MAX = 0.005
DRAFT_MEAN, DRAFT_P99 = 0.008, 0.05


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "camera", "rocket"])
def test_fast_model_path_matches_the_float_reference(name, size):
    src = _photo(name)
    prep = ImagePrep(size=size)
    gray = ImagePrep(size=size, channels=1, mean=[0.5], std=[0.25])
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(src).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        data = buf.getvalue()
        for p in (prep, gray):
            diff = np.abs(decode_image(data, p, LIMITS) - to_model_input(load_image(data, LIMITS), p)) * 0.25
            # JPEG: reduced-scale decode, or (one channel) JPEG's own luma plane
            drafted = fmt == "JPEG" and (min(src.shape[:2]) >= 2 * size or p.channels == 1)
            if drafted:
                assert diff.mean() <= DRAFT_MEAN and np.quantile(diff, 0.99) <= DRAFT_P99, (name, fmt, size)
            else:
                assert diff.max() <= EXACT_MAX, (name, fmt, size, float(diff.max()))


def test_fast_path_same_reason_codes():
    prep = ImagePrep()
    buf = io.BytesIO()
    Image.fromarray(_photo("astronaut")).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    for limits, code in ((Limits(max_image_pixels=512 * 512 - 1), "image_too_many_pixels"),
                         (Limits(max_image_bytes=len(data) - 1), "image_too_large"),
                         (LIMITS, "ok")):
        assert _code(decode_image, data, prep, limits) == _code(load_image, data, limits) == code
    assert _code(decode_image, data[: len(data) // 2], prep, LIMITS) == "image_corrupt"


# ---------------------------------------------------------------- speech


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict[str, bytes]:
    espeak, ffmpeg = _tool("espeak-ng"), _tool("ffmpeg")
    tmp = tmp_path_factory.mktemp("speech")
    wav = tmp / "speech.wav"
    _run(espeak, "-w", str(wav), "The patient reports mild chest pain since yesterday evening.")
    out = {"wav": wav.read_bytes()}
    for key, args in {
        "mp3": ["-c:a", "libmp3lame", "-b:a", "64k", "speech.mp3"],
        "m4a": ["-c:a", "aac", "-b:a", "64k", "speech.m4a"],
        "aac": ["-c:a", "aac", "-f", "adts", "speech.aac"],
        "opus": ["-c:a", "libopus", "speech.ogg"],
        "flac": ["-c:a", "flac", "speech.flac"],
        "stereo_m4a": ["-ac", "2", "-ar", "44100", "-c:a", "aac", "stereo.m4a"],
    }.items():
        _run(ffmpeg, "-loglevel", "error", "-y", "-i", str(wav), *args[:-1], str(tmp / args[-1]))
        out[key] = (tmp / args[-1]).read_bytes()
    return out


def _envelope(x: np.ndarray, hop: int = 400) -> np.ndarray:
    n = len(x) // hop
    return np.sqrt((x[: n * hop].reshape(n, hop) ** 2).mean(axis=1))


def _aligned_corr(a: np.ndarray, b: np.ndarray, max_lag: int = 8) -> float:
    """Best correlation of two loudness envelopes within +-max_lag hops
    (encoders add priming delay; raw ADTS has no edit list to remove it)."""
    ea, eb = _envelope(a), _envelope(b)
    best = -1.0
    for lag in range(-max_lag, max_lag + 1):
        x, y = (ea[lag:], eb) if lag >= 0 else (ea, eb[-lag:])
        n = min(len(x), len(y))
        best = max(best, float(np.corrcoef(x[:n], y[:n])[0, 1]))
    return best


@pytest.mark.parametrize("key", ["mp3", "m4a", "aac", "opus", "flac", "stereo_m4a"])
def test_speech_in_common_formats_decodes_like_the_wav(speech, key):
    ref = load_audio(speech["wav"], LIMITS, 16000)
    got = load_audio(speech[key], LIMITS, 16000)
    assert abs(len(got) - len(ref)) <= 0.05 * len(ref), (key, len(got), len(ref))
    corr = _aligned_corr(got, ref)  # the loudness envelope follows the speech
    assert corr > 0.9, (key, corr)
    data = speech[key]
    assert _code(load_audio, data, Limits(max_audio_seconds=1.0), 16000) == "audio_too_long"
    assert _code(load_audio, data, Limits(max_audio_bytes=len(data) - 1), 16000) == "audio_too_large"


def test_unsupported_audio_names_what_it_saw(speech, tmp_path):
    ffmpeg = _tool("ffmpeg")
    src = tmp_path / "s.wav"
    src.write_bytes(speech["wav"])
    _run(ffmpeg, "-loglevel", "error", "-y", "-i", str(src), str(tmp_path / "s.aiff"))
    with pytest.raises(RecordError) as info:
        load_audio((tmp_path / "s.aiff").read_bytes(), LIMITS, 16000)
    err = info.value
    assert err.code is Reason.AUDIO_UNSUPPORTED_FORMAT and "AIFF" in err.message


# ---------------------------------------------------------------- phone video


def test_portrait_phone_clip_is_decoded_upright(tmp_path):
    """A phone held upright records landscape pixels plus a display matrix;
    the frames must come out portrait, exactly as ffmpeg's own autorotate shows them."""
    ffmpeg = _tool("ffmpeg")
    land, portrait = tmp_path / "land.mp4", tmp_path / "portrait.mp4"
    _run(ffmpeg, "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=160x90:rate=10:duration=1",
         "-c:v", "libx264", "-pix_fmt", "yuv444p", "-qp", "0", str(land))
    _run(ffmpeg, "-loglevel", "error", "-y", "-i", str(land), "-c", "copy", "-metadata:s:v:0", "rotate=90",
         str(portrait))
    shown = tmp_path / "shown.rgb"  # ffmpeg applies the display matrix by default
    _run(ffmpeg, "-loglevel", "error", "-y", "-i", str(portrait), "-frames:v", "1", "-pix_fmt", "rgb24",
         "-f", "rawvideo", str(shown))
    want = np.frombuffer(shown.read_bytes(), np.uint8).reshape(160, 90, 3).astype(np.float32) / 255
    frames = load_keyframes(portrait.read_bytes(), LIMITS, 10)
    assert frames[0].shape == (160, 90, 3)
    np.testing.assert_allclose(frames[0], want, atol=2 / 255)
    plain = load_keyframes(land.read_bytes(), LIMITS, 10)
    assert plain[0].shape == (90, 160, 3)


# ---------------------------------------------------------------- logs


_LOG_PROBE = """
import io, sys
import pydicom
from pydicom.data import get_testdata_file
from pipeline.log import setup_logging
setup_logging()
from pipeline.config import Limits
from pipeline.decode.dicom import load_dicom
ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
ds.SpecificCharacterSet = "XSECRETCHARSET42"
ds.PatientName = "XSECRETNAME^Jane"
buf = io.BytesIO()
pydicom.dcmwrite(buf, ds, enforce_file_format=True)
print(load_dicom(buf.getvalue(), Limits()).shape)
"""


def test_dicom_element_values_never_reach_the_logs():
    """An unknown SpecificCharacterSet makes pydicom warn (with the value) on
    every text element: stderr must hold JSON lines only, none with the value."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", _LOG_PROBE], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "(64, 64, 1)" in res.stdout
    assert "XSECRET" not in res.stderr and "XSECRET" not in res.stdout
    lines = [json.loads(line) for line in res.stderr.splitlines() if line.strip()]  # every line is JSON
    kinds = {(rec.get("event"), rec.get("kind"), rec.get("origin")) for rec in lines}
    assert ("python_warning", "UserWarning", "pydicom") in kinds  # captured, as its kind


_IMAGE_NOISE_PROBE = """
import io, sys
import numpy as np
from PIL import Image
from pipeline.log import setup_logging
setup_logging()
from pipeline.config import Limits
from pipeline.decode import load_image
rng = np.random.default_rng(7)
src = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
seen = set()
for fmt, kw in (("TIFF", {"compression": "tiff_lzw"}), ("TIFF", {"compression": "tiff_adobe_deflate"}),
                ("GIF", {}), ("BMP", {}), ("PNG", {}), ("JPEG", {}), ("WEBP", {}), ("AVIF", {}), ("HEIF", {})):
    buf = io.BytesIO(); src.save(buf, fmt, **kw); data = buf.getvalue()
    for _ in range(60):
        m = bytearray(data)
        for _ in range(6):
            m[int(rng.integers(0, len(m)))] = int(rng.integers(0, 256))
        try:
            load_image(bytes(m), Limits()); seen.add("ok")
        except Exception as exc:
            seen.add(str(getattr(exc, "code", type(exc).__name__)))
print(sorted(seen))
"""


def test_damaged_images_keep_stderr_json():
    """libtiff prints straight to the C stderr and Pillow's plugins log header
    values: damaged files of every accepted format leave only JSON lines."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", _IMAGE_NOISE_PROBE], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    allowed = {"ok", "image_corrupt", "image_too_many_pixels", "image_unsupported_format"}
    assert set(ast.literal_eval(res.stdout)) <= allowed
    for line in res.stderr.splitlines():
        if line.strip():
            json.loads(line)
