"""Audio decoding: WAV, FLAC and Ogg (Vorbis/Opus) via libsndfile.

Limits come from the header before any sample is decoded, and samples are
read in blocks and mixed to mono as they arrive, so memory is bounded by
``max_audio_seconds`` of mono audio whatever the header claims.

Truncation policy (deliberate): a file whose header declares more audio than
the file holds is rejected as ``AUDIO_CORRUPT`` rather than silently scored on
a fragment.  libsndfile quietly shrinks a WAV's frame count to what is
present, so for RIFF WAV we read the declared ``data`` chunk size ourselves;
a declared duration over the limit is ``AUDIO_TOO_LONG`` even if the bytes
behind it are missing.  Streaming writers that leave the size as 0 or
0xFFFFFFFF ("unknown") are accepted with whatever is present.  (A FLAC whose
STREAMINFO leaves the total sample count at 0 cannot be read by libsndfile
through a file object -- its seek fails -- and so ends up ``AUDIO_CORRUPT``.)
"""

from __future__ import annotations

import struct
from fractions import Fraction
from io import BytesIO

import numpy as np

from pipeline.config import Limits
from pipeline.errors import Reason, RecordError
from pipeline.spec import AudioPrep

MAX_SAMPLE_RATE = 384_000  # above any real recording; bounds work per second of audio
_MAX_RATIO_DENOMINATOR = 1000  # bounds resample_poly's filter length on exotic rates
_BLOCK_SAMPLES = 1 << 18
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


def sniff_audio_format(data: bytes) -> str | None:
    """Container name for the formats we accept, else None."""
    if len(data) >= 12 and data[:4] in (b"RIFF", b"RIFX", b"RF64") and data[8:12] == b"WAVE":
        return "WAV"
    if data[:4] == b"fLaC":
        return "FLAC"
    if data[:4] == b"OggS":
        return "OGG"
    return None


def _wav_declared(data: bytes) -> tuple[int, int, int] | None:
    """(declared data bytes, bytes present, avg bytes/second) from a RIFF/RIFX
    WAV's own chunks, or None when they cannot be determined (RF64, missing
    chunks, unknown size).  libsndfile validates the rest."""
    if data[:4] not in (b"RIFF", b"RIFX"):
        return None
    endian = "<" if data[:4] == b"RIFF" else ">"
    pos, byte_rate = 12, 0
    for _ in range(4096):
        if pos + 8 > len(data):
            return None
        cid = data[pos : pos + 4]
        (size,) = struct.unpack(endian + "I", data[pos + 4 : pos + 8])
        body = pos + 8
        if cid == b"fmt " and size >= 16 and body + 16 <= len(data):
            (byte_rate,) = struct.unpack(endian + "I", data[body + 8 : body + 12])
        elif cid == b"data":
            if size in _UNKNOWN_SIZES or byte_rate <= 0:
                return None
            present = max(0, len(data) - body)
            return size, present, byte_rate
        pos = body + size + (size & 1)
    return None


def _resample(x: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling with the gcd-reduced ratio.  Exotic rates whose
    reduced ratio has a denominator above 1000 use the nearest ratio that does
    (relative rate error < 1e-6) so the filter design stays cheap; every
    common rate (8k, 11.025k, 22.05k, 44.1k, 48k, 96k, ...) is exact."""
    if sr == target_sr:
        return x
    from scipy.signal import resample_poly

    ratio = Fraction(target_sr, sr).limit_denominator(_MAX_RATIO_DENOMINATOR)
    return resample_poly(x, ratio.numerator, ratio.denominator).astype(np.float32, copy=False)


def load_audio(data: bytes, limits: Limits, target_sr: int) -> np.ndarray:
    """Decode WAV/FLAC/Ogg bytes to mono float32 at ``target_sr``."""
    if target_sr <= 0:
        raise ValueError("target_sr must be positive")
    if len(data) > limits.max_audio_bytes:
        raise RecordError(
            Reason.AUDIO_TOO_LARGE, f"audio is {len(data)} bytes, limit {limits.max_audio_bytes}"
        )
    fmt = sniff_audio_format(data)
    if fmt is None:
        raise RecordError(Reason.AUDIO_UNSUPPORTED_FORMAT, "not a WAV, FLAC or Ogg audio file")
    try:
        return _load(data, fmt, limits, target_sr)
    except RecordError:
        raise
    except Exception as exc:
        raise RecordError(
            Reason.AUDIO_CORRUPT, f"{fmt} audio is truncated or corrupt ({type(exc).__name__})"
        ) from None


def _too_long(seconds: float, limits: Limits) -> RecordError:
    return RecordError(
        Reason.AUDIO_TOO_LONG, f"audio is {seconds:.1f} s, limit {limits.max_audio_seconds:g} s"
    )


def _load(data: bytes, fmt: str, limits: Limits, target_sr: int) -> np.ndarray:
    import soundfile as sf

    if fmt == "WAV":
        declared = _wav_declared(data)
        if declared is not None:
            size, present, byte_rate = declared
            if size / byte_rate > limits.max_audio_seconds:
                raise _too_long(size / byte_rate, limits)
            if size - present > max(16, size // 100):
                raise RecordError(
                    Reason.AUDIO_CORRUPT,
                    f"WAV is truncated: header declares {size} data bytes, {present} present",
                )
    with sf.SoundFile(BytesIO(data)) as f:
        sr, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
        if sr <= 0 or channels <= 0:
            raise RecordError(Reason.AUDIO_CORRUPT, f"{fmt} header declares {sr} Hz, {channels} channel(s)")
        if sr > MAX_SAMPLE_RATE:
            raise RecordError(
                Reason.AUDIO_UNSUPPORTED_FORMAT,
                f"sample rate {sr} Hz is above the supported {MAX_SAMPLE_RATE} Hz",
            )
        max_frames = int(limits.max_audio_seconds * sr)
        known = 0 < frames < 2**62
        if known and frames > max_frames:
            raise _too_long(frames / sr, limits)
        want = frames if known else max_frames + 1
        block = max(1, _BLOCK_SAMPLES // channels)
        parts: list[np.ndarray] = []
        got = 0
        while got < want:
            chunk = f.read(min(block, want - got), dtype="float32", always_2d=True)
            if chunk.shape[0] == 0:
                break
            if not np.isfinite(chunk).all():
                raise RecordError(Reason.AUDIO_CORRUPT, f"{fmt} audio contains NaN or infinite samples")
            mono = chunk[:, 0] if channels == 1 else chunk.mean(axis=1, dtype=np.float64).astype(np.float32)
            parts.append(mono)
            got += chunk.shape[0]
    if got > max_frames:
        raise _too_long(got / sr, limits)
    if got == 0:
        raise RecordError(Reason.AUDIO_CORRUPT, f"{fmt} audio has no samples")
    if known and got < frames - max(1, frames // 100):
        raise RecordError(
            Reason.AUDIO_CORRUPT, f"{fmt} is truncated: header declares {frames} frames, {got} decodable"
        )
    wave = _resample(np.concatenate(parts), sr, target_sr)
    if not np.isfinite(wave).all():
        raise RecordError(Reason.AUDIO_CORRUPT, f"{fmt} audio overflows to non-finite values")
    return np.ascontiguousarray(wave, dtype=np.float32)


def decode_audio(data: bytes, prep: AudioPrep, limits: Limits) -> np.ndarray:
    """Record bytes -> log-mel ``[n_mels, prep.frames]`` for the model."""
    from pipeline.features import log_mel

    return log_mel(load_audio(data, limits, prep.sample_rate), prep)
