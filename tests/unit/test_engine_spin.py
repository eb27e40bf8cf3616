"""``engine.spin``: whether ONNX Runtime's intra-op workers spin-wait
between runs.  Off for the stream consumer (its decode and Kafka threads
share the cores with the engine) and for the generator's once-per-call
graphs; the session must really carry the setting."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.config import EngineConfig, load_settings
from pipeline.engines.onnx_engine import OnnxRuntimeEngine

KEY = "session.intra_op.allow_spinning"


@pytest.fixture()
def relu(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _spinning(engine: OnnxRuntimeEngine) -> bool:
    try:
        return engine.session.get_session_options().get_session_config_entry(KEY) != "0"
    except RuntimeError:  # not set: ONNX Runtime's default, which spins
        return True


def test_the_session_carries_the_spin_setting(relu) -> None:
    assert _spinning(OnnxRuntimeEngine(relu))
    assert not _spinning(OnnxRuntimeEngine(relu, spin=False))


def test_spin_is_auto_by_default_and_settable(tmp_path) -> None:
    assert EngineConfig().spin == "auto"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("engine: {spin: false}\n")
    assert load_settings(cfg, env={}).engine.spin is False
    assert load_settings(None, env={"MMPIPE__ENGINE__SPIN": "true"}).engine.spin is True
