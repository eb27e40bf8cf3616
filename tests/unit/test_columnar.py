"""The columnar batch: one collate, merge, split and block form for every path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.columnar import ColumnarBatch, Rejected, pad_concat
from pipeline.preprocess import Prepared

MODALITIES = ("text", "image", "tabular")
SHAPES = {"pixel_values": (3, 4, 4), "tabular": (2,)}
PAD = 7


def _row(i: int, draw_len: int, present: tuple[bool, bool, bool]) -> Prepared:
    rng = np.random.default_rng(i)
    feats: dict[str, np.ndarray] = {"input_ids": rng.integers(10, 99, size=draw_len).astype(np.int64)}
    if present[1]:
        feats["pixel_values"] = rng.random((3, 4, 4), dtype=np.float32)
    if present[2]:
        feats["tabular"] = rng.random(2, dtype=np.float32)
    offsets = [(j, j + 1) for j in range(draw_len)]
    return Prepared(id=f"r{i}", workload="w", features=feats, present=dict(zip(MODALITIES, present, strict=True)),
                    offsets=offsets, preprocess_ms=float(i))


record = st.one_of(
    st.tuples(st.just("ok"), st.integers(1, 12), st.tuples(st.booleans(), st.booleans(), st.booleans())),
    st.tuples(st.just("bad"), st.sampled_from(["bad_json", "image_corrupt", "text_too_long"])),
)


def _batch(spec: list, seed: int) -> ColumnarBatch:
    prepared, positions, rejected = [], [], Rejected()
    for pos, item in enumerate(spec):
        if item[0] == "ok":
            prepared.append(_row(seed * 1000 + pos, item[1], item[2]))
            positions.append(pos)
        else:
            rejected.add(pos, f"bad{seed}-{pos}", item[1], f"reason {item[1]}")
    return ColumnarBatch.from_prepared(prepared, workload="w", modalities=MODALITIES, shapes=SHAPES, text=True,
                                       pad_id=PAD, positions=positions, rejected=rejected, size=len(spec))


def _rows(b: ColumnarBatch) -> dict[int, tuple]:
    """Each record's content by position, independent of padding."""
    out: dict[int, tuple] = {}
    for r, pos in enumerate(b.positions.tolist()):
        n = int(b.lengths[r])
        assert (b.features["input_ids"][r, n:] == PAD).all(), "padding must use the pad id"
        out[pos] = ("ok", b.ids[r], tuple(b.features["input_ids"][r, :n].tolist()),
                    b.features["pixel_values"][r].tobytes(), b.features["tabular"][r].tobytes(),
                    tuple(b.presence[r].tolist()), tuple(map(tuple, b.offsets[r, :n].tolist())))
    for j, pos in enumerate(b.rejected.positions.tolist()):
        out[pos] = ("bad", b.rejected.ids[j], b.rejected.codes[j], b.rejected.messages[j])
    assert sorted(out) == list(range(b.size)), "every position is accepted or rejected, once"
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(record, max_size=6), min_size=1, max_size=4))
def test_merge_split_round_trip(parts: list[list]) -> None:
    batches = [_batch(p, i) for i, p in enumerate(parts)]
    merged = ColumnarBatch.merge(batches)
    assert merged.size == sum(len(p) for p in parts)
    back = merged.split([b.size for b in batches])
    for original, got in zip(batches, back, strict=True):
        assert _rows(got) == _rows(original)


@settings(max_examples=60, deadline=None)
@given(st.lists(record, max_size=10))
def test_block_round_trip(spec: list) -> None:
    b = _batch(spec, 1)
    block = b.to_block(max_length=16)
    assert len(block["id"]) == b.size
    assert all(v.shape[0] == b.size for v in block.values())
    back = ColumnarBatch.from_block(block, workload="w", modalities=MODALITIES, pad_id=PAD)
    assert _rows(back) == _rows(b)


def test_absent_modality_is_zero_and_masked() -> None:
    b = _batch([("ok", 3, (True, False, True))], 0)
    assert not b.features["pixel_values"].any()
    assert b.presence.tolist() == [[1.0, 0.0, 1.0]]


def test_canonical_mask_follows_lengths_and_fixed_length_pads() -> None:
    b = _batch([("ok", 2, (True, True, True)), ("ok", 5, (True, True, True))], 0)
    feeds = b.canonical()
    assert feeds["input_ids"].shape == (2, 5)
    assert feeds["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    b.fixed_length = 8
    fixed = b.canonical()
    assert fixed["input_ids"].shape == (2, 8) and (fixed["input_ids"][:, 5:] == PAD).all()


def test_take_trims_padding_nobody_needs() -> None:
    b = _batch([("ok", 2, (True, True, True)), ("ok", 9, (True, True, True))], 0)
    assert b.take([0]).features["input_ids"].shape == (1, 2)


def test_pad_concat_pads_each_variable_axis_to_the_longest() -> None:
    a, b = np.ones((1, 2), dtype=np.int64), np.ones((2, 4), dtype=np.int64)
    got = pad_concat([a, b], (1,), value=0)
    assert got.shape == (3, 4) and got[0].tolist() == [1, 1, 0, 0]


def test_conversations_travel_with_their_rows() -> None:
    """A generative head's ``messages`` follow their record through the
    block form, take, merge and split, and back out as Prepared rows."""
    conv = [{"role": "user", "content": "what is seen?"}]
    rows = [_row(0, 3, (True, True, False)), _row(1, 5, (True, False, True))]
    rows[1].messages = conv
    b = ColumnarBatch.from_prepared(rows, workload="w", modalities=MODALITIES, shapes=SHAPES, text=True, pad_id=PAD,
                                    positions=[0, 2], rejected=Rejected(np.array([1]), ["x"], ["bad_json"], ["m"]),
                                    size=3)
    assert b.messages == [None, conv]
    assert "messages" not in b.to_block(16), "only asked for (generation on)"
    back = ColumnarBatch.from_block(b.to_block(16, messages=True), workload="w", modalities=MODALITIES, pad_id=PAD)
    assert back.messages == [None, conv] and back.take([1]).messages == [conv]
    plain = _batch([("ok", 2, (True, True, True))], 3)
    merged = ColumnarBatch.merge([plain, back])
    assert merged.messages == [None, None, conv] and merged.split([1, 3])[1].messages == [None, conv]
    again = back.rows()
    assert [p.messages for p in again] == [None, conv] and [p.id for p in again] == ["r0", "r1"]
    assert again[1].features["input_ids"].tolist() == rows[1].features["input_ids"].tolist()
    assert again[1].present == rows[1].present and again[1].offsets == rows[1].offsets


def test_pad_concat_fills_one_buffer_and_refuses_parts_that_do_not_fit() -> None:
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    b = np.arange(2, dtype=np.int32).reshape(1, 2)
    got = pad_concat([a, b], (1,), value=-1)
    assert got.dtype == np.int64 and got.tolist() == [[0, 1, 2], [3, 4, 5], [0, 1, -1]]
    assert pad_concat([a], (1,)) is a  # nothing to pad: the part itself
    assert pad_concat([b], (1,), lengths={1: 4}).tolist() == [[0, 1, 0, 0]]
    same = pad_concat([a, a + 6])
    assert same.tolist() == np.arange(12).reshape(4, 3).tolist()
    with pytest.raises(ValueError, match="cannot concatenate"):
        pad_concat([a, np.zeros((1, 1), np.int64)])  # a fixed axis differs: never broadcast
    with pytest.raises(ValueError, match="longer than"):
        pad_concat([a], (1,), lengths={1: 2})
