"""Raw record -> model features, and features -> a padded batch.

The same code prepares training data and inference batches, so what a model
sees in training is exactly what it sees in production.  ``prepare`` works on
one record and raises :class:`RecordError`; ``collate`` never fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.columnar import BatchBuilder, ColumnarBatch
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
    messages: list[dict[str, str]] | None = None
    """the record's conversation, for a generative head (tagging ignores it)"""


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
        rec = self._parse_checked(raw)
        return self._featurize(rec, self._encode([rec])[0], t0)

    def prepare_many(
        self, raws: Sequence[bytes | str | dict[str, Any] | Record], pool: Executor | None = None,
    ) -> list[Prepared | Exception]:
        """:meth:`prepare` for many records at once, each its Prepared or the
        exception it raised: texts are tokenized in one ``encode_batch`` call
        and media decoded on ``pool`` (Pillow, libsndfile and PyAV release
        the GIL while they decode), so one batch keeps every core busy."""
        t0 = time.perf_counter()
        parsed: list[Record | Exception] = []
        for raw in raws:
            try:
                parsed.append(self._parse_checked(raw))
            except Exception as exc:  # RecordError, or a bug the caller reports
                parsed.append(exc)
        good = [r for r in parsed if isinstance(r, Record)]
        encoded = iter(self._encode(good))
        share = (time.perf_counter() - t0) / max(len(parsed), 1)
        jobs = [(r, next(encoded)) if isinstance(r, Record) else r for r in parsed]

        def one(job: tuple[Record, Encoded | None] | Exception) -> Prepared | Exception:
            if isinstance(job, Exception):
                return job
            try:
                return self._featurize(job[0], job[1], time.perf_counter() - share)
            except Exception as exc:
                return exc

        if pool is None or len(jobs) < 4:
            return [one(j) for j in jobs]
        return list(pool.map(one, jobs))

    def _parse_checked(self, raw: bytes | str | dict[str, Any] | Record) -> Record:
        rec = self.parse(raw)
        return self._check_modalities(rec)

    def _encode(self, recs: Sequence[Record]) -> list[Encoded | None]:
        """Token ids of each record's text (an empty text's when it has
        none), in one batched tokenizer call."""
        if self.prep.text is None or not recs:
            return [None] * len(recs)
        assert self.text is not None
        return self.text.encode_batch([r.text if r.text and r.text.strip() else "" for r in recs])

    def _featurize(self, rec: Record, enc: Encoded | None, t0: float) -> Prepared:
        """Every modality of a parsed record; raises RecordError."""
        feats: dict[str, np.ndarray] = {}
        present: dict[str, bool] = {}
        offsets: list[tuple[int, int]] = []
        if self.prep.text is not None:
            assert enc is not None
            feats["input_ids"] = enc.ids
            offsets = [(0, 0) if s else o for o, s in zip(enc.offsets, enc.special, strict=True)]
            present["text"] = bool(rec.text and rec.text.strip())
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
            messages=[m.model_dump() for m in rec.messages] if rec.messages else None,
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

    # -- columns ---------------------------------------------------------------------
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        prep, shapes = self.prep, {}
        if prep.image is not None:
            shapes["pixel_values"] = (prep.image.channels, prep.image.size, prep.image.size)
        if prep.audio is not None:
            shapes["audio_features"] = (prep.audio.n_mels, prep.audio.frames)
        if prep.tabular is not None:
            shapes["tabular"] = (len(prep.tabular.fields),)
        return shapes

    @property
    def fixed_length(self) -> int | None:
        """Text length every batch is padded to, for a graph that reads
        token ids but has no attention-mask input: padding it cannot hide
        would otherwise make a record's answer depend on its neighbours."""
        from pipeline.package import fixed_length_inputs

        if self.prep.text is None or self.inputs is None or not fixed_length_inputs(self.inputs):
            return None
        return self.prep.text.max_length

    def builder(self, capacity: int = 64) -> BatchBuilder:
        """An empty :class:`BatchBuilder` for this model's columns."""
        return BatchBuilder(
            self.spec.name, self.modalities, self._shapes(), text=self.prep.text is not None,
            pad_id=self.text.pad_id if self.text is not None else 0, fixed_length=self.fixed_length,
            capacity=capacity, max_length=self.prep.text.max_length if self.prep.text is not None else None,
        )

    def columns(self, prepared: Sequence[Prepared]) -> ColumnarBatch:
        """Decoded records as one columnar batch (positions 0..n-1)."""
        b = self.builder(len(prepared))
        for i, p in enumerate(prepared):
            b.add(p, i)
        return b.build()

    def feeds(self, batch: ColumnarBatch) -> dict[str, np.ndarray]:
        """The graph's input tensors for a batch (names and dtypes of the
        package signature)."""
        out = batch.canonical()
        if self.inputs is None:
            return out
        return self._to_graph(out)

    def collate(self, batch: Sequence[Prepared]) -> dict[str, np.ndarray]:
        """Stack features into model inputs, zero-filling missing modalities
        and padding text to the longest sequence in the batch (the one rule
        of :mod:`pipeline.columnar`)."""
        return self.feeds(self.columns(batch))

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
