"""ONNX Runtime engine: TensorRT -> CUDA -> CPU, whichever is present.

The provider list is filtered by what this onnxruntime build offers; every
requested-but-missing provider is logged once, and the provider that really
runs the graph (the session's first) is what results and metrics report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.log import log_event

logger = logging.getLogger(__name__)

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_ORDER = (TRT, CUDA, CPU)

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


def choose_providers(
    wanted: list[str] | tuple[str, ...] | None, device: str, available: list[str], *, quiet: bool = False
) -> list[str]:
    """Providers to ask for, in order, from what is wanted and available.

    ``device='cpu'`` forces the CPU provider; ``'auto'`` and ``'cuda'`` try
    the GPU ones first.  The CPU provider is always last so a session can
    always be created."""
    order = list(wanted) if wanted else ([CPU] if device == "cpu" else list(GPU_ORDER))
    chosen = []
    for p in order:
        if p in available:
            chosen.append(p)
        elif not quiet:
            log_event(logger, logging.INFO, "provider_unavailable_falling_back", provider=p,
                      available=",".join(available))
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def _provider_options(p: str, trt_cache_dir: Path | None, trt_fp16: bool,
                      trt_profiles: dict[str, str] | None) -> dict[str, Any]:
    if p == TRT:
        opts: dict[str, Any] = {"trt_fp16_enable": trt_fp16}
        if trt_cache_dir is not None:
            trt_cache_dir.mkdir(parents=True, exist_ok=True)
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache_dir),
                        trt_timing_cache_enable=True, trt_timing_cache_path=str(trt_cache_dir))
        if trt_profiles:
            opts.update(trt_profiles)
        return opts
    return {}


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float32", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(string)": "string", "tensor(bool)": "bool"}


def signature_mismatches(session: Any, signature: dict) -> list[str]:
    """How an ONNX session's inputs/outputs differ from a package signature
    (names, dtypes, ranks).  fp16 graphs with fp32 I/O compare as fp32."""
    problems = []
    for kind, have, want in (("input", session.get_inputs(), signature["inputs"]),
                             ("output", session.get_outputs(), signature["outputs"])):
        got = {t.name: t for t in have}
        for spec in want:
            t = got.pop(spec["name"], None)
            if t is None:
                problems.append(f"{kind} {spec['name']!r} is missing from the graph")
                continue
            dtype = _ORT_TYPES.get(t.type, t.type)
            if dtype != spec["dtype"]:
                problems.append(f"{kind} {spec['name']!r} has dtype {dtype}, expected {spec['dtype']}")
            if len(t.shape) != len(spec["shape"]):
                problems.append(f"{kind} {spec['name']!r} has rank {len(t.shape)} {list(t.shape)}, "
                                f"expected rank {len(spec['shape'])} {spec['shape']}")
        problems.extend(f"graph has unexpected {kind} {name!r}" for name in got)
    return problems


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        *,
        device: str = "auto",
        providers: list[str] | None = None,
        threads: int = 0,
        graph_optimization: str = "all",
        trt_cache_dir: Path | None = None,
        trt_fp16: bool = False,
        trt_profiles: dict[str, str] | None = None,
        signature: dict | None = None,
        spin: bool = True,
    ) -> None:
        """``spin=False``: the intra-op workers sleep as soon as a run ends
        instead of spin-waiting for the next one.  For a session that runs
        once between runs of another (a generation call's encoder and first
        decoder step): its spinning workers would take a core from the
        session that runs next, for every step of a call."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[graph_optimization])
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        chosen = choose_providers(providers, device, ort.get_available_providers())
        provider_args = [(p, _provider_options(p, trt_cache_dir, trt_fp16, trt_profiles)) for p in chosen]
        self.session = ort.InferenceSession(str(model_path), sess_options=so, providers=provider_args)
        if signature is not None:
            problems = signature_mismatches(self.session, signature)
            if problems:
                from pipeline.errors import PackageError

                raise PackageError(f"ONNX model {Path(model_path).name} does not match the package signature: "
                                   + "; ".join(problems))
        active = self.session.get_providers()
        self.provider = active[0] if active else CPU
        if chosen[0] != self.provider:
            log_event(logger, logging.WARNING, "provider_fallback", requested=chosen[0], active=self.provider)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._types = {i.name: i.type for i in self.session.get_inputs()}
        log_event(logger, logging.INFO, "onnxruntime_session", provider=self.provider, model=Path(model_path).name,
                  providers=",".join(active))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ins = {}
        for n in self.input_names:
            arr = feeds[n]
            if self._types[n] == "tensor(float16)" and arr.dtype != np.float16:
                arr = arr.astype(np.float16)
            ins[n] = np.ascontiguousarray(arr)
        outs = self.session.run(self.output_names, ins)
        return {n: np.asarray(o, dtype=np.float32) for n, o in zip(self.output_names, outs, strict=True)}

    def close(self) -> None:
        self.session = None
