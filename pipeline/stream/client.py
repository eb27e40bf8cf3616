"""kafka-python client settings from :class:`~pipeline.config.StreamConfig`.

One place turns the config into client keyword arguments, so the consumer,
the producer and any tool share the same security settings.  Secrets are
unwrapped here, at the last moment, and only into the client's arguments:
they are never logged (``describe`` gives a loggable summary without them).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from pipeline.config import StreamConfig


def security_kwargs(cfg: StreamConfig) -> dict[str, Any]:
    """SSL / SASL arguments common to consumer, producer and admin clients."""
    out: dict[str, Any] = {"security_protocol": cfg.security_protocol}
    if cfg.security_protocol.startswith("SASL"):
        if cfg.sasl_mechanism is None:
            raise ValueError(f"stream.security_protocol {cfg.security_protocol} needs stream.sasl_mechanism")
        if not cfg.sasl_username or cfg.sasl_password is None:
            raise ValueError("SASL needs stream.sasl_username and stream.sasl_password "
                             "(set the password from the environment: MMPIPE__STREAM__SASL_PASSWORD)")
        out.update(
            sasl_mechanism=cfg.sasl_mechanism,
            sasl_plain_username=cfg.sasl_username,
            sasl_plain_password=cfg.sasl_password.get_secret_value(),
        )
    if cfg.security_protocol.endswith("SSL"):
        out["ssl_check_hostname"] = cfg.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(cfg, name)
            if value is not None:
                if not os.path.isfile(value):
                    raise ValueError(f"stream.{name} does not exist: {value}")
                out[name] = str(value)
        if cfg.ssl_password is not None:
            out["ssl_password"] = cfg.ssl_password.get_secret_value()
    return out


def client_id(cfg: StreamConfig) -> str:
    return cfg.client_id or f"mmpipe-{socket.gethostname()}-{os.getpid()}"


def transactional_id(cfg: StreamConfig) -> str:
    """Stable per instance: a restarted instance reuses it, which fences the
    dead predecessor and aborts its open transaction at once instead of
    leaving read_committed readers blocked until the transaction times out."""
    return cfg.transactional_id or f"mmpipe-{cfg.group_id}-{socket.gethostname()}"


def consumer_kwargs(cfg: StreamConfig) -> dict[str, Any]:
    hb = max(cfg.session_timeout_ms // 3, 100)
    return {
        "bootstrap_servers": cfg.bootstrap_servers,
        "group_id": cfg.group_id,
        "client_id": client_id(cfg),
        "enable_auto_commit": False,  # offsets are committed only after results are acknowledged
        "auto_offset_reset": cfg.auto_offset_reset,
        "max_poll_records": max(cfg.max_batch_records, min(cfg.max_in_flight, 4 * cfg.max_batch_records)),
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": hb,
        "max_poll_interval_ms": cfg.max_poll_interval_ms,
        "isolation_level": "read_committed" if cfg.exactly_once else "read_uncommitted",
        "bootstrap_timeout_ms": cfg.connect_timeout_ms,
        "fetch_max_wait_ms": cfg.fetch_max_wait_ms,
        "fetch_min_bytes": cfg.fetch_min_bytes,
        "max_partition_fetch_bytes": cfg.max_partition_fetch_bytes,
        **security_kwargs(cfg),
    }


def producer_kwargs(cfg: StreamConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": client_id(cfg),
        "acks": "all",
        "enable_idempotence": True,  # broker-side retries never duplicate within a session
        "linger_ms": cfg.linger_ms,
        "batch_size": cfg.producer_batch_bytes,
        "delivery_timeout_ms": cfg.delivery_timeout_ms,
        "request_timeout_ms": min(30_000, cfg.delivery_timeout_ms),
        "bootstrap_timeout_ms": cfg.connect_timeout_ms,
        "max_request_size": 64 * 2**20,  # a dead letter carries its input's bytes; the topic's limit decides
        **security_kwargs(cfg),
    }
    if cfg.exactly_once:
        out["transactional_id"] = transactional_id(cfg)
        out["transaction_timeout_ms"] = cfg.transaction_timeout_ms
    return out


def crc32c_impl() -> str:
    """Which CRC32C kafka-python checks every fetched batch (and stamps
    every produced one) with: ``"c"`` when the ``crc32c`` package is
    importable, else ``"python"`` (about 9 MB/s: a backlog of large records
    spends most of its time there)."""
    from kafka.record import util

    return "python" if getattr(util, "_crc32c", util.crc32c_py) is util.crc32c_py else "c"


def kafka_python_version() -> str:
    import kafka

    return str(getattr(kafka, "__version__", "unknown"))


def describe(cfg: StreamConfig) -> dict[str, Any]:
    """A loggable summary of the connection: no secrets, no file contents."""
    return {
        "bootstrap_servers": ",".join(cfg.bootstrap_servers), "group_id": cfg.group_id,
        "input_topics": ",".join(cfg.input_topics), "output_topic": cfg.output_topic, "dlq_topic": cfg.dlq_topic,
        "security_protocol": cfg.security_protocol, "sasl_mechanism": cfg.sasl_mechanism,
        "exactly_once": cfg.exactly_once,
    }
