"""Configuration: YAML file, env overrides, clear errors; workload specs."""

from __future__ import annotations

import pytest

from pipeline.config import Limits, load_settings
from pipeline.errors import ConfigError
from pipeline.spec import BUILTIN_WORKLOADS, load_workload


def test_defaults_without_file() -> None:
    s = load_settings(None, env={})
    assert s.engine.kind == "auto" and s.predict.batch_size == 32


def test_yaml_and_env_overrides(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("engine: {kind: torch, threads: 1}\npredict: {batch_size: 8}\nlimits: {max_text_chars: 99}\n")
    s = load_settings(p, env={"MMPIPE__PREDICT__BATCH_SIZE": "4", "MMPIPE__ENGINE__THREADS": "2", "OTHER": "x"})
    assert s.predict.batch_size == 4 and s.engine.threads == 2
    assert s.limits is not None and s.limits.max_text_chars == 99


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("engine: {kind: tensorflow}", "engine.kind"),
        ("predict: {batch_size: 0}", "batch_size"),
        ("unknown_section: 1", "unknown_section"),
        ("- a list", "mapping"),
        ("engine: [", "not valid YAML"),
    ],
)
def test_bad_config_is_explained(tmp_path, text: str, match: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_settings(p, env={})


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings("/nonexistent/mmpipe.yaml", env={})


def test_limits_merge_only_explicit_fields() -> None:
    base = Limits(max_text_chars=100, max_image_pixels=5)
    merged = base.merged(Limits(max_image_pixels=7))
    assert merged.max_text_chars == 100 and merged.max_image_pixels == 7


@pytest.mark.parametrize("name", BUILTIN_WORKLOADS)
def test_builtin_workloads_load(name: str) -> None:
    spec = load_workload(name)
    assert spec.name == name and spec.heads
    assert spec.modalities


def test_workload_specs_are_validated(tmp_path) -> None:
    p = tmp_path / "w.yaml"
    p.write_text(
        "name: w\npreprocessing: {image: {size: 32}}\n"
        "heads: [{name: tags, type: token, labels: [O, B-X]}]\n"
    )
    with pytest.raises(ConfigError, match="token head needs text"):
        load_workload(p)
    with pytest.raises(ConfigError, match="unknown workload"):
        load_workload("finance")
