"""Cross-path parity: one set of records, every configured path, one answer.

A record must get the same labels, and scores within the tolerance of the
model variant, whichever way it travels: the PyTorch reference, ONNX Runtime
(fp32 / fp16 / int8), Ray Serve over HTTP (the friendly ``/v1`` API and the
Open Inference Protocol), Triton over gRPC, the Ray Data batch job or the
Kafka stream.  Each path is a function from raw records to results keyed by
record id; the comparison is path x path, so a difference is located, not
just detected.

Paths that serve the same numbers (every fp32 path) are held to the fp32
tolerance: identical labels and scores within 1e-4.  A reduced-precision
variant is held to its own tolerance (the one its export's parity gate used)
against any other path.

With a generative head (``--generate`` or ``generate.enabled``), the
generated text is compared too, pair by pair: in-process generation, the
batch job's and the stream's ``generated`` field, and Ray Serve's
``/v1/{workload}/generate``.  Greedy fp32 decoding must give identical text
(or the same reason code) for every record.  The text itself is record
content: the report holds counts, never text.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from exporters.parity import TOLERANCES, Tolerance
from pipeline.config import EngineConfig, Settings
from pipeline.engines import create_engine, resolve_kind
from pipeline.package import ModelPackage
from pipeline.predictor import Predictor, _guess_id
from pipeline.records import ErrorInfo, GeneratedText, Result, record_bytes

Runner = Callable[[Sequence[Any]], list[Result]]


@dataclass
class PathSpec:
    """A way for records to travel.  ``variant`` names the numbers it serves
    (fp32, fp16 or int8), which sets its tolerance."""

    name: str
    variant: str
    run: Runner


@dataclass
class PathRun:
    name: str
    variant: str
    results: dict[str, Result] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class Cell:
    """Path ``a`` against path ``b`` over the records both answered."""

    compared: int
    label_agreement: float
    max_score_diff: float
    missing: int
    error_mismatch: int
    passed: bool


def _labels(res: Result) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, head in (res.heads or {}).items():
        if head.spans is not None:
            out[name] = tuple((s.start, s.end, s.label) for s in head.spans)
        elif head.type == "multiclass":
            out[name] = head.labels[0].label if head.labels else None
        else:
            out[name] = tuple(sorted(x.label for x in head.labels))
    return out


def _max_diff(a: Result, b: Result) -> float:
    worst = 0.0
    for name, ha in (a.heads or {}).items():
        hb = (b.heads or {}).get(name)
        if hb is None:
            return float("inf")
        for lab, s in ha.scores.items():
            worst = max(worst, abs(s - hb.scores.get(lab, float("inf"))))
    return worst


def tolerance(variant_a: str, variant_b: str) -> Tolerance:
    """The looser of two variants' tolerances: fp32 against int8 is judged
    as int8 is."""
    order = ["fp32", "fp16", "int8"]
    return TOLERANCES[max(variant_a, variant_b, key=order.index)]


def compare(a: PathRun, b: PathRun) -> Cell:
    """Compare two runs record by record.  A record one path rejected and
    the other answered is an error mismatch; one a path did not return at
    all is missing (a loss)."""
    tol = tolerance(a.variant, b.variant)
    agree = compared = missing = mismatched = 0
    worst = 0.0
    for rid in a.results.keys() | b.results.keys():
        ra, rb = a.results.get(rid), b.results.get(rid)
        if ra is None or rb is None:
            missing += 1
            continue
        if ra.ok != rb.ok or (not ra.ok and ra.error and rb.error and ra.error.code != rb.error.code):
            mismatched += 1
            continue
        if not ra.ok:
            continue
        compared += 1
        agree += _labels(ra) == _labels(rb)
        worst = max(worst, _max_diff(ra, rb))
    agreement = agree / compared if compared else 1.0
    ok = missing == 0 and mismatched == 0 and agreement >= tol.agreement and worst <= tol.prob_abs
    return Cell(compared, agreement, worst, missing, mismatched, ok)


def run_paths(paths: Sequence[PathSpec], records: Sequence[Any]) -> list[PathRun]:
    """Run every path over the same records.  A path that fails as a whole
    (its server is down, say) is reported with its error, not raised, so the
    matrix still shows the others."""
    runs = []
    for p in paths:
        run = PathRun(p.name, p.variant)
        t0 = time.perf_counter()
        try:
            for res in p.run(records):
                run.results[res.id] = res
        except Exception as exc:  # reported in the matrix
            run.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        run.seconds = time.perf_counter() - t0
        runs.append(run)
    return runs


def merge_runs(groups: Sequence[Sequence[PathRun]]) -> list[PathRun]:
    """One run per path over several packages (say one per workload): the
    matrix then covers every record of every package.  A path that failed
    for one package is failed as a whole, since its cells would only cover
    part of the records."""
    merged: dict[str, PathRun] = {}
    for runs in groups:
        for r in runs:
            m = merged.setdefault(r.name, PathRun(r.name, r.variant))
            if m.variant != r.variant:
                raise ValueError(f"path {r.name} serves {m.variant} for one package and {r.variant} for another")
            m.results.update(r.results)
            m.error = m.error or r.error
            m.seconds += r.seconds
    return list(merged.values())


def id_problems(records: Sequence[Any]) -> tuple[int, int]:
    """(records without an id, records whose id another record has).  Paths
    are compared record by record through the id, so such records are
    compared as one: the warning says how many."""
    ids = [_guess_id(r) for r in records]
    counts = Counter(i for i in ids if i is not None)
    return sum(i is None for i in ids), sum(c for c in counts.values() if c > 1)


def report(runs: Sequence[PathRun]) -> dict[str, Any]:
    """Everything ``mmpipe verify`` prints and writes: per path its counts,
    and per pair of paths the cell."""
    ok_runs = [r for r in runs if r.error is None]
    cells = {f"{a.name} | {b.name}": asdict(compare(a, b))
             for i, a in enumerate(ok_runs) for b in ok_runs[i + 1:]}
    return {
        "paths": {r.name: {"variant": r.variant, "results": len(r.results),
                           "errors": sum(not x.ok for x in r.results.values()), "failed": r.error,
                           "seconds": round(r.seconds, 3)}
                  for r in runs},
        "pairs": cells,
        "passed": all(r.error is None for r in runs) and all(c["passed"] for c in cells.values()),
    }


def format_matrix(runs: Sequence[PathRun]) -> str:
    """The path x path table: max score difference / label agreement."""
    ok_runs = [r for r in runs if r.error is None]
    names = [r.name for r in ok_runs]
    width = max([len(n) for n in names] + [10])
    lines = ["max |score diff| / label agreement (PASS unless marked)", " " * width + " | " +
             " | ".join(n.rjust(17) for n in names)]
    for a in ok_runs:
        cells = []
        for b in ok_runs:
            if a is b:
                cells.append("-".rjust(17))
                continue
            c = compare(a, b)
            mark = "" if c.passed else "!"
            text = f"{c.max_score_diff:.1e}/{c.label_agreement:.1%}{mark}"
            if c.missing or c.error_mismatch:
                text = f"LOST {c.missing} ERR {c.error_mismatch}"
            cells.append(text.rjust(17))
        lines.append(a.name.ljust(width) + " | " + " | ".join(cells))
    for r in runs:
        if r.error is not None:
            lines.append(f"{r.name}: FAILED: {r.error}")
    return "\n".join(lines)


# --- generated text ----------------------------------------------------------


@dataclass
class GenCell:
    """Generated text of path ``a`` against path ``b``, record by record."""

    compared: int
    text_agreement: float
    missing: int
    passed: bool


def _outcome(res: Result) -> tuple[str, str | None] | None:
    """What a path generated for a record: its text, or the reason code it
    gave instead (the record's, or the generation's own); None when the
    path wrote no generated field for an answered record."""
    if res.error is not None:
        return ("error", res.error.code)
    if res.generated is None:
        return None
    if res.generated.error is not None:
        return ("error", res.generated.error.code)
    return ("text", res.generated.text)


def compare_generated(a: PathRun, b: PathRun) -> GenCell:
    """Text agreement of two runs.  A record one path did not answer, or
    answered without generated text, is missing; every other record counts
    as agreeing only when both wrote the same text (or the same reason code).
    fp32 paths must agree on every record; a reduced-precision variant to
    its tolerance's agreement."""
    compared = agree = missing = 0
    for rid in a.results.keys() | b.results.keys():
        ra, rb = a.results.get(rid), b.results.get(rid)
        oa = _outcome(ra) if ra is not None else None
        ob = _outcome(rb) if rb is not None else None
        if oa is None or ob is None:
            missing += 1
            continue
        compared += 1
        agree += oa == ob
    agreement = agree / compared if compared else 1.0
    need = 1.0 if a.variant == b.variant == "fp32" else tolerance(a.variant, b.variant).agreement
    return GenCell(compared, agreement, missing, missing == 0 and agreement >= need)


def generation_report(runs: Sequence[PathRun]) -> dict[str, Any]:
    """Per path its counts, per pair of paths the :class:`GenCell`; counts only (text is record content)."""
    ok_runs = [r for r in runs if r.error is None]
    cells = {f"{a.name} | {b.name}": asdict(compare_generated(a, b))
             for i, a in enumerate(ok_runs) for b in ok_runs[i + 1:]}
    outcomes = {r.name: [_outcome(x) for x in r.results.values()] for r in runs}
    return {
        "paths": {r.name: {"variant": r.variant, "texts": sum(1 for o in outcomes[r.name] if o and o[0] == "text"),
                           "errors": sum(1 for o in outcomes[r.name] if o and o[0] == "error"),
                           "failed": r.error} for r in runs},
        "pairs": cells,
        "passed": all(r.error is None for r in runs) and all(c["passed"] for c in cells.values()),
    }


def format_generation(runs: Sequence[PathRun]) -> str:
    """The path x path table of generated-text agreement."""
    ok_runs = [r for r in runs if r.error is None]
    width = max([len(r.name) for r in ok_runs] + [10])
    lines = ["generated text agreement (PASS unless marked)",
             " " * width + " | " + " | ".join(r.name.rjust(17) for r in ok_runs)]
    for a in ok_runs:
        cells = []
        for b in ok_runs:
            if a is b:
                cells.append("-".rjust(17))
                continue
            c = compare_generated(a, b)
            text = f"{c.text_agreement:.1%}{'' if c.passed else '!'}"
            cells.append((f"LOST {c.missing}" if c.missing else text).rjust(17))
        lines.append(a.name.ljust(width) + " | " + " | ".join(cells))
    lines += [f"{r.name}: FAILED: {r.error}" for r in runs if r.error is not None]
    return "\n".join(lines)


def generation_settings(settings: Settings) -> Settings:
    """Settings for paths that generate: ``generate.enabled`` on, the
    variant pinned (``auto`` could pick fp16 on a GPU node only)."""
    gen = settings.generate
    variant = "fp32" if gen.variant == "auto" else gen.variant
    return settings.model_copy(update={"generate": gen.model_copy(update={"enabled": True, "variant": variant})})


def generate_path(package: ModelPackage, settings: Settings) -> PathSpec:
    """In-process generation (:class:`~pipeline.generate.Generator` on ONNX
    Runtime): the reference the other paths' text is held to."""
    from pipeline.generate import Generator

    cfg = generation_settings(settings)

    def run(records: Sequence[Any]) -> list[Result]:
        gen = Generator(package, cfg.engine, cfg.generate, cfg.limits)
        # A record rejected before its id was read is named as the other paths name it.
        return [Result(id=g.id or _guess_id(raw) or "", workload=package.spec.name, model=g.model,
                       model_version=g.model_version, error=g.error,
                       generated=None if g.error else GeneratedText(text=g.text, finish_reason=g.finish_reason))
                for raw, g in zip(records, gen.generate(list(records)), strict=True)]

    return PathSpec("generate", cfg.generate.variant, run)


def serve_generate_path(url: str, workload: str, timeout_s: float = 60.0, chunk: int = 32) -> PathSpec:
    """Ray Serve's ``POST /v1/{workload}/generate`` (non-streaming): records
    in batches (``{"records": [...]}``), each answer's ``text`` and
    ``finish_reason`` (or ``error``) read back.  Records that are not JSON
    cannot travel in a batch and are left out here (the tag comparison sends
    them alone)."""
    endpoint = f"{url.rstrip('/')}/v1/{workload}/generate"

    def result(r: dict[str, Any]) -> Result:
        err = r.get("error")
        return Result(id=str(r.get("id", "")), workload=workload, model=str(r.get("model", "")),
                      model_version=str(r.get("model_version", "")),
                      error=ErrorInfo(code=str(err.get("code")), message=str(err.get("message"))) if err else None,
                      generated=None if err else GeneratedText(text=r.get("text"),
                                                               finish_reason=r.get("finish_reason")))

    def run(records: Sequence[Any]) -> list[Result]:
        out: list[Result] = []
        docs: list[Any] = []
        for raw in records:
            wire = record_bytes(raw)
            try:
                docs.append(json.loads(wire.decode("utf-8")))
                continue
            except ValueError:  # not JSON: alone, as the whole body; its rejection is its answer
                status, doc = _post_json(endpoint, wire, timeout_s)
            if not (400 <= status < 500 and isinstance(doc, dict) and isinstance(doc.get("error"), dict)):
                raise RuntimeError(f"{endpoint} answered {status} to a record that is not JSON")
            out.append(result({"id": _guess_id(wire) or "", "error": doc["error"]}))
        for i in range(0, len(docs), chunk):
            status, doc = _post_json(endpoint, json.dumps({"records": docs[i:i + chunk]}).encode(), timeout_s)
            if status != 200:
                raise RuntimeError(f"{endpoint} answered {status} to a batch of {len(docs[i:i + chunk])}")
            out.extend(result(r) for r in doc["results"])
        return out

    return PathSpec("serve-generate", "fp32", run)


# --- path runners -----------------------------------------------------------


def predictor_path(name: str, variant: str, package: ModelPackage, engine: EngineConfig,
                   settings: Settings, batch_size: int = 32) -> PathSpec:
    """A path through an in-process Predictor (torch, ONNX Runtime, or a
    Triton / Ray Serve server through the Open Inference Protocol)."""

    def run(records: Sequence[Any]) -> list[Result]:
        pred = Predictor(package, create_engine(package, engine), limits=settings.limits, media=settings.media,
                         batch_size=batch_size, path="verify")
        try:
            return pred.predict(records)
        finally:
            pred.close()

    return PathSpec(name, variant, run)


def _post_json(endpoint: str, body: bytes, timeout_s: float) -> tuple[int, Any]:
    """POST ``body``; the status and the JSON answer (a 4xx's too)."""
    req = urllib.request.Request(endpoint, data=body, headers={"Content-Type": "application/json",
                                                               "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            raise RuntimeError(f"{endpoint} answered {exc.code}: {text[:200]!r}") from None


def serve_v1_path(url: str, workload: str, timeout_s: float = 60.0, chunk: int = 32) -> PathSpec:
    """Ray Serve's friendly endpoint, ``POST /v1/{workload}/predict``.

    Records go in batches (``{"records": [...]}``).  Bytes that are not JSON
    cannot travel inside a batch: such a record is sent alone as the whole
    body, and the server's rejection (a 4xx with a reason code) is that
    record's answer, as a client would see it."""
    endpoint = f"{url.rstrip('/')}/v1/{workload}/predict"

    def post(body: bytes) -> tuple[int, Any]:
        return _post_json(endpoint, body, timeout_s)

    def run(records: Sequence[Any]) -> list[Result]:
        out: list[Result] = []
        pending: list[Any] = []

        def flush() -> None:
            if not pending:
                return
            status, doc = post(json.dumps({"records": pending}).encode())
            if status != 200:
                raise RuntimeError(f"{endpoint} answered {status} to a batch of {len(pending)}: {doc}")
            out.extend(Result.model_validate(r) for r in doc["results"])
            pending.clear()

        for raw in records:
            wire = record_bytes(raw)
            try:
                pending.append(json.loads(wire.decode("utf-8")))
                alone = False
            except ValueError:  # not JSON (or not UTF-8): alone, as the whole body
                alone = True
            if alone:
                status, doc = post(wire)
                err = doc.get("error") if isinstance(doc, dict) else None
                if status == 200:
                    out.append(Result.model_validate(doc))
                elif 400 <= status < 500 and isinstance(err, dict):
                    out.append(Result(id=_guess_id(wire) or "", workload=workload, model="", model_version="",
                                      error=ErrorInfo(code=str(err.get("code")), message=str(err.get("message")))))
                else:
                    raise RuntimeError(f"{endpoint} answered {status}: {doc}")
            if len(pending) >= chunk:
                flush()
        flush()
        return out

    return PathSpec("serve-v1", "fp32", run)


def _pinned(settings: Settings, package: ModelPackage) -> tuple[Settings, str]:
    """Settings for a path that builds its own engine (batch actors, a
    stream consumer), with the engine pinned to known numbers, and the
    variant those are.  ``auto`` becomes ONNX Runtime fp32 (PyTorch without
    an ONNX export): on a GPU ``auto`` could pick fp16, which the fp32
    tolerance would then judge.  An explicit variant is kept and judged as
    that variant."""
    eng = settings.engine
    kind = resolve_kind(package, eng.kind)
    variant = eng.variant if kind == "onnxruntime" and eng.variant != "auto" else "fp32"
    update: dict[str, Any] = {"kind": kind}
    if kind == "onnxruntime":
        update["variant"] = variant
    return settings.model_copy(update={"engine": eng.model_copy(update=update)}), variant


def batch_path(package: ModelPackage, settings: Settings, *, workdir: str | Path | None = None) -> PathSpec:
    """The Ray Data batch job (``mmpipe batch``): the records written to a
    JSONL file, the job run on a local Ray (or the cluster ``RAY_ADDRESS``
    names, or the Ray already initialised in this process), its published
    Parquet results and error rows read back.  Everything lives in a
    temporary directory (under ``workdir`` if given; on a remote cluster it
    must be a path the workers see) removed afterwards."""
    pinned, variant = _pinned(settings, package)
    pinned = pinned.model_copy(update={"batch": pinned.batch.model_copy(update={"progress": False})})

    def run(records: Sequence[Any]) -> list[Result]:
        from pipeline.batch import JobOptions, run_batch
        from pipeline.batch.output import read_as_results

        tmp = Path(tempfile.mkdtemp(prefix="mmpipe-verify-batch-", dir=workdir))
        try:
            src = tmp / "records.jsonl"
            with src.open("wb") as fh:
                for i, raw in enumerate(records):
                    line = record_bytes(raw)
                    if b"\n" in line:
                        raise ValueError(f"record {i} holds a raw newline: it cannot be one JSONL line")
                    fh.write(line + b"\n")
            run_batch(pinned, JobOptions(input=str(src), output=str(tmp / "out"), package=str(package.root),
                                         progress=False))
            return read_as_results(tmp / "out")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return PathSpec("batch", variant, run)


def stream_path(package: ModelPackage, settings: Settings, *, external: bool = False,
                timeout_s: float = 300.0) -> PathSpec:
    """The Kafka stream (``mmpipe stream``).  Connection, topics and security
    come from ``settings.stream`` (so SASL/SSL secrets come from the
    environment as for the stream itself).  Each record is produced to the
    first input topic keyed by its id; answers are read from the output
    topic and the dead-letter topic (a dead letter becomes an error result
    with its reason code) from their ends as they were before producing.

    By default a :class:`~pipeline.stream.consumer.StreamConsumer`, the code
    ``mmpipe stream`` runs, handles them in this process in a consumer
    group of its own whose offsets start at the input's end, so only these
    records are processed.  ``external``: a ``mmpipe stream`` already
    running on those topics handles them (its engine settings are its own:
    the path is judged as this config's variant)."""
    cfg = settings.stream
    missing = [n for n in ("input_topics", "output_topic", "dlq_topic") if not getattr(cfg, n)]
    if missing:
        raise ValueError(f"the Kafka path needs {', '.join('stream.' + m for m in missing)}")
    pinned, variant = _pinned(settings, package)

    def run(records: Sequence[Any]) -> list[Result]:
        from kafka import KafkaConsumer, KafkaProducer

        from pipeline.stream import client
        from pipeline.stream.stages import result_of_message

        assert cfg.output_topic is not None and cfg.dlq_topic is not None
        topic = cfg.input_topics[0]
        conn = {"bootstrap_servers": cfg.bootstrap_servers, "client_id": client.client_id(cfg),
                **client.security_kwargs(cfg)}

        reader = KafkaConsumer(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                               isolation_level="read_committed" if cfg.exactly_once else "read_uncommitted", **conn)
        stop: Callable[[], None] = lambda: None  # noqa: E731
        worker: threading.Thread | None = None
        failure: list[BaseException] = []
        try:
            tps = _partitions(reader, cfg.output_topic) + _partitions(reader, cfg.dlq_topic)
            reader.assign(tps)
            reader.seek_to_end(*tps)
            for tp in tps:
                reader.position(tp)  # resolve the end now, before anything is produced
            if not external:
                stop, worker = _start_consumer(pinned, package, conn, topic, failure)
            producer = KafkaProducer(**client.producer_kwargs(cfg.model_copy(update={"exactly_once": False})))
            want: set[str] = set()
            try:
                for raw in records:
                    rid = _guess_id(raw) or ""
                    want.add(rid)
                    producer.send(topic, key=rid.encode(), value=record_bytes(raw))
                producer.flush()
            finally:
                producer.close()
            got: dict[str, Result] = {}
            deadline = time.monotonic() + timeout_s
            while want - got.keys() and time.monotonic() < deadline and not failure:
                for msgs in reader.poll(timeout_ms=500).values():
                    for m in msgs:
                        res = result_of_message(m.key, m.value, m.headers, dead_letter=m.topic == cfg.dlq_topic)
                        if res.id in want:
                            got.setdefault(res.id, res)  # a redelivered duplicate says the same
            if failure:
                raise failure[0]
            return list(got.values())  # a record never answered is reported missing (a loss)
        finally:
            stop()
            if worker is not None:
                worker.join(120)
            reader.close()

    return PathSpec("stream", variant, run)


def _partitions(consumer: Any, topic: str) -> list[Any]:
    from kafka import TopicPartition

    parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise RuntimeError(f"topic {topic!r} does not exist (create it; auto-creation is not relied on)")
    return [TopicPartition(topic, p) for p in sorted(parts)]


def _start_consumer(settings: Settings, package: ModelPackage, conn: dict[str, Any], topic: str,
                    failure: list[BaseException]) -> tuple[Callable[[], None], threading.Thread]:
    """A StreamConsumer in a thread, in a fresh group whose committed
    offsets are the input topic's current end (so it reads only what is
    produced next, whatever the topic held before)."""
    from kafka import KafkaConsumer, OffsetAndMetadata

    from pipeline.stream.consumer import StreamConsumer

    group = f"mmpipe-verify-{uuid.uuid4().hex[:12]}"
    setter = KafkaConsumer(group_id=group, enable_auto_commit=False, **conn)
    try:
        tps = _partitions(setter, topic)
        setter.assign(tps)
        setter.seek_to_end(*tps)
        setter.commit({tp: OffsetAndMetadata(setter.position(tp), "", -1) for tp in tps})
    finally:
        setter.close()
    # The configured transactional_id belongs to the running members: reusing
    # it would fence them.  None gives this group's own (mmpipe-GROUP-HOST).
    local = settings.model_copy(update={"stream": settings.stream.model_copy(
        update={"group_id": group, "input_topics": [topic], "transactional_id": None})})
    predictor = Predictor.from_settings(local, str(package.root), path="stream")
    consumer = StreamConsumer(local, predictor)

    def target() -> None:
        try:
            consumer.run()
        except BaseException as exc:  # reported by the path, the matrix shows it
            failure.append(exc)
        finally:
            predictor.close()

    th = threading.Thread(target=target, name="mmpipe-verify-stream", daemon=True)
    th.start()
    return consumer.stop, th


def package_paths(package: ModelPackage, settings: Settings, *, torch: bool = True) -> list[PathSpec]:
    """The in-process paths a package offers: PyTorch (when it carries
    weights and torch is installed) and each ONNX variant it holds."""
    paths: list[PathSpec] = []
    base = settings.engine
    if torch and "torch" in package.manifest.variants:
        try:
            import torch as _torch  # noqa: F401
        except ImportError:
            pass
        else:
            cfg = base.model_copy(update={"kind": "torch", "device": "cpu"})
            paths.append(predictor_path("torch", "fp32", package, cfg, settings))
    for variant in ("fp32", "fp16", "int8"):
        if f"onnx-{variant}" in package.manifest.variants:
            cfg = base.model_copy(update={"kind": "onnxruntime", "variant": variant})
            paths.append(predictor_path(f"onnx-{variant}", variant, package, cfg, settings))
    return paths


def oip_path(name: str, package: ModelPackage, settings: Settings, url: str, protocol: str,
             model: str | None = None) -> PathSpec:
    """A server that speaks the Open Inference Protocol (Triton, or Ray
    Serve's ``/v2``), fed tensors by the Predictor's Triton engine."""
    cfg = settings.engine.model_copy(update={
        "kind": "triton", "triton_url": url, "triton_protocol": protocol, "triton_model": model})
    return predictor_path(name, "fp32", package, cfg, settings)


# --- mmpipe verify ------------------------------------------------------------


def _records(path: str | None, package: ModelPackage, n: int) -> list[Any]:
    if path:
        with open(path, "rb") as f:
            return [line for line in f.read().splitlines() if line.strip()]
    from pipeline.spec import BUILTIN_WORKLOADS
    from pipeline.tooling import sample_data

    if package.spec.name not in BUILTIN_WORKLOADS:
        raise SystemExit(f"package {package.name} is for workload {package.spec.name!r}, which has no built-in "
                         "sample data: pass --records FILE.jsonl with records of your own")
    # Missing modalities on purpose: the presence masks must agree too.
    return [s.record for s in sample_data.generate(package.spec.name, n, seed=11, missing_rate=0.3)]


def _generating(args: Any, settings: Settings, package: ModelPackage) -> bool:
    """Whether generated text is compared too: asked for (``--generate`` or
    ``generate.enabled``) and the package carries an exported head; asked
    for without one is an error."""
    if not (getattr(args, "generate", False) or settings.generate.enabled):
        return False
    if not any(v.startswith("generate-") for v in package.manifest.variants):
        raise SystemExit(f"error: --generate / generate.enabled, but package {package.name} has no exported "
                         "generative head (train with --generative, then mmpipe export)")
    return True


def cmd_verify(args: Any) -> int:
    from pipeline.config import load_settings
    from pipeline.package import load_package

    settings = load_settings(args.config)
    package = load_package(args.package)
    records = _records(args.records, package, args.n)
    no_id, shared = id_problems(records)
    if no_id or shared:
        print(f"warning: {no_id} records have no id and {shared} share one with another record; paths are "
              "compared by record id, so those are compared as one")
    paths = package_paths(package, settings, torch=not args.no_torch)
    generating = _generating(args, settings, package)
    gen_paths = [generate_path(package, settings)] if generating else []
    if generating:  # the batch job and the stream write their text beside their tags
        settings = generation_settings(settings)
    if args.serve_url:
        host = args.serve_url.split("://", 1)[-1].rstrip("/")
        paths.append(serve_v1_path(args.serve_url, package.spec.name, timeout_s=args.timeout))
        paths.append(oip_path("serve-v2", package, settings, host, "http", args.serve_model or package.name))
        if generating:
            gen_paths.append(serve_generate_path(args.serve_url, package.spec.name, timeout_s=args.timeout))
    if args.triton_url:
        paths.append(oip_path("triton-grpc", package, settings, args.triton_url, "grpc",
                              args.triton_model or package.name))
    if args.batch:
        paths.append(batch_path(package, settings))
    if args.kafka is not None:
        update: dict[str, Any] = {}
        if args.kafka:
            update["bootstrap_servers"] = [x.strip() for x in args.kafka.split(",") if x.strip()]
        if args.kafka_input:
            update["input_topics"] = [args.kafka_input]
        if args.kafka_output:
            update["output_topic"] = args.kafka_output
        if args.kafka_dlq:
            update["dlq_topic"] = args.kafka_dlq
        stream_settings = settings.model_copy(update={"stream": settings.stream.model_copy(update=update)})
        try:
            paths.append(stream_path(package, stream_settings, external=args.kafka_external,
                                     timeout_s=args.timeout))
        except ValueError as exc:
            raise SystemExit(f"error: {exc} (--kafka-input / --kafka-output / --kafka-dlq, or the config)") from None
    if len(paths) < 2:
        raise SystemExit("fewer than two paths to compare: export the package to ONNX "
                         "(mmpipe export) or name a server or path (--serve-url, --triton-url, --batch, --kafka)")
    runs = run_paths(paths, records)
    print(format_matrix(runs))
    rep = report(runs)
    if generating:
        gen_runs = run_paths(gen_paths, records) + [r for r in runs if r.name in ("batch", "stream")]
        print(format_generation(gen_runs))
        if len(gen_runs) < 2:
            print("generation: only in-process ran; add --batch, --kafka or --serve-url to compare its text")
        rep["generation"] = generation_report(gen_runs)
        rep["passed"] = rep["passed"] and rep["generation"]["passed"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)
    print(f"{len(records)} records, {len(runs)} paths: {'PASS' if rep['passed'] else 'FAIL'}")
    return 0 if rep["passed"] else 3


def add_parser(sub: Any) -> None:
    import argparse

    v = sub.add_parser(
        "verify", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="check that every path gives the same answers for a package",
        description="Send one set of records through every configured path and compare the\n"
        "answers path by path: labels must be identical and scores within the\n"
        "tolerance of the variant (fp32 1e-4; fp16 0.02 and int8 0.15 with 99% label\n"
        "agreement); a record one path rejects must be rejected by every path with the\n"
        "same reason code, and a record a path never answers counts as lost.\n"
        "\n"
        "Always checked, in this process: PyTorch (if the package has weights and torch\n"
        "is installed) and every exported ONNX variant.  Checked when asked:\n"
        "  --serve-url    a running Ray Serve app: /v1/{workload}/predict and the Open\n"
        "                 Inference Protocol (/v2, fed tensors like a Triton client)\n"
        "  --triton-url   a Triton server over gRPC\n"
        "  --batch        the Ray Data batch job (mmpipe batch) on a local Ray, or on the\n"
        "                 cluster RAY_ADDRESS names; results read back from its Parquet\n"
        "  --kafka        the Kafka stream: records produced to the input topic keyed by\n"
        "                 id, answers read from the output and dead-letter topics; a\n"
        "                 stream consumer (what mmpipe stream runs) is started here in a\n"
        "                 group of its own, or with --kafka-external a running mmpipe\n"
        "                 stream answers.  Brokers, topics and SASL/SSL come from the\n"
        "                 config's stream: section and MMPIPE__STREAM__* variables; the\n"
        "                 flags override brokers and topics.  The topics must exist.\n"
        "  --generate     also compare generated text (a package with a generative head):\n"
        "                 in-process generation against the batch job's and the stream's\n"
        "                 generated field and Serve's /v1/{workload}/generate (with the\n"
        "                 flags above); greedy fp32 text must be identical for every record\n"
        "Records are matched across paths by id: give each record its own.  Prints a\n"
        "path x path matrix of the largest score difference and the label agreement\n"
        "(and, with --generate, of the generated-text agreement; never the text).",
        epilog="""\
examples:
  mmpipe verify packages/retail
  mmpipe verify packages/retail --records my-records.jsonl --json verify.json
  mmpipe verify packages/retail --serve-url http://localhost:8000 --triton-url localhost:8001
  mmpipe verify packages/retail --batch                                # local Ray
  RAY_ADDRESS=ray://head:10001 mmpipe verify packages/retail --batch   # a cluster
  mmpipe verify packages/retail --kafka localhost:9092 --kafka-input retail-records \\
      --kafka-output retail-results --kafka-dlq retail-dlq
  mmpipe verify packages/retail -c stream.yaml --kafka --kafka-external   # a running mmpipe stream
  mmpipe verify packages/medical --generate --batch -c stream.yaml --kafka   # generated text too
  mmpipe verify packages/retail --no-torch --batch --kafka localhost:9092 -c stream.yaml \\
      --serve-url http://localhost:8000 --triton-url localhost:8001 --triton-model retail-fusion_cpu

exit codes: 0 every pair agrees; 3 a pair disagrees or a path failed (the matrix says
which); 2 bad arguments.""",
    )
    v.add_argument("package", help="model package directory")
    v.add_argument("--config", "-c", metavar="YAML",
                   help="settings file (limits, media, engine options; stream: for --kafka, batch: for --batch)")
    v.add_argument("--records", help="records JSONL (default: built-in sample records of the package's workload)")
    v.add_argument("-n", type=int, default=64, help="sample records to generate when --records is not given")
    v.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    v.add_argument("--serve-url", help="a running mmpipe Ray Serve app, e.g. http://localhost:8000")
    v.add_argument("--serve-model", help="the model's name there (default: the package name)")
    v.add_argument("--triton-url", help="a Triton gRPC endpoint, e.g. localhost:8001")
    v.add_argument("--triton-model", help="the model's name in Triton (default: the package name; NAME_cpu on "
                   "CPU servers without the onnxruntime backend)")
    v.add_argument("--batch", action="store_true",
                   help="run the Ray Data batch job on the records (local Ray, or the cluster RAY_ADDRESS names)")
    v.add_argument("--kafka", nargs="?", const="", metavar="HOST:PORT[,...]",
                   help="send the records through Kafka; brokers default to stream.bootstrap_servers")
    v.add_argument("--kafka-input", metavar="TOPIC", help="input topic (default: the first of stream.input_topics)")
    v.add_argument("--kafka-output", metavar="TOPIC", help="results topic (default: stream.output_topic)")
    v.add_argument("--kafka-dlq", metavar="TOPIC", help="dead-letter topic (default: stream.dlq_topic)")
    v.add_argument("--kafka-external", action="store_true",
                   help="a running mmpipe stream consumes the input topic: start no consumer here")
    v.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for a server's or the stream's answers (default 300)")
    v.add_argument("--generate", action="store_true",
                   help="also compare generated text across paths (the package needs a generative head; "
                   "generate.enabled in the config does the same)")
    v.add_argument("--json", help="write the report as JSON here")
    v.set_defaults(func=cmd_verify)
