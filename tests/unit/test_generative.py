"""The generative head's pieces alone (no training): the decoder's cache and
padding rules, the decoding loop's choices, prompts, metrics, targets and
config.  The end-to-end checks are in tests/e2e/test_generate.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import GenerateConfig, load_settings
from pipeline.errors import RecordError
from pipeline.generate import Sampling, choose, decode, prompt_ids
from pipeline.spec import load_workload
from pipeline.tokenizer import DecoderTokenizer
from pipeline.tooling import sample_data
from pipeline.tooling.model.config import FusionConfig, GenerativeHeadConfig
from pipeline.tooling.model.decoder import CausalDecoder, positions
from pipeline.tooling.train import exact_match, rouge_l


def _decoder(seed: int = 0) -> CausalDecoder:
    torch.manual_seed(seed)
    cfg = GenerativeHeadConfig(vocab_size=50, n_embd=32, n_layer=2, n_head=4, bos_id=2, eos_id=3, pad_id=0,
                               max_prompt_tokens=8, max_new_tokens=8)
    return CausalDecoder(cfg).eval()


def test_cache_steps_equal_the_full_forward() -> None:
    dec = _decoder()
    ids = torch.randint(4, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    with torch.inference_mode():
        full, _ = dec(dec.embed(ids), mask, positions(mask))
        logits, cache = dec(dec.embed(ids[:, :4]), mask[:, :4], positions(mask[:, :4]))
        steps = [logits]
        for t in range(4, 7):
            logits, cache = dec(dec.embed(ids[:, t:t + 1]), mask[:, :t + 1], torch.full((3, 1), t), cache)
            steps.append(logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    assert cache[0][0].shape == (3, 4, 7, 8)


def test_padding_between_prefix_and_prompt_changes_nothing() -> None:
    dec = _decoder()
    prefix = torch.randn(1, 3, 32)
    ids = torch.randint(4, 50, (1, 4))
    with torch.inference_mode():
        mask = torch.ones(1, 7, dtype=torch.long)
        alone, _ = dec(torch.cat([prefix, dec.embed(ids)], 1), mask, positions(mask))
        padded_ids = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], 1)
        pmask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1]])
        padded, _ = dec(torch.cat([prefix, dec.embed(padded_ids)], 1), pmask, positions(pmask))
    assert torch.allclose(alone[:, -1], padded[:, -1], atol=1e-5)


class _Layers(torch.nn.Module):
    """A tiny decoder's first step (``init``) or a later one (``step``) as a
    graph with named inputs, exported the way the package's graphs are."""

    def __init__(self, dec: CausalDecoder, kind: str) -> None:
        super().__init__()
        self.dec, self.kind = dec, kind
        names = [f"{k}_{i}" for i in range(len(dec.h)) for k in ("key", "value")]
        self.input_names = ["ids", "mask", "pos", *(["past_" + n for n in names] if kind == "step" else [])]
        self.output_names = ["logits", *("present_" + n for n in names)]

    def forward(self, ids, mask, pos, *past):
        cache = [(past[i], past[i + 1]) for i in range(0, len(past), 2)] or None
        logits, presents = self.dec(self.dec.embed(ids), mask, pos, cache)
        return (logits, *(t for kv in presents for t in kv))


def test_exported_attention_is_one_fused_node_per_layer_and_computes_the_same(tmp_path) -> None:
    """Exported, each layer's attention is one MultiHeadAttention node (the
    step graph's dozens of small ops made a decoding step slower than its
    MatMuls); it must compute what eager ``attend`` does: causal from the
    end of the cache, pads between prefix and prompt hidden, the cache
    extended by the new positions."""
    import onnx
    import onnxruntime as ort

    from exporters.onnx_export import export_fp32

    dec = _decoder(3)
    b, t = 3, 6
    ids = torch.randint(4, 50, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 1:3] = 0  # pads in the middle of row 0
    pos = positions(mask)
    with torch.inference_mode():
        _, cache = dec(dec.embed(ids), mask, pos)
    step_ids, step_mask = torch.randint(4, 50, (b, 1)), torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1)
    step_pos = step_mask.sum(1, keepdim=True) - 1
    flat = [x for kv in cache for x in kv]
    cases = {"init": (ids, mask, pos), "step": (step_ids, step_mask, step_pos, *flat)}
    for kind, args in cases.items():
        module = _Layers(dec, kind).eval()
        example = {n: a.numpy() for n, a in zip(module.input_names, args, strict=True)}
        dims = {"ids": ["batch", "sequence"], "mask": ["batch", "total"], "pos": ["batch", "sequence"]}
        inputs = [{"name": n, "shape": dims.get(n, ["batch", 4, "past", 8])} for n in module.input_names]
        outputs = [{"name": n, "shape": ["batch", "sequence", 50] if n == "logits" else ["batch", 4, "total", 8]}
                   for n in module.output_names]
        path = tmp_path / f"{kind}.onnx"
        export_fp32(module, example, path, outputs, inputs)
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert ops.count("MultiHeadAttention") == len(dec.h) and "Softmax" not in ops, kind
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, example)
        with torch.inference_mode():
            want = [w.numpy() for w in module(*args)]
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and np.allclose(g, w, atol=1e-5), kind


def test_choose_greedy_top_k_and_top_p() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 200))
    assert choose(logits[:1], Sampling(), None).tolist() == [0]
    k1 = Sampling(do_sample=True, top_k=1, seed=0)
    assert set(choose(logits, k1, k1.rngs(range(200))).tolist()) == {0}
    p = Sampling(do_sample=True, top_p=0.7, seed=0)
    assert set(choose(logits, p, p.rngs(range(200))).tolist()) == {0, 1}
    hot = Sampling(do_sample=True, temperature=2.0, seed=4)
    a = choose(logits, hot, hot.rngs(range(200)))
    b = choose(logits, hot, hot.rngs(range(200)))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 4


class _Counting:
    """A backend whose next token is the step number (tests the loop alone)."""

    provider = "test"

    def encode(self, feeds):
        return None

    def first(self, prefix, ids, mask, pos):
        return self._logits(ids.shape[0], 5), 0

    def step(self, ids, mask, pos, cache):
        assert (pos[:, 0] == mask.sum(1) - 1).all(), "a new token sits after every real one"
        return self._logits(ids.shape[0], 6 + cache), cache + 1

    @staticmethod
    def _logits(b: int, token: int) -> np.ndarray:
        out = np.zeros((b, 20), dtype=np.float32)
        out[:, token] = 1.0
        return out


def test_each_sequence_stops_at_its_own_stop_token_or_the_length() -> None:
    stops = [frozenset({6}), frozenset({8}), frozenset({99})]
    steps = list(decode(_Counting(), {}, [[2], [2, 7, 7], [2, 7]], 2, max_new_tokens=6, stop_ids=stops, pad_id=0))
    tokens = np.stack([t for t, _ in steps])
    finished = np.stack([f for _, f in steps])
    assert tokens[:, 0].tolist()[:2] == [5, 6] and finished[1, 0]
    assert tokens[:, 1].tolist()[:4] == [5, 6, 7, 8] and finished[3, 1]
    assert tokens[:, 2].tolist() == [5, 6, 7, 8, 9, 10] and finished[5, 2]
    assert finished.sum(0).tolist() == [1, 1, 1], "each sequence finishes once"


def test_prompts_alternate_and_end_with_the_question() -> None:
    tok = DecoderTokenizer.train(["what is the main finding?", "pulmonary nodule.", "anything else?"])
    ids = prompt_ids(tok, [{"role": "user", "content": "what is the main finding?"},
                           {"role": "assistant", "content": "pulmonary nodule."},
                           {"role": "user", "content": "anything else?"}])
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 3 and ids[-1] == tok.eos_id
    assert prompt_ids(tok, None) == [tok.bos_id]
    assert tok.decode(tok.encode("pulmonary nodule.")) == "pulmonary nodule."
    with pytest.raises(RecordError, match="end with the user"):
        prompt_ids(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(RecordError, match="alternate"):
        prompt_ids(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_exact_match_and_rouge_l() -> None:
    assert exact_match(["Rib fracture."], ["rib  fracture ."]) == 1.0
    assert rouge_l(["a b c d"], ["a b c d"]) == 1.0
    assert rouge_l(["a b c d"], ["a x c d"]) == pytest.approx(0.75)
    assert rouge_l(["a b"], [""]) == 0.0


def test_targets_are_deterministic_and_follow_the_labels() -> None:
    for w in sample_data.WORKLOADS:
        a, b = sample_data.generate(w, 12, seed=3), sample_data.generate(w, 12, seed=3)
        assert [s.target for s in a] == [s.target for s in b]
        for s in a:
            assert s.target == sample_data.target_text(w, s.labels)
            convs = sample_data.dialogues(w, s.labels)
            assert convs[0] == ([], s.target)
            assert all(m[-1]["role"] == "user" for m, _ in convs if m)
    med = {"findings": ["effusion", "nodule"]}
    assert sample_data.target_text("medical", med) == "pleural effusion and pulmonary nodule."
    assert sample_data.target_text("retail", {"category": "toys", "attributes": ["large", "on_sale", "red"]}) \
        == "large red toy, on sale."


def test_generative_config_checks_the_position_budget() -> None:
    spec = load_workload("medical")
    head = {"vocab_size": 100, "bos_id": 2, "eos_id": 3, "pad_id": 0, "max_prompt_tokens": 100,
            "max_new_tokens": 40, "n_positions": 128}
    with pytest.raises(ValueError, match="exceeds n_positions"):
        FusionConfig.for_workload(spec, generative=head)
    with pytest.raises(ValueError, match="clashes"):
        FusionConfig.for_workload(spec, generative={**head, "max_prompt_tokens": 8, "name": "findings"})
    assert FusionConfig.for_workload(spec, generative={**head, "max_prompt_tokens": 8}).prefix_tokens == 4


def test_generate_config_section_and_env_overrides() -> None:
    s = load_settings(None, env={"MMPIPE__GENERATE__MAX_NEW_TOKENS": "12", "MMPIPE__GENERATE__DO_SAMPLE": "true"})
    assert s.generate.max_new_tokens == 12 and s.generate.do_sample
    assert GenerateConfig().use_cache and GenerateConfig().io_binding
    with pytest.raises(ValueError):
        GenerateConfig(top_p=0)


def test_the_generator_imports_no_torch_and_no_tooling() -> None:
    import subprocess
    import sys

    code = ("import sys, pipeline.generate; bad = [m for m in sys.modules if m == 'torch' or m.startswith("
            "('transformers', 'exporters', 'pipeline.tooling'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
