"""Train the example ShopTagger for a few steps and save what
``mmpipe package --module`` takes.

    python examples/byo/train.py --out byo-work

writes to ``byo-work/``: ``weights.safetensors`` (the state dict),
``init_args.json`` (the constructor's arguments), ``tokenizer/tokenizer.json``,
``signature.yaml`` (a copy of the one beside this script) and
``records.jsonl`` (shop records with base64 media, to package against and to
predict on).  Training reuses mmpipe's preprocessing, built from the
signature file, so the model sees in training exactly what it will be fed in
production.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from shop_model import ShopTagger  # noqa: E402

from pipeline.preprocess import Preprocessor  # noqa: E402
from pipeline.signature import load_signature  # noqa: E402
from pipeline.tokenizer import TextEncoder, train_wordpiece  # noqa: E402
from pipeline.tooling import sample_data  # noqa: E402


def shop_records(n: int, seed: int) -> list[tuple[dict, dict]]:
    """Retail sample records as a "shop" catalogue: text + photo only."""
    out = []
    for s in sample_data.generate("retail", n, seed=seed):
        rec = {k: v for k, v in s.record.items() if k != "tabular"}
        rec["workload"] = "shop"
        if rec.get("text") or rec.get("image"):
            out.append((rec, s.labels))
    return out


def to_jsonl(records: list[dict], path: Path) -> None:
    with path.open("w") as fh:
        for r in records:
            fh.write(json.dumps({k: base64.b64encode(v).decode() if isinstance(v, bytes) else v
                                 for k, v in r.items()}) + "\n")


def train(out: Path, records: int = 480, epochs: int = 3, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    shutil.copyfile(HERE / "signature.yaml", out / "signature.yaml")
    data = shop_records(records, seed)
    texts = [r["text"] for r, _ in data if r.get("text")]
    sig = load_signature(out / "signature.yaml")  # before the tokenizer exists: only its path is read here
    spec = sig.workload_spec()
    assert spec.preprocessing.text is not None
    encoder = TextEncoder(train_wordpiece(texts, vocab_size=1000), spec.preprocessing.text.max_length)
    encoder.save(out / "tokenizer")

    init_args = {"vocab_size": encoder.vocab_size, "n_categories": len(spec.heads[0].labels),
                 "n_attributes": len(spec.heads[1].labels), "max_length": spec.preprocessing.text.max_length}
    model = ShopTagger(**init_args)
    # mmpipe's Preprocessor, fed the signature: batches come keyed by the model's own input names.
    pre = Preprocessor(spec, encoder, inputs=sig.signature().inputs)
    prepared = [pre.prepare(r) for r, _ in data]
    cats, attrs = spec.heads[0].labels, spec.heads[1].labels
    y_cat = torch.tensor([cats.index(lab["category"]) for _, lab in data])
    y_attr = torch.tensor([[1.0 if a in lab["attributes"] else 0.0 for a in attrs] for _, lab in data])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(prepared))
        total = 0.0
        for start in range(0, len(order), 32):
            idx = order[start:start + 32]
            feeds = {k: torch.from_numpy(v) for k, v in pre.collate([prepared[i] for i in idx]).items()}
            logits = model(**feeds)
            loss = (torch.nn.functional.cross_entropy(logits["category"], y_cat[idx])
                    + torch.nn.functional.binary_cross_entropy_with_logits(logits["attributes"], y_attr[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(order):.3f}")
    save_file(model.state_dict(), str(out / "weights.safetensors"))
    (out / "init_args.json").write_text(json.dumps(init_args, indent=2) + "\n")
    to_jsonl([r for r, _ in shop_records(64, seed + 1)], out / "records.jsonl")
    print(f"saved weights, init args, tokenizer, signature and records to {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="byo-work", help="output directory (default byo-work)")
    ap.add_argument("--records", type=int, default=480, help="training records (default 480)")
    ap.add_argument("--epochs", type=int, default=3, help="passes over them (default 3)")
    args = ap.parse_args()
    train(Path(args.out), args.records, args.epochs)


if __name__ == "__main__":
    main()
