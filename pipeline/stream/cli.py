"""``mmpipe stream``: run one Kafka consumer-group member until signalled."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from pipeline.log import log_event

logger = logging.getLogger("mmpipe")

EPILOG = """\
examples:
  mmpipe stream --config stream.yaml
  MMPIPE__STREAM__SASL_PASSWORD=... mmpipe stream --config stream.yaml   # secrets from the environment
  mmpipe stream --config stream.yaml --exactly-once                       # transactional results + offsets
  mmpipe stream --config stream.yaml --exit-when-idle 30                  # drain a backlog, then exit

stream.yaml (see README 'Streaming on Kafka' for every key):
  model_package: packages/retail
  engine: {kind: onnxruntime}
  metrics: {port: 9108}
  stream:
    bootstrap_servers: [kafka-0:9092]
    group_id: retail-tagger
    input_topics: [retail-records]
    output_topic: retail-results
    dlq_topic: retail-dlq
    max_batch_records: 32
    max_wait_ms: 50

messages:
  input    value = one record (JSON, see README 'Records and results'); key and headers are free
  output   key = record id, value = result JSON; headers mmpipe-model, mmpipe-model-version,
           mmpipe-source-topic, mmpipe-source-partition, mmpipe-source-offset
  DLQ      the input's key and original bytes; headers mmpipe-reason (reason code),
           mmpipe-error (what was wrong, never content) and the same source headers

delivery: at-least-once by default (offsets committed after the broker acknowledged the results);
--exactly-once writes results and offsets in one transaction (read outputs with read_committed).
Start more members with the same group_id to share the partitions.

signals: SIGTERM/SIGINT finish the in-flight batch, produce, commit and leave the group;
a second signal stops at once, leaving in-flight work uncommitted (it is re-delivered).

exit codes: 0 stopped cleanly; 1 fatal Kafka or delivery error (nothing unacknowledged was
committed: restart and it resumes); 2 bad config or package."""


def cmd_stream(args: argparse.Namespace) -> int:
    from pipeline.config import load_settings
    from pipeline.errors import PackageError
    from pipeline.predictor import Predictor
    from pipeline.stream.consumer import StreamConsumer, StreamError

    settings = load_settings(args.config)
    cfg = settings.stream
    if args.engine:
        settings.engine.kind = args.engine
    if args.exactly_once:
        cfg.exactly_once = True
    if args.group_id:
        cfg.group_id = args.group_id
    if settings.engine.spin == "auto":
        # The decode thread, kafka-python's IO threads and the main loop share
        # the cores with the engine: its workers spin-waiting between calls
        # took CPU they needed (bench/stream.py, engine.spin).
        settings.engine.spin = False
    # kafka-python's DEBUG output can echo client configuration: keep it at INFO or above.
    kafka_log = logging.getLogger("kafka")
    kafka_log.setLevel(max(logging.getLogger().getEffectiveLevel(), logging.WARNING))
    predictor = Predictor.from_settings(settings, args.package, path="stream")
    try:
        consumer = StreamConsumer(settings, predictor, exit_when_idle_s=args.exit_when_idle)
    except (ValueError, PackageError) as exc:  # PackageError: generate.enabled without a generative head
        predictor.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.metrics.enabled and settings.metrics.port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics.port, registry=predictor.metrics.registry)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if consumer.stopping:
            log_event(logger, logging.WARNING, "stream_signal_again", signal=signum)
            consumer.abandon()
        else:
            log_event(logger, logging.INFO, "stream_signal", signal=signum)
            consumer.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        code = consumer.run()
    except StreamError as exc:
        log_event(logger, logging.ERROR, "stream_failed", exc_type=type(exc.__cause__ or exc).__name__)
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except ValueError as exc:  # security settings that cannot work (missing password, missing file)
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    finally:
        predictor.close()
    c = consumer.counts
    reasons = {k[4:]: v for k, v in sorted(c.items()) if k.startswith("dlq:")}
    print(f"stream: {c['in']} records in, {c['results']} results, {c['dlq']} to the DLQ"
          + (f" {reasons}" if reasons else ""), file=sys.stderr)
    return code


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "stream", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="Kafka consumer: tag records as they arrive, results to a topic",
        description="Join a Kafka consumer group, read records from the input topics, micro-batch them\n"
        "(stream.max_batch_records / stream.max_wait_ms), run the model package on them and\n"
        "produce each result to the output topic keyed by record id.  A record that cannot be\n"
        "parsed or decoded, or breaks a limit, goes to the dead-letter topic with its original bytes\n"
        "and a reason code; the stream goes on.  Runs until SIGTERM/SIGINT.",
        epilog=EPILOG,
    )
    s.add_argument("--config", "-c", metavar="YAML", required=True,
                   help="settings file with a stream: section; MMPIPE__STREAM__KEY env vars override it")
    s.add_argument("--package", help="model package directory (default: model_package in the config)")
    s.add_argument("--engine", choices=["auto", "onnxruntime", "triton", "torch"],
                   help="override engine.kind (onnxruntime, or triton to feed a Triton fleet)")
    s.add_argument("--group-id", help="override stream.group_id")
    s.add_argument("--exactly-once", action="store_true", help="override stream.exactly_once to true")
    s.add_argument("--exit-when-idle", type=float, metavar="SECONDS",
                   help="exit cleanly once no record arrived for this long and nothing is in flight")
    s.set_defaults(func=cmd_stream)
