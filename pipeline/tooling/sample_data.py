"""Deterministic synthetic multimodal datasets for the built-in workloads.

Why synthetic data: the pipeline needs end-to-end tests, demos and training
smoke runs without shipping real patient scans, product catalogues or media.
The data is built so that a small fusion model can actually *learn* it: every
label is drawn into the pixels (shapes, colours, textures), written into the
text (keyword families), voiced in the audio (one tone signature per label)
and, for retail, reflected in the tabular fields.  Each label is carried by at
least two modalities, so a record that lost one modality stays predictable.
Realistic noise (distractor words, random backgrounds, position/size/colour
jitter, background hiss, occasionally omitted keywords) keeps it from being
trivial.

Determinism: record ``i`` is drawn from its own random stream seeded by
``(workload, seed, i)``, so ``generate(w, n, seed)`` is byte-identical across
runs and processes, and ``generate(w, 10)`` is a prefix of
``generate(w, 1000)``.  All encoders are lossless or use fixed settings:
PNG / WAV / FLAC / DICOM are exact; JPEG and WebP use a fixed quality chosen
by the random stream; videos are MPEG-4 Part 2 (``mpeg4``) or H.264
(``libx264``) in MP4 with bitexact flags and a single encoder thread, which
PyAV's bundled FFmpeg encodes to identical bytes.  Byte identity holds for
the same library versions (libjpeg, libwebp, FFmpeg); a different libjpeg may
produce different but equivalent bytes.

Media fields in :attr:`Sample.record` are raw ``bytes``; :func:`write_jsonl`
base64-encodes them.  Nothing here downloads anything or uses pickle.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import Reason
from pipeline.records import json_safe

# --------------------------------------------------------------------------- #
# Label sets (must equal pipeline/workloads/*.yaml; a unit test checks this)
# --------------------------------------------------------------------------- #

WORKLOADS: tuple[str, ...] = ("medical", "retail", "media")

MEDICAL_FINDINGS: tuple[str, ...] = ("nodule", "effusion", "fracture", "cardiomegaly")
RETAIL_CATEGORIES: tuple[str, ...] = ("apparel", "electronics", "grocery", "furniture", "toys")
RETAIL_ATTRIBUTES: tuple[str, ...] = ("red", "blue", "green", "large", "on_sale")
MEDIA_CONTENT: tuple[str, ...] = ("sports", "music", "nature", "news", "animals")
MEDIA_MODERATION: tuple[str, ...] = ("safe", "sensitive", "unsafe")

#: head name -> (head type, labels) per workload.
HEADS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    "medical": {
        "findings": ("multilabel", MEDICAL_FINDINGS),
        "report_tags": ("token", ("O", "B-ANATOMY", "I-ANATOMY", "B-FINDING", "I-FINDING")),
    },
    "retail": {
        "category": ("multiclass", RETAIL_CATEGORIES),
        "attributes": ("multilabel", RETAIL_ATTRIBUTES),
    },
    "media": {
        "content": ("multilabel", MEDIA_CONTENT),
        "moderation": ("multiclass", MEDIA_MODERATION),
    },
}

# Text budgets in rough word/punctuation tokens, kept below each workload's
# ``preprocessing.text.max_length`` (48 medical, 32 otherwise) minus [CLS]/[SEP]
# and word-piece slack, so the keywords are never truncated away.
_TOKEN_BUDGET = {"medical": 40, "retail": 26, "media": 26}

# --------------------------------------------------------------------------- #
# Vocabularies (public so tests and notebooks can check texts against them)
# --------------------------------------------------------------------------- #

MEDICAL_FINDING_TERMS: dict[str, tuple[str, ...]] = {
    "nodule": ("nodule", "small nodule", "pulmonary nodule", "rounded opacity", "mass", "spiculated mass"),
    "effusion": ("effusion", "pleural effusion", "fluid", "small effusion", "fluid collection",
                 "layering fluid"),
    "fracture": ("fracture", "break", "displaced fracture", "nondisplaced fracture", "cortical break"),
    "cardiomegaly": ("cardiomegaly", "enlarged heart", "enlarged cardiac silhouette", "cardiac enlargement"),
}
MEDICAL_FINDING_ANATOMY: dict[str, tuple[str, ...]] = {
    "nodule": ("left upper lobe", "right upper lobe", "left lower lobe", "right lower lobe",
               "right middle lobe", "lingula", "left lung", "right lung"),
    "effusion": ("left lung base", "right lung base", "costophrenic angle", "pleural space", "lung bases",
                 "pleura"),
    "fracture": ("left fifth rib", "right sixth rib", "left clavicle", "right clavicle", "posterior rib",
                 "lateral rib", "rib"),
    "cardiomegaly": ("heart", "cardiac silhouette", "mediastinum"),
}
_MEDICAL_FINDING_TEMPLATES: dict[str, tuple[str, ...]] = {
    "nodule": ("There is a {F} in the {A}.", "A {F} is seen in the {A}.", "The {A} contains a {F}."),
    "effusion": ("There is {F} at the {A}.", "The {A} shows {F}.", "Blunting of the {A} with {F}."),
    "fracture": ("There is a {F} of the {A}.", "The {A} shows a {F}.", "A {F} is seen in the {A}."),
    "cardiomegaly": ("There is {F}.", "Findings consistent with {F}.",
                     "The {A} is prominent, compatible with {F}."),
}
# Statements about normal anatomy: they mention anatomy (tagged) but no finding.
_MEDICAL_NORMAL_TEMPLATES: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("The {A} are clear.", ("lungs",), None),
    ("The {A} is normal in size.", ("heart", "cardiac silhouette"), "cardiomegaly"),
    ("The {A} is unremarkable.", ("mediastinum",), "cardiomegaly"),
    ("No pneumothorax over the {A}.", ("lung apices",), None),
)
MEDICAL_ANATOMY_TERMS: frozenset[str] = frozenset(
    {a for v in MEDICAL_FINDING_ANATOMY.values() for a in v}
    | {a for _, terms, _ in _MEDICAL_NORMAL_TEMPLATES for a in terms}
)
MEDICAL_FINDING_VOCAB: frozenset[str] = frozenset(t for v in MEDICAL_FINDING_TERMS.values() for t in v)
_MEDICAL_INTROS = ("Chest radiograph, PA view.", "Portable AP film.", "Frontal and lateral views.",
                   "Indication: cough.", "Indication: fever.", "Indication: follow-up.", "Comparison: none.",
                   "Comparison: prior study.", "History: shortness of breath.", "Technique: single view.")
_MEDICAL_CLOSINGS = ("Clinical correlation recommended.", "Follow-up advised.", "Dictated by Dr. Lee.",
                     "Dr. Patel, radiology.", "Report finalized.")
_MEDICAL_NORMAL_OPENERS = ("No acute findings.", "No acute cardiopulmonary abnormality.",
                           "No acute disease.")

RETAIL_CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "apparel": ("shirt", "jacket", "dress", "hoodie", "t-shirt", "sweater"),
    "electronics": ("phone", "laptop", "headphones", "tablet", "smartwatch", "monitor"),
    "grocery": ("apple", "coffee", "cereal", "pasta", "juice", "tea"),
    "furniture": ("chair", "table", "sofa", "desk", "bookshelf", "stool"),
    "toys": ("puzzle", "doll", "robot", "blocks", "teddy bear", "kite"),
}
RETAIL_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "blue": ("blue", "navy", "cobalt"),
    "green": ("green", "olive", "emerald"),
    # colours that are not attribute labels (the ~25% "none" case)
    "grey": ("grey", "gray", "silver"),
    "charcoal": ("black", "charcoal"),
    "yellow": ("yellow", "mustard"),
    "tan": ("tan", "beige"),
}
RETAIL_LARGE_WORDS: tuple[str, ...] = ("large", "xl", "family size", "oversized", "king size", "jumbo")
RETAIL_SMALL_WORDS: tuple[str, ...] = ("compact", "mini", "small", "travel size")
RETAIL_SALE_WORDS: tuple[str, ...] = ("sale", "discount", "clearance", "deal", "special offer")
_RETAIL_BRANDS = ("Acme", "Nordhaven", "Zentro", "Lumio", "Brixwell", "Kovo", "Pinecrest", "Orbital",
                  "Maple & Co", "Redwood", "Bluebird", "Greenfield")
_RETAIL_FILLERS = ("free shipping", "new arrival", "best seller", "classic design", "high quality",
                   "ships in 2 days", "customer favourite", "easy returns", "limited stock")
_RETAIL_MATERIALS: dict[str, tuple[str, ...]] = {
    "apparel": ("cotton", "wool", "linen", "denim"),
    "electronics": ("wireless", "smart", "5g", "bluetooth"),
    "grocery": ("organic", "fresh", "whole grain", "premium"),
    "furniture": ("oak", "wooden", "upholstered", "steel"),
    "toys": ("wooden", "plush", "educational", "kids"),
}

MEDIA_CONTENT_WORDS: dict[str, tuple[str, ...]] = {
    "sports": ("football", "match", "goal", "stadium", "team", "league", "tournament", "referee"),
    "music": ("concert", "song", "band", "guitar", "album", "singer", "melody", "drummer"),
    "nature": ("forest", "mountain", "river", "landscape", "waterfall", "hiking", "valley", "sunrise"),
    "news": ("breaking news", "report", "anchor", "headline", "election", "press conference",
             "correspondent", "bulletin"),
    "animals": ("dog", "cat", "wildlife", "puppy", "elephant", "horse", "kitten", "zoo"),
}
MEDIA_MODERATION_WORDS: dict[str, tuple[str, ...]] = {
    "unsafe": ("violence", "blood", "weapon", "gunfire", "fight", "gore", "assault"),
    "sensitive": ("mature", "alcohol", "smoking", "beer", "cigarette", "gambling", "explicit language"),
    "safe": ("family friendly", "for all ages"),
}
_MEDIA_FILLERS = ("watch", "today", "full clip", "part 2", "new upload", "hd", "episode",
                  "behind the scenes", "live", "official", "compilation", "weekend", "vlog", "must see")

# Audio signatures (Hz).  Medical: one steady tone per finding, a mains hum when
# normal.  These sit in distinct bands of a 32-band log-mel at 16 kHz, and
# below 4 kHz so 8 kHz recordings keep them.
MEDICAL_TONES: dict[str, float] = {"nodule": 300.0, "effusion": 700.0, "fracture": 1200.0,
                                   "cardiomegaly": 2000.0}

# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Sample:
    """One generated record with its ground truth.

    ``record`` holds Record fields (media as raw bytes); ``labels`` maps head
    name to a sorted label list (multilabel) or one label (multiclass);
    ``spans`` are character spans ``(start, end, TYPE)`` of the token head's
    entities in ``record["text"]`` (empty when there is no text or no token
    head).
    """

    record: dict
    labels: dict[str, list[str] | str]
    spans: list[tuple[int, int, str]]


def generate(workload: str, n: int, seed: int = 0, *, missing_rate: float = 0.15) -> list[Sample]:
    """``n`` learnable samples of ``workload``; same arguments, same bytes.

    Before dropping, a record carries: medical text + image (8-bit PNG,
    16-bit PNG or DICOM) + dictation audio in ~60%; retail text + image +
    tabular; media text + image-or-video (~30% video) + audio in ~70%.
    ``missing_rate`` is the probability that each of those is dropped; at
    least one modality always remains, so every record is valid input.  The
    content is drawn before dropping, so changing ``missing_rate`` only
    changes which fields survive, never labels or bytes.
    """
    if workload not in _GENERATORS:
        raise ValueError(f"unknown workload {workload!r}: use one of {', '.join(WORKLOADS)}")
    if n < 0:
        raise ValueError("n must be >= 0")
    if not 0.0 <= missing_rate <= 1.0:
        raise ValueError("missing_rate must be within [0, 1]")
    make = _GENERATORS[workload]
    return [make(_rng(workload, seed, i), f"{workload}-{seed}-{i:05d}", missing_rate) for i in range(n)]


def broken_records(workload: str, seed: int = 0) -> list[tuple[dict | bytes, str]]:
    """Records broken on purpose, each with the :class:`Reason` value the
    pipeline must reject it with.  Dict records use base64 text for media so
    they can be sent as JSON unchanged; raw-bytes entries are wire payloads."""
    if workload not in _GENERATORS:
        raise ValueError(f"unknown workload {workload!r}: use one of {', '.join(WORKLOADS)}")
    rng = _rng(workload, seed, -1)
    limits = _workload_limits(workload)

    def rec(name: str, **fields: Any) -> dict:
        return {"id": f"{workload}-broken-{name}", "workload": workload, **fields}

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    good_png = _png_bytes(_noise_image(rng, 64, 64, 3 if workload != "medical" else 1))
    good_jpeg = _jpeg_bytes(Image.fromarray(_noise_image(rng, 64, 64, 3)), 90, 1)
    garbage = b"\x00\x17GARBAGE" + rng.integers(0, 256, 2048, dtype=np.uint8).tobytes()
    side = max(8000, math.isqrt(limits["max_image_pixels"]) + 64)
    out: list[tuple[dict | bytes, str]] = [
        (b'{"id": "' + workload.encode() + b'-broken-json", "text": "unterminated', Reason.BAD_JSON.value),
        (b"\xff\xfe\x00not utf-8 \x80\x81", Reason.BAD_JSON.value),
        (b"[1, 2, 3]", Reason.BAD_RECORD.value),
        ({"workload": workload, "text": "a record without an id"}, Reason.BAD_RECORD.value),
        (rec("unknown-field", text="valid text", colour="red"), Reason.BAD_RECORD.value),
        (rec("no-modality"), Reason.NO_MODALITY.value),
        (rec("empty-text", text=""), Reason.NO_MODALITY.value),
        (rec("text-too-long", text=("lorem ipsum " * 9000)[:100_000]), Reason.TEXT_TOO_LONG.value),
        (rec("truncated-png", image=b64(good_png[: len(good_png) // 2])), Reason.IMAGE_CORRUPT.value),
        (rec("random-image", image=b64(garbage)), Reason.IMAGE_UNSUPPORTED_FORMAT.value),
        (rec("bad-base64", image="@@ this is not base64 @@"), Reason.BAD_BASE64.value),
        (rec("bad-base64-padding", image="QUJD" * 10 + "Q"), Reason.BAD_BASE64.value),
        (rec("pixel-bomb", image=b64(_bomb_png(side, side))), Reason.IMAGE_TOO_MANY_PIXELS.value),
    ]
    if workload != "medical":
        out.append((rec("truncated-jpeg", image=b64(good_jpeg[: len(good_jpeg) // 2])),
                    Reason.IMAGE_CORRUPT.value))
    if workload in ("medical", "media"):
        wav = _wav_bytes(np.zeros(1600, dtype=np.float32), 16_000)
        out.append((rec("truncated-wav", audio=b64(wav[:30])), Reason.AUDIO_CORRUPT.value))
    if workload == "media":
        out.append((rec("random-video", video=b64(garbage)), Reason.VIDEO_CORRUPT.value))
    if workload == "medical":
        out.append((rec("dicom-no-pixels", image=b64(_dicom_bytes(None, rng, "broken"))),
                    Reason.DICOM_NO_PIXELS.value))
    return out


def write_jsonl(samples: list[Sample], records_path: Path, labels_path: Path | None = None) -> None:
    """Records as JSON lines (media base64, standard alphabet) and, optionally,
    the ground truth as ``{"id", "labels", "spans"}`` lines in the same order."""
    records_path = Path(records_path)
    with records_path.open("w", encoding="utf-8") as fh:
        for s in samples:
            fh.write(json.dumps(json_safe(s.record), separators=(",", ":")) + "\n")
    if labels_path is not None:
        with Path(labels_path).open("w", encoding="utf-8") as fh:
            for s in samples:
                row = {"id": s.record["id"], "labels": s.labels, "spans": [list(sp) for sp in s.spans]}
                fh.write(json.dumps(row, separators=(",", ":")) + "\n")


def read_labels(labels_path: Path) -> dict[str, dict]:
    """``id -> {"labels": ..., "spans": [(start, end, TYPE), ...]}`` from a labels file."""
    out: dict[str, dict] = {}
    with Path(labels_path).open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            out[row["id"]] = {"labels": row["labels"], "spans": [tuple(sp) for sp in row.get("spans", [])]}
    return out


def read_samples(records_path: Path, labels_path: Path | None = None) -> list[Sample]:
    """Samples back from :func:`write_jsonl` files (the inverse of it), so
    ``mmpipe train --data`` can train on data generated earlier or elsewhere.

    ``labels_path`` defaults to ``labels.jsonl`` next to the records.  Lines
    without a labels entry (e.g. broken records appended by ``mmpipe generate
    --broken``, or lines that are not JSON objects) are skipped: they cannot be
    trained on.  Base64 media become bytes again; URIs stay text.
    """
    records_path = Path(records_path)
    if labels_path is None:
        labels_path = records_path.with_name("labels.jsonl")
    if not Path(labels_path).is_file():
        raise FileNotFoundError(f"labels file not found: {labels_path} (needed to train on {records_path})")
    labels = read_labels(Path(labels_path))
    out: list[Sample] = []
    with records_path.open("rb") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if not isinstance(row, dict) or row.get("id") not in labels:
                continue
            for key in ("image", "audio", "video"):
                value = row.get(key)
                if isinstance(value, str) and "://" not in value[:32]:
                    # invalid base64 stays text: the pipeline reports it as bad_base64
                    with contextlib.suppress(ValueError):
                        row[key] = base64.b64decode(value, validate=True)
            truth = labels[row["id"]]
            out.append(Sample(record=row, labels=truth["labels"], spans=truth["spans"]))
    return out


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #


def _rng(workload: str, seed: int, i: int) -> np.random.Generator:
    """An independent stream per record, so records do not depend on ``n``."""
    return np.random.default_rng(np.random.SeedSequence([zlib.crc32(workload.encode()), seed & 0xFFFFFFFF,
                                                         seed >> 32 & 0xFFFFFFFF, i + 1]))


def _choice(rng: np.random.Generator, items: tuple | list) -> Any:
    return items[int(rng.integers(len(items)))]


def _workload_limits(workload: str) -> dict[str, int]:
    """Limits from the workload YAML (source of truth), falling back to the
    shipped values if the spec cannot be loaded."""
    try:
        from pipeline.spec import load_workload

        lim = load_workload(workload).limits
        return {"max_image_pixels": lim.max_image_pixels, "max_text_chars": lim.max_text_chars}
    except Exception:  # pragma: no cover - spec module is part of the package
        return {"max_image_pixels": 50_000_000, "max_text_chars": 10_000}


def _drop_modalities(rng: np.random.Generator, present: list[str], rate: float) -> list[str]:
    """Drop each modality with probability ``rate``; never drop them all."""
    kept = [m for m in present if rng.random() >= rate]
    if not kept:
        kept = [_choice(rng, present)]
    return kept


def _approx_tokens(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def _fill_template(template: str, values: dict[str, tuple[str, str]]) -> list[tuple[str, str | None]]:
    """Split ``"There is a {F} in the {A}."`` into (text, entity type) pieces."""
    pieces: list[tuple[str, str | None]] = []
    for part in re.split(r"(\{[A-Z]\})", template):
        if not part:
            continue
        if part.startswith("{") and part[1:-1] in values:
            pieces.append(values[part[1:-1]])
        else:
            pieces.append((part, None))
    return pieces


def _join_pieces(sentences: list[list[tuple[str, str | None]]]) -> tuple[str, list[tuple[int, int, str]]]:
    """Sentences of tagged pieces -> text plus exact character spans."""
    text = ""
    spans: list[tuple[int, int, str]] = []
    for k, sentence in enumerate(sentences):
        if k:
            text += " "
        for piece, tag in sentence:
            if tag is not None:
                spans.append((len(text), len(text) + len(piece), tag))
            text += piece
    return text, spans


# ---- image encoders --------------------------------------------------------


def _png_bytes(arr: np.ndarray) -> bytes:
    """PNG of a uint8 (H,W) / (H,W,3) or uint16 (H,W) array; zlib is deterministic."""
    if arr.dtype == np.uint16:
        img = Image.fromarray(arr.astype("<u2"), mode="I;16") if _PIL_NEEDS_MODE else Image.fromarray(arr)
    else:
        img = Image.fromarray(arr.squeeze() if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _pil_needs_mode() -> bool:
    """Older Pillow maps uint16 arrays to mode 'I'; newer ones to 'I;16'."""
    try:
        return Image.fromarray(np.zeros((2, 2), dtype=np.uint16)).mode != "I;16"
    except Exception:  # pragma: no cover
        return True


_PIL_NEEDS_MODE = _pil_needs_mode()

# exif Orientation -> the transpose that turns the upright image into the stored
# one (the inverse of what ImageOps.exif_transpose applies when reading).
_EXIF_STORE_OP: dict[int, Image.Transpose | None] = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _jpeg_bytes(img: Image.Image, quality: int, orientation: int = 1) -> bytes:
    """JPEG with a fixed quality.  With ``orientation`` != 1 the pixels are
    stored rotated/flipped and an EXIF Orientation tag says how to undo it,
    as phone cameras do, so ``exif_transpose`` shows the upright image."""
    op = _EXIF_STORE_OP[orientation]
    kwargs: dict[str, Any] = {"quality": quality, "optimize": False, "progressive": False}
    if op is not None:
        img = img.transpose(op)
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def _webp_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()


def _encode_rgb(rng: np.random.Generator, arr: np.ndarray, formats: tuple[tuple[str, float], ...]) -> bytes:
    """Encode an RGB uint8 image in a randomly chosen format (fixed settings)."""
    names = [f for f, _ in formats]
    probs = np.array([p for _, p in formats], dtype=float)
    fmt = names[int(rng.choice(len(names), p=probs / probs.sum()))]
    img = Image.fromarray(arr)
    if fmt == "png":
        return _png_bytes(arr)
    if fmt == "webp":
        return _webp_bytes(img, int(_choice(rng, (75, 85, 90))))
    orientation = 1
    if fmt == "jpeg_exif":
        orientation = int(_choice(rng, (2, 3, 4, 5, 6, 7, 8)))
    return _jpeg_bytes(img, int(_choice(rng, (80, 88, 95))), orientation)


def _noise_image(rng: np.random.Generator, h: int, w: int, channels: int) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


@lru_cache(maxsize=4)
def _bomb_png(width: int, height: int) -> bytes:
    """A valid all-black 8-bit grayscale PNG of huge dimensions that compresses
    to tens of kilobytes: a decompression bomb the pipeline must refuse from
    the header alone.  Built by hand (one zlib stream of zero rows) so making
    it does not allocate the full image."""
    comp = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + zero pixels
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


# ---- audio encoders --------------------------------------------------------


def _wav_bytes(x: np.ndarray, sr: int, fmt: str = "WAV") -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1.0, 1.0).astype(np.float32), sr, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def _fade(n: int, sr: int, ms: float = 20.0) -> np.ndarray:
    env = np.ones(n, dtype=np.float32)
    k = min(n // 2, max(1, int(sr * ms / 1000)))
    ramp = np.linspace(0.0, 1.0, k, dtype=np.float32)
    env[:k] = ramp
    env[n - k:] = ramp[::-1]
    return env


def _band_noise(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float) -> np.ndarray:
    """White noise band-limited to [lo, hi] Hz through an FFT mask, unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    spec[(freqs < lo) | (freqs > hi)] = 0
    y = np.fft.irfft(spec, n).astype(np.float32)
    return y / (float(np.sqrt(np.mean(y**2))) + 1e-9)


def _finish_audio(rng: np.random.Generator, x: np.ndarray, noise: tuple[float, float]) -> np.ndarray:
    """Add background hiss and normalise the peak to a random level."""
    x = x + rng.normal(0.0, rng.uniform(*noise), x.shape).astype(np.float32)
    peak = float(np.max(np.abs(x))) + 1e-9
    return (x / peak * rng.uniform(0.5, 0.9)).astype(np.float32)


# ---- numpy drawing ---------------------------------------------------------


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates (y, x) in [0, 1]."""
    yy = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h
    xx = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w
    return np.broadcast_to(yy, (h, w)), np.broadcast_to(xx, (h, w))


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
             soft: float = 0.15) -> np.ndarray:
    """Ellipse mask in [0, 1] with a soft rim of relative width ``soft``."""
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return np.clip((1.0 - d) / soft, 0.0, 1.0)


def _segment(yy: np.ndarray, xx: np.ndarray, p0: tuple[float, float], p1: tuple[float, float],
             width: float) -> np.ndarray:
    """Mask of a thick line segment (normalised coordinates, ``width`` across)."""
    (y0, x0), (y1, x1) = p0, p1
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / (dy * dy + dx * dx + 1e-12), 0.0, 1.0)
    dist = np.sqrt((yy - (y0 + t * dy)) ** 2 + (xx - (x0 + t * dx)) ** 2)
    return np.clip((width / 2 - dist) / (width / 2) * 2, 0.0, 1.0)


def _transform(points: list[tuple[float, float]], cx: float, cy: float, scale: float,
               angle: float) -> list[tuple[float, float]]:
    """Unit-box polygon -> pixel coordinates: rotate, scale, translate."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + scale * (x * c - y * s), cy + scale * (x * s + y * c)) for x, y in points]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _jitter_colour(rng: np.random.Generator, lo: tuple[int, int, int], hi: tuple[int, int, int]
                   ) -> tuple[int, int, int]:
    return tuple(int(rng.integers(a, b + 1)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def _vertical_gradient(h: int, w: int, top: tuple[int, ...], bottom: tuple[int, ...]) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    a = np.array(top, dtype=np.float32)[None, None, :]
    b = np.array(bottom, dtype=np.float32)[None, None, :]
    return np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).copy()


def _to_uint8(arr: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    if noise > 0:
        arr = arr + rng.normal(0.0, noise, arr.shape).astype(np.float32)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- #
# Medical
# --------------------------------------------------------------------------- #


def _medical_image(rng: np.random.Generator, findings: list[str], size: int) -> np.ndarray:
    """Grayscale "radiograph" in [0, 1]: a chest-like ellipse with darker lung
    fields, faint ribs and a heart shadow; each finding adds its own bright
    structure (nodule blob, basal effusion band, diagonal fracture line,
    large central heart)."""
    yy, xx = _grid(size, size)
    img = np.full((size, size), rng.uniform(0.04, 0.12), dtype=np.float32)
    img += (yy * rng.uniform(-0.04, 0.04)).astype(np.float32)
    bcx, bcy = 0.5 + rng.uniform(-0.03, 0.03), 0.52 + rng.uniform(-0.03, 0.03)
    body = _ellipse(yy, xx, bcy, bcx, rng.uniform(0.42, 0.47), rng.uniform(0.38, 0.45), soft=0.1)
    img += body * rng.uniform(0.28, 0.38)
    lungs = np.zeros_like(img)
    lung_geo = []
    for side in (-1, 1):
        lcx = bcx + side * rng.uniform(0.16, 0.2)
        lcy = bcy - rng.uniform(0.02, 0.06)
        lry, lrx = rng.uniform(0.27, 0.32), rng.uniform(0.12, 0.15)
        lung_geo.append((lcy, lcx, lry, lrx))
        lungs = np.maximum(lungs, _ellipse(yy, xx, lcy, lcx, lry, lrx, soft=0.25))
    img -= lungs * rng.uniform(0.08, 0.14)
    # faint ribs: curved periodic bands inside the lungs (texture, not a label)
    freq, phase = rng.uniform(6.0, 8.0), rng.uniform(0, 2 * np.pi)
    ribs = np.sin(2 * np.pi * freq * (yy + 0.25 * (xx - bcx) ** 2) + phase) > 0.75
    img += ribs * lungs * rng.uniform(0.03, 0.06)
    # heart shadow: normal size, or large and bright with cardiomegaly
    hcx, hcy = bcx + rng.uniform(0.0, 0.04), bcy + rng.uniform(0.05, 0.09)
    if "cardiomegaly" in findings:
        heart = _ellipse(yy, xx, hcy, hcx, rng.uniform(0.17, 0.21), rng.uniform(0.22, 0.27), soft=0.12)
        img = img * (1 - heart) + heart * rng.uniform(0.72, 0.82)
    else:
        heart = _ellipse(yy, xx, hcy, hcx, rng.uniform(0.09, 0.12), rng.uniform(0.10, 0.13), soft=0.3)
        img += heart * rng.uniform(0.12, 0.2)
    if "effusion" in findings:
        sides = [0, 1] if rng.random() < 0.35 else [int(rng.integers(2))]
        for k in sides:
            lcy, lcx, lry, lrx = lung_geo[k]
            top = lcy + lry * rng.uniform(0.35, 0.55)
            bottom = lcy + lry * rng.uniform(0.95, 1.1)
            meniscus = top - 0.04 * ((xx - lcx) / lrx) ** 2  # fluid climbs the lateral wall
            band = ((yy > meniscus) & (yy < bottom) & (np.abs(xx - lcx) < lrx * 1.15)).astype(np.float32)
            img = img * (1 - band) + band * rng.uniform(0.72, 0.85)
    if "nodule" in findings:
        for _ in range(1 + int(rng.random() < 0.3)):
            lcy, lcx, lry, lrx = lung_geo[int(rng.integers(2))]
            ny = lcy + rng.uniform(-0.6, 0.3) * lry
            nx = lcx + rng.uniform(-0.5, 0.5) * lrx
            r = rng.uniform(0.03, 0.05)
            blob = _ellipse(yy, xx, ny, nx, r, r, soft=0.35)
            img = np.maximum(img, blob * rng.uniform(0.85, 0.97))
    if "fracture" in findings:
        lcy, lcx, lry, lrx = lung_geo[int(rng.integers(2))]
        cy, cx = lcy + rng.uniform(-0.5, 0.3) * lry, lcx + rng.uniform(-0.4, 0.4) * lrx
        length = rng.uniform(0.22, 0.34)
        ang = math.radians(rng.uniform(25, 65)) * (1 if rng.random() < 0.5 else -1)
        dy, dx = math.sin(ang) * length / 2, math.cos(ang) * length / 2
        line = _segment(yy, xx, (cy - dy, cx - dx), (cy + dy, cx + dx), rng.uniform(0.018, 0.026))
        img = np.maximum(img, line * rng.uniform(0.9, 1.0))
    img += rng.normal(0.0, rng.uniform(0.015, 0.04), img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def _dicom_bytes(img: np.ndarray | None, rng: np.random.Generator, uid_key: str) -> bytes:
    """A CR DICOM Part 10 file (Explicit VR Little Endian, MONOCHROME2, 12 bits
    stored in 16) with a VOI window, as a modality would send it.  ``img`` None
    builds the same dataset without PixelData (a broken record).  UIDs derive
    from ``uid_key`` so the bytes are deterministic."""
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    prefix = "1.2.826.0.1.3680043.8.498."
    sop_uid = generate_uid(prefix, entropy_srcs=[uid_key, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = prefix + "1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(prefix, entropy_srcs=[uid_key, "study"])
    ds.SeriesInstanceUID = generate_uid(prefix, entropy_srcs=[uid_key, "series"])
    ds.Modality = "CR"
    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = "SYN" + str(zlib.crc32(uid_key.encode()))
    ds.BodyPartExamined = "CHEST"
    size = img.shape[0] if img is not None else 64
    ds.Rows = size
    ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    # Half the files carry a CT-like rescale: the window is in rescaled units,
    # so a decoder that ignores the rescale would see a shifted image.
    intercept = -1024.0 if rng.random() < 0.5 else 0.0
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = "1"
    ds.WindowCenter = f"{2047.5 + intercept + rng.uniform(-80, 80):.1f}"
    ds.WindowWidth = f"{rng.uniform(3700, 4096):.1f}"
    if img is not None:
        ds.PixelData = np.rint(img * 4095).astype("<u2").tobytes()
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _medical_text(rng: np.random.Generator, findings: list[str]) -> tuple[str, list[tuple[int, int, str]]]:
    """Report from templates; anatomy and finding phrases become spans."""
    stated = [f for f in findings if rng.random() >= 0.05]  # a report occasionally misses one
    sentences: list[list[tuple[str, str | None]]] = []
    for f in stated:
        tmpl = _choice(rng, _MEDICAL_FINDING_TEMPLATES[f])
        values = {"F": (_choice(rng, MEDICAL_FINDING_TERMS[f]), "FINDING"),
                  "A": (_choice(rng, MEDICAL_FINDING_ANATOMY[f]), "ANATOMY")}
        sentences.append(_fill_template(tmpl, values))
    normal: list[list[tuple[str, str | None]]] = []
    if not findings:
        normal.append([(_choice(rng, _MEDICAL_NORMAL_OPENERS), None)])
    options = [t for t in _MEDICAL_NORMAL_TEMPLATES if t[2] is None or t[2] not in findings]
    if rng.random() < (0.7 if not findings else 0.4):
        tmpl, terms, _ = _choice(rng, options)
        normal.append(_fill_template(tmpl, {"A": (_choice(rng, terms), "ANATOMY")}))
    intro = [[(_choice(rng, _MEDICAL_INTROS), None)]] if rng.random() < 0.8 else []
    closing = [[(_choice(rng, _MEDICAL_CLOSINGS), None)]] if rng.random() < 0.5 else []
    body = sentences + normal
    order = rng.permutation(len(body))
    body = [body[k] for k in order]
    while True:
        text, spans = _join_pieces(intro + body + closing)
        if _approx_tokens(text) <= _TOKEN_BUDGET["medical"]:
            return text, spans
        if closing:
            closing = []
        elif intro:
            intro = []
        else:  # cannot happen with the templates above; keep the first sentences
            body = body[:-1]


def _medical_audio(rng: np.random.Generator, findings: list[str]) -> bytes:
    """Dictation stand-in: one steady tone per finding (mains hum when normal)
    with a syllable-like amplitude wobble, background hiss and varied sample
    rates and containers so resampling and decoding get exercised."""
    sr = int(_choice(rng, (16_000, 16_000, 22_050, 8_000)))
    n = int(sr * rng.uniform(1.0, 2.0))
    t = np.arange(n, dtype=np.float32) / sr
    x = np.zeros(n, dtype=np.float32)
    if findings:
        for f in findings:
            freq = MEDICAL_TONES[f] * rng.uniform(0.97, 1.03)
            wobble = 0.7 + 0.3 * np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, 2 * np.pi))
            x += rng.uniform(0.5, 1.0) * wobble * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    else:
        mains = float(_choice(rng, (50.0, 60.0)))
        x += np.sin(2 * np.pi * mains * t) + 0.5 * np.sin(2 * np.pi * 2 * mains * t + 0.3)
    x *= _fade(n, sr)
    x += 0.05 * _band_noise(rng, n, sr, 80, min(3000, sr / 2 - 1)) * rng.uniform(0.5, 1.5)
    x = _finish_audio(rng, x, (0.01, 0.04))
    return _wav_bytes(x, sr, "WAV" if rng.random() < 0.5 else "FLAC")


def _make_medical(rng: np.random.Generator, rid: str, missing_rate: float) -> Sample:
    k = int(rng.choice(3, p=[0.2, 0.5, 0.3]))
    findings = sorted(str(f) for f in rng.choice(MEDICAL_FINDINGS, size=k, replace=False))
    present = ["text", "visual"] + (["audio"] if rng.random() < 0.6 else [])
    # Everything is drawn before modalities are dropped, so a record's content
    # does not depend on missing_rate: only which fields survive does.
    text, text_spans = _medical_text(rng, findings)
    size = int(_choice(rng, (96, 96, 112, 128)))
    img = _medical_image(rng, findings, size)
    fmt = float(rng.random())
    if fmt < 0.4:
        image = _png_bytes(np.rint(img * 255).astype(np.uint8))
    elif fmt < 0.7:
        image = _png_bytes(np.rint(img * 65535).astype(np.uint16))
    else:
        image = _dicom_bytes(img, rng, rid)
    audio = _medical_audio(rng, findings)
    kept = _drop_modalities(rng, present, missing_rate)
    record: dict[str, Any] = {"id": rid, "workload": "medical"}
    spans: list[tuple[int, int, str]] = []
    if "text" in kept:
        record["text"], spans = text, text_spans
    if "visual" in kept:
        record["image"] = image
    if "audio" in kept:
        record["audio"] = audio
    return Sample(record=record, labels={"findings": findings}, spans=spans)


# --------------------------------------------------------------------------- #
# Retail
# --------------------------------------------------------------------------- #

_ATTR_COLOURS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "red": ((185, 15, 15), (235, 60, 60)),
    "blue": ((20, 40, 165), (60, 95, 230)),
    "green": ((20, 135, 30), (70, 195, 80)),
    "grey": ((120, 120, 120), (170, 170, 170)),
    "charcoal": ((25, 25, 25), (55, 55, 55)),
    "yellow": ((215, 195, 35), (245, 225, 80)),
    "tan": ((165, 135, 95), (190, 160, 115)),
}
_TSHIRT = [(-0.18, -0.45), (-0.07, -0.45), (0.0, -0.37), (0.07, -0.45), (0.18, -0.45), (0.5, -0.22),
           (0.4, -0.04), (0.28, -0.12), (0.28, 0.5), (-0.28, 0.5), (-0.28, -0.12), (-0.4, -0.04),
           (-0.5, -0.22)]
_DRESS = [(-0.12, -0.5), (0.12, -0.5), (0.16, -0.18), (0.42, 0.5), (-0.42, 0.5), (-0.16, -0.18)]


def _star(points: int = 5, inner: float = 0.2) -> list[tuple[float, float]]:
    out = []
    for k in range(points * 2):
        r = 0.5 if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _retail_shapes(category: str, rng: np.random.Generator
                   ) -> list[tuple[list[tuple[float, float]], str]]:
    """Polygons in a unit box for the category, each with a role: ``body``
    (attribute colour), ``screen`` (dark), ``stem`` (brown)."""
    if category == "apparel":
        return [(_TSHIRT if rng.random() < 0.65 else _DRESS, "body")]
    if category == "electronics":
        if rng.random() < 0.5:  # phone / tablet: portrait
            w, h = rng.uniform(0.28, 0.36), 0.5
        else:  # laptop / monitor: landscape
            w, h = 0.5, rng.uniform(0.3, 0.36)
        m = 0.06
        return [(_rect(-w, -h, w, h), "body"), (_rect(-w + m, -h + m, w - m, h - m * 1.6), "screen")]
    if category == "grocery":
        ry = rng.uniform(0.4, 0.46)
        circle = [(0.47 * math.cos(a), ry * math.sin(a) + 0.04) for a in np.linspace(0, 2 * math.pi, 40)]
        return [(circle, "body"), (_rect(-0.03, -0.5, 0.03, -0.34), "stem")]
    if category == "furniture":
        shapes = [(_rect(-0.5, -0.12, 0.5, 0.06), "body"), (_rect(-0.46, 0.06, -0.37, 0.5), "body"),
                  (_rect(0.37, 0.06, 0.46, 0.5), "body")]
        if rng.random() < 0.4:  # chair: backrest
            shapes.append((_rect(0.34, -0.5, 0.46, -0.12), "body"))
        if rng.random() < 0.5:
            shapes.append((_rect(-0.05, 0.06, 0.05, 0.5), "body"))
        return shapes
    if rng.random() < 0.7:
        return [(_star(5, rng.uniform(0.18, 0.25)), "body")]
    return [([(0.0, -0.5), (0.5, 0.45), (-0.5, 0.45)], "body")]


def _retail_image(rng: np.random.Generator, category: str, colour: str, large: bool) -> np.ndarray:
    """Product photo: light studio background, one object whose shape tells
    the category, fill colour the colour attribute and size the ``large``
    attribute; plus position/rotation/colour jitter and some clutter."""
    w, h = ((96, 96), (96, 96), (96, 96), (128, 96), (96, 128))[int(rng.integers(5))]
    base = np.array([rng.integers(222, 250) for _ in range(3)], dtype=np.float32)
    bg = _vertical_gradient(h, w, tuple(base), tuple(base - rng.uniform(5, 25)))
    img = Image.fromarray(_to_uint8(bg, rng, 0))
    draw = ImageDraw.Draw(img)
    side = min(w, h)  # the object lives in the central square (safe under centre crops)
    for _ in range(int(rng.integers(0, 3))):  # clutter: faint shadows/props near the edges
        g = int(rng.integers(185, 215))
        cx, cy = rng.uniform(0, w), rng.choice([rng.uniform(0, h * 0.15), rng.uniform(h * 0.85, h)])
        r = rng.uniform(3, 8)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(g, g, g))
    frac = rng.uniform(0.74, 0.92) if large else rng.uniform(0.36, 0.5)
    scale = frac * side
    slack = (side - scale) / 2 * 0.8
    cx = w / 2 + rng.uniform(-slack, slack)
    cy = h / 2 + rng.uniform(-slack, slack)
    angle = math.radians(rng.uniform(-10, 10))
    fill = _jitter_colour(rng, *_ATTR_COLOURS[colour])
    outline = tuple(int(c * 0.6) for c in fill)
    for poly, role in _retail_shapes(category, rng):
        pts = _transform(poly, cx, cy, scale, angle)
        if role == "body":
            draw.polygon(pts, fill=fill, outline=outline, width=max(1, int(scale / 40)))
        elif role == "screen":
            s = int(rng.integers(30, 55))
            draw.polygon(pts, fill=(s, s, s + 6))
            # reflection highlight so a charcoal device still shows its screen
            x0, y0 = pts[0]
            x2, y2 = pts[2]
            gw, gh = x2 - x0, y2 - y0
            glare = [(x0 + gw * 0.15, y2 - gh * 0.2), (x0 + gw * 0.4, y0 + gh * 0.2)]
            draw.line(glare, fill=(200, 200, 205), width=max(1, int(scale / 50)))
        else:
            draw.polygon(pts, fill=(110, 70, 30))
    return _to_uint8(np.asarray(img, dtype=np.float32), rng, rng.uniform(2, 6))


def _retail_text(rng: np.random.Generator, category: str, colour: str, large: bool, on_sale: bool,
                 discount: float) -> str:
    """Title + description.  Category noun, colour word, size and sale words
    carry the labels; brands (some with colour-like names) and stock phrases
    are distractors."""
    noun = _choice(rng, RETAIL_CATEGORY_WORDS[category]) if rng.random() >= 0.04 else "item"
    title = [_choice(rng, _RETAIL_BRANDS)]
    if rng.random() < (0.9 if colour in ("red", "blue", "green") else 0.6):
        title.append(_choice(rng, RETAIL_COLOUR_WORDS[colour]))
    if large and rng.random() >= 0.08:
        title.append(_choice(rng, RETAIL_LARGE_WORDS))
    elif not large and rng.random() < 0.3:
        title.append(_choice(rng, RETAIL_SMALL_WORDS))
    if rng.random() < 0.6:
        title.append(_choice(rng, _RETAIL_MATERIALS[category]))
    title.append(noun)
    desc: list[str] = []
    if on_sale and rng.random() >= 0.08:
        word = _choice(rng, RETAIL_SALE_WORDS)
        desc.append(_choice(rng, (f"now {discount:.0f}% off", word, f"{word}: {discount:.0f}% off",
                                  f"on {word} today")))
    fillers = list(rng.choice(_RETAIL_FILLERS, size=int(rng.integers(1, 3)), replace=False))
    desc.extend(str(f) for f in fillers)
    order = rng.permutation(len(desc))
    desc = [desc[k] for k in order]
    sep = _choice(rng, (" - ", ". ", " | "))
    text = " ".join(title) + sep + ", ".join(desc) + "."
    while _approx_tokens(text) > _TOKEN_BUDGET["retail"] and len(desc) > 1:
        desc = [d for d in desc if d not in fillers][:1] or desc[:1]
        text = " ".join(title) + sep + ", ".join(desc) + "."
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


_RETAIL_PRICE = {"apparel": (12, 90), "electronics": (80, 650), "grocery": (2, 25), "furniture": (60, 480),
                 "toys": (8, 70)}
_RETAIL_WEIGHT = {"apparel": (0.2, 0.8), "electronics": (0.2, 3.0), "grocery": (0.3, 2.0),
                  "furniture": (5.0, 20.0), "toys": (0.2, 1.5)}


def _make_retail(rng: np.random.Generator, rid: str, missing_rate: float) -> Sample:
    category = str(_choice(rng, RETAIL_CATEGORIES))
    u = float(rng.random())
    colour = ("red", "blue", "green")[int(u * 4)] if u < 0.75 else str(
        _choice(rng, ("grey", "charcoal", "yellow", "tan")))
    large = bool(rng.random() < 0.4)
    on_sale = bool(rng.random() < 0.3)
    discount = float(rng.integers(15, 61)) if on_sale else (0.0 if rng.random() < 0.6 else float(
        rng.integers(1, 6)))
    price = rng.uniform(*_RETAIL_PRICE[category]) * (rng.uniform(1.3, 1.8) if large else 1.0)
    weight = rng.uniform(*_RETAIL_WEIGHT[category]) * (rng.uniform(2.5, 4.0) if large else 1.0)
    tabular = {"price": round(float(price), 2), "weight_kg": round(float(weight), 2),
               "discount_pct": discount}
    for key in list(tabular):  # a catalogue feed sometimes lacks a field
        if rng.random() < 0.04 and len(tabular) > 1:
            del tabular[key]
    text = _retail_text(rng, category, colour, large, on_sale, discount)
    arr = _retail_image(rng, category, colour, large)
    image = _encode_rgb(rng, arr, (("jpeg", 0.4), ("jpeg_exif", 0.15), ("png", 0.25), ("webp", 0.2)))
    kept = _drop_modalities(rng, ["text", "visual", "tabular"], missing_rate)
    record: dict[str, Any] = {"id": rid, "workload": "retail"}
    if "text" in kept:
        record["text"] = text
    if "visual" in kept:
        record["image"] = image
    if "tabular" in kept:
        record["tabular"] = tabular
    attributes = sorted(([colour] if colour in ("red", "blue", "green") else [])
                        + (["large"] if large else []) + (["on_sale"] if on_sale else []))
    return Sample(record=record, labels={"category": category, "attributes": attributes}, spans=[])


# --------------------------------------------------------------------------- #
# Media
# --------------------------------------------------------------------------- #


def _scene_sports(rng: np.random.Generator, s: int) -> np.ndarray:
    """Green pitch with mowing stripes and white lines."""
    g = np.array(_jitter_colour(rng, (35, 115, 35), (70, 165, 70)), dtype=np.float32)
    _, xx = _grid(s, s)
    stripes = (np.floor(xx * rng.uniform(4, 7) + rng.uniform(0, 1)) % 2)[..., None]
    arr = np.broadcast_to(g, (s, s, 3)) * (1 + 0.1 * stripes)
    img = Image.fromarray(_to_uint8(arr, rng, 0))
    d = ImageDraw.Draw(img)
    lw = max(1, s // 40)
    white = _jitter_colour(rng, (225, 225, 225), (255, 255, 255))
    m = s * rng.uniform(0.06, 0.12)
    d.rectangle([m, m, s - m, s - m], outline=white, width=lw)
    cx = s / 2 + rng.uniform(-0.08, 0.08) * s
    d.line([(cx, m), (cx, s - m)], fill=white, width=lw)
    r = s * rng.uniform(0.12, 0.18)
    d.ellipse([cx - r, s / 2 - r, cx + r, s / 2 + r], outline=white, width=lw)
    return np.asarray(img, dtype=np.float32)


def _scene_nature(rng: np.random.Generator, s: int) -> np.ndarray:
    """Sky gradient over a green-to-brown landscape, mountains, maybe a sun."""
    horizon = rng.uniform(0.35, 0.5)
    hpx = int(horizon * s)
    sky = _vertical_gradient(hpx, s, _jitter_colour(rng, (80, 140, 215), (130, 185, 250)),
                             _jitter_colour(rng, (165, 205, 235), (205, 230, 255)))
    ground = _vertical_gradient(s - hpx, s, _jitter_colour(rng, (55, 125, 45), (95, 165, 80)),
                                _jitter_colour(rng, (105, 85, 45), (145, 115, 70)))
    img = Image.fromarray(_to_uint8(np.concatenate([sky, ground], axis=0), rng, 0))
    d = ImageDraw.Draw(img)
    if rng.random() < 0.4:
        sx, sy, r = rng.uniform(0.1, 0.9) * s, rng.uniform(0.08, 0.2) * s, s * 0.06
        d.ellipse([sx - r, sy - r, sx + r, sy + r], fill=(250, 225, 90))
    for _ in range(int(rng.integers(1, 4))):
        px, pw, ph = rng.uniform(0, 1) * s, rng.uniform(0.2, 0.4) * s, rng.uniform(0.12, 0.3) * s
        col = _jitter_colour(rng, (80, 95, 110), (120, 130, 155))
        d.polygon([(px - pw, hpx), (px, hpx - ph), (px + pw, hpx)], fill=col)
    for _ in range(int(rng.integers(0, 4))):  # trees
        tx, ty, th = rng.uniform(0, 1) * s, rng.uniform(horizon + 0.05, 0.9) * s, rng.uniform(0.08, 0.15) * s
        d.polygon([(tx - th / 3, ty), (tx, ty - th), (tx + th / 3, ty)], fill=(25, 80, 35))
    return np.asarray(img, dtype=np.float32)


def _scene_news(rng: np.random.Generator, s: int) -> np.ndarray:
    """Dark blue studio with a presenter silhouette and a lower-third bar."""
    yy, xx = _grid(s, s)
    base = np.array(_jitter_colour(rng, (12, 30, 100), (40, 70, 165)), dtype=np.float32)
    glow = _ellipse(yy, xx, 0.35, 0.5 + rng.uniform(-0.15, 0.15), 0.5, 0.5, soft=1.0)[..., None]
    img = Image.fromarray(_to_uint8(base * (0.8 + 0.5 * glow), rng, 0))
    d = ImageDraw.Draw(img)
    px = s * rng.uniform(0.3, 0.7)
    skin = _jitter_colour(rng, (150, 110, 85), (225, 180, 150))
    suit = _jitter_colour(rng, (20, 20, 25), (70, 70, 80))
    d.polygon([(px - s * 0.2, s * 0.75), (px - s * 0.12, s * 0.45), (px + s * 0.12, s * 0.45),
               (px + s * 0.2, s * 0.75)], fill=suit)
    r = s * 0.09
    d.ellipse([px - r, s * 0.42 - 2 * r, px + r, s * 0.42], fill=skin)
    top = s * rng.uniform(0.7, 0.76)
    bar = _jitter_colour(rng, (215, 215, 215), (250, 250, 250))
    d.rectangle([s * rng.uniform(0.0, 0.06), top, s, top + s * rng.uniform(0.11, 0.15)], fill=bar)
    d.rectangle([0, top, s * 0.12, top + s * 0.13], fill=_jitter_colour(rng, (215, 180, 20), (245, 215, 60)))
    for k in range(2):
        y = top + s * (0.03 + 0.05 * k)
        d.rectangle([s * 0.16, y, s * rng.uniform(0.5, 0.9), y + max(1, s * 0.02)], fill=(40, 40, 50))
    return np.asarray(img, dtype=np.float32)


def _scene_music(rng: np.random.Generator, s: int) -> np.ndarray:
    """Purple stage with equaliser-like vertical bars."""
    top = _jitter_colour(rng, (60, 10, 95), (110, 40, 145))
    bottom = _jitter_colour(rng, (100, 25, 125), (150, 60, 180))
    img = Image.fromarray(_to_uint8(_vertical_gradient(s, s, top, bottom), rng, 0))
    d = ImageDraw.Draw(img)
    colour = [(235, 70, 225), (70, 225, 235), (240, 240, 240)][int(rng.integers(3))]
    nbars = int(rng.integers(6, 11))
    bw = s / nbars
    for k in range(nbars):
        height = rng.uniform(0.2, 0.8) * s
        d.rectangle([k * bw + bw * 0.2, s - height, (k + 1) * bw - bw * 0.2, s], fill=colour)
    return np.asarray(img, dtype=np.float32)


def _scene_plain(rng: np.random.Generator, s: int) -> np.ndarray:
    """Neutral backdrop for animal-only clips (no other content cue)."""
    kind = int(rng.integers(3))
    lo, hi = [((115, 115, 115), (175, 175, 175)), ((195, 185, 155), (225, 210, 180)),
              ((215, 215, 215), (240, 240, 240))][kind]
    c = _jitter_colour(rng, lo, hi)
    return _vertical_gradient(s, s, c, tuple(v - 20 for v in c))


_SCENES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "sports": _scene_sports, "nature": _scene_nature, "news": _scene_news, "music": _scene_music,
}


def _draw_animal(img: Image.Image, rng_vals: dict[str, Any], dx: float = 0.0) -> None:
    """A brown quadruped: body ellipse, head, four legs, tail, eye."""
    d = ImageDraw.Draw(img)
    s = img.size[0]
    cx, cy = rng_vals["cx"] * s + dx, rng_vals["cy"] * s
    bw, bh = rng_vals["bw"] * s, rng_vals["bh"] * s
    col, face = rng_vals["colour"], rng_vals["face"]
    lw = max(2, int(bw * 0.14))
    for k in (-0.75, -0.4, 0.4, 0.75):
        lx = cx + k * bw
        d.rectangle([lx - lw / 2, cy, lx + lw / 2, cy + bh * 1.5], fill=col)
    d.ellipse([cx - bw, cy - bh, cx + bw, cy + bh], fill=col)
    hx = cx + face * bw * 1.05
    hr = bh * 0.85
    d.ellipse([hx - hr, cy - bh * 1.4 - hr, hx + hr, cy - bh * 1.4 + hr], fill=col)
    tail = [(cx - face * bw, cy - bh * 0.3), (cx - face * bw * 1.5, cy - bh * 1.2)]
    d.line(tail, fill=col, width=lw // 2 + 1)
    er = max(1.0, hr * 0.22)
    ex, ey = hx + face * hr * 0.35, cy - bh * 1.5
    d.ellipse([ex - er, ey - er, ex + er, ey + er], fill=(15, 15, 15))


def _moderation_overlay(arr: np.ndarray, moderation: str, params: dict[str, Any], shift: float = 0.0
                        ) -> np.ndarray:
    """Unsafe: large opaque red splashes.  Sensitive: orange diagonal stripes."""
    s = arr.shape[0]
    if moderation == "unsafe":
        yy, xx = _grid(s, s)
        mask = np.zeros((s, s), dtype=np.float32)
        for cy, cx, r in params["blobs"]:
            mask = np.maximum(mask, _ellipse(yy, xx, cy, cx + shift, r, r, soft=0.2))
        return arr * (1 - mask[..., None]) + np.array(params["colour"], dtype=np.float32) * mask[..., None]
    if moderation == "sensitive":
        yy, xx = _grid(s, s)
        phase = (xx + params["dir"] * yy) / params["period"] + params["phase"] + shift * 3
        mask = ((phase % 1.0) < 0.45).astype(np.float32)[..., None] * params["alpha"]
        return arr * (1 - mask) + np.array(params["colour"], dtype=np.float32) * mask
    return arr


def _media_frame_plan(rng: np.random.Generator, content: list[str], moderation: str) -> dict[str, Any]:
    """All random choices for a clip's visuals, drawn once so video frames
    stay consistent while the camera pans and the animal walks."""
    scenes = [c for c in content if c != "animals"]
    order = [scenes[k] for k in rng.permutation(len(scenes))]
    plan: dict[str, Any] = {"primary": order[0] if order else None,
                            "inset": order[1] if len(order) > 1 else None,
                            "inset_frac": rng.uniform(0.42, 0.55), "corner": int(rng.integers(4)),
                            "animal": "animals" in content, "moderation": moderation}
    # the animal stands away from the inset so both stay visible
    if plan["inset"]:
        cx = rng.uniform(0.58, 0.7) if plan["corner"] in (0, 2) else rng.uniform(0.3, 0.42)
    else:
        cx = rng.uniform(0.3, 0.7)
    plan["animal_geo"] = {
        "cx": cx, "cy": rng.uniform(0.5, 0.62), "bw": rng.uniform(0.16, 0.24), "bh": rng.uniform(0.09, 0.13),
        "colour": _jitter_colour(rng, (95, 55, 20), (150, 95, 50)), "face": 1 if rng.random() < 0.5 else -1,
    }
    blobs = []
    for _ in range(int(rng.integers(2, 4))):  # each splash: a few overlapping discs
        cy, cx = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
        for _ in range(int(rng.integers(2, 5))):
            dy, dx, r = rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08), rng.uniform(0.07, 0.15)
            blobs.append((cy + dy, cx + dx, r))
    plan["overlay"] = {
        "blobs": blobs,
        "colour": _jitter_colour(rng, (170, 0, 0), (230, 25, 25)),
        "dir": 1 if rng.random() < 0.5 else -1, "period": rng.uniform(0.16, 0.24),
        "phase": rng.uniform(0, 1), "alpha": rng.uniform(0.6, 0.75),
        "colour_s": _jitter_colour(rng, (240, 120, 0), (255, 150, 20)),
    }
    return plan


def _media_compose(rng: np.random.Generator, plan: dict[str, Any], s: int, *, t: float = 0.0,
                   base: np.ndarray | None = None, overlay: bool = True) -> np.ndarray:
    """One frame: primary scene, secondary scene as picture-in-picture, the
    animal on top, then the moderation overlay.  ``t`` in [0, 1] moves the
    animal and stripes between video frames."""
    if base is None:
        base = _media_base(rng, plan, s)
    img = Image.fromarray(_to_uint8(base, rng, 0))
    if plan["animal"]:
        _draw_animal(img, plan["animal_geo"], dx=(t - 0.5) * 0.15 * s * plan["animal_geo"]["face"])
    arr = np.asarray(img, dtype=np.float32)
    if overlay and plan["moderation"] != "safe":
        params = dict(plan["overlay"])
        if plan["moderation"] == "sensitive":
            params["colour"] = params["colour_s"]
        arr = _moderation_overlay(arr, plan["moderation"], params, shift=t * 0.05)
    return arr


def _media_base(rng: np.random.Generator, plan: dict[str, Any], s: int) -> np.ndarray:
    """Static background of a clip (scene + inset) before animal and overlay."""
    primary = plan["primary"]
    arr = _SCENES[primary](rng, s) if primary else _scene_plain(rng, s)
    if plan["inset"]:
        k = round(s * plan["inset_frac"])
        inset = _SCENES[plan["inset"]](rng, k)
        inset[:1], inset[-1:], inset[:, :1], inset[:, -1:] = 255, 255, 255, 255
        y0 = 0 if plan["corner"] in (0, 1) else s - k
        x0 = 0 if plan["corner"] in (0, 2) else s - k
        arr = arr.copy()
        arr[y0:y0 + k, x0:x0 + k] = inset
    return arr


def _video_bytes(frames: list[np.ndarray], codec: str) -> bytes:
    """MP4 from RGB frames at 8 fps; bitexact flags and one thread make the
    bytes reproducible."""
    import av

    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        opts = {"flags": "+bitexact"}
        if codec == "libx264":
            opts.update({"preset": "ultrafast", "threads": "1", "crf": "20"})
        else:
            stream.codec_context.bit_rate = 600_000
        stream.codec_context.options = opts
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _media_video(rng: np.random.Generator, plan: dict[str, Any]) -> bytes:
    """8-16 frames, 64 or 96 px, a slow pan; the moderation overlay is on in
    all frames but at most one, so keyframe sampling nearly always sees it."""
    s = int(_choice(rng, (64, 96)))
    nframes = int(rng.integers(8, 17))
    pad = 8
    big = _media_base(rng, plan, s + pad)
    off_frame = int(rng.integers(nframes)) if rng.random() < 0.3 else -1
    frames = []
    for k in range(nframes):
        t = k / max(1, nframes - 1)
        o = round(t * pad)
        base = big[o:o + s, pad // 2:pad // 2 + s]
        arr = _media_compose(rng, plan, s, t=t, base=base, overlay=k != off_frame)
        frames.append(_to_uint8(arr, rng, 3.0))
    return _video_bytes(frames, "mpeg4" if rng.random() < 0.7 else "libx264")


def _media_text(rng: np.random.Generator, content: list[str], moderation: str) -> str:
    chunks: list[str] = []
    for c in content:
        if rng.random() >= 0.08:
            k = 1 + int(rng.random() < 0.4)
            chunks.extend(str(w) for w in rng.choice(MEDIA_CONTENT_WORDS[c], size=k, replace=False))
    if moderation != "safe" and rng.random() >= 0.05:
        k = 1 + int(rng.random() < 0.4)
        chunks.extend(str(w) for w in rng.choice(MEDIA_MODERATION_WORDS[moderation], size=k, replace=False))
    elif moderation == "safe" and rng.random() < 0.3:
        chunks.append(_choice(rng, MEDIA_MODERATION_WORDS["safe"]))
    chunks.extend(str(w) for w in rng.choice(_MEDIA_FILLERS, size=int(rng.integers(1, 4)), replace=False))
    chunks = [chunks[k] for k in rng.permutation(len(chunks))]
    sep = _choice(rng, (" ", ", ", " - ", " | "))
    prefix = _choice(rng, ("", "", "Caption: ", "Transcript: ", "Clip: "))
    text = prefix + sep.join(chunks)
    while _approx_tokens(text) > _TOKEN_BUDGET["media"]:
        for k in range(len(chunks) - 1, -1, -1):
            if chunks[k] in _MEDIA_FILLERS:
                del chunks[k]
                break
        else:
            chunks = chunks[:-1]
        text = prefix + sep.join(chunks)
    return text


def _media_audio(rng: np.random.Generator, content: list[str], moderation: str) -> bytes:
    """Soundtrack with one signature per content tag: music a harmonic chord,
    sports crowd-like noise bursts, news a steady mid tone, nature high
    chirps, animals low pulses.  Moderation is audible too (a third carrier
    besides pixels and words): unsafe clips have gunshot-like broadband
    cracks, sensitive ones censor bleeps.  Plus background hiss."""
    sr = int(_choice(rng, (16_000, 16_000, 44_100)))
    n = int(sr * rng.uniform(1.0, 2.0))
    t = np.arange(n, dtype=np.float32) / sr
    x = np.zeros(n, dtype=np.float32)
    for c in content:
        gain = rng.uniform(0.6, 1.0)
        if c == "music":
            root = rng.uniform(200, 300)
            ratios = (1.0, 1.26, 1.5) if rng.random() < 0.5 else (1.0, 1.19, 1.5)
            y = sum(np.sin(2 * np.pi * root * r * h * t + rng.uniform(0, 6)) / h
                    for r in ratios for h in (1, 2)) / 3
        elif c == "sports":
            y = 0.3 * _band_noise(rng, n, sr, 300, 2500)
            env = np.zeros(n, dtype=np.float32)
            for _ in range(int(rng.integers(3, 7))):
                start, length = int(rng.uniform(0, 0.8) * n), int(rng.uniform(0.12, 0.3) * sr)
                seg = env[start:start + length]
                seg[:] = np.maximum(seg, np.hanning(len(seg) + 2)[1:-1])
            y = y + env * _band_noise(rng, n, sr, 400, 3000) * 0.9
        elif c == "news":
            y = 0.8 * np.sin(2 * np.pi * rng.uniform(1400, 1600) * t)
        elif c == "nature":
            y = np.zeros(n, dtype=np.float32)
            for _ in range(int(rng.integers(4, 9))):
                start, length = int(rng.uniform(0, 0.9) * n), int(rng.uniform(0.04, 0.09) * sr)
                length = min(length, n - start)
                tt = np.arange(length, dtype=np.float32) / sr
                f0, f1 = rng.uniform(3000, 4000), rng.uniform(4500, 6000)
                sweep = 2 * np.pi * (f0 * tt + (f1 - f0) * tt**2 / (2 * max(tt[-1], 1e-3)))
                y[start:start + length] += np.sin(sweep) * np.hanning(length)
        else:  # animals
            y = np.zeros(n, dtype=np.float32)
            f = rng.uniform(90, 150)
            for _ in range(int(rng.integers(3, 6))):
                start, length = int(rng.uniform(0, 0.85) * n), int(rng.uniform(0.12, 0.25) * sr)
                length = min(length, n - start)
                tt = np.arange(length, dtype=np.float32) / sr
                y[start:start + length] += (np.sin(2 * np.pi * f * tt) + 0.3 * np.sin(4 * np.pi * f * tt)) * \
                    np.hanning(length)
        x += gain * np.asarray(y, dtype=np.float32)
    if moderation == "unsafe":
        for _ in range(int(rng.integers(2, 5))):
            start, length = int(rng.uniform(0, 0.9) * n), int(0.12 * sr)
            length = min(length, n - start)
            decay = np.exp(-np.arange(length, dtype=np.float32) / (sr * rng.uniform(0.02, 0.04)))
            x[start:start + length] += 2.5 * rng.standard_normal(length).astype(np.float32) * decay
    elif moderation == "sensitive":
        freq = rng.uniform(950, 1050)
        for _ in range(int(rng.integers(2, 4))):
            start, length = int(rng.uniform(0, 0.8) * n), int(rng.uniform(0.12, 0.22) * sr)
            length = min(length, n - start)
            tt = np.arange(length, dtype=np.float32) / sr
            x[start:start + length] += 0.9 * np.sin(2 * np.pi * freq * tt) * _fade(length, sr, 5)
    x *= _fade(n, sr)
    x = _finish_audio(rng, x, (0.005, 0.02))
    return _wav_bytes(x, sr, "WAV")


def _make_media(rng: np.random.Generator, rid: str, missing_rate: float) -> Sample:
    k = 1 + int(rng.random() < 0.4)
    content = sorted(str(c) for c in rng.choice(MEDIA_CONTENT, size=k, replace=False))
    u = float(rng.random())
    moderation = "safe" if u < 0.6 else "sensitive" if u < 0.85 else "unsafe"
    plan = _media_frame_plan(rng, content, moderation)
    is_video = bool(rng.random() < 0.3)
    if is_video:
        visual = _media_video(rng, plan)
    else:
        s = int(_choice(rng, (64, 96, 96)))
        arr = _to_uint8(_media_compose(rng, plan, s), rng, rng.uniform(2, 5))
        visual = _encode_rgb(rng, arr, (("jpeg", 0.6), ("png", 0.4)))
    text = _media_text(rng, content, moderation)
    present = ["text", "visual"] + (["audio"] if rng.random() < 0.7 else [])
    audio = _media_audio(rng, content, moderation)
    kept = _drop_modalities(rng, present, missing_rate)
    record: dict[str, Any] = {"id": rid, "workload": "media"}
    if "text" in kept:
        record["text"] = text
    if "visual" in kept:
        record["video" if is_video else "image"] = visual
    if "audio" in kept:
        record["audio"] = audio
    return Sample(record=record, labels={"content": content, "moderation": moderation}, spans=[])


_GENERATORS: dict[str, Callable[[np.random.Generator, str, float], Sample]] = {
    "medical": _make_medical, "retail": _make_retail, "media": _make_media,
}
