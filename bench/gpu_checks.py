"""GPU checks: PyTorch eager (CUDA) vs ONNX Runtime CUDA (fp32, fp16) vs
TensorRT (fp16), on the same model and records, in one run; and the
generative head on CUDA with its key/value cache kept on the device (I/O
binding) against the CPU: identical greedy tokens, tokens per second.

Run on a GPU node with ``pip install 'mmpipe[gpu]'`` (onnxruntime-gpu with
its CUDA and TensorRT libraries).  Without a GPU it says so and exits 0
without measuring anything.

    python bench/gpu_checks.py --models small,minilm

Writes bench/results/gpu.json and bench/results/gpu.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engines import OUT, build, chart  # noqa: E402

from exporters import parity  # noqa: E402
from pipeline.config import EngineConfig  # noqa: E402
from pipeline.engines import create_engine  # noqa: E402
from pipeline.package import load_package  # noqa: E402
from pipeline.preprocess import Preprocessor  # noqa: E402
from pipeline.tooling import sample_data  # noqa: E402


def gpu_status() -> tuple[bool, str]:
    try:
        import onnxruntime as ort
        import torch
    except ImportError as exc:
        return False, f"missing package: {exc.name}"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    avail = ort.get_available_providers()
    if "CUDAExecutionProvider" not in avail:
        return False, f"onnxruntime has no CUDA provider ({', '.join(avail)}); install mmpipe[gpu]"
    return True, torch.cuda.get_device_name(0)


def generation_checks(tmp: Path, new_tokens: int = 32, rounds: int = 5) -> list[dict]:
    """The generative head's decoding loop on CUDA (cache on the device) and
    on the CPU, batch 1 and 16: tokens/s, time to first token, and whether
    CUDA chose the same greedy tokens as the CPU (fp32 both)."""
    import numpy as np
    from generate import build as build_generative
    from generate import run_once

    from pipeline.generate import OrtBackend, decode, generation_variant

    pkg = build_generative(tmp / "generative", 256, 4, new_tokens)
    info = generation_variant(pkg, "fp32")
    files = {g: pkg.path(f) for g, f in info["graphs"].items()}
    n_prefix = int(info["prefix_tokens"])
    backends = {"ort-cpu": OrtBackend(files, EngineConfig(device="cpu"), io_binding=False),
                "ort-cuda-iobinding": OrtBackend(files, EngineConfig(providers=["CUDAExecutionProvider"]),
                                                 io_binding=True)}
    pre = Preprocessor.for_package(pkg)
    prepared = [pre.prepare(s.record) for s in sample_data.generate("retail", 16, seed=5)]
    rows = []
    for b in (1, 16):
        feeds, prompts = pre.collate(prepared[:b]), [[2]] * b
        chosen = {name: np.stack([t.copy() for t, _ in decode(be, feeds, prompts, n_prefix, max_new_tokens=new_tokens,
                                                               stop_ids=[frozenset()] * b, pad_id=0)])
                  for name, be in backends.items()}
        for name, be in backends.items():
            run_once(be, feeds, prompts, n_prefix, new_tokens, True)  # warm-up
            runs = [run_once(be, feeds, prompts, n_prefix, new_tokens, True) for _ in range(rounds)]
            total = statistics.median(t for _, t in runs)
            rows.append({"engine": name, "provider": be.provider, "on_device": be.on_device, "batch": b,
                         "new_tokens": new_tokens, "tokens_per_s": b * new_tokens / total,
                         "first_token_ms": 1000 * statistics.median(f for f, _ in runs),
                         "identical_to_cpu": bool(np.array_equal(chosen[name], chosen["ort-cpu"]))})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small,minilm")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    ok, what = gpu_status()
    if not ok:
        print(f"no GPU checks run: {what}")
        return 0
    import onnxruntime as ort

    has_trt = "TensorrtExecutionProvider" in ort.get_available_providers()
    print(f"GPU: {what}; TensorRT provider: {'yes' if has_trt else 'no'}")
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            pkg_dir = build(kind, Path(tmp))
            if has_trt:
                from exporters.tensorrt import build_tensorrt

                build_tensorrt(pkg_dir, fp16=True)
            pkg = load_package(pkg_dir)
            engines = {
                "eager-cuda": create_engine(pkg, EngineConfig(kind="torch", device="cuda")),
                "ort-cuda-fp32": create_engine(pkg, EngineConfig(
                    kind="onnxruntime", variant="fp32", providers=["CUDAExecutionProvider"])),
                "ort-cuda-fp16": create_engine(pkg, EngineConfig(
                    kind="onnxruntime", variant="fp16", providers=["CUDAExecutionProvider"])),
            }
            if has_trt:
                engines["tensorrt-fp16"] = create_engine(pkg, EngineConfig(
                    kind="onnxruntime", variant="fp32", providers=["TensorrtExecutionProvider"], trt_fp16=True))
            for name, e in engines.items():
                print(f"  {name}: provider {e.provider}")
            pre = Preprocessor(pkg.spec, pkg.text_encoder())
            recs = [pre.prepare(s.record) for s in sample_data.generate("retail", max(batches), seed=9,
                                                                        missing_rate=0.0)]
            for b in batches:
                feeds = pre.collate(recs[:b])
                ref = engines["eager-cuda"].run(feeds)
                for e in engines.values():
                    for _ in range(3):
                        e.run(feeds)
                times: dict[str, list[float]] = {k: [] for k in engines}
                for _ in range(args.rounds):
                    for name, e in engines.items():
                        t = time.perf_counter()
                        e.run(feeds)
                        times[name].append(time.perf_counter() - t)
                base = statistics.median(times["eager-cuda"])
                for name, e in engines.items():
                    _, a, n = parity.compare(pkg.spec, ref, e.run(feeds), feeds.get("attention_mask"))
                    med = statistics.median(times[name])
                    rows.append({"model": kind, "engine": name, "provider": e.provider, "batch": b,
                                 "median_ms": med * 1e3, "records_per_s": b / med,
                                 "speedup_vs_eager": base / med, "agreement": a / n})
        generation = generation_checks(Path(tmp))
    (OUT / "gpu.json").write_text(json.dumps({"gpu": what, "rows": rows, "generation": generation}, indent=2))
    chart(rows, OUT / "gpu.png")
    print(f"{'model':<7} {'engine':<14} {'batch':>5} {'ms':>8} {'rec/s':>9} {'x eager':>8} {'agree':>7}")
    for r in rows:
        print(f"{r['model']:<7} {r['engine']:<14} {r['batch']:>5} {r['median_ms']:>8.2f} {r['records_per_s']:>9.0f} "
              f"{r['speedup_vs_eager']:>8.2f} {100 * r['agreement']:>6.2f}%")
    print(f"{'generation':<20} {'provider':<24} {'batch':>5} {'tok/s':>9} {'first ms':>9} {'same tokens':>12}")
    for r in generation:
        print(f"{r['engine']:<20} {r['provider']:<24} {r['batch']:>5} {r['tokens_per_s']:>9.0f} "
              f"{r['first_token_ms']:>9.1f} {'yes' if r['identical_to_cpu'] else 'NO':>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
