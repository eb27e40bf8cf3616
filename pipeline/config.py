"""One typed configuration shared by every path.

Read from a YAML file, then overridden by environment variables of the form
``MMPIPE__SECTION__KEY=value`` (double underscores separate levels; values
are parsed as YAML scalars, so ``MMPIPE__ENGINE__THREADS=2`` is an int).
Environment overrides exist because Kubernetes injects settings that way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from pipeline.errors import ConfigError

ENV_PREFIX = "MMPIPE__"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(_Strict):
    """Hard limits, checked *before* any decode so a hostile input cannot make
    a worker allocate unbounded memory (decompression bombs, huge audio)."""

    max_text_chars: int = Field(20_000, gt=0)
    max_image_bytes: int = Field(20 * 2**20, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)
    max_audio_bytes: int = Field(20 * 2**20, gt=0)
    max_audio_seconds: float = Field(120.0, gt=0)
    max_video_bytes: int = Field(200 * 2**20, gt=0)
    max_video_seconds: float = Field(3600.0, gt=0)
    max_tabular_fields: int = Field(256, gt=0)
    max_record_bytes: int = Field(64 * 2**20, gt=0)
    max_batch_records: int = Field(512, gt=0)
    max_request_bytes: int = Field(100 * 2**20, gt=0)
    # Not a size but what a record may carry: a field of a modality the model
    # does not take (audio for a text + image model) rejects the record, or
    # is dropped undecoded and counted (mmpipe_ignored_modalities_total).
    extra_modalities: Literal["reject", "ignore"] = Field(
        "reject", description="a record with a modality the model does not take: reject it "
        "(modality_not_supported) or ignore that field")

    def merged(self, override: Limits | None) -> Limits:
        """Fields explicitly set in ``override`` win over this object's."""
        if override is None:
            return self
        data = self.model_dump()
        data.update({k: getattr(override, k) for k in override.model_fields_set})
        return Limits(**data)


class MediaConfig(_Strict):
    """Where media referenced by URI may come from.

    Online callers must not be able to make the server read its own files, so
    URIs are off unless a scheme is listed; ``file`` URIs are additionally
    confined below ``uri_root`` when it is set.
    """

    allowed_uri_schemes: list[str] = Field(default_factory=lambda: ["file"])
    uri_root: Path | None = None


class EngineConfig(_Strict):
    """Which engine runs the model, and how.

    ``variant`` picks the package's ONNX variant for ``onnxruntime``
    (``auto``: fp16 when a GPU provider is active, else fp32)."""

    kind: Literal["auto", "torch", "onnxruntime", "triton"] = Field(
        "auto", description="auto: onnxruntime when the package has ONNX variants, else torch"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="intra-op threads; 0 = library default")
    spin: Literal["auto"] | bool = Field(
        "auto", description="onnxruntime: intra-op workers spin-wait for the next run (lowest latency per call), "
        "or sleep at once (false), leaving the cores to the threads that decode and move records between runs. "
        "auto: false for the stream consumer (its decode and Kafka threads share the cores with the engine: "
        "0.67-0.74x -> 0.78-0.84x the bare Predictor on 2 cores), true elsewhere")
    variant: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    providers: list[str] | None = Field(
        None, description="onnxruntime providers in order; default TensorRT, CUDA, CPU"
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    trt_cache_dir: Path | None = Field(None, description="TensorRT engine cache (default: PACKAGE/tensorrt)")
    trt_fp16: bool = True
    triton_url: str | None = Field(None, description="host:port; default localhost:8001 (grpc) / :8000 (http)")
    triton_model: str | None = Field(None, description="default: the package name; NAME_cpu on python-only servers")
    triton_model_version: str = ""
    triton_protocol: Literal["grpc", "http"] = "grpc"
    triton_timeout_s: float = Field(10.0, gt=0)
    triton_retries: int = Field(3, ge=0)
    triton_backoff_s: float = Field(0.2, ge=0)


class PredictConfig(_Strict):
    batch_size: int = Field(32, gt=0)


class MetricsConfig(_Strict):
    enabled: bool = True
    port: int | None = Field(None, description="serve /metrics on this port (CLI/stream)")


class BatchConfig(_Strict):
    """The Ray Data batch job (``mmpipe batch``).

    Decode runs in CPU tasks and inference in an actor pool, so the two scale
    separately: decode is CPU-bound and embarrassingly parallel, while each
    actor holds one loaded model (and its GPU share) for the whole job."""

    batch_size: int = Field(32, gt=0, description="records per engine call in an inference actor")
    decode_in: Literal["auto", "actor", "tasks"] = Field(
        "auto", description="where records are decoded: 'actor' (each inference actor reads, decodes, infers and "
        "writes whole shards: no decoded tensors cross processes), 'tasks' (separate CPU tasks feed the actors: "
        "for GPU actors, which should not wait on decoding); auto: tasks when num_gpus > 0, else actor")
    concurrency: int | None = Field(
        None, gt=0, description="inference actors (the minimum when max_concurrency is set); default: with "
        "decode_in actor, as many as the cluster's CPUs hold (CPUs / actor_num_cpus), else 1")
    max_concurrency: int | None = Field(
        None, gt=0, description="autoscale the actor pool between concurrency and this many actors"
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per inference actor (fractions share a GPU)")
    actor_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per inference actor")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per decode task")
    decode_threads: int | None = Field(
        None, gt=0, description="media-decoding threads inside a decode task (default: its whole CPUs, at least 1; "
        "decode parallelism comes from concurrent tasks, which the GIL does not serialise)")
    decode_memory_mb: int = Field(256, gt=0, description="memory reserved per decode task (Ray scheduling), MiB")
    shard_bytes: int = Field(
        4 * 2**20, gt=0,
        description="JSONL inputs are split into byte ranges of about this size: the unit of work and of --resume",
    )
    shard_rows: int = Field(256, gt=0, description="Parquet rows / media files per shard")
    ray_num_cpus: int | None = Field(
        None, gt=0, description="CPUs of the local Ray started when RAY_ADDRESS is unset (default: all)"
    )
    pushgateway_url: str | None = Field(None, description="push job metrics here at the end (host:port or URL)")
    pushgateway_job: str = Field("mmpipe-batch", min_length=1, description="Pushgateway job label")
    filesystem: dict[str, Any] = Field(
        default_factory=dict,
        description="options for the input's pyarrow filesystem, e.g. {region: eu-west-1, endpoint_override: ...}",
    )
    progress: bool = Field(True, description="show a progress bar when stderr is a terminal")
    output_filesystem: dict[str, Any] | None = Field(
        None,
        description="options for the output's pyarrow filesystem (and the Delta commit), e.g. {endpoint_override: "
        "127.0.0.1:9000, scheme: http, access_key: ..., secret_key: ...}; default: the input's options",
    )

    def decode_mode(self) -> str:
        """``decode_in`` resolved: 'actor' or 'tasks'."""
        if self.decode_in != "auto":
            return self.decode_in
        return "tasks" if self.num_gpus > 0 else "actor"

    def actors(self, cluster_cpus: float) -> int:
        """The actor pool's minimum size for a cluster with this many CPUs."""
        if self.concurrency is not None:
            return self.concurrency
        if self.decode_mode() == "actor":
            return max(1, int(cluster_cpus // self.actor_num_cpus))
        return 1

    def output_options(self) -> dict[str, Any]:
        """The output store's filesystem options (the input's unless set apart)."""
        return dict(self.output_filesystem if self.output_filesystem is not None else self.filesystem)


class StreamConfig(_Strict):
    """The Kafka stream consumer (``mmpipe stream``).

    A consumer-group member micro-batches records from ``input_topics``, runs
    the Predictor and produces results keyed by record id to
    ``output_topic``; rejected records go, byte for byte, to ``dlq_topic``.
    Offsets are committed only after the broker acknowledged the results they
    cover (at-least-once); ``exactly_once`` writes results and offsets in one
    transaction instead.  Secrets are ``SecretStr``: set them from the
    environment (``MMPIPE__STREAM__SASL_PASSWORD``) and they never reach a log."""

    bootstrap_servers: list[str] = Field(
        default_factory=lambda: ["localhost:9092"], min_length=1, description="Kafka brokers, host:port"
    )
    group_id: str = Field("mmpipe", min_length=1, description="consumer group; members share the partitions")
    input_topics: list[str] = Field(default_factory=list, description="topics to consume records from")
    output_topic: str | None = Field(None, description="results go here, keyed by record id")
    dlq_topic: str | None = Field(None, description="rejected records go here with their original bytes")
    client_id: str | None = Field(None, description="Kafka client.id (default mmpipe-HOSTNAME-PID)")
    max_batch_records: int = Field(32, gt=0, description="a micro-batch closes at this many records...")
    max_wait_ms: int = Field(50, ge=0, description="...or when its first record has waited this long")
    max_in_flight: int = Field(
        1024, gt=0, description="pause fetching when this many records are buffered or in flight (backpressure)"
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where a group without committed offsets starts"
    )
    exactly_once: bool = Field(
        False, description="results and consumed offsets in one transaction; read outputs with read_committed"
    )
    transactional_id: str | None = Field(
        None, description="exactly_once: stable per consumer instance (default mmpipe-GROUP-HOSTNAME), so a "
        "restarted instance fences and aborts its predecessor's open transaction",
    )
    transaction_timeout_ms: int = Field(60_000, gt=0, description="exactly_once: the broker aborts older "
                                        "transactions, and a transaction step the client has not finished by then "
                                        "is given up (producer replaced, reading resumes from the group's "
                                        "committed offsets)")
    session_timeout_ms: int = Field(10_000, gt=0, description="group membership timeout (a dead member's "
                                    "partitions move after this)")
    max_poll_interval_ms: int = Field(300_000, gt=0, description="longest allowed gap between polls")
    delivery_timeout_ms: int = Field(
        120_000, gt=0, description="a result not acknowledged within this is resent (never dropped)"
    )
    commit_retry_backoff_ms: int = Field(500, ge=0, description="pause before retrying a failed commit")
    commit_interval_ms: int = Field(
        200, ge=0, description="at-least-once: commit acknowledged offsets at most this often (each commit is a "
        "round trip the consumer waits for; a crash re-delivers at most this much more)",
    )
    connect_timeout_ms: int = Field(
        30_000, gt=0, description="give up at start when no broker answers (wrong address, TLS or credentials)"
    )
    lag_interval_s: float = Field(2.0, gt=0, description="how often consumer lag per partition is updated")
    linger_ms: int = Field(
        5, ge=0, description="producer: wait up to this long to fill a request with results (fewer, larger "
        "requests; the model does not wait for them)",
    )
    producer_batch_bytes: int = Field(
        256 << 10, gt=0, description="producer: bytes of results per partition in one request",
    )
    fetch_max_wait_ms: int = Field(
        100, ge=0, description="consumer: longest a fetch waits at the broker for fetch_min_bytes",
    )
    fetch_min_bytes: int = Field(1, gt=0, description="consumer: a fetch returns once this much is there")
    max_partition_fetch_bytes: int = Field(
        1 << 20, gt=0, description="consumer: bytes fetched per partition per request (larger: a backlog drains "
        "in fewer round trips; every assigned partition may hold this much fetched in memory)",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = Field(None, description="set from env: MMPIPE__STREAM__SASL_PASSWORD")
    ssl_cafile: Path | None = Field(None, description="CA bundle that signed the brokers' certificates")
    ssl_certfile: Path | None = Field(None, description="client certificate (mutual TLS)")
    ssl_keyfile: Path | None = Field(None, description="client private key (mutual TLS)")
    ssl_password: SecretStr | None = Field(None, description="password of ssl_keyfile; from env")
    ssl_check_hostname: bool = True


class GenerateConfig(_Strict):
    """Generative heads (``pipeline.generate``): limits and decoding defaults.

    The limits are checked before any model work: a prompt (conversation
    history + question, in decoder tokens) over ``max_prompt_tokens`` is an
    error result with reason ``prompt_too_long``; asking for more than
    ``max_new_tokens`` is refused for the whole call.  Each is also capped
    by what the model was trained for (its position budget)."""

    enabled: bool = Field(False, description="batch job and stream: also write each record's generated text "
                          "(the package must carry an exported generative head; refused at start otherwise)")
    max_prompt_tokens: int = Field(256, gt=0, description="prompt tokens a record may bring")
    max_new_tokens: int = Field(64, gt=0, description="the most new tokens a call may ask for")
    default_new_tokens: int | None = Field(None, gt=0, description="when a call names none (default: the "
                                           "head's trained answer length)")
    batch_size: int = Field(16, gt=0, description="sequences decoded together")
    decoder_threads: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        "auto", description="ONNX Runtime intra-op threads of the per-token decoder graphs (0: engine.threads). "
        "A decoding step is a few small MatMuls and one fused attention node per layer: a single sequence runs "
        "about as fast on one thread (leaving the other cores to concurrent calls), while 2 or more sequences gain "
        "from engine.threads; auto holds a session of each (the decoder's weights twice in memory) and picks per "
        "call. The encoder, run once per call, keeps engine.threads")
    variant: Literal["auto", "fp32", "fp16", "int8"] = Field("auto", description="auto: fp16 on GPU, else fp32")
    use_cache: bool = Field(True, description="reuse past keys/values (off: recompute the whole sequence)")
    io_binding: bool = Field(True, description="GPU providers: keep the cache on the device between steps")
    do_sample: bool = Field(False, description="sample instead of greedy decoding")
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0: no top-k cut")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, description="sampling seed: same seed, same records, same text")


class Settings(_Strict):
    model_package: Path | None = None
    engine: EngineConfig = Field(default_factory=EngineConfig)
    limits: Limits | None = None
    media: MediaConfig = Field(default_factory=MediaConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def _set_path(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[keys[-1]] = value


def read_yaml_mapping(path: str | Path, what: str, *, empty_ok: bool = False) -> dict[str, Any]:
    """A YAML file that must hold a mapping (config, signature, Serve config),
    with one wording for the three ways it goes wrong: missing, not YAML, not
    a mapping.  ``what`` names the file in the message ("config file")."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {p} is not valid YAML: {exc}") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must hold a mapping at top level")
    return data


def load_settings(path: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Load settings from an optional YAML file plus ``MMPIPE__*`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(path, "config file", empty_ok=True)
    env = dict(os.environ) if env is None else env
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__") if k]
        if not keys:
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_path(data, keys, value)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration:\n{exc}") from exc


def apply_overrides(settings: Settings, *, engine: str | None = None, batch_size: int | None = None,
                    batch_section: str = "predict") -> Settings:
    """The command-line overrides every CLI offers (``--engine``,
    ``--batch-size``), applied in one place; ``batch_section`` names the
    config section whose ``batch_size`` the flag sets (``predict`` or
    ``batch``).  Changes ``settings`` in place and returns it."""
    if engine:
        settings.engine.kind = engine  # type: ignore[assignment]
    if batch_size:
        getattr(settings, batch_section).batch_size = batch_size
    return settings
