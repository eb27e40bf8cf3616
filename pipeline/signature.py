"""The signature file of a model brought from elsewhere (``mmpipe package
--signature S.yaml``).

It says, in the user's words, what the model takes and gives: each input
(its tensor name, modality, dtype, shape with symbolic dims, preprocessing)
and each output (its tensor name, head type, labels, thresholds).  It is not
a second package format: :meth:`SignatureFile.workload_spec` and
:meth:`SignatureFile.signature` turn it into the :class:`WorkloadSpec` and
the :class:`~pipeline.package.Signature` every model package already
carries, with ``feature``/``head`` naming which Preprocessor feature feeds
which input and which head reads which output.  So a brought model is served
by the same Predictor, engines and paths as mmpipe's own family.

Example (a text + image model with two heads)::

    workload: shop                  # the records' "workload" field
    name: shop-tagger               # package name (default WORKLOAD-model)
    inputs:
      - {name: token_ids, modality: text, feature: input_ids, dtype: int64, shape: [batch, sequence],
         preprocessing: {tokenizer: tokenizer/, max_length: 32}}
      - {name: token_mask, modality: text, feature: attention_mask, dtype: int64, shape: [batch, sequence]}
      - {name: image, modality: image, dtype: float32, shape: [batch, 3, 64, 64],
         preprocessing: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}
    outputs:
      - {name: category, type: multiclass, labels: [apparel, electronics, grocery], top_k: 2}
      - {name: attributes, type: multilabel, labels: [red, blue, on_sale], threshold: 0.5}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.config import Limits, read_yaml_mapping
from pipeline.errors import ConfigError
from pipeline.package import FEATURES, Signature, TensorSpec
from pipeline.spec import MODALITY_ORDER, HeadSpec, Privacy, WorkloadSpec

# modality -> the features an input of that modality may take (first: default)
_FEATURES_BY_MODALITY: dict[str, tuple[str, ...]] = {
    "text": ("input_ids", "attention_mask", "token_type_ids"),
    "image": ("pixel_values",),
    "audio": ("log_mel",),
    "tabular": ("values",),
    "presence": ("presence",),
}
_DTYPES = ("float32", "float16", "int64", "int32")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputDecl(_Strict):
    """One model input."""

    name: str = Field(min_length=1, description="the tensor name in the model (forward keyword / ONNX input)")
    modality: Literal["text", "image", "audio", "tabular", "presence"] = Field(
        description="what it carries; 'presence' is a [batch, modalities] 0/1 mask of what each record has")
    feature: str | None = Field(
        None, description="text: input_ids (default) | attention_mask | token_type_ids; other modalities have one")
    dtype: Literal["float32", "float16", "int64", "int32"] = Field(
        "float32", description="element type (text inputs usually int64)")
    shape: list[int | str] = Field(
        min_length=1, description="dims; strings are symbolic (batch first, sequence for text)")
    preprocessing: dict[str, Any] | None = Field(
        None, description="text: tokenizer (directory with tokenizer.json), max_length, lowercase; image: size, "
        "channels, mean, std; audio: sample_rate, max_seconds, n_mels, n_fft, hop_length; tabular: fields, mean, "
        "std.  Once per modality.")

    @model_validator(mode="after")
    def _check(self) -> InputDecl:
        allowed = _FEATURES_BY_MODALITY[self.modality]
        if self.feature is None:
            self.feature = allowed[0]
        if self.feature not in allowed:
            raise ValueError(f"input {self.name!r}: a {self.modality} input takes one of {list(allowed)}, "
                             f"not feature {self.feature!r}")
        if self.shape[0] != "batch":
            raise ValueError(f"input {self.name!r}: the first dim must be 'batch', got {self.shape[0]!r}")
        return self

    @property
    def full_feature(self) -> str:
        key = "presence" if self.modality == "presence" else f"{self.modality}.{self.feature}"
        if self.modality == "audio":
            key = "audio.log_mel"
        return key


class OutputDecl(_Strict):
    """One model output: a head's logits (or scores) per record."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, description="the tensor name in the model (dict key / ONNX output)")
    head: str | None = Field(None, description="head name in results (default: name)")
    type: Literal["multiclass", "multilabel", "token"]
    labels: list[str] = Field(min_length=2)
    threshold: float = Field(0.5, ge=0, le=1, description="multilabel default threshold")
    thresholds: dict[str, float] = Field(default_factory=dict, description="per-label thresholds")
    top_k: int = Field(3, ge=1, description="multiclass: labels returned")
    shape: list[int | str] | None = Field(
        None, description="default [batch, N labels] ([batch, sequence, N] for token heads)")
    from_: str | None = Field(
        None, alias="from", description="Hugging Face way: the model output field to read (default logits)")
    prompts: list[str] | None = Field(
        None, description="Hugging Face dual encoders (CLIP-style): one text prompt per label; the head scores "
        "each record against them (zero-shot)")

    @model_validator(mode="after")
    def _check(self) -> OutputDecl:
        if self.prompts is not None and len(self.prompts) != len(self.labels):
            raise ValueError(f"output {self.name!r}: {len(self.prompts)} prompts for {len(self.labels)} labels")
        if self.shape is None:
            n = len(self.labels)
            self.shape = ["batch", "sequence", n] if self.type == "token" else ["batch", n]
        elif self.shape[-1] != len(self.labels):
            raise ValueError(f"output {self.name!r}: last dim {self.shape[-1]!r} must be the number of labels "
                             f"({len(self.labels)})")
        return self

    @property
    def head_name(self) -> str:
        return self.head or self.name


class SignatureFile(_Strict):
    """The whole file (see the module docstring)."""

    workload: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$", description="the records' workload field")
    name: str | None = Field(None, description="package name (default WORKLOAD-model)")
    description: str = ""
    inputs: list[InputDecl] = Field(min_length=1)
    outputs: list[OutputDecl] = Field(min_length=1)
    limits: Limits = Field(default_factory=Limits)
    privacy: Privacy = Field(default_factory=Privacy)
    accepts_video: bool = False
    accepts_dicom: bool = False
    base_dir: Path = Field(Path("."), exclude=True, description="relative paths resolve here (the file's dir)")

    @model_validator(mode="after")
    def _check(self) -> SignatureFile:
        for kind, names in (("input", [i.name for i in self.inputs]), ("output", [o.name for o in self.outputs])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{kind} names must be unique: {dup} repeat")
        feats = [i.full_feature for i in self.inputs]
        dup = sorted({f for f in feats if feats.count(f) > 1})
        if dup:
            raise ValueError(f"one input per feature: {dup} is taken by two inputs")
        for m in ("text", "image", "audio", "tabular"):
            preps = [i for i in self.inputs if i.modality == m and i.preprocessing is not None]
            if len(preps) > 1:
                raise ValueError(f"give {m} preprocessing once (on one input), not on {[i.name for i in preps]}")
        if any(i.modality == "text" for i in self.inputs) and "text.input_ids" not in feats:
            raise ValueError("a text model needs an input with feature input_ids (the token ids)")
        return self

    # -- what the package carries -----------------------------------------------------------------
    def modalities(self) -> list[str]:
        present = {i.modality for i in self.inputs}
        return [m for m in MODALITY_ORDER if m in present]

    def tokenizer_dir(self) -> Path | None:
        """Directory holding the tokenizer.json of the text input (None: no text)."""
        prep = self._prep("text")
        if "text" not in self.modalities():
            return None
        where = prep.get("tokenizer")
        return None if where is None else (self.base_dir / str(where))

    def _prep(self, modality: str) -> dict[str, Any]:
        for i in self.inputs:
            if i.modality == modality and i.preprocessing is not None:
                return dict(i.preprocessing)
        return {}

    def workload_spec(self) -> WorkloadSpec:
        """The workload spec (preprocessing, heads, limits) in the manifest."""
        prep: dict[str, Any] = {}
        for m in self.modalities():
            p = self._prep(m)
            if m == "text":
                p.pop("tokenizer", None)
            if m == "image":
                img = next(i for i in self.inputs if i.modality == "image")
                if len(img.shape) == 4 and isinstance(img.shape[1], int):
                    p.setdefault("channels", img.shape[1])
                if len(img.shape) == 4 and isinstance(img.shape[2], int):
                    p.setdefault("size", img.shape[2])
            if m == "audio":
                pass  # n_mels / frames follow from the preprocessing; checked against the shape below
            prep[m] = p
        heads = [HeadSpec(name=o.head_name, type=o.type, labels=o.labels, threshold=o.threshold,
                          thresholds=o.thresholds, top_k=o.top_k) for o in self.outputs]
        spec = WorkloadSpec(name=self.workload, description=self.description, preprocessing=prep, heads=heads,
                            limits=self.limits, privacy=self.privacy, accepts_video=self.accepts_video,
                            accepts_dicom=self.accepts_dicom)
        self._check_shapes(spec)
        return spec

    def _check_shapes(self, spec: WorkloadSpec) -> None:
        """Static dims of the inputs must be what the preprocessing produces."""
        pp = spec.preprocessing
        want: dict[str, list[int | str]] = {"presence": ["batch", len(spec.modalities)]}
        if pp.image is not None:
            want["image.pixel_values"] = ["batch", pp.image.channels, pp.image.size, pp.image.size]
        if pp.audio is not None:
            want["audio.log_mel"] = ["batch", pp.audio.n_mels, pp.audio.frames]
        if pp.tabular is not None:
            want["tabular.values"] = ["batch", len(pp.tabular.fields)]
        for i in self.inputs:
            exp = want.get(i.full_feature)
            if i.modality == "text":
                if len(i.shape) != 2:
                    raise ConfigError(f"input {i.name!r}: text inputs are [batch, sequence], got {i.shape}")
                continue
            if exp is not None and (len(exp) != len(i.shape) or any(
                    isinstance(a, int) and a != b for a, b in zip(i.shape, exp, strict=True))):
                raise ConfigError(f"input {i.name!r}: shape {i.shape} does not match its preprocessing, which "
                                  f"gives {exp}")

    def signature(self) -> Signature:
        """The manifest signature: the user's tensor names, with the feature
        feeding each input and the head reading each output."""
        return Signature(
            inputs=[TensorSpec(name=i.name, dtype=i.dtype, shape=i.shape, feature=i.full_feature)
                    for i in self.inputs],
            outputs=[TensorSpec(name=o.name, dtype="float32", shape=list(o.shape or []), head=o.head_name,
                                kind="logits") for o in self.outputs],
        )


def load_signature(path: str | Path) -> SignatureFile:
    """Read and check a signature file; relative paths in it resolve against
    its directory.  Raises ConfigError saying what is wrong and where."""
    p = Path(path)
    data = read_yaml_mapping(p, "signature file (workload, inputs, outputs)")
    try:
        sig = SignatureFile.model_validate({**data, "base_dir": p.resolve().parent})
        sig.workload_spec()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"signature file {p} is invalid: {problems}") from None
    except ConfigError as exc:
        raise ConfigError(f"signature file {p} is invalid: {exc}") from None
    return sig


__all__ = ["FEATURES", "InputDecl", "OutputDecl", "SignatureFile", "load_signature"]
