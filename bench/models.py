"""The two models every path benchmark measures, built by the benchmarks themselves and cached.

* **small**: the demo's retail model (tiny towers, 64x64 images): a path's
  pure overhead, since the engine costs almost nothing;
* **production**: what users feel: the pretrained all-MiniLM-L6-v2 text
  tower and a ResNet-18-sized image tower (stages 64/128/256/512, two blocks
  each) at 224x224, trained briefly on the retail sample data and exported
  to ONNX fp32.

Both are cached under ``~/.cache/mmpipe/models`` keyed by mmpipe's code
digest, so a benchmark run builds each at most once per code version.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRODUCTION_IMAGE = {"size": 224, "hidden_sizes": [64, 128, 256, 512], "depths": [2, 2, 2, 2]}
PRODUCTION_TEXT_LENGTH = 64


def small_package() -> Path:
    """The demo's trained retail package (built and cached like ``make demo``)."""
    from pipeline.spec import load_workload
    from pipeline.tooling.demo import cached_package

    return cached_package(load_workload("retail"))[0]


def production_spec():  # -> WorkloadSpec
    """The retail workload at production input sizes (224x224 images, 64 tokens)."""
    from pipeline.spec import load_workload

    spec = load_workload("retail").model_copy(deep=True)
    assert spec.preprocessing.image is not None and spec.preprocessing.text is not None
    spec.preprocessing.image.size = PRODUCTION_IMAGE["size"]
    spec.preprocessing.text.max_length = PRODUCTION_TEXT_LENGTH
    return spec


def production_package(steps: int = 8) -> Path:
    """MiniLM + ResNet-18-sized image tower at 224x224, trained ``steps``
    steps (its speed, not its accuracy, is what the benchmarks need; parity
    is still checked by the export), exported to ONNX fp32."""
    from exporters.onnx_export import export_package
    from exporters.package import build_package
    from pipeline.tooling import sample_data
    from pipeline.tooling.demo import _code_digest, cache_root
    from pipeline.tooling.train import train

    target = cache_root() / "models" / f"retail-production-{_code_digest()}"
    if (target / "package" / "manifest.json").is_file():
        return target / "package"
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    samples = sample_data.generate("retail", 160, seed=0)
    train(production_spec(), samples, tmp / "trained", text_source="minilm", max_steps=steps, batch_size=16,
          lr=1e-3, progress=False, model_overrides={"image": dict(PRODUCTION_IMAGE)})
    build_package(tmp / "trained", tmp / "package", version="bench")
    export_package(tmp / "package", ("fp32",))
    try:
        tmp.rename(target)
    except OSError:  # another process built it first (same code, same seed)
        shutil.rmtree(tmp, ignore_errors=True)
    return target / "package"


MODELS = {"small": small_package, "production": production_package}
