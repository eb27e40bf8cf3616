"""Video decoding into keyframes and a contact sheet.

The fusion model has a single image input.  Video reaches it as a *contact
sheet*: ``n`` frames sampled evenly over the clip, tiled into one near-square
grid image, then preprocessed exactly like a photo.  This keeps one model for
photo and video workloads and gives the image encoder a coarse view of the
whole clip instead of one arbitrary frame.

Only a whitelist of container demuxers is allowed and FFmpeg may not open any
other resource, so a crafted playlist (HLS, concat) cannot make the worker
read local files or the network.
"""

from __future__ import annotations

import math
from io import BytesIO
from typing import Any

import numpy as np

from pipeline.config import Limits
from pipeline.decode.image import resize_plane, to_model_input
from pipeline.errors import Reason, RecordError
from pipeline.spec import ImagePrep

_FORMAT_WHITELIST = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,ogg,flv"
# A stream with more packets than max_video_seconds * MAX_FPS is treated as too long
# even when its timestamps claim otherwise (timestamps are attacker-controlled).
MAX_FPS = 1000


def _refuse_io(url: str, flags: int, options: dict) -> Any:
    raise PermissionError("media containers may not open other resources")


def open_container(data: bytes, format_whitelist: str) -> Any:
    """``av.open`` on in-memory bytes, limited to the named demuxers and
    unable to open any other resource (shared with the audio decoder)."""
    import av

    return av.open(
        BytesIO(data),
        mode="r",
        container_options={"format_whitelist": format_whitelist, "protocol_whitelist": "none"},
        io_open=_refuse_io,
    )


def _open(data: bytes) -> Any:
    try:
        return open_container(data, _FORMAT_WHITELIST)
    except Exception as exc:
        raise RecordError(
            Reason.VIDEO_CORRUPT, f"not a readable video container ({type(exc).__name__})"
        ) from None


def _too_long(seconds: float, limits: Limits) -> RecordError:
    return RecordError(
        Reason.VIDEO_TOO_LONG, f"video is {seconds:.1f} s, limit {limits.max_video_seconds:g} s"
    )


def _check_pixels(w: int, h: int, limits: Limits) -> None:
    if w * h > limits.max_image_pixels:
        raise RecordError(
            Reason.VIDEO_TOO_MANY_PIXELS,
            f"video frames are {w}x{h} = {w * h} pixels, limit {limits.max_image_pixels}",
        )


def _survey(data: bytes, limits: Limits) -> int:
    """Header checks plus a demux-only pass (no decoding) to count the video
    packets, so targets can be spread over the real stream length."""
    with _open(data) as container:
        if not container.streams.video:
            raise RecordError(Reason.VIDEO_NO_FRAMES, "container has no video stream")
        stream = container.streams.video[0]
        if container.duration is not None and container.duration / 1e6 > limits.max_video_seconds:
            raise _too_long(container.duration / 1e6, limits)
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
            if seconds > limits.max_video_seconds:
                raise _too_long(seconds, limits)
        cc = stream.codec_context
        _check_pixels(int(cc.width or 0), int(cc.height or 0), limits)
        max_packets = int(limits.max_video_seconds * MAX_FPS)
        count = 0
        lo = hi = None
        for packet in container.demux(stream):
            if packet.size == 0:  # end-of-stream flush packet
                continue
            count += 1
            if count > max_packets:
                raise RecordError(
                    Reason.VIDEO_TOO_LONG,
                    f"video has more than {max_packets} frames (limit {limits.max_video_seconds:g} s)",
                )
            if packet.pts is not None:
                lo = packet.pts if lo is None else min(lo, packet.pts)
                hi = packet.pts if hi is None else max(hi, packet.pts)
        if lo is not None and hi is not None and stream.time_base is not None:
            seconds = float((hi - lo) * stream.time_base)
            if seconds > limits.max_video_seconds:
                raise _too_long(seconds, limits)
    return count


def _targets(count: int, n_frames: int) -> list[int]:
    """Centres of ``n_frames`` equal segments (skips the often-black first and
    last frames); every frame when there are fewer than ``n_frames``."""
    if count <= n_frames:
        return list(range(count))
    return [int((i + 0.5) * count / n_frames) for i in range(n_frames)]


def _quarter_turns(frame: Any) -> int:
    """Counter-clockwise quarter turns the display matrix asks for (a phone
    held upright records landscape pixels plus rotation 90 or 270), rounded
    as FFmpeg's own autorotate does; a matrix that also mirrors is rare and
    is applied as its rotation only."""
    try:
        degrees = float(getattr(frame, "rotation", 0) or 0)
    except (TypeError, ValueError):
        return 0
    return round(degrees / 90.0) % 4 if math.isfinite(degrees) else 0


def _frame_to_array(frame: Any, max_side: int | None) -> np.ndarray:
    """One frame as float32 ``HxWx3`` in [0, 1], upright (as photos honour
    EXIF orientation), shrunk to ``max_side`` while converting colour."""
    w, h = int(frame.width), int(frame.height)
    if max_side is not None and max(w, h) > max_side:
        scale = max_side / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        rgb = frame.to_ndarray(format="rgb24", width=nw, height=nh, interpolation="AREA")
    else:
        rgb = frame.to_ndarray(format="rgb24")
    turns = _quarter_turns(frame)
    if turns:
        rgb = np.rot90(rgb, turns)
    return np.asarray(rgb, dtype=np.float32) / 255.0


def load_keyframes(
    data: bytes, limits: Limits, n_frames: int, *, max_side: int | None = None
) -> list[np.ndarray]:
    """``n_frames`` float32 ``HxWx3`` frames in [0, 1], evenly spaced over the
    first video stream (the last frame repeated when the clip is shorter).

    Frames are decoded sequentially only up to the last target and only the
    targets are kept.  ``max_side`` (optional) shrinks frames during colour
    conversion, which ``decode_video`` uses so a 4K clip never materialises
    ``n_frames`` full-size float frames.
    """
    if n_frames < 1:
        raise ValueError("n_frames must be at least 1")
    if len(data) > limits.max_video_bytes:
        raise RecordError(
            Reason.VIDEO_TOO_LARGE, f"video is {len(data)} bytes, limit {limits.max_video_bytes}"
        )
    try:
        return _load(data, limits, n_frames, max_side)
    except RecordError:
        raise
    except Exception as exc:
        raise RecordError(
            Reason.VIDEO_CORRUPT, f"video stream could not be decoded ({type(exc).__name__})"
        ) from None


def _load(data: bytes, limits: Limits, n_frames: int, max_side: int | None) -> list[np.ndarray]:
    count = _survey(data, limits)
    if count == 0:
        raise RecordError(Reason.VIDEO_NO_FRAMES, "video stream has no frames")
    targets = _targets(count, n_frames)
    wanted = set(targets)
    last = targets[-1]
    kept: dict[int, np.ndarray] = {}
    with _open(data) as container:
        stream = container.streams.video[0]
        for index, frame in enumerate(container.decode(stream)):
            _check_pixels(int(frame.width), int(frame.height), limits)
            if index in wanted:
                kept[index] = _frame_to_array(frame, max_side)
            if index >= last:
                break
    if not kept:
        raise RecordError(Reason.VIDEO_NO_FRAMES, "video stream has no decodable frames")
    out: list[np.ndarray] = []
    prev = kept[min(kept)]
    for t in targets:  # a stream that ends early repeats its last decoded target
        prev = kept.get(t, prev)
        out.append(prev)
    while len(out) < n_frames:
        out.append(out[-1])
    return out


def contact_sheet(frames: list[np.ndarray]) -> np.ndarray:
    """Tile frames row-major into a near-square grid (``ceil(sqrt(n))``
    columns: 1 -> 1x1, 4 -> 2x2, 6 -> 2 rows x 3 columns); every cell takes the
    first frame's size, unused cells are black.  Returns float32 ``HxWx3``."""
    if not frames:
        raise ValueError("contact_sheet needs at least one frame")
    n = len(frames)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    first = np.asarray(frames[0])
    ch, cw = int(first.shape[0]), int(first.shape[1])
    sheet = np.zeros((rows * ch, cols * cw, 3), dtype=np.float32)
    for i, frame in enumerate(frames):
        f = np.asarray(frame, dtype=np.float32)
        if f.ndim == 2:
            f = f[..., None]
        if f.ndim != 3 or f.shape[-1] not in (1, 3):
            raise ValueError(f"frames must be HxWx1 or HxWx3, got shape {f.shape}")
        if f.shape[-1] == 1:
            f = np.repeat(f, 3, axis=-1)
        if f.shape[:2] != (ch, cw):
            f = np.stack([resize_plane(f[..., k], ch, cw) for k in range(3)], axis=-1)
        r, c = divmod(i, cols)
        sheet[r * ch : (r + 1) * ch, c * cw : (c + 1) * cw] = f
    return sheet


def decode_video(data: bytes, prep: ImagePrep, limits: Limits) -> np.ndarray:
    """Record bytes -> model input ``[channels, size, size]`` via a contact
    sheet of ``prep.video_frames`` keyframes.  Frames are shrunk to at most
    ``prep.size`` on their long side while decoding (the sheet is shrunk
    further by to_model_input), which bounds memory for large videos."""
    frames = load_keyframes(data, limits, prep.video_frames, max_side=prep.size)
    return to_model_input(contact_sheet(frames), prep)
