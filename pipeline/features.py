"""Audio features shared by training and inference.

Training computes features with exactly this code, so any change here changes
what the model sees: keep it numpy-only and deterministic (no threads, no
random state, float64 internally, float32 out).
"""

from __future__ import annotations

import functools

import numpy as np

from pipeline.spec import AudioPrep

LOG_EPS = 1e-6


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale (librosa's default, ``htk=False``): linear below 1 kHz, log above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = hz / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    logs = min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep
    return np.where(hz >= min_log_hz, logs, mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), freqs)


@functools.lru_cache(maxsize=32)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular mel filters ``[n_mels, n_fft//2+1]`` from 0 Hz to Nyquist.

    Same construction as ``librosa.filters.mel`` with its defaults (Slaney mel
    scale, Slaney area normalisation), so features match librosa-trained
    models.  Cached because it is rebuilt for every record otherwise; the
    returned array is read-only so a caller cannot corrupt the cache.
    """
    if sample_rate <= 0 or n_fft <= 0 or n_mels <= 0:
        raise ValueError("sample_rate, n_fft and n_mels must be positive")
    n_bins = n_fft // 2 + 1
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_bins)
    mel_pts = np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(sample_rate / 2.0)), n_mels + 2)
    mel_f = _mel_to_hz(mel_pts)
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, None]
    out = weights.astype(np.float32)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=8)
def _hann(n_fft: int) -> np.ndarray:
    """Periodic Hann window (``scipy.signal.get_window('hann', n, fftbins=True)``, as librosa uses)."""
    k = np.arange(n_fft, dtype=np.float64)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * k / n_fft)
    w.flags.writeable = False
    return w


def log_mel(wave: np.ndarray, prep: AudioPrep) -> np.ndarray:
    """Log-mel spectrogram ``float32 [n_mels, prep.frames]`` of a mono clip.

    The clip is forced to exactly ``prep.max_seconds`` (cropped from the start,
    zero-padded at the end) so every record yields the same shape the model
    was trained on.  STFT is centred with reflect padding like librosa.
    """
    x = np.asarray(wave, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"log_mel expects a mono 1-D wave, got shape {x.shape}")
    n = int(prep.sample_rate * prep.max_seconds)
    x = x[:n] if x.shape[0] >= n else np.concatenate([x, np.zeros(n - x.shape[0], dtype=np.float64)])
    n_fft, hop, frames = prep.n_fft, prep.hop_length, prep.frames
    pad = n_fft // 2
    # reflect needs at least 2 samples; a (degenerate) 1-sample clip is padded with zeros instead.
    x = np.pad(x, pad, mode="reflect" if n >= 2 else "constant")
    need = (frames - 1) * hop + n_fft
    if x.shape[0] < need:  # odd n_fft: centre padding is one sample short of prep.frames
        x = np.concatenate([x, np.zeros(need - x.shape[0], dtype=np.float64)])
    windows = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop][:frames]
    spec = np.fft.rfft(windows * _hann(n_fft), axis=1)
    power = spec.real**2 + spec.imag**2  # [frames, bins]
    mel = mel_filterbank(prep.sample_rate, n_fft, prep.n_mels).astype(np.float64) @ power.T
    return np.log(mel + LOG_EPS).astype(np.float32)
