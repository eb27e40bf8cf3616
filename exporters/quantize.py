"""int8 variants that are int8: which MatMul/Gemm nodes are quantized,
which stay fp32 and why, and what came out.

What is quantized is every MatMul/Gemm whose second input is a weight (an
initializer): the dense layers of any model, whatever its module names.
What stays fp32:

* the **heads**: the weight MatMul/Gemm nodes nearest to each output of the
  signature (found by walking back from the output through every other
  op).  They are a tiny share of the compute, but where rounding moves
  decisions most directly;
* in mmpipe's own fusion family, also the **fusion layer**: every weight
  node outside the towers (``/text/``, ``/image/``, ``/audio/``,
  ``/tabular/``).

ONNX Runtime's dynamic quantizer first rewrites each Gemm as a MatMul named
``<gemm>_MatMul`` (plus an Add), so an exclusion list that only names the
Gemm misses it; both names are excluded here, and the result is counted on
the quantized graph itself rather than trusted: a variant that quantized
nothing is refused by the exporter, never shipped as "int8".
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TOWER_PREFIXES = ("/text/", "/image/", "/audio/", "/tabular/")
_DENSE = ("MatMul", "Gemm")
# What a quantized dense node becomes: integer ops (dynamic, QOperator) ...
_INTEGER_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul", "QGemm"}
# ... or (static QDQ) the same op fed by a DequantizeLinear of its weight.
_DEQUANTIZE = "DequantizeLinear"


@dataclass(frozen=True)
class Plan:
    """The dense nodes with weights, and those kept fp32 (node -> why)."""

    weight_nodes: tuple[str, ...]
    keep_fp32: dict[str, str]

    @property
    def to_quantize(self) -> list[str]:
        return [n for n in self.weight_nodes if n not in self.keep_fp32]

    def exclusions(self) -> list[str]:
        """Names to pass as ``nodes_to_exclude``: each kept node, and the name
        the dynamic quantizer gives a Gemm once it has rewritten it."""
        return sorted({*self.keep_fp32, *(f"{n}_MatMul" for n in self.keep_fp32)})

    def why_kept(self) -> str:
        kinds = sorted(set(self.keep_fp32.values()))
        return " and ".join(kinds) if kinds else "none"


def _load_graph(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


def weight_nodes(graph: Any) -> list[Any]:
    """MatMul/Gemm nodes whose second input is an initializer (a weight)."""
    inits = {t.name for t in graph.initializer}
    return [n for n in graph.node if n.op_type in _DENSE and len(n.input) > 1 and n.input[1] in inits]


def head_nodes(graph: Any, outputs: list[str]) -> set[str]:
    """The dense nodes nearest to ``outputs``: walk back from each output
    through any other op, stopping at the first MatMul/Gemm on each path."""
    producer = {o: n for n in graph.node for o in n.output}
    seen: set[str] = set()
    found: set[str] = set()
    todo = list(outputs)
    while todo:
        tensor = todo.pop()
        node = producer.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in _DENSE:
            found.add(node.name)
            continue
        todo.extend(node.input)
    return found


def plan(src: Path, outputs: list[str], *, family: bool) -> Plan:
    """What to quantize in ``src`` (``outputs``: the signature's output
    names; ``family``: mmpipe's own fusion model, whose fusion layer also
    stays fp32)."""
    graph = _load_graph(src)
    dense = weight_nodes(graph)
    heads = head_nodes(graph, outputs)
    keep = {n.name: "heads" for n in dense if n.name in heads}
    if family:
        keep.update({n.name: "fusion layer" for n in dense
                     if n.name not in keep and not n.name.startswith(TOWER_PREFIXES)})
    return Plan(weight_nodes=tuple(n.name for n in dense), keep_fp32=keep)


def quantized_nodes(path: Path) -> list[str]:
    """Dense nodes of a quantized graph that run on int8 weights."""
    graph = _load_graph(path)
    producer = {o: n for n in graph.node for o in n.output}

    def dequantized(name: str) -> bool:
        node = producer.get(name)
        return node is not None and node.op_type == _DEQUANTIZE

    return [n.name for n in graph.node if n.op_type in _INTEGER_OPS
            or (n.op_type in _DENSE and len(n.input) > 1 and dequantized(n.input[1]))]


def summary(p: Plan, fp32: Path, int8: Path) -> dict[str, Any]:
    """What the int8 file is, for the parity report."""
    return {
        "weight_nodes": len(p.weight_nodes), "quantized": len(quantized_nodes(int8)),
        "kept_fp32": sorted(p.keep_fp32), "kept_why": p.why_kept(),
        "size_ratio": round(int8.stat().st_size / fp32.stat().st_size, 4),
    }


def nothing_to_quantize(p: Plan) -> str:
    """Why an int8 variant of this model would be fp32 under another name."""
    if not p.weight_nodes:
        return ("the model has no MatMul/Gemm node with weights (convolutions stay fp32), so an int8 file would "
                "be the fp32 model under another name")
    return (f"all {len(p.weight_nodes)} of the model's MatMul/Gemm nodes with weights are its {p.why_kept()}, which "
            f"stay fp32 ({', '.join(sorted(p.keep_fp32)[:6])}), so an int8 file would be the fp32 model under "
            "another name")


class _QuantizerAdvice(logging.Filter):
    """Drops what ONNX Runtime's quantizer logs through the root logger (in
    plain text, advice about pre-processing): nothing of ours, and it would
    break a JSON-lines log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname or "quantization" not in record.pathname


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    root = logging.getLogger()
    advice = _QuantizerAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def to_int8_dynamic(src: Path, dst: Path, p: Plan) -> None:
    """Dynamic int8 on the planned MatMul/Gemm, unsigned per-channel weights
    (integer convolutions are slower than fp32 on CPUs without VNNI)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_quantizer():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(_DENSE), weight_type=QuantType.QUInt8,
                         per_channel=True, nodes_to_exclude=p.exclusions())


def to_int8_static(src: Path, dst: Path, p: Plan, calibration: list[dict[str, np.ndarray]]) -> None:
    """Static QDQ int8 calibrated on sample batches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    with _quiet_quantizer():
        quantize_static(
            str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(_DENSE),
            activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8, per_channel=True,
            nodes_to_exclude=p.exclusions(),
        )
