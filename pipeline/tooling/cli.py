"""The ``mmpipe`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pipeline import __version__
from pipeline.errors import ConfigError, PackageError
from pipeline.log import log_event, setup_logging

logger = logging.getLogger("mmpipe")

_FMT = argparse.RawDescriptionHelpFormatter


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", metavar="YAML",
        help="settings file (see README 'Configuration'); MMPIPE__SECTION__KEY env vars override it",
    )


# -- generate -------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from pipeline.spec import load_workload
    from pipeline.tooling import sample_data

    name = load_workload(args.workload).name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = sample_data.generate(name, args.records, seed=args.seed)
    sample_data.write_jsonl(samples, out / "records.jsonl", out / "labels.jsonl")
    n_broken = 0
    if args.broken:
        n_broken = _append_broken(out / "records.jsonl", name, args.seed)
    print(f"wrote {len(samples)} records (+{n_broken} broken on purpose) to {out / 'records.jsonl'}; "
          f"labels in {out / 'labels.jsonl'}")
    return 0


def _append_broken(path: Path, workload: str, seed: int) -> int:
    """Append deliberately broken records (one per line) to a records file."""
    from pipeline.records import jsonl_line
    from pipeline.tooling import sample_data

    broken = sample_data.broken_records(workload, seed)
    with path.open("ab") as fh:
        for rec, _reason in broken:
            fh.write(jsonl_line(rec) + b"\n")
    return len(broken)


# -- train --------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.spec import load_workload
    from pipeline.tooling import sample_data
    from pipeline.tooling.train import train

    spec = load_workload(args.workload)
    if args.data:
        samples = sample_data.read_samples(Path(args.data), Path(args.labels) if args.labels else None)
    else:
        samples = sample_data.generate(spec.name, args.records, seed=args.seed)
    report = train(
        spec, samples, Path(args.out), fusion=args.fusion, text_source=args.text_source,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
    )
    print(f"trained {spec.name} ({report.fusion}) on {report.train_records} records, "
          f"{report.epochs} epochs, {report.seconds:.0f}s")
    print(f"held-out macro-F1 ({report.test_records} records):")
    for head, f1 in report.f1.items():
        miss = report.f1_missing_modality.get(head)
        print(f"  {head:<14} {f1:.3f}   (one modality removed: {miss:.3f})")
    print(f"saved to {args.out}; next: mmpipe package --trained {args.out} --out PACKAGE_DIR")
    if args.min_f1 is not None and report.macro_f1 < args.min_f1:
        print(f"error: macro-F1 {report.macro_f1:.3f} is below --min-f1 {args.min_f1}", file=sys.stderr)
        return 3
    return 0


# -- package ----------------------------------------------------------------------------
def cmd_package(args: argparse.Namespace) -> int:
    if args.trained:
        from exporters.package import build_package

        pkg = build_package(args.trained, args.out, name=args.name, version=args.version, overwrite=args.overwrite)
    else:
        from exporters.onnx_export import ExportError

        try:
            pkg = _package_byo(args)
        except ExportError as exc:
            print(f"error: export refused: {exc}", file=sys.stderr)
            return 3
    m = pkg.manifest
    print(f"package {m.name} v{m.version} ({m.workload.name}) written to {pkg.root}")
    print(f"  variants: {', '.join(m.variants)}; files: {len(m.files)} (sha256 verified)")
    return 0


def _package_byo(args: argparse.Namespace):  # -> ModelPackage
    """A model brought from elsewhere (exporters/byo.py): module, HF dir or ONNX file."""
    from exporters import byo

    if not args.signature:
        raise ConfigError("--module, --hf-dir and --onnx need --signature S.yaml (see `mmpipe package --help`)")
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    common = {"name": args.name, "version": args.version, "overwrite": args.overwrite}
    if args.module:
        if not args.weights:
            raise ConfigError("--module needs --weights W.safetensors (the module's state dict)")
        return byo.package_module(args.module, args.signature, args.out, weights=args.weights,
                                  init_args=byo.parse_init_args(args.init_args), samples=args.samples,
                                  variants=variants, search_path=args.module_path or (), **common)
    if args.hf_dir:
        return byo.package_hf(args.hf_dir, args.signature, args.out, samples=args.samples, variants=variants,
                              **common)
    return byo.package_onnx(args.onnx, args.signature, args.out, **common)


# -- export -------------------------------------------------------------------------------
def _read_jsonl_records(path: str) -> list[bytes]:
    with open(path, "rb") as fh:
        return [line.rstrip(b"\r\n") for line in fh if line.strip()]


def cmd_export(args: argparse.Namespace) -> int:
    from exporters.onnx_export import ExportError, export_package

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    samples = _read_jsonl_records(args.samples) if args.samples else None
    try:
        pkg, _ = export_package(args.package, variants, static_int8=args.int8_static, sample_records=samples)
    except ExportError as exc:
        print(f"error: export refused: {exc}", file=sys.stderr)
        return 3
    print(f"package {pkg.name}: variants {', '.join(pkg.manifest.variants)} (parity report in manifest.json)")
    if args.tensorrt:
        from exporters.tensorrt import TensorRTUnavailable, build_tensorrt

        try:
            build_tensorrt(args.package, fp16=not args.tensorrt_fp32)
        except TensorRTUnavailable as exc:
            print(f"error: TensorRT engine not built: {exc}", file=sys.stderr)
            return 4
        except ExportError as exc:
            print(f"error: TensorRT export refused: {exc}", file=sys.stderr)
            return 3
        print("TensorRT engine built and cached in the package (variant 'tensorrt')")
    return 0


# -- predict -----------------------------------------------------------------------------
def _read_lines(stream: IO[bytes], chunk: int) -> Iterator[list[bytes]]:
    buf: list[bytes] = []
    for line in stream:
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        buf.append(line)
        if len(buf) >= chunk:
            yield buf
            buf = []
    if buf:
        yield buf


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.config import apply_overrides, load_settings
    from pipeline.predictor import Predictor

    settings = apply_overrides(load_settings(args.config), engine=args.engine, batch_size=args.batch_size)
    predictor = Predictor.from_settings(settings, args.package, path="cli")
    if settings.metrics.enabled and settings.metrics.port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics.port)  # scrapeable while a long run goes on
    src = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")  # noqa: SIM115
    dst = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")  # noqa: SIM115
    total = ok = 0
    errors: dict[str, int] = {}
    try:
        for lines in _read_lines(src, predictor.batch_size * 4):
            results = predictor.predict_batch(lines)
            total += results.size
            ok += results.ok_count
            for code in results.error_codes():
                errors[code] = errors.get(code, 0) + 1
            dst.write(b"".join(line + b"\n" for line in results.json_lines()))
            dst.flush()
    finally:
        if src is not sys.stdin.buffer:
            src.close()
        if dst is not sys.stdout.buffer:
            dst.close()
        predictor.close()
    print(f"{total} records in, {ok} results, {sum(errors.values())} errors"
          + (f" {errors}" if errors else ""), file=sys.stderr)
    return 0


# -- demo ---------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.tooling.demo import run_demo

    return run_demo(Path(args.out), records=args.records, retrain=args.retrain)


# -- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmpipe",
        formatter_class=_FMT,
        description="Batch, stream and online inference for multimodal fusion models.",
        epilog="""\
typical flow:
  mmpipe generate --workload retail --out data/retail --records 1000
  mmpipe train    --workload retail --out models/retail
  mmpipe package  --trained models/retail --out packages/retail
  mmpipe export   --package packages/retail
  mmpipe predict  --package packages/retail --input data/retail/records.jsonl --output results.jsonl
  mmpipe demo     # all of the above for the three built-in workloads

run `mmpipe COMMAND --help` for each command's options.""",
    )
    p.add_argument("--version", action="version", version=f"mmpipe {__version__}")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser(
        "generate", formatter_class=_FMT, help="write a learnable sample dataset for a workload",
        description="Write a deterministic sample dataset: records.jsonl (media base64-encoded) and\n"
        "labels.jsonl (ground truth per head).  The labels are carried by shapes and colours in\n"
        "images, keywords in text and tones in audio, so models can really learn them.",
        epilog="example:\n  mmpipe generate --workload medical --out data/medical --records 500 --broken",
    )
    g.add_argument("--workload", required=True, help="medical, retail or media")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--records", type=int, default=1000, help="how many records (default 1000)")
    g.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    g.add_argument("--broken", action="store_true", help="also append records broken on purpose")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser(
        "train", formatter_class=_FMT, help="train a small fusion model on CPU",
        description="Train a fusion model for a workload and save it as a trained model directory\n"
        "(safetensors weights, config, tokenizer, workload spec, held-out metrics).\n"
        "Without --data it trains on a generated sample dataset.",
        epilog="""\
examples:
  mmpipe train --workload retail --out models/retail
  mmpipe train --workload medical --fusion cross_attention --text-source minilm --out models/med
  mmpipe train --workload my_workload.yaml --data recs.jsonl --labels labels.jsonl --out models/mine""",
    )
    t.add_argument("--workload", required=True, help="medical, retail, media or a workload YAML path")
    t.add_argument("--out", required=True, help="trained model directory to write")
    t.add_argument("--data", help="records JSONL to train on (default: generated sample data)")
    t.add_argument("--labels", help="labels JSONL for --data (id, labels, spans per line)")
    t.add_argument("--records", type=int, default=1200, help="generated records (default 1200)")
    t.add_argument("--fusion", choices=["concat", "gated", "cross_attention"],
                   help="fusion strategy (default: the workload's)")
    t.add_argument("--text-source", default="builtin",
                   help="'builtin' (small BERT, WordPiece trained on the corpus), 'minilm' "
                   "(pretrained all-MiniLM-L6-v2, needs the minilm extra), or a local HF encoder dir")
    t.add_argument("--epochs", type=int, default=12)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--min-f1", type=float, default=None,
                   help="exit with code 3 if the lowest per-head macro-F1 is below this")
    t.set_defaults(func=cmd_train)

    k = sub.add_parser(
        "package", formatter_class=_FMT, help="turn a trained model (mmpipe's or your own) into a model package",
        description="Build a model package (manifest.json with signature, labels, thresholds,\n"
        "preprocessing and a sha256 per file) from a trained model directory, or bring your own\n"
        "model: a PyTorch module of yours (--module), a Hugging Face checkpoint directory\n"
        "(--hf-dir) or an ONNX file exported elsewhere (--onnx), each with a signature file\n"
        "(--signature) naming every input (modality, dtype, shape, preprocessing) and output\n"
        "(head type, labels, thresholds).  Modules and checkpoints are exported to ONNX with a\n"
        "parity check against your PyTorch model (exit 3 when it fails); ONNX files are checked\n"
        "against the signature.  The package is written atomically and verified after writing.",
        epilog="""\
examples:
  # a model trained with `mmpipe train`
  mmpipe package --trained models/retail --out packages/retail --version 2026.11.1

  # 1. your own PyTorch module: import path, constructor arguments, safetensors weights
  mmpipe package --module shop_model:ShopTagger --module-path examples/byo \\
      --init-args @byo-work/init_args.json --weights byo-work/weights.safetensors \\
      --signature byo-work/signature.yaml --samples byo-work/records.jsonl --out packages/shop
  mmpipe package --module mypkg.models:build_tagger --init-args '{"width": 128}' \\
      --weights tagger.safetensors --signature tagger.yaml --samples recs.jsonl \\
      --variants fp32,int8 --out packages/tagger

  # 2. a Hugging Face checkpoint directory (local files only; class from its config.json)
  mmpipe package --hf-dir checkpoints/clip-shop --signature clip-shop.yaml \\
      --samples recs.jsonl --out packages/clip-shop

  # 3. an ONNX file exported elsewhere
  mmpipe package --onnx exported/tagger.onnx --signature tagger.yaml --out packages/tagger

signature file (YAML; paths relative to it):
  workload: shop                # the records' "workload" field
  name: shop-tagger             # package name (default WORKLOAD-model)
  inputs:                       # the model's own tensor names
    - {name: token_ids, modality: text, feature: input_ids, dtype: int64, shape: [batch, sequence],
       preprocessing: {tokenizer: tokenizer, max_length: 32}}
    - {name: token_mask, modality: text, feature: attention_mask, dtype: int64,
       shape: [batch, sequence]}
    - {name: image, modality: image, dtype: float32, shape: [batch, 3, 64, 64],
       preprocessing: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}
  outputs:
    - {name: category, type: multiclass, labels: [apparel, electronics, grocery], top_k: 2}
    - {name: attributes, type: multilabel, labels: [red, blue, on_sale], threshold: 0.5}

  modality: text (feature input_ids | attention_mask | token_type_ids), image, audio
  (log-mel; preprocessing sample_rate, max_seconds, n_mels), tabular (fields, mean, std),
  presence ([batch, modalities] mask of what each record has).  Hugging Face dual encoders
  (CLIP-style) score records against label prompts: an output with prompts: [...], one per
  label.  Other HF classes: the output field named by from: (default logits).

your module's forward takes the inputs as keyword arguments and returns a tensor, a tuple
in output order, or a dict by output name.  The current directory is importable; add
others with --module-path.""",
    )
    src = k.add_mutually_exclusive_group(required=True)
    src.add_argument("--trained", help="directory written by `mmpipe train`")
    src.add_argument("--module", metavar="PKG.MOD:NAME",
                     help="your nn.Module class, or a function returning one")
    src.add_argument("--hf-dir", metavar="DIR", help="a Hugging Face checkpoint directory (save_pretrained)")
    src.add_argument("--onnx", metavar="FILE", help="an ONNX model exported elsewhere")
    k.add_argument("--signature", metavar="S.yaml", help="inputs and outputs of --module/--hf-dir/--onnx")
    k.add_argument("--init-args", metavar="JSON|@FILE", help="--module: constructor keyword arguments")
    k.add_argument("--weights", metavar="W.safetensors", help="--module: the state dict")
    k.add_argument("--module-path", metavar="DIR", action="append",
                   help="--module: a directory to import from (repeatable; the current one always is)")
    k.add_argument("--samples", metavar="JSONL",
                   help="--module/--hf-dir: records of the signature's workload for the parity check (>= 8)")
    k.add_argument("--variants", default="fp32",
                   help="--module/--hf-dir: ONNX variants, subset of fp32,fp16,int8 (default fp32)")
    k.add_argument("--out", required=True, help="package directory to create")
    k.add_argument("--name", help="model name (default: WORKLOAD-fusion)")
    k.add_argument("--version", default="1", help="model version string (default 1)")
    k.add_argument("--overwrite", action="store_true", help="replace an existing package atomically")
    k.set_defaults(func=cmd_package)

    e = sub.add_parser(
        "export", formatter_class=_FMT, help="export a package's model to ONNX (fp32, fp16, int8) and TensorRT",
        description="Export the PyTorch model of a package to ONNX (opset 17, dynamic batch and sequence\n"
        "axes, every head a named output), optimize it offline, derive fp16 and int8 variants, and\n"
        "prove each one computes the same function: random inputs and real sample records, with\n"
        "and without missing modalities, several batch sizes and sequence lengths.  A variant that\n"
        "misses its tolerance fails the export (exit 3) and the package is left unchanged.\n"
        "The parity report is printed and stored in manifest.json.",
        epilog="""\
examples:
  mmpipe export --package packages/retail
  mmpipe export --package packages/retail --variants fp32,int8 --int8-static
  mmpipe export --package packages/mine --samples my_records.jsonl
  mmpipe export --package packages/retail --tensorrt      # on a GPU node with onnxruntime-gpu

tolerances: fp32 |dlogit|<=1e-3 everywhere; fp16 |dprob|<=0.02 and int8 |dprob|<=0.15 on the
sample records, both with label agreement >= 99%.""",
    )
    e.add_argument("--package", required=True, help="model package directory (from `mmpipe package`)")
    e.add_argument("--variants", default="fp32,fp16,int8",
                   help="comma-separated subset of fp32,fp16,int8 (default all; fp32 is always built)")
    e.add_argument("--int8-static", action="store_true",
                   help="static int8 (QDQ) calibrated on the sample records instead of dynamic")
    e.add_argument("--samples", help="records JSONL for parity and calibration (default: built-in sample data)")
    e.add_argument("--tensorrt", action="store_true", help="also build a TensorRT engine (GPU nodes)")
    e.add_argument("--tensorrt-fp32", action="store_true", help="TensorRT in fp32 instead of fp16")
    e.set_defaults(func=cmd_export)

    from exporters.triton_repo import add_parser as add_triton_repo

    add_triton_repo(sub)
    from deploy.serve.cli import add_parser as add_serve

    add_serve(sub)
    from pipeline.tooling.verify import add_parser as add_verify

    add_verify(sub)
    from pipeline.batch.cli import add_parser as add_batch

    add_batch(sub)
    from pipeline.stream.cli import add_parser as add_stream

    add_stream(sub)

    r = sub.add_parser(
        "predict", formatter_class=_FMT, help="JSONL records in, JSONL results out",
        description="Run a model package on a JSONL file of records.  Each input line is one record:\n"
        '  {"id": "r1", "workload": "retail", "text": "...", "image": "<base64 or file:///path>"}\n'
        "Each output line is a result with labels and scores, or an error with a reason code;\n"
        "a bad line never stops the run.  A summary goes to stderr.",
        epilog="""\
examples:
  mmpipe predict --package packages/retail --input records.jsonl --output results.jsonl
  cat records.jsonl | mmpipe predict --package packages/retail > results.jsonl""",
    )
    _add_config(r)
    r.add_argument("--package", help="model package directory (or model_package in the config)")
    r.add_argument("--input", "-i", default="-", help="records JSONL, '-' for stdin (default)")
    r.add_argument("--output", "-o", default="-", help="results JSONL, '-' for stdout (default)")
    r.add_argument("--engine", choices=["auto", "torch", "onnxruntime", "triton"],
                   help="override engine.kind (default auto: onnxruntime if the package has ONNX variants)")
    r.add_argument("--batch-size", type=int, help="override predict.batch_size")
    r.set_defaults(func=cmd_predict)

    d = sub.add_parser(
        "demo", formatter_class=_FMT, help="the main job on built-in sample data (no services needed)",
        description="Generate sample data for medical, retail and media, train (or reuse cached)\n"
        "small models, package and export them to ONNX, then run the batch job (`mmpipe batch`:\n"
        "Ray Data on a local Ray) on the sample records (some broken on purpose): Parquet results\n"
        "and errors under OUT/tags, a summary table (counts, errors by reason, stage times, label\n"
        "counts, F1 against the sample's truth) and a label-count chart OUT/label_counts.png.",
    )
    d.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    d.add_argument("--records", type=int, default=300, help="sample records per workload to tag")
    d.add_argument("--retrain", action="store_true", help="ignore cached models")
    d.set_defaults(func=cmd_demo)
    return p


def _dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints every thread's stack to stderr and the
    process goes on: how to see where a stuck consumer, job or server is
    waiting without restarting it (stacks hold code locations, no data)."""
    import contextlib
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        # Not when stderr is no real file (mmpipe's main() called in-process).
        with contextlib.suppress(OSError, ValueError, AttributeError):
            faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    setup_logging(args.log_level)
    _dump_stacks_on_sigusr1()
    try:
        return int(args.func(args) or 0)
    except (ConfigError, PackageError, FileNotFoundError, ValueError) as exc:
        log_event(logger, logging.ERROR, "command_failed", command=args.command, exc_type=type(exc).__name__)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
