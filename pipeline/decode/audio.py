"""Audio decoding: WAV, FLAC, Ogg (Vorbis/Opus) and MP3 via libsndfile;
M4A/MP4 (AAC, ALAC) and raw ADTS AAC via PyAV (FFmpeg), whitelisted demuxers only.

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


ACCEPTED = "WAV, FLAC, Ogg, MP3 or M4A/AAC"
# Demuxers PyAV may use for the formats libsndfile does not read.
_AV_WHITELIST = "mov,mp4,m4a,3gp,3g2,mj2,aac"
_M4A_BRANDS = {b"M4A ", b"M4B ", b"mp42", b"mp41", b"isom", b"iso2", b"dash", b"3gp4", b"3gp5"}


def _mp3_frame_sync(data: bytes) -> bool:
    """An MPEG-1/2/2.5 Layer III frame header at the start (MP3 without ID3)."""
    if len(data) < 4 or data[0] != 0xFF or (data[1] & 0xE0) != 0xE0:
        return False
    version, layer = (data[1] >> 3) & 0x3, (data[1] >> 1) & 0x3
    bitrate, rate = data[2] >> 4, (data[2] >> 2) & 0x3
    return version != 1 and layer == 1 and bitrate not in (0, 15) and rate != 3


def sniff_audio_format(data: bytes) -> str | None:
    """Container name for the formats we accept, else None."""
    if len(data) >= 12 and data[:4] in (b"RIFF", b"RIFX", b"RF64") and data[8:12] == b"WAVE":
        return "WAV"
    if data[:4] == b"fLaC":
        return "FLAC"
    if data[:4] == b"OggS":
        return "OGG"
    if data[:3] == b"ID3" or _mp3_frame_sync(data):
        return "MP3"
    if len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] in _M4A_BRANDS:
        return "M4A"
    if len(data) >= 7 and data[0] == 0xFF and (data[1] & 0xF6) == 0xF0:  # ADTS sync, layer 0
        return "AAC"
    return None


def _describe_unsupported(data: bytes) -> str:
    for magic, name in ((b"FORM", "AIFF/IFF"), (b"\x1a\x45\xdf\xa3", "Matroska/WebM"), (b".snd", "Sun AU"),
                        (b"#!AMR", "AMR"), (b"MThd", "MIDI"), (b"caff", "CAF")):
        if data.startswith(magic):
            return f"{name} audio is not accepted ({ACCEPTED} only)"
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return f"MP4 with an unexpected brand is not accepted as audio ({ACCEPTED} only)"
    return f"not a recognised audio format ({ACCEPTED} only)"


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
    """Decode WAV/FLAC/Ogg/MP3/M4A/AAC bytes to mono float32 at ``target_sr``."""
    if target_sr <= 0:
        raise ValueError("target_sr must be positive")
    if len(data) > limits.max_audio_bytes:
        raise RecordError(
            Reason.AUDIO_TOO_LARGE, f"audio is {len(data)} bytes, limit {limits.max_audio_bytes}"
        )
    fmt = sniff_audio_format(data)
    if fmt is None:
        raise RecordError(Reason.AUDIO_UNSUPPORTED_FORMAT, _describe_unsupported(data))
    try:
        if fmt in ("M4A", "AAC"):
            return _finish(_load_av(data, fmt, limits), fmt, target_sr)
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
        _check_rate(sr, channels, fmt)
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
    return _finish((np.concatenate(parts), sr), fmt, target_sr)


def _finish(decoded: tuple[np.ndarray, int], fmt: str, target_sr: int) -> np.ndarray:
    mono, sr = decoded
    wave = _resample(mono, sr, target_sr)
    if not np.isfinite(wave).all():
        raise RecordError(Reason.AUDIO_CORRUPT, f"{fmt} audio overflows to non-finite values")
    return np.ascontiguousarray(wave, dtype=np.float32)


def _check_rate(sr: int, channels: int, fmt: str) -> None:
    if sr <= 0 or channels <= 0:
        raise RecordError(Reason.AUDIO_CORRUPT, f"{fmt} header declares {sr} Hz, {channels} channel(s)")
    if sr > MAX_SAMPLE_RATE:
        raise RecordError(
            Reason.AUDIO_UNSUPPORTED_FORMAT, f"sample rate {sr} Hz is above the supported {MAX_SAMPLE_RATE} Hz"
        )


def _load_av(data: bytes, fmt: str, limits: Limits) -> tuple[np.ndarray, int]:
    """M4A/AAC through PyAV: the container's declared duration is checked
    before decoding, then decoding stops as soon as the decoded samples pass
    the limit, so memory stays bounded whatever the header claims."""
    from pipeline.decode.video import open_container

    with open_container(data, _AV_WHITELIST) as container:
        if not container.streams.audio:
            raise RecordError(Reason.AUDIO_CORRUPT, f"{fmt} file has no audio stream")
        stream = container.streams.audio[0]
        if container.duration is not None and container.duration / 1e6 > limits.max_audio_seconds:
            raise _too_long(container.duration / 1e6, limits)
        sr, channels = int(stream.codec_context.sample_rate or 0), int(stream.codec_context.channels or 0)
        _check_rate(sr, channels, fmt)
        max_frames = int(limits.max_audio_seconds * sr)
        parts: list[np.ndarray] = []
        got = 0
        for frame in container.decode(stream):
            if int(frame.sample_rate) != sr:
                raise RecordError(Reason.AUDIO_CORRUPT, f"{fmt} stream changes sample rate mid-stream")
            raw = frame.to_ndarray()
            x = raw.astype(np.float32, copy=False)
            if np.issubdtype(raw.dtype, np.integer):
                x = x / np.float32(np.iinfo(raw.dtype).max)
            if not frame.format.is_planar:  # packed: (1, samples * channels)
                x = x.reshape(-1, len(frame.layout.channels)).T
            if not np.isfinite(x).all():
                raise RecordError(Reason.AUDIO_CORRUPT, f"{fmt} audio contains NaN or infinite samples")
            parts.append(x.mean(axis=0, dtype=np.float64).astype(np.float32))
            got += x.shape[1]
            if got > max_frames:
                raise _too_long(got / sr, limits)
    if got == 0:
        raise RecordError(Reason.AUDIO_CORRUPT, f"{fmt} audio has no samples")
    return np.concatenate(parts), sr


def decode_audio(data: bytes, prep: AudioPrep, limits: Limits) -> np.ndarray:
    """Record bytes -> log-mel ``[n_mels, prep.frames]`` for the model."""
    from pipeline.features import log_mel

    return log_mel(load_audio(data, limits, prep.sample_rate), prep)
