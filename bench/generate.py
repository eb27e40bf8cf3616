"""Generation speed: ONNX Runtime vs PyTorch eager, KV cache vs recomputing.

Tokens per second and time to first token for the generative head's
decoding loop (``pipeline.generate.decode``, the one serving uses) on four
engines measured side by side, rounds interleaved, on the same records:

* ``ort``          ONNX Runtime, KV cache (the serving path);
* ``ort-nocache``  ONNX Runtime, whole sequence recomputed every step;
* ``eager``        PyTorch eager, KV cache (same modules the graphs came from);
* ``eager-nocache``PyTorch eager, recomputing.

at batch 1 and 16, 32 and 128 new tokens.  No stop token is honoured, so
every run makes exactly that many tokens.  The model is the retail fusion
model with a generative head sized by ``--n-embd/--n-layer`` (default 256
wide, 4 layers: a small GPT-2), trained for a few steps only: speed does
not depend on what it writes.

    python bench/generate.py                    # about 5 minutes on 2 cores
    python bench/generate.py --rounds 3 --n-embd 128 --n-layer 2

Writes bench/results/generate.json and bench/results/generate.png with
``"aims"``: ORT >= 2x eager tokens/s (the lowest ratio over batch sizes and
lengths) and the KV cache >= 3x recomputing at 128 new tokens (ORT, lower
of the two batch sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_flags  # noqa: E402
from exporters.generative import export_generative  # noqa: E402
from exporters.package import build_package  # noqa: E402
from pipeline.config import EngineConfig, GenerateConfig  # noqa: E402
from pipeline.generate import OrtBackend, decode, generation_variant  # noqa: E402
from pipeline.package import ModelPackage  # noqa: E402
from pipeline.preprocess import Preprocessor  # noqa: E402
from pipeline.spec import load_workload  # noqa: E402
from pipeline.tooling import sample_data  # noqa: E402
from pipeline.tooling.train import train  # noqa: E402

OUT = ROOT / "bench" / "results"
ENGINES = ("ort", "ort-nocache", "eager", "eager-nocache")


def build(work: Path, n_embd: int, n_layer: int, max_new: int) -> ModelPackage:
    """The retail model with a generative head with room for ``max_new`` tokens."""
    spec = load_workload("retail")
    assert spec.generation is not None
    spec = spec.model_copy(update={"generation": spec.generation.model_copy(
        update={"max_new_tokens": max_new, "max_prompt_tokens": 8})})
    samples = sample_data.generate("retail", 96, seed=0)
    gen = {"n_embd": n_embd, "n_layer": n_layer, "n_head": max(1, n_embd // 64)}
    train(spec, samples, work / "trained", max_steps=5, generative=True, progress=False,
          model_overrides={"generative": gen})
    pkg = build_package(work / "trained", work / "pkg")
    pkg, _ = export_generative(pkg.root, ("fp32",))
    return pkg




def run_once(backend, feeds: dict, prompts: list[list[int]], n_prefix: int, new: int, use_cache: bool
             ) -> tuple[float, float]:
    """(seconds to the first token, seconds for all) of one generation."""
    t0 = time.perf_counter()
    first = 0.0
    stops = [frozenset()] * len(prompts)
    for k, _ in enumerate(decode(backend, feeds, prompts, n_prefix, max_new_tokens=new, stop_ids=stops,
                                 pad_id=0, use_cache=use_cache)):
        if k == 0:
            first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


def bench(pkg: ModelPackage, batches: list[int], lengths: list[int], rounds: int, threads: int) -> list[dict]:
    import torch

    from pipeline.tooling.model.generative import TorchBackend
    from pipeline.tooling.torch_engine import load_model

    info = generation_variant(pkg, "fp32")
    files = {g: pkg.path(f) for g, f in info["graphs"].items()}
    # ONNX Runtime as the Generator runs it (its default generate settings); eager with ``threads``.
    # The ONNX Runtime sessions are made before PyTorch's thread setting: made after it, the same
    # sessions decoded 1.35x slower (batch 16 on 2 cores), which no serving process (no torch in
    # it) would see.
    ort = OrtBackend(files, EngineConfig(device="cpu", threads=threads), io_binding=False,
                     decoder_threads=None if GenerateConfig().decoder_threads == "auto"
                     else GenerateConfig().decoder_threads)
    torch.set_num_threads(threads)
    backends = {"ort": ort, "eager": TorchBackend(load_model(pkg.path("model/model.safetensors").parent))}
    pre = Preprocessor.for_package(pkg)
    prepared = [pre.prepare(s.record) for s in sample_data.generate("retail", max(batches), seed=5)]
    n_prefix = int(info["prefix_tokens"])
    rows = []
    for b in batches:
        feeds = pre.collate(prepared[:b])
        prompts = [[2]] * b  # [CLS]: the plain draft
        for new in lengths:
            times: dict[str, list[tuple[float, float]]] = {e: [] for e in ENGINES}
            for e in ENGINES:  # warm-up
                run_once(backends[e.split("-")[0]], feeds, prompts, n_prefix, min(new, 4), "nocache" not in e)
            for _ in range(rounds):
                for e in ENGINES:
                    times[e].append(run_once(backends[e.split("-")[0]], feeds, prompts, n_prefix, new,
                                             "nocache" not in e))
            for e in ENGINES:
                total = statistics.median(t for _, t in times[e])
                rows.append({"engine": e, "batch": b, "new_tokens": new, "seconds": total,
                             "tokens_per_s": b * new / total,
                             "first_token_ms": 1000 * statistics.median(f for f, _ in times[e])})
            print(f"batch {b:>2}, {new:>3} new tokens: " + ", ".join(
                f"{r['engine']} {r['tokens_per_s']:.0f} tok/s" for r in rows[-len(ENGINES):]), flush=True)
    return rows


def aims(rows: list[dict]) -> list[dict]:
    def tps(engine: str, b: int, new: int) -> float:
        return next(r["tokens_per_s"] for r in rows if (r["engine"], r["batch"], r["new_tokens"]) == (engine, b, new))

    keys = sorted({(r["batch"], r["new_tokens"]) for r in rows})
    ort_vs_eager = min(tps("ort", b, n) / tps("eager", b, n) for b, n in keys)
    longest = max(n for _, n in keys)
    cache = min(tps("ort", b, longest) / tps("ort-nocache", b, longest) for b, n in keys if n == longest)
    return [
        {"name": "ort_vs_eager_tokens_per_s_min", "value": round(ort_vs_eager, 2), "target": 2.0,
         "met": ort_vs_eager >= 2.0},
        {"name": f"kv_cache_vs_recompute_at_{longest}_new_tokens", "value": round(cache, 2), "target": 3.0,
         "met": cache >= 3.0},
    ]


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["batch"], r["new_tokens"]) for r in rows})
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(ENGINES)
    for i, e in enumerate(ENGINES):
        sub = {(r["batch"], r["new_tokens"]): r for r in rows if r["engine"] == e}
        x = np.arange(len(keys)) + i * width
        ax.bar(x, [sub[k]["tokens_per_s"] for k in keys], width, label=e)
        ax2.bar(x, [sub[k]["first_token_ms"] for k in keys], width, label=e)
    labels = [f"batch {b}\n{n} tokens" for b, n in keys]
    for a, title in ((ax, "tokens / s (higher is better)"), (ax2, "time to first token, ms")):
        a.set_xticks(np.arange(len(keys)) + width * (len(ENGINES) - 1) / 2, labels)
        a.set_title(title)
        a.set_yscale("log")
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--lengths", default="32,128")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        pkg = build(Path(tmp), args.n_embd, args.n_layer, max(lengths))
        rows = bench(pkg, batches, lengths, args.rounds, args.threads)
    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "cpu_flags": cpu_flags(), "threads": args.threads},
        "model": {"workload": "retail", "n_embd": args.n_embd, "n_layer": args.n_layer},
        "rows": rows, "aims": aims(rows),
    }
    (OUT / "generate.json").write_text(json.dumps(result, indent=2))
    chart(rows, OUT / "generate.png")
    for a in result["aims"]:
        print(f"aim {a['name']}: {a['value']} (target {a['target']}) {'met' if a['met'] else 'NOT met'}")
    print(f"wrote {OUT / 'generate.json'} and {OUT / 'generate.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
