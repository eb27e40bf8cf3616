"""The stream path vs the bare Predictor, on a real Apache Kafka broker.

Throughput: N records are produced to the input topic first (a backlog),
then ``StreamConsumer`` drains it: consume -> decode -> infer -> produce
results -> acknowledgement -> commit (at-least-once), or the same with
results and offsets in transactions (exactly-once).  The same records, as
the same bytes, go through the bare Predictor (``predict_batch`` and the
results' wire form, ``json_lines``) in batches of the same size, in the same
run, rounds interleaved.  The ratio is what the stream path costs over the
model itself.

Latency: a producer in a separate process sends records at half the
throughput this run measured for the mode; a record's end-to-end latency is
from its input timestamp (set by that producer) to the moment the consumer
knows its result is acknowledged (at-least-once) or committed (exactly-once).

Models: ``small`` (the demo's retail model: the path's pure overhead) and
``production`` (MiniLM + a ResNet-18-sized image tower at 224x224, built by
``bench/models.py`` and cached: what users feel).

    python bench/stream.py                                  # small and production models
    python bench/stream.py --models small --records 4000
    python bench/stream.py --crc32c python --out /tmp/s.json  # as without the C CRC32C

Writes bench/results/stream.json (``aims`` inside) and stream.png.  Needs
Java and Maven (the broker's jars are fetched once, as in the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kafka import KafkaProducer  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from bench.machine import cpu_flags  # noqa: E402
from pipeline.config import EngineConfig, Settings  # noqa: E402
from pipeline.engines import create_engine  # noqa: E402
from pipeline.metrics import get_metrics  # noqa: E402
from pipeline.package import load_package  # noqa: E402
from pipeline.predictor import Predictor  # noqa: E402
from pipeline.records import json_safe  # noqa: E402
from pipeline.stream import client  # noqa: E402
from pipeline.stream.consumer import StreamConsumer  # noqa: E402
from pipeline.stream.stages import OutMessage  # noqa: E402
from pipeline.tooling import sample_data  # noqa: E402
from tests.integration.kafka_broker import KafkaBroker  # noqa: E402

OUT = ROOT / "bench" / "results" / "stream.json"
RATIO_AIM = 0.9
P99_AIM_MS = 100.0
MODES = {"at-least-once": False, "exactly-once": True}


def use_python_crc32c() -> None:
    """What the stream did before the C CRC32C was a dependency: every batch
    checksummed by kafka-python's pure-Python CRC32C (this process only)."""
    from kafka.record import default_records, util

    util._crc32c = util.crc32c_py
    default_records.calc_crc32c = lambda memview: util.crc32c_py(memview)




def model_package(name: str, override: Path | None) -> Path:
    if override is not None:
        return override
    from bench.models import MODELS  # builds (and caches) the model on first use

    return MODELS[name]()


def records(workload: str, n: int) -> list[bytes]:
    out = []
    for i, s in enumerate(sample_data.generate(workload, n, seed=21, missing_rate=0.2)):
        rec = json_safe(s.record)
        rec["id"] = f"b-{i}"
        out.append(json.dumps(rec).encode())
    return out


ENGINE_SPIN = False  # --engine-spin; as `mmpipe stream` runs (engine.spin auto), for the bare Predictor too


def predictor(package: Path, batch: int) -> Predictor:
    pkg = load_package(package)
    eng = create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu", spin=ENGINE_SPIN))
    return Predictor(pkg, eng, batch_size=batch, path="stream", metrics=get_metrics(CollectorRegistry()))


def bare(pred: Predictor, values: list[bytes], batch: int) -> tuple[float, float]:
    """Records/s of the bare Predictor (decode, infer, the results' wire
    form), and this process's CPU milliseconds per record."""
    pred.predict_batch(values[:batch]).json_lines()  # warm-up
    t, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(values), batch):
        pred.predict_batch(values[i : i + batch]).json_lines()
    return len(values) / (time.perf_counter() - t), (time.process_time() - cpu) * 1e3 / len(values)


def new_topics(broker: KafkaBroker, *, append_time: bool = False) -> tuple[str, str, str]:
    """Input (2 partitions), output and DLQ topics; ``append_time``: the
    input's timestamps are the broker's (when a record was in Kafka)."""
    tag = uuid.uuid4().hex[:8]
    names = (f"in-{tag}", f"out-{tag}", f"dlq-{tag}")
    broker.create_topics([names[0]], 2, {"message.timestamp.type": "LogAppendTime"} if append_time else None)
    broker.create_topics(list(names[1:]))
    return names


def start_stream(broker: KafkaBroker, package: Path, names: tuple[str, str, str], batch: int,
                 exactly_once: bool, sample: list[bytes]) -> tuple[StreamConsumer, threading.Thread]:
    settings = Settings(model_package=package, engine={"kind": "onnxruntime", "device": "cpu"},
                        predict={"batch_size": batch},
                        stream={"bootstrap_servers": [broker.bootstrap], "group_id": f"bench-{names[0]}",
                                "input_topics": [names[0]], "output_topic": names[1], "dlq_topic": names[2],
                                "max_batch_records": batch, "max_wait_ms": 20, "exactly_once": exactly_once,
                                "transactional_id": f"bench-tx-{names[0]}"})
    pred = predictor(package, batch)
    pred.predict_batch(sample[:batch]).json_lines()  # warm-up, as for the bare Predictor
    consumer = StreamConsumer(settings, pred)
    th = threading.Thread(target=consumer.run, daemon=True)
    th.start()
    if not consumer.ready.wait(120):
        raise SystemExit("the stream consumer got no partitions within 120 s")
    return consumer, th


def stop(consumer: StreamConsumer, th: threading.Thread) -> None:
    consumer.stop()
    th.join(120)
    consumer.predictor.close()


def drain(broker: KafkaBroker, package: Path, values: list[bytes], batch: int, exactly_once: bool,
          ) -> tuple[float, float]:
    """Records/s draining a backlog of ``values``, and the consumer process's
    CPU milliseconds per record (every thread; the broker's JVM not counted)."""
    names = new_topics(broker)
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5, batch_size=1 << 20)
    for v in values:
        p.send(names[0], v)
    p.flush()
    p.close()
    consumer, th = start_stream(broker, package, names, batch, exactly_once, values)
    t, cpu = time.perf_counter(), time.process_time()
    while consumer.counts["results"] + consumer.counts["dlq"] < len(values):
        if not th.is_alive():
            raise SystemExit(f"the stream consumer stopped early: {dict(consumer.counts)}")
        time.sleep(0.005)
    rate, cpu_ms = len(values) / (time.perf_counter() - t), (time.process_time() - cpu) * 1e3 / len(values)
    stop(consumer, th)
    return rate, cpu_ms


def latency(broker: KafkaBroker, package: Path, values: list[bytes], batch: int, exactly_once: bool,
            rate: float, seconds: float) -> dict[str, Any]:
    """End-to-end latency at a steady ``rate`` (from a producer process),
    from the moment the broker appended a record (the input topic stamps
    LogAppendTime: a producer that lags on a loaded machine is not the
    stream's latency) to its result being acknowledged or committed."""
    names = new_topics(broker, append_time=True)
    consumer, th = start_stream(broker, package, names, batch, exactly_once, values)
    seen: list[float] = []
    stamps: list[int] = []
    finished = consumer._finished

    def timed(outs: list[OutMessage]) -> None:  # instrument, do not change: when the broker has the batch
        now = time.time()
        seen.extend(now - o.source.timestamp_ms / 1000 for o in outs if o.source.timestamp_ms)
        stamps.extend(o.source.timestamp_ms for o in outs if o.source.timestamp_ms)
        finished(outs)

    consumer._finished = timed  # type: ignore[method-assign]
    n = int(rate * seconds)
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as fh:
        fh.write(b"\n".join(values) + b"\n")
    try:
        subprocess.run([sys.executable, __file__, "--produce", broker.bootstrap, names[0], fh.name, str(rate),
                        str(n)], check=True, timeout=seconds * 4 + 60)
        deadline = time.monotonic() + 120
        while len(seen) < n and time.monotonic() < deadline and th.is_alive():
            time.sleep(0.05)
    finally:
        os.unlink(fh.name)
        stop(consumer, th)
    lat = seen[int(rate):]  # the first second includes the group's and the model's warm-up
    if not lat:
        raise SystemExit(f"the latency run got no results back ({len(seen)} of {n})")
    span_s = (max(stamps) - min(stamps)) / 1000
    return {"rate_per_s": round(rate, 1), "arrival_rate_per_s": round(len(stamps) / span_s, 1) if span_s else None,
            "seconds": seconds, "records": len(lat), "answered": len(seen), "sent": n,
            "p50_ms": pct(lat, 0.5) * 1e3, "p90_ms": pct(lat, 0.9) * 1e3,
            "p99_ms": pct(lat, 0.99) * 1e3, "max_ms": max(lat) * 1e3}


def produce_paced(bootstrap: str, topic: str, path: str, rate: float, n: int) -> None:
    """The latency run's producer (its own process: it must not share the
    consumer's interpreter lock): ``n`` records at ``rate``, each stamped."""
    values = Path(path).read_bytes().splitlines()
    # linger 5 ms: a request per few records, as producers batch in practice.  With
    # linger 0 (a request per record) this load generator took ~40% of a core on the
    # machine it shares with the stream and the broker, and that was measured as latency.
    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1)
    start = time.perf_counter()
    for i in range(n):
        p.send(topic, values[i % len(values)], timestamp_ms=int(time.time() * 1000))
        delay = start + (i + 1) / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    p.flush()
    p.close()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(broker: KafkaBroker, name: str, package: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    workload = load_package(package).spec.name
    values = records(workload, n)
    pred = predictor(package, args.batch)
    rates: dict[str, list[float]] = {"bare": [], **{m: [] for m in MODES}}
    cpu: dict[str, list[float]] = {k: [] for k in rates}
    for _ in range(args.rounds):
        runs = [("bare", bare(pred, values, args.batch)),
                *((m, drain(broker, package, values, args.batch, eos)) for m, eos in MODES.items())]
        for key, (rate, cpu_ms) in runs:
            rates[key].append(rate)
            cpu[key].append(cpu_ms)
        print(f"{name}: " + "  ".join(f"{k} {v[-1]:.0f}/s ({cpu[k][-1]:.2f} CPU ms)" for k, v in rates.items()),
              flush=True)
    pred.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    out: dict[str, Any] = {"package": load_package(package).name, "workload": workload, "records": n,
                           "bare_records_per_s": med["bare"], "bare_cpu_ms_per_record": cpu_med["bare"],
                           "rounds": rates, "cpu_ms_per_record_rounds": cpu, "modes": {}}
    for mode, eos in MODES.items():
        # cpu_ratio: bare CPU per record / stream CPU per record.  On a machine
        # shared with other work, wall-clock ratios also measure how much CPU
        # each got (a process with more busy threads gets a bigger share).
        out["modes"][mode] = {"records_per_s": med[mode], "ratio": med[mode] / med["bare"],
                              "cpu_ms_per_record": cpu_med[mode], "cpu_ratio": cpu_med["bare"] / cpu_med[mode]}
        if args.no_latency:
            continue
        lat = latency(broker, package, values, args.batch, eos, med[mode] / 2, args.seconds)
        print(f"{name} {mode}: latency at {lat['rate_per_s']:.0f}/s: p50 {lat['p50_ms']:.0f} ms, "
              f"p99 {lat['p99_ms']:.0f} ms", flush=True)
        out["modes"][mode]["latency"] = lat
    return out


def aims(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name, r in models.items():
        for mode, m in r["modes"].items():
            out.append({"name": f"{name} model, {mode}: stream / bare Predictor", "value": round(m["ratio"], 3),
                        "target": f">= {RATIO_AIM}", "met": m["ratio"] >= RATIO_AIM})
            if "cpu_ratio" in m:  # the same aim in CPU per record: what holds on a machine shared with other work
                out.append({"name": f"{name} model, {mode}: stream / bare Predictor, by CPU per record",
                            "value": round(m["cpu_ratio"], 3), "target": f">= {RATIO_AIM}",
                            "met": m["cpu_ratio"] >= RATIO_AIM})
            if "latency" not in m:
                continue
            p99 = m["latency"]["p99_ms"]
            out.append({"name": f"{name} model, {mode}: p99 end-to-end latency at half max throughput (ms)",
                        "value": round(p99, 1), "target": f"<= {P99_AIM_MS:.0f}", "met": p99 <= P99_AIM_MS})
    return out


def chart(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = data["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False)
    for (a, b), (name, r) in zip(axes, models.items(), strict=True):
        labels = ["bare Predictor", *r["modes"]]
        vals = [r["bare_records_per_s"], *(m["records_per_s"] for m in r["modes"].values())]
        a.bar(labels, vals, color=["#888", "#3a7", "#37a"])
        a.set_ylabel("records/s")
        a.set_title(f"{name} model: throughput, batch {data['batch']}")
        for i, m in enumerate(r["modes"].values(), start=1):
            a.annotate(f"{m['ratio']:.2f}x", (i, vals[i]), ha="center", va="bottom")
        x = range(len(r["modes"]))
        for k, (q, color) in enumerate((("p50_ms", "#9cf"), ("p99_ms", "#37a"))):
            b.bar([i + k * 0.4 for i in x], [m["latency"][q] for m in r["modes"].values()], width=0.4,
                  color=color, label=q.removesuffix("_ms"))
        b.axhline(P99_AIM_MS, color="#c33", linestyle="--", linewidth=1, label="p99 aim")
        b.set_xticks([i + 0.2 for i in x], list(r["modes"]))
        b.set_ylabel("ms")
        b.set_title(f"{name} model: end-to-end latency at half max throughput")
        b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--produce"]:
        bootstrap, topic, path, rate, n = argv[1:6]
        produce_paced(bootstrap, topic, path, float(rate), int(n))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small,production", help="comma-separated: small, production")
    ap.add_argument("--package", type=Path, default=None, help="use this package as the small model")
    ap.add_argument("--records", type=int, default=2000, help="records per throughput round (small model)")
    ap.add_argument("--production-records", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="throughput rounds, bare and stream interleaved")
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each latency run")
    ap.add_argument("--crc32c", choices=["auto", "python"], default="auto",
                    help="python: measure as without the C CRC32C (kafka-python's pure-Python one)")
    ap.add_argument("--no-latency", action="store_true", help="throughput only")
    ap.add_argument("--engine-spin", choices=["on", "off"], default="off",
                    help="engine.spin for the bare Predictor and the stream alike (off: as mmpipe stream runs)")
    ap.add_argument("--add", action="store_true",
                    help="keep the other models already in --out (one model per run on a busy machine)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.crc32c == "python":
        use_python_crc32c()
    global ENGINE_SPIN
    ENGINE_SPIN = args.engine_spin == "on"
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    packages = {m: model_package(m, args.package if m == "small" else None) for m in names}
    # No fsync per append (the tests' broker does one, to survive its own kill): a production
    # broker relies on replication for that, and an fsync per result would be the broker's cost.
    broker = KafkaBroker(Path(tempfile.mkdtemp(prefix="mmpipe-bench-kafka-")), flush_each_message=False)
    broker.start()
    t0 = time.monotonic()
    try:
        models = {m: measure(broker, m, packages[m], args.records if m == "small" else args.production_records,
                             args) for m in names}
    finally:
        broker.close()
    if args.add and args.out.is_file():
        models = {**json.loads(args.out.read_text()).get("models", {}), **models}
    first = models.get("small") or next(iter(models.values()))
    alo = first["modes"]["at-least-once"]
    data: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "cpu_flags": cpu_flags(), "platform": platform.platform(),
                    "python": platform.python_version(), "loadavg_at_end": os.getloadavg()},
        "kafka_python": client.kafka_python_version(), "crc32c": client.crc32c_impl(), "batch": args.batch,
        "engine_spin": ENGINE_SPIN,
        "wall_s": round(time.monotonic() - t0, 1), "models": models, "aims": aims(models),
        # The first model's at-least-once numbers, in the shape bench/report.py renders.
        "workload": first["workload"], "records": first["records"],
        "throughput": {"bare_records_per_s": first["bare_records_per_s"], "stream_records_per_s": alo["records_per_s"],
                       "ratio": alo["ratio"], "aim": RATIO_AIM, "met": alo["ratio"] >= RATIO_AIM},
        "latency": alo.get("latency"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    if not args.no_latency:
        chart(data, args.out.with_suffix(".png"))
    print(json.dumps(data["aims"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
