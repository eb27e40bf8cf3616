"""Record ids in logs: keyed pseudonyms that nobody without the key links back."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.log import ID_KEY_ENV, safe_id


def test_pseudonym_cannot_be_recovered_without_the_key() -> None:
    key = b"k" * 32
    logged = safe_id("ACC-004211", True, key)
    candidates = [f"ACC-{i:06d}" for i in range(10_000)]
    # An attacker without the key hashes every candidate: no unkeyed digest matches.
    unkeyed = {"h:" + hashlib.sha256(c.encode()).hexdigest()[:16] for c in candidates}
    assert logged not in unkeyed
    # With another key the pseudonyms differ; with the key they are stable.
    assert safe_id("ACC-004211", True, b"x" * 32) != logged
    assert safe_id("ACC-004211", True, key) == logged


def test_ids_pass_through_when_not_hashed() -> None:
    assert safe_id("sku-1", False) == "sku-1"


def test_no_key_never_logs_an_unkeyed_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ID_KEY_ENV, raising=False)
    assert safe_id("ACC-004211", True) == "h:unkeyed"


def test_a_hashing_workload_refuses_to_start_without_a_key(
    tiny_packages: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.package import load_package
    from pipeline.predictor import Predictor

    monkeypatch.delenv(ID_KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=ID_KEY_ENV):
        Predictor(load_package(tiny_packages["medical"]), None)
    Predictor(load_package(tiny_packages["retail"]), None)  # retail ids are not hashed: no key needed
