"""Triton python-backend model NAME_cpu: the package's ONNX model on onnxruntime.

Same inputs, outputs and batching as NAME (the onnxruntime-backend model),
for Triton builds that have only the python backend (the nvidia-pytriton
wheel, CPU-only nodes).  It needs numpy and onnxruntime in the stub's Python
environment, and mmpipe's ``pipeline`` (for the one padding rule), imported
from the ``MMPIPE_PYTHONPATH`` config parameter like the preprocess model.

Triton's dynamic batcher hands ``execute`` several requests; they are run as
one onnxruntime batch.  The config marks the text inputs ``allow_ragged_batch``
(the batcher otherwise merges only equal shapes), so requests may carry
different text lengths: sequence inputs are padded to the longest (pad id for
``input_ids``, 0 for the attention mask, which hides the pads) and sequence
outputs are cut back to each request's own length.
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

_NP = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32,
       "TYPE_BOOL": np.bool_}


def _pythonpath(value: str) -> None:
    """Make ``pipeline`` importable from the configured source roots (the
    ``MMPIPE_PYTHONPATH`` parameter, as the preprocess model reads it)."""
    for entry in reversed([p for p in value.split(":") if p]):
        if Path(entry).is_dir() and entry not in sys.path:
            sys.path.insert(0, entry)


def merge(batches: list[dict[str, np.ndarray]], seq_inputs: list[str], pad: dict[str, int]) -> dict[str, np.ndarray]:
    """Requests along the batch axis, sequence inputs (axis 1) padded to the
    longest request by mmpipe's one padding rule (``pipeline.columnar.pad_concat``)."""
    from pipeline.columnar import pad_concat

    return {name: np.ascontiguousarray(pad_concat([b[name] for b in batches], (1,) if name in seq_inputs else (),
                                                  pad.get(name, 0)))
            for name in batches[0]}


def split(outputs: dict[str, np.ndarray], sizes: list[int], seq_lens: list[int | None],
          seq_outputs: list[str]) -> list[dict[str, np.ndarray]]:
    """Undo ``merge`` for the outputs (``pipeline.columnar.cut_rows``),
    sequence outputs cut to each request's length."""
    from pipeline.columnar import cut_rows

    rows = {name: cut_rows(arr, sizes) for name, arr in outputs.items()}
    parts = []
    for i, s in enumerate(seq_lens):
        parts.append({name: np.ascontiguousarray(r[i][:, :s] if name in seq_outputs and s is not None else r[i])
                      for name, r in rows.items()})
    return parts


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        _pythonpath(params.get("MMPIPE_PYTHONPATH", ""))
        path = Path(args["model_repository"]) / args["model_version"] / params.get("MODEL_FILE", "model.onnx")
        so = ort.SessionOptions()
        threads = int(params.get("ORT_INTRA_OP_THREADS", "0") or 0)
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        self.inputs: list[tuple[str, Any]] = [(i["name"], _NP[i["data_type"]]) for i in config["input"]]
        self.seq_inputs = [i["name"] for i in config["input"] if i["dims"] and int(i["dims"][0]) == -1]
        self.outputs = [o["name"] for o in config["output"]]
        self.out_dtypes = {o["name"]: _NP[o["data_type"]] for o in config["output"]}
        self.seq_outputs = [o["name"] for o in config["output"] if o["dims"] and int(o["dims"][0]) == -1]
        self.pad = {"input_ids": int(params.get("PAD_ID", "0") or 0)}
        pb_utils.Logger.log_info(f"mmpipe onnxruntime (CPU) model ready: {path.name}")

    def execute(self, requests):
        feeds, sizes, seq_lens = [], [], []
        for request in requests:
            f = {}
            for name, dtype in self.inputs:
                f[name] = pb_utils.get_input_tensor_by_name(request, name).as_numpy().astype(dtype, copy=False)
            feeds.append(f)
            sizes.append(next(iter(f.values())).shape[0])
            seq_lens.append(f[self.seq_inputs[0]].shape[1] if self.seq_inputs else None)
        try:
            batch = merge(feeds, self.seq_inputs, self.pad)
            outs = dict(zip(self.outputs, self.session.run(self.outputs, batch)))
        except Exception as exc:
            err = pb_utils.TritonError(f"onnxruntime failed: {type(exc).__name__}: {str(exc)[:300]}")
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        responses = []
        for part in split(outs, sizes, seq_lens, self.seq_outputs):
            tensors = [pb_utils.Tensor(n, part[n].astype(self.out_dtypes[n], copy=False)) for n in self.outputs]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.session = None
