"""Triton python-backend model NAME_preprocess: raw record JSON -> model inputs.

Input ``RECORD`` (TYPE_STRING, [batch, 1]): one record per row, the same JSON
bytes every other mmpipe path takes (media base64).  Outputs: the model's
input tensors (text padded to the package's ``max_length`` so ensemble
requests have one shape and batch together), ``VALID`` (bool), ``ERROR``
(reason code, empty when valid), ``ERROR_MESSAGE`` and, for text models,
``TOKEN_OFFSETS`` (character span of every token, (0, 0) for special and pad
tokens) so clients can turn token-head logits into spans.

A bad record gets ``VALID=false`` and its reason code; its row is zero-filled
with an all-zero presence mask and the other rows of the request answer as
usual.  Only a broken request (not a broken record) fails the request.

It runs mmpipe's own decoding (``Predictor.decode`` into a columnar batch,
padded by the batch's own rule) from the package copy placed beside this file, so Triton clients get exactly the features every other path
computes.  ``pipeline`` is imported from the ``MMPIPE_PYTHONPATH`` config
parameter when set, else from the stub's Python environment.  Record content
is never logged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (unit tests)
    pb_utils = None


def _params(model_config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def add_pythonpath(value: str) -> None:
    """Make ``pipeline`` importable from the configured source roots."""
    for entry in reversed([p for p in value.split(":") if p]):
        if Path(entry).is_dir() and entry not in sys.path:
            sys.path.insert(0, entry)


def load_decoder(package_dir: Path, allowed_uri_schemes: list[str]):
    """A decode-only Predictor for the package (no engine: this model only
    featurizes), from a manifest and the files preprocessing needs
    (tokenizer), each verified against the manifest's sha256."""
    from pipeline.config import MediaConfig
    from pipeline.package import load_package_copy
    from pipeline.predictor import Predictor

    pkg = load_package_copy(package_dir)
    # Online callers must not make the server read its own files: no URIs
    # unless the config lists schemes.
    return Predictor(pkg, None, media=MediaConfig(allowed_uri_schemes=allowed_uri_schemes), path="triton")


def featurize(predictor, raws: list[bytes], seq_len: int | None) -> dict[str, np.ndarray]:
    """Model inputs + VALID / ERROR / ERROR_MESSAGE (+ TOKEN_OFFSETS) for a
    list of raw records: ``Predictor.decode`` into one columnar batch, then
    the ensemble's fixed-length form (:func:`pipeline.oip.ensemble_features`,
    the same function Serve's ``NAME_ensemble`` uses)."""
    from pipeline.oip import ensemble_features

    return ensemble_features(predictor.pre, predictor.decode(bytes(r) for r in raws), seq_len)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = _params(config)
        add_pythonpath(params.get("MMPIPE_PYTHONPATH", ""))
        try:
            import pipeline  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                "mmpipe's 'pipeline' package is not importable by Triton's python backend: set the "
                "MMPIPE_PYTHONPATH parameter (mmpipe triton-repo --pythonpath DIR) or install mmpipe in "
                f"the backend's Python environment ({exc})"
            ) from exc
        version_dir = Path(args["model_repository"]) / args["model_version"]
        schemes = [s for s in params.get("ALLOWED_URI_SCHEMES", "").split(",") if s.strip()]
        self.predictor = load_decoder(version_dir / params.get("PACKAGE_DIR", "package"), schemes)
        self.pkg = self.predictor.package
        text = self.pkg.spec.preprocessing.text
        self.seq_len = text.max_length if text is not None else None
        self.output_names = [o["name"] for o in config["output"]]
        pb_utils.Logger.log_info(
            f"mmpipe preprocess ready: package {self.pkg.name} v{self.pkg.version}, workload {self.pkg.spec.name}"
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                raws = pb_utils.get_input_tensor_by_name(request, "RECORD").as_numpy().reshape(-1).tolist()
                out = featurize(self.predictor, raws, self.seq_len)
                tensors = [pb_utils.Tensor(name, out[name]) for name in self.output_names]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"preprocess failed: {type(exc).__name__}")))
        return responses

    def finalize(self) -> None:
        self.predictor = None
