"""Raw record -> model features, and features -> a padded batch.

The same code prepares training data and inference batches, so what a model
sees in training is exactly what it sees in production.  ``prepare`` works on
one record and raises :class:`RecordError`; ``collate`` never fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import Limits, MediaConfig
from pipeline.decode import decode_audio, decode_image, decode_video
from pipeline.errors import Reason, RecordError
from pipeline.records import Record, parse_record, resolve_media
from pipeline.spec import WorkloadSpec
from pipeline.tokenizer import Encoded, TextEncoder

if TYPE_CHECKING:
    from pipeline.package import ModelPackage, TensorSpec


@dataclass
class Prepared:
    """One record ready for batching.  Holds features only: the raw record
    (possibly patient data) is not kept."""

    id: str
    workload: str
    features: dict[str, np.ndarray]
    present: dict[str, bool]
    offsets: list[tuple[int, int]] = field(default_factory=list)
    preprocess_ms: float = 0.0


class Preprocessor:
    """Validates, decodes and featurizes records for one workload spec."""

    def __init__(
        self,
        spec: WorkloadSpec,
        text_encoder: TextEncoder | None,
        limits: Limits | None = None,
        media: MediaConfig | None = None,
        inputs: Sequence[TensorSpec] | None = None,
    ) -> None:
        """``inputs``: the model graph's inputs (a package signature's), when
        they are not mmpipe's own names: ``collate`` then feeds each one the
        feature its ``feature`` names, in its dtype, and nothing else."""
        self.spec = spec
        self.prep = spec.preprocessing
        self.text = text_encoder
        self.limits = spec.limits.merged(limits)
        self.media = media or MediaConfig()
        self.modalities = spec.modalities
        if self.prep.text is not None and text_encoder is None:
            raise ValueError("workload has text preprocessing but no tokenizer was given")
        self.inputs = list(inputs) if inputs is not None else None
        if self.inputs is not None:
            from pipeline.package import FEATURES

            for t in self.inputs:
                feat = t.feature_name()
                if feat not in FEATURES:
                    raise ValueError(f"model input {t.name!r} takes an unknown feature {feat!r}; "
                                     f"known: {sorted(FEATURES)}")
        # limits.extra_modalities: ignore -- called with each modality dropped
        # from a record (the Predictor counts them in a metric).
        self.on_extra_modality: Callable[[str], None] = _uncounted

    @classmethod
    def for_package(cls, package: ModelPackage, limits: Limits | None = None,
                    media: MediaConfig | None = None) -> Preprocessor:
        """The Preprocessor that feeds ``package``'s model graph."""
        return cls(package.spec, package.text_encoder(), limits, media, inputs=package.manifest.signature.inputs)

    def input_name(self, feature: str) -> str | None:
        """Graph input fed with ``feature`` (``text.input_ids``...), if any."""
        from pipeline.package import FEATURES

        if self.inputs is None:
            return FEATURES[feature]
        return next((t.name for t in self.inputs if t.feature_name() == feature), None)

    def parse(self, raw: bytes | str | dict[str, Any] | Record) -> Record:
        rec = parse_record(raw, self.limits)
        if rec.workload != self.spec.name:
            raise RecordError(
                Reason.WORKLOAD_MISMATCH,
                f"record is for workload {rec.workload!r}; this model serves {self.spec.name!r}",
            )
        return rec

    def prepare(self, raw: bytes | str | dict[str, Any] | Record) -> Prepared:
        """Parse, check limits, decode each modality.  Raises RecordError."""
        t0 = time.perf_counter()
        rec = self.parse(raw)
        rec = self._check_modalities(rec)
        feats: dict[str, np.ndarray] = {}
        present: dict[str, bool] = {}
        offsets: list[tuple[int, int]] = []
        if self.prep.text is not None:
            assert self.text is not None
            has_text = bool(rec.text and rec.text.strip())
            enc: Encoded = self.text.encode(rec.text) if has_text else self.text.empty()
            feats["input_ids"] = enc.ids
            offsets = [(0, 0) if s else o for o, s in zip(enc.offsets, enc.special, strict=True)]
            present["text"] = has_text
        if self.prep.image is not None:
            if rec.image not in (None, "", b""):
                data = resolve_media(rec.image, "image", self.limits, self.media)
                feats["pixel_values"] = decode_image(
                    data, self.prep.image, self.limits, allow_dicom=self.spec.accepts_dicom
                )
                present["image"] = True
            elif rec.video not in (None, "", b""):
                data = resolve_media(rec.video, "video", self.limits, self.media)
                feats["pixel_values"] = decode_video(data, self.prep.image, self.limits)
                present["image"] = True
            else:
                present["image"] = False
        if self.prep.audio is not None:
            if rec.audio not in (None, "", b""):
                data = resolve_media(rec.audio, "audio", self.limits, self.media)
                feats["audio_features"] = decode_audio(data, self.prep.audio, self.limits)
                present["audio"] = True
            else:
                present["audio"] = False
        if self.prep.tabular is not None:
            tp = self.prep.tabular
            if rec.tabular:
                unknown = sorted(set(rec.tabular) - set(tp.fields))
                if unknown:
                    raise RecordError(
                        Reason.TABULAR_INVALID,
                        f"unknown tabular fields {unknown[:5]}; expected some of {tp.fields}",
                    )
                vals = np.array([rec.tabular.get(f, m) for f, m in zip(tp.fields, tp.mean, strict=True)])
                feats["tabular"] = ((vals - np.array(tp.mean)) / np.array(tp.std)).astype(np.float32)
                present["tabular"] = True
            else:
                present["tabular"] = False
        if not any(present.values()):
            raise RecordError(Reason.NO_MODALITY, "record has no non-empty modality this model uses")
        return Prepared(
            id=rec.id,
            workload=rec.workload,
            features=feats,
            present=present,
            offsets=offsets,
            preprocess_ms=(time.perf_counter() - t0) * 1000.0,
        )

    def _check_modalities(self, rec: Record) -> Record:
        """The record, or without the fields of modalities the model does not
        take when ``limits.extra_modalities`` is ``ignore``."""
        accepted = set(self.modalities)
        if "image" in accepted and self.spec.accepts_video:
            accepted.add("video")
        extra = [m for m in rec.modalities() if m not in accepted]
        if extra:
            rec = self._extra_modalities(rec, extra, accepted)
        if rec.image not in (None, "", b"") and rec.video not in (None, "", b""):
            raise RecordError(Reason.BAD_RECORD, "give either image or video, not both")
        return rec

    # -- limits.extra_modalities --------------------------------------------------------------
    def _extra_modalities(self, rec: Record, extra: list[str], accepted: set[str]) -> Record:
        """Reject (the default), or drop the fields undecoded and count each."""
        if self.limits.extra_modalities == "reject":
            raise RecordError(
                Reason.MODALITY_NOT_SUPPORTED,
                f"workload {self.spec.name} takes {sorted(accepted)}; record has {extra} (set "
                "limits.extra_modalities: ignore to accept such records without those fields)",
            )
        for m in extra:
            self.on_extra_modality(m)
        return rec.model_copy(update=dict.fromkeys(extra))

    def collate(self, batch: list[Prepared]) -> dict[str, np.ndarray]:
        """Stack features into model inputs, zero-filling missing modalities
        and padding text to the longest sequence in the batch."""
        n = len(batch)
        out: dict[str, np.ndarray] = {}
        prep = self.prep
        if prep.text is not None:
            assert self.text is not None
            seq = self._text_length(batch)
            ids = np.full((n, seq), self.text.pad_id, dtype=np.int64)
            mask = np.zeros((n, seq), dtype=np.int64)
            for i, p in enumerate(batch):
                t = p.features["input_ids"]
                ids[i, : len(t)] = t
                mask[i, : len(t)] = 1
            out["input_ids"], out["attention_mask"] = ids, mask
        if prep.image is not None:
            shape = (prep.image.channels, prep.image.size, prep.image.size)
            out["pixel_values"] = _stack(batch, "pixel_values", shape)
        if prep.audio is not None:
            out["audio_features"] = _stack(batch, "audio_features", (prep.audio.n_mels, prep.audio.frames))
        if prep.tabular is not None:
            out["tabular"] = _stack(batch, "tabular", (len(prep.tabular.fields),))
        out["presence"] = np.array(
            [[1.0 if p.present.get(m) else 0.0 for m in self.modalities] for p in batch], dtype=np.float32
        )
        if self.inputs is None:
            return out
        return self._to_graph(out)

    def _text_length(self, batch: list[Prepared]) -> int:
        """Pad to the longest text, or always to max_length for a model with
        no attention-mask input (whose results padding would reach)."""
        from pipeline.package import fixed_length_inputs

        assert self.prep.text is not None
        if self.inputs is not None and fixed_length_inputs(self.inputs):
            return self.prep.text.max_length
        return max(len(p.features["input_ids"]) for p in batch)

    def _to_graph(self, canonical: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rename, cast and select the features for the graph's inputs."""
        from pipeline.package import FEATURES

        assert self.inputs is not None
        feeds: dict[str, np.ndarray] = {}
        for t in self.inputs:
            feat = t.feature_name()
            if feat == "text.token_type_ids":  # one segment: all zeros, shaped like the mask
                arr = np.zeros_like(canonical["attention_mask"])
            else:
                arr = canonical[FEATURES[str(feat)]]
            feeds[t.name] = arr if arr.dtype == np.dtype(t.dtype) else arr.astype(t.dtype)
        return feeds


def _uncounted(modality: str) -> None:
    """No metric wired (a Preprocessor outside a Predictor)."""


def _stack(batch: list[Prepared], key: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.zeros((len(batch), *shape), dtype=np.float32)
    for i, p in enumerate(batch):
        if key in p.features:
            arr[i] = p.features[key]
    return arr
