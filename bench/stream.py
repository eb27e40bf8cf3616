"""The stream path vs the bare Predictor, on a real Apache Kafka broker.

Throughput: N records are produced to the input topic first (a backlog),
then ``StreamConsumer`` drains it: consume -> decode -> infer -> produce
results -> commit.  The same records, as the same bytes, go through
``Predictor.predict`` in batches of the same size in the same run.  The
ratio is what the stream path costs over the model itself.

Latency: a producer sends records at a steady rate below capacity; the
end-to-end latency of each record is its result's timestamp minus its
input's timestamp (both stamped by clients on this machine).

    python bench/stream.py                                # retail demo package, 2000 records
    python bench/stream.py --package packages/retail --records 4000 --rate 50

Writes bench/results/stream.json and bench/results/stream.png.  Needs Java
and Maven (the broker's jars are fetched once, as in the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kafka import KafkaConsumer, KafkaProducer  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from pipeline.config import EngineConfig, Settings  # noqa: E402
from pipeline.engines import create_engine  # noqa: E402
from pipeline.metrics import get_metrics  # noqa: E402
from pipeline.package import load_package  # noqa: E402
from pipeline.predictor import Predictor  # noqa: E402
from pipeline.records import json_safe  # noqa: E402
from pipeline.stream.consumer import StreamConsumer  # noqa: E402
from pipeline.tooling import sample_data  # noqa: E402
from tests.integration.kafka_broker import KafkaBroker  # noqa: E402

OUT = ROOT / "bench" / "results"


def default_package() -> Path:
    demo = ROOT / "demo-out" / "packages" / "retail"
    if demo.is_dir():
        return demo
    found = sorted((Path.home() / ".cache" / "mmpipe" / "models").glob("retail-*/package"))
    if not found:
        sys.exit("no retail package: run `make demo` first or pass --package")
    return found[-1]


def records(workload: str, n: int) -> list[bytes]:
    out = []
    for i, s in enumerate(sample_data.generate(workload, n, seed=21, missing_rate=0.2)):
        rec = json_safe(s.record)
        rec["id"] = f"b-{i}"
        out.append(json.dumps(rec).encode())
    return out


def predictor(package: Path, batch: int) -> Predictor:
    pkg = load_package(package)
    eng = create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu"))
    return Predictor(pkg, eng, batch_size=batch, path="stream", metrics=get_metrics(CollectorRegistry()))


def bare(package: Path, values: list[bytes], batch: int) -> float:
    pred = predictor(package, batch)
    pred.predict(values[:batch])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(values), batch):
        pred.predict(values[i : i + batch])
    return len(values) / (time.perf_counter() - t)


def run_stream(broker: KafkaBroker, package: Path, names: tuple[str, str, str], batch: int,
               done: threading.Event | None = None) -> tuple[StreamConsumer, threading.Thread]:
    settings = Settings(model_package=package, engine={"kind": "onnxruntime", "device": "cpu"},
                        predict={"batch_size": batch},
                        stream={"bootstrap_servers": [broker.bootstrap], "group_id": f"bench-{names[0]}",
                                "input_topics": [names[0]], "output_topic": names[1], "dlq_topic": names[2],
                                "max_batch_records": batch, "max_wait_ms": 20})
    consumer = StreamConsumer(settings, predictor(package, batch))
    th = threading.Thread(target=consumer.run, daemon=True)
    th.start()
    return consumer, th


def stream_throughput(broker: KafkaBroker, package: Path, values: list[bytes], batch: int) -> float:
    names = (f"tin-{time.time_ns()}", f"tout-{time.time_ns()}", f"tdlq-{time.time_ns()}")
    broker.create_topics([names[0]], 2)
    broker.create_topics(list(names[1:]))
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    for v in values:
        p.send(names[0], v)
    p.flush()
    p.close()
    consumer, th = run_stream(broker, package, names, batch)
    consumer.ready.wait(120)
    t = time.perf_counter()
    while consumer.counts["results"] + consumer.counts["dlq"] < len(values):
        time.sleep(0.01)
    rate = len(values) / (time.perf_counter() - t)
    consumer.stop()
    th.join(60)
    return rate


def stream_latency(broker: KafkaBroker, package: Path, values: list[bytes], batch: int, rate: float,
                   seconds: float) -> list[float]:
    names = (f"lin-{time.time_ns()}", f"lout-{time.time_ns()}", f"ldlq-{time.time_ns()}")
    broker.create_topics([names[0]], 2)
    broker.create_topics(list(names[1:]))
    consumer, th = run_stream(broker, package, names, batch)
    consumer.ready.wait(120)
    n = int(rate * seconds)
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0)
    sent: dict[str, int] = {}
    start = time.perf_counter()
    for i in range(n):
        v = values[i % len(values)]
        rid = f"l-{i}"
        body = json.loads(v)
        body["id"] = rid
        ts = int(time.time() * 1000)
        sent[rid] = ts
        p.send(names[0], json.dumps(body).encode(), timestamp_ms=ts)
        delay = start + (i + 1) / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    p.flush()
    p.close()
    reader = KafkaConsumer(names[1], bootstrap_servers=broker.bootstrap, group_id=None,
                           auto_offset_reset="earliest")
    lat: dict[str, float] = {}
    deadline = time.monotonic() + 120
    while len(lat) < n and time.monotonic() < deadline:
        for msgs in reader.poll(timeout_ms=500).values():
            for m in msgs:
                rid = m.key.decode()
                if rid in sent:
                    lat.setdefault(rid, (m.timestamp - sent[rid]) / 1000)
    reader.close()
    print(f"latency run: sent {n}, results read {len(lat)}, consumer counts {dict(consumer.counts)}", flush=True)
    consumer.stop()
    th.join(60)
    # The first second includes warm-up of the model's sessions: leave it out.
    warm = int(rate)
    return [lat[f"l-{i}"] for i in range(warm, n) if f"l-{i}" in lat]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    t = data["throughput"]
    a.bar(["bare Predictor", "stream (Kafka)"], [t["bare_records_per_s"], t["stream_records_per_s"]],
          color=["#888", "#3a7"])
    a.set_ylabel("records/s")
    a.set_title(f"throughput, batch {data['batch']} ({t['ratio']:.2f}x)")
    lat = data["latency"]
    b.bar(["p50", "p90", "p99"], [lat["p50_ms"], lat["p90_ms"], lat["p99_ms"]], color="#37a")
    b.set_ylabel("ms")
    b.set_title(f"end-to-end latency at {lat['rate_per_s']:.0f} records/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", type=Path, default=None)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="throughput rounds, bare and stream interleaved")
    ap.add_argument("--rate", type=float, default=50.0, help="latency run input rate, records/s (default 50)")
    ap.add_argument("--seconds", type=float, default=15.0)
    args = ap.parse_args()
    package = args.package or default_package()
    workload = load_package(package).spec.name
    values = records(workload, args.records)
    broker = KafkaBroker(Path(tempfile.mkdtemp(prefix="mmpipe-bench-kafka-")))
    broker.start()
    try:
        bare_rates, stream_rates = [], []
        for _ in range(args.rounds):
            bare_rates.append(bare(package, values, args.batch))
            stream_rates.append(stream_throughput(broker, package, values, args.batch))
            print(f"bare {bare_rates[-1]:.0f}/s  stream {stream_rates[-1]:.0f}/s", flush=True)
        b, s = statistics.median(bare_rates), statistics.median(stream_rates)
        rate = args.rate
        lat = stream_latency(broker, package, values, args.batch, rate, args.seconds)
        if not lat:
            raise SystemExit("the latency run got no results back")
    finally:
        broker.close()
    data = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "package": load_package(package).name, "workload": workload, "records": len(values), "batch": args.batch,
        "throughput": {"bare_records_per_s": b, "stream_records_per_s": s, "ratio": s / b,
                       "rounds": {"bare": bare_rates, "stream": stream_rates}, "aim": 0.9, "met": s / b >= 0.9},
        "latency": {"rate_per_s": rate, "seconds": args.seconds, "records": len(lat),
                    "p50_ms": pct(lat, 0.5) * 1e3, "p90_ms": pct(lat, 0.9) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
                    "max_ms": max(lat) * 1e3},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "stream.json").write_text(json.dumps(data, indent=2))
    chart(data, OUT / "stream.png")
    print(json.dumps({k: data[k] for k in ("throughput", "latency")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
