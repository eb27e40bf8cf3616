"""Text generation with a package's generative head (numpy + ONNX Runtime).

``Generator(package, engine_config).generate(records)`` writes one
:class:`GenerationResult` per record; :meth:`Generator.stream` yields the
tokens step by step as they are chosen, for paths that stream to a client.

How a call runs:

1. each record is validated and decoded by the same Preprocessor as
   tagging, and its ``messages`` become the prompt (:func:`prompt_ids`);
   limits are checked before any model work, and a record that breaks one
   becomes an error result, never failing the others;
2. the encoder graph turns the batch's features into the conditioning
   prefix; the first decoder step reads prefix + prompt and returns the
   key/value cache; each later step feeds one token per sequence and the
   cache (or, with ``use_cache`` off, the whole sequence again);
3. greedy or sampled choice per sequence, each stopping at its own stop
   token or ``max_new_tokens``.

Ragged prompts are padded *between* the prefix and the prompt, so every
sequence's last prompt token sits in the last column; the attention mask
hides pads and position ids skip them (see ``pipeline.tooling.model.decoder``).

On CUDA / TensorRT the cache stays on the device between steps through ONNX
Runtime I/O binding; only the next-token logits come back to the host.

Generated text is record content: nothing here logs it (or prompts, or
token ids), and :class:`GenerationResult` keeps it out of its repr.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field

from pipeline.columnar import ColumnarBatch
from pipeline.config import EngineConfig, GenerateConfig, Limits, MediaConfig, Settings
from pipeline.errors import PackageError, Reason, RecordError
from pipeline.log import log_event
from pipeline.package import ModelPackage
from pipeline.preprocess import Prepared, Preprocessor
from pipeline.records import ErrorInfo, Message, Record
from pipeline.results import ResultBatch
from pipeline.tokenizer import DecoderTokenizer

logger = logging.getLogger(__name__)

#: package files of an exported generative head, per variant
GRAPHS = ("encoder", "decoder_init", "decoder_step")


class GenerationError(ValueError):
    """A generation call asked for something its limits refuse (the whole
    call: per-record problems become error results instead)."""


class GenerationResult(BaseModel):
    """What a generative head wrote for one record (or why it could not)."""

    id: str
    model: str
    model_version: str
    head: str
    text: str | None = Field(None, repr=False, description="patient data for medical: never logged")
    token_ids: list[int] = Field(default_factory=list, repr=False)
    finish_reason: Literal["stop", "length"] | None = None
    prompt_tokens: int = 0
    provider: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    error: ErrorInfo | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_generated(self) -> dict[str, Any]:
        """The ``generated`` field of a record's result on the batch job and
        the stream (:class:`~pipeline.records.GeneratedText`): text and
        finish reason, and the error when this record could not be answered."""
        out: dict[str, Any] = {"text": self.text, "finish_reason": self.finish_reason}
        if self.error is not None:
            out["error"] = self.error.model_dump()
        return out


@dataclass(frozen=True)
class TokenEvent:
    """One token chosen for one sequence (``index``: its place in the call's
    input), or the sequence's end (``finish_reason`` set) or failure."""

    index: int
    id: str
    token_id: int | None = None
    text: str = field(default="", repr=False)
    finish_reason: str | None = None
    error: ErrorInfo | None = None
    prompt_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The JSON form every path sends (Serve's server-sent events, the
        stream's results): index, id, text delta, token id, finish reason, error."""
        return {"index": self.index, "id": self.id, "text": self.text, "token_id": self.token_id,
                "finish_reason": self.finish_reason,
                "error": None if self.error is None else self.error.model_dump()}


@dataclass(frozen=True)
class Sampling:
    """Greedy unless ``do_sample``; then temperature, top-k and nucleus
    (top-p) sampling, reproducible from ``seed``: sequence ``i`` of a call
    draws from its own stream seeded by ``(seed, i)``, so batch size and
    batch boundaries never change what is drawn."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def from_config(cls, cfg: GenerateConfig) -> Sampling:
        return cls(cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)

    def check(self) -> None:
        if self.temperature <= 0:
            raise GenerationError("temperature must be > 0")
        if self.top_k < 0:
            raise GenerationError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise GenerationError("top_p must be within (0, 1]")

    def rngs(self, indices: Sequence[int]) -> list[np.random.Generator] | None:
        if not self.do_sample:
            return None
        seed = 0 if self.seed is None else self.seed
        if self.seed is None:
            seed = int(np.random.SeedSequence().entropy % (1 << 63))
        return [np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, i]) for i in indices]


def choose(logits: np.ndarray, sampling: Sampling, rngs: list[np.random.Generator] | None) -> np.ndarray:
    """Next token per row of ``logits`` [B, V]."""
    if rngs is None:
        return logits.argmax(-1).astype(np.int64)
    z = logits.astype(np.float64) / sampling.temperature
    out = np.empty(len(z), dtype=np.int64)
    for i, row in enumerate(z):
        order = np.argsort(-row, kind="stable")
        if sampling.top_k:
            order = order[: sampling.top_k]
        p = np.exp(row[order] - row[order[0]])
        p /= p.sum()
        if sampling.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), sampling.top_p) + 1)
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        out[i] = order[int(rngs[i].choice(len(order), p=p))]
    return out


# -- prompts ----------------------------------------------------------------------------
def _turns(messages: Sequence[Message | dict[str, str]] | None) -> list[tuple[str, str]]:
    turns = [(m.role, m.content) if isinstance(m, Message) else (str(m["role"]), str(m["content"]))
             for m in messages or []]
    if not turns:
        return turns
    if turns[-1][0] != "user":
        raise RecordError(Reason.BAD_RECORD, "messages must end with the user's question")
    for k, (role, _) in enumerate(turns):
        expected = "user" if (len(turns) - 1 - k) % 2 == 0 else "assistant"
        if role != expected:
            raise RecordError(Reason.BAD_RECORD, "messages must alternate user and assistant turns")
    return turns


def prompt_ids(tok: DecoderTokenizer, messages: Sequence[Message | dict[str, str]] | None) -> list[int]:
    """The decoder prompt: ``[CLS]`` then every turn followed by ``[SEP]``;
    the answer follows and ends with ``[SEP]``.  Roles are implied by the
    alternation (checked here), so they cost no tokens.  Training builds its
    prompts here too."""
    ids = [tok.bos_id]
    for _role, content in _turns(messages):
        ids.extend(tok.encode(content))
        ids.append(tok.eos_id)
    return ids


# -- the decoding loop ------------------------------------------------------------------
class DecoderBackend(Protocol):
    """The three graphs of a generative head, on some engine.  ``prefix``
    and ``cache`` are opaque (device-resident where the engine can)."""

    provider: str

    def encode(self, feeds: dict[str, np.ndarray]) -> Any: ...

    def first(self, prefix: Any, input_ids: np.ndarray, attention_mask: np.ndarray,
              position_ids: np.ndarray) -> tuple[np.ndarray, Any]: ...

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: Any) -> tuple[np.ndarray, Any]: ...


def _positions(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)


def decode(
    backend: DecoderBackend, feeds: dict[str, np.ndarray], prompts: list[list[int]], prefix_tokens: int, *,
    max_new_tokens: int, stop_ids: Sequence[frozenset[int]], pad_id: int, sampling: Sampling = Sampling(),
    indices: Sequence[int] | None = None, use_cache: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Decode a batch; yields per step (tokens [B], finished-now mask [B]).
    Rows that finished earlier get ``pad_id`` and are ignored by callers."""
    b = len(prompts)
    width = max(len(p) for p in prompts)
    ids = np.full((b, width), pad_id, dtype=np.int64)
    mask = np.ones((b, prefix_tokens + width), dtype=np.int64)
    for i, p in enumerate(prompts):  # pads between the prefix and the prompt
        ids[i, width - len(p):] = p
        mask[i, prefix_tokens:prefix_tokens + width - len(p)] = 0
    rngs = sampling.rngs(indices if indices is not None else range(b))
    prefix = backend.encode(feeds)
    logits, cache = backend.first(prefix, ids, mask, _positions(mask))
    done = np.zeros(b, dtype=bool)
    for t in range(max_new_tokens):
        tokens = np.where(done, pad_id, choose(logits, sampling, rngs))
        stopped = np.array([not done[i] and int(tokens[i]) in stop_ids[i] for i in range(b)])
        finished_now = stopped | (~done & (t == max_new_tokens - 1))
        yield tokens, finished_now
        done |= finished_now
        if done.all():
            return
        mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
        if use_cache:
            pos = (mask.sum(1, keepdims=True) - 1).astype(np.int64)
            logits, cache = backend.step(tokens[:, None], mask, pos, cache)
        else:
            ids = np.concatenate([ids, tokens[:, None]], axis=1)
            logits, _ = backend.first(prefix, ids, mask, _positions(mask))


# -- ONNX Runtime backend -----------------------------------------------------------------
class OrtBackend:
    """The exported graphs on ONNX Runtime.  The prefix and the cache are
    OrtValues handed from step to step untouched: with a GPU provider and
    ``io_binding`` they live on the device (I/O binding) and only logits are
    copied back; on the CPU provider they stay in host memory, and that is
    logged once."""

    def __init__(self, files: dict[str, Any], engine: EngineConfig, io_binding: bool = True,
                 bind_device: str | None = None, decoder_threads: int | None = 0, wide_from: int = 2) -> None:
        """``bind_device``: use I/O binding on this ORT device type whatever
        the provider (``"cpu"`` runs the binding path where no GPU is).
        ``decoder_threads``: intra-op threads of the two decoder graphs (0:
        ``engine.threads``; None: one thread for batches under ``wide_from``
        sequences and ``engine.threads`` from there, with a session of each);
        the encoder runs once per call with the engine's threads."""
        from pipeline.engines.onnx_engine import CPU, OnnxRuntimeEngine

        common = {"device": engine.device, "providers": engine.providers, "threads": engine.threads,
                  "graph_optimization": engine.graph_optimization, "trt_fp16": engine.trt_fp16}
        import onnxruntime

        self._ort = onnxruntime

        def session(graph: str, threads: int) -> Any:
            # Only the per-token graph spins between runs: the encoder and the
            # first step run once per call, and their workers spinning on
            # after it took a core from every later step (1.6 -> 2.9 ms per
            # step at batch 16 on 2 cores).
            return OnnxRuntimeEngine(files[graph], **{**common, "threads": threads},
                                     spin=graph == "decoder_step").session

        narrow = engine.threads if decoder_threads == 0 else (decoder_threads or 1)
        self.sessions = {"encoder": session("encoder", engine.threads),
                         **{g: session(g, narrow) for g in GRAPHS[1:]}}
        self._wide: dict[str, Any] = {}
        self.wide_from = wide_from
        if decoder_threads is None and engine.threads != 1 and (os.cpu_count() or 1) > 1:
            self._wide = {g: session(g, engine.threads) for g in GRAPHS[1:]}
        self.provider = self.sessions["decoder_step"].get_providers()[0]
        self.on_device = bind_device is not None or (io_binding and self.provider != CPU)
        if io_binding and not self.on_device:
            log_event(logger, logging.INFO, "generate_io_binding_off", provider=self.provider,
                      reason="cpu provider: the cache stays in host memory (as OrtValues)")
        self._device = bind_device or "cuda"
        self._outputs = {g: [o.name for o in s.get_outputs()] for g, s in self.sessions.items()}
        self._cache_in = [i.name for i in self.sessions["decoder_step"].get_inputs() if i.name.startswith("past_")]

    def encode(self, feeds: dict[str, np.ndarray]) -> Any:
        sess = self.sessions["encoder"]
        ins = {i.name: np.ascontiguousarray(feeds[i.name]) for i in sess.get_inputs()}
        if not self.on_device:
            ort_value = self._ort.OrtValue.ortvalue_from_numpy
            return sess.run_with_ort_values(self._outputs["encoder"], {k: ort_value(v) for k, v in ins.items()})[0]
        binding = sess.io_binding()
        for name, arr in ins.items():
            binding.bind_cpu_input(name, arr)
        binding.bind_output(self._outputs["encoder"][0], self._device)
        sess.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def _run(self, graph: str, small: dict[str, np.ndarray], big: dict[str, Any]) -> tuple[np.ndarray, Any]:
        # By the batch's size (constant through a call), with no state kept:
        # a Generator serves concurrent calls from several threads.
        wide = bool(self._wide) and len(small["input_ids"]) >= self.wide_from
        sess = (self._wide if wide else self.sessions)[graph]
        if not self.on_device:  # OrtValues in and out: the cache is handed back without a numpy copy
            ort_value = self._ort.OrtValue.ortvalue_from_numpy
            arrays = {k: np.ascontiguousarray(v) for k, v in small.items()}  # alive while the run reads them
            outs = sess.run_with_ort_values(self._outputs[graph], {**{k: ort_value(v) for k, v in arrays.items()},
                                                                   **big})
            return outs[0].numpy(), outs[1:]
        binding = sess.io_binding()
        for name, arr in small.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name, value in big.items():
            binding.bind_ortvalue_input(name, value)
        names = self._outputs[graph]
        binding.bind_output(names[0], "cpu")
        for name in names[1:]:
            binding.bind_output(name, self._device)
        sess.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0].numpy(), outs[1:]

    def first(self, prefix: Any, input_ids: np.ndarray, attention_mask: np.ndarray,
              position_ids: np.ndarray) -> tuple[np.ndarray, Any]:
        small = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        return self._run("decoder_init", small, {"prefix_embeds": prefix})

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: Any) -> tuple[np.ndarray, Any]:
        small = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        return self._run("decoder_step", small, dict(zip(self._cache_in, cache, strict=True)))


# -- the generator --------------------------------------------------------------------------
def generation_variant(package: ModelPackage, variant: str) -> dict[str, Any]:
    """The manifest entry of an exported generative head (``generate-fp32``...)."""
    gen = [v for v in package.manifest.variants if v.startswith("generate-")]
    if not gen:
        raise PackageError(f"package {package.name} has no exported generative head "
                           "(train with --generative, then mmpipe export)")
    name = f"generate-{variant}"
    if name not in package.manifest.variants:
        raise PackageError(f"package {package.name} has no variant {name!r}; it has {sorted(gen)}")
    return package.manifest.variants[name].model_dump()


class Generator:
    """Generation with a package's generative head: records in, text out."""

    def __init__(self, package: ModelPackage, engine: EngineConfig | None = None,
                 config: GenerateConfig | None = None, limits: Limits | None = None,
                 backend: DecoderBackend | None = None, media: MediaConfig | None = None) -> None:
        """``backend``: another engine for the same graphs (the PyTorch
        reference in parity checks and benchmarks); default ONNX Runtime.
        ``media``: where records' media URIs may point (online servers pass
        one that allows none, so callers cannot make them read their files)."""
        self.package = package
        self.config = config or GenerateConfig()
        engine = engine or EngineConfig()
        variant = self.config.variant
        if variant == "auto":
            variant = "fp16" if _gpu(engine) and "generate-fp16" in package.manifest.variants else "fp32"
        self.variant = variant
        info = generation_variant(package, variant)
        self.head = info["head"]
        self.prefix_tokens = int(info["prefix_tokens"])
        self.tokenizer = DecoderTokenizer.load(package.path(info["tokenizer"]))
        self.max_prompt_tokens = min(self.config.max_prompt_tokens, int(info["max_prompt_tokens"]))
        self.max_new_tokens = min(self.config.max_new_tokens, int(info["max_new_tokens"]))
        self.default_new_tokens = min(self.config.default_new_tokens or int(info["max_new_tokens"]),
                                      self.max_new_tokens)
        self.preprocessor = Preprocessor.for_package(package, limits, media)
        if backend is None:
            files = {g: package.path(f) for g, f in info["graphs"].items()}
            threads = None if self.config.decoder_threads == "auto" else self.config.decoder_threads
            backend = OrtBackend(files, engine, self.config.io_binding, decoder_threads=threads)
        self.backend = backend

    # -- public API ---------------------------------------------------------------
    def generate(self, items: Sequence[Any], *, messages: Sequence[Any] | None = None,
                 max_new_tokens: int | None = None, sampling: Sampling | None = None,
                 stop_token_ids: Sequence[Sequence[int]] | None = None) -> list[GenerationResult]:
        """One result per item, in order.  ``items``: raw records (dict,
        JSON text/bytes, :class:`Record`) or :class:`Prepared` features;
        ``messages[i]`` is item i's conversation when the item is Prepared
        (a record carries its own).  ``stop_token_ids[i]``: extra stop
        tokens for item i (the end-of-answer token always stops)."""
        t0 = time.perf_counter()
        results: list[dict[str, Any]] = [{"ids": [], "finish": None, "error": None} for _ in items]
        first_token_ms: float | None = None
        for ev in self.stream(items, messages=messages, max_new_tokens=max_new_tokens, sampling=sampling,
                              stop_token_ids=stop_token_ids):
            r = results[ev.index]
            if ev.error is not None:
                r["error"] = ev.error
            if ev.token_id is not None:
                r["ids"].append(ev.token_id)
                if first_token_ms is None:
                    first_token_ms = (time.perf_counter() - t0) * 1000.0
            if ev.finish_reason:
                r["finish"] = ev.finish_reason
            r["id"], r["prompt"] = ev.id, ev.prompt_tokens
        total_ms = (time.perf_counter() - t0) * 1000.0
        out = []
        for r in results:
            timings = {"total": round(total_ms, 3)}
            if first_token_ms is not None:
                timings["first_token"] = round(first_token_ms, 3)
            text = None if r["error"] is not None else self.tokenizer.decode(r["ids"])
            out.append(GenerationResult(
                id=r.get("id", ""), model=self.package.name, model_version=self.package.version, head=self.head,
                text=text, token_ids=r["ids"], finish_reason=r["finish"], prompt_tokens=r.get("prompt", 0),
                provider=self.backend.provider, timings_ms=timings, error=r["error"]))
        return out

    def stream(self, items: Sequence[Any], *, messages: Sequence[Any] | None = None,
               max_new_tokens: int | None = None, sampling: Sampling | None = None,
               stop_token_ids: Sequence[Sequence[int]] | None = None) -> Iterator[TokenEvent]:
        """Tokens as they are chosen: per decoding step, one event per live
        sequence (with its text delta); a sequence's last event carries its
        ``finish_reason``.  Rejected records come first, as error events."""
        new = self._check_call(len(items), max_new_tokens, messages, stop_token_ids)
        sampling = sampling or Sampling.from_config(self.config)
        sampling.check()
        ready: list[tuple[int, Prepared, list[int]]] = []
        for i, item in enumerate(items):
            try:
                prepared, prompt = self._prepare(item, messages[i] if messages is not None else None)
            except RecordError as exc:
                yield TokenEvent(i, _item_id(item), error=ErrorInfo(code=exc.code.value, message=exc.message))
                continue
            ready.append((i, prepared, prompt))
        size = self.config.batch_size
        for start in range(0, len(ready), size):
            yield from self._stream_batch(ready[start:start + size], new, sampling, stop_token_ids)

    # -- internals ----------------------------------------------------------------
    def _check_call(self, n: int, max_new_tokens: int | None, messages: Sequence[Any] | None,
                    stop_token_ids: Sequence[Sequence[int]] | None) -> int:
        new = self.default_new_tokens if max_new_tokens is None else max_new_tokens
        if new < 1:
            raise GenerationError("max_new_tokens must be >= 1")
        if new > self.max_new_tokens:
            raise GenerationError(f"max_new_tokens {new} exceeds the limit of {self.max_new_tokens} "
                                  "(generate.max_new_tokens, capped by what the head was trained for)")
        for what, seq in (("messages", messages), ("stop_token_ids", stop_token_ids)):
            if seq is not None and len(seq) != n:
                raise GenerationError(f"{what} has {len(seq)} entries for {n} items")
        return new

    def _prepare(self, item: Any, messages: Any) -> tuple[Prepared, list[int]]:
        if isinstance(item, Prepared):
            prepared = item
            messages = item.messages if messages is None else messages
        else:
            rec: Record = self.preprocessor.parse(item)
            messages = rec.messages if messages is None else messages
            prepared = self.preprocessor.prepare(rec)
        prompt = prompt_ids(self.tokenizer, messages)
        if len(prompt) > self.max_prompt_tokens:
            raise RecordError(Reason.PROMPT_TOO_LONG, f"prompt is {len(prompt)} tokens; limit is "
                              f"{self.max_prompt_tokens} (generate.max_prompt_tokens)")
        return prepared, prompt

    def _stream_batch(self, batch: list[tuple[int, Prepared, list[int]]], new: int, sampling: Sampling,
                      stop_token_ids: Sequence[Sequence[int]] | None) -> Iterator[TokenEvent]:
        indices = [i for i, _, _ in batch]
        feeds = self.preprocessor.collate([p for _, p, _ in batch])
        stops = [frozenset({self.tokenizer.eos_id, *(stop_token_ids[i] if stop_token_ids else ())})
                 for i in indices]
        generated: list[list[int]] = [[] for _ in batch]
        texts = [""] * len(batch)
        live = [True] * len(batch)
        steps = decode(self.backend, feeds, [p for _, _, p in batch], self.prefix_tokens, max_new_tokens=new,
                       stop_ids=stops, pad_id=self.tokenizer.pad_id, sampling=sampling, indices=indices,
                       use_cache=self.config.use_cache)
        try:
            for tokens, finished in steps:
                yield from self._events(batch, tokens, finished, stops, generated, texts, live)
        except Exception as exc:  # the engine failed: these records get an error, the call goes on
            log_event(logger, logging.ERROR, "generate_failed", error=type(exc).__name__, records=len(batch))
            err = ErrorInfo(code=Reason.INFERENCE_FAILED.value, message=f"generation failed ({type(exc).__name__})")
            for row, (index, prepared, prompt) in enumerate(batch):
                if live[row]:
                    yield TokenEvent(index, prepared.id, error=err, prompt_tokens=len(prompt))

    def _events(self, batch: list[tuple[int, Prepared, list[int]]], tokens: np.ndarray, finished: np.ndarray,
                stops: list[frozenset[int]], generated: list[list[int]], texts: list[str], live: list[bool]
                ) -> Iterator[TokenEvent]:
        """One step's events; ``generated``, ``texts`` and ``live`` are updated."""
        for row, (index, prepared, prompt) in enumerate(batch):
            if not live[row]:
                continue
            tok = int(tokens[row])
            stop = tok in stops[row]
            delta = ""
            if not stop:
                generated[row].append(tok)
                text = self.tokenizer.decode(generated[row])
                delta, texts[row] = text[len(texts[row]):] if text.startswith(texts[row]) else text, text
            reason = ("stop" if stop else "length") if finished[row] else None
            yield TokenEvent(index, prepared.id, token_id=None if stop else tok, text=delta,
                             finish_reason=reason, prompt_tokens=len(prompt))
            live[row] = not finished[row]


# -- beside the tagging heads (the batch job, the stream) ---------------------------------------
def check_enabled(package: ModelPackage, cfg: GenerateConfig) -> None:
    """Refuse ``generate.enabled`` at start when the package cannot generate
    (no exported head, or not the variant asked for), before any record is read."""
    if not cfg.enabled:
        return
    try:
        generation_variant(package, "fp32" if cfg.variant == "auto" else cfg.variant)
    except PackageError as exc:
        if cfg.variant == "auto" and any(v.startswith("generate-") for v in package.manifest.variants):
            return  # auto picks what the package has
        raise PackageError(f"generate.enabled is true but {exc}") from None


def generator_for(package: ModelPackage, settings: Settings, engine: EngineConfig | None = None
                  ) -> Generator | None:
    """The Generator a path runs beside its Predictor when
    ``generate.enabled`` (on ``engine``, default the settings'); None
    (nothing loaded, no cost) when it is off."""
    if not settings.generate.enabled:
        return None
    check_enabled(package, settings.generate)
    return Generator(package, engine or settings.engine, settings.generate, settings.limits)


def add_generated(generator: Generator, batch: ColumnarBatch, results: ResultBatch) -> ResultBatch:
    """``results`` with each answered record's generated text (its result's
    ``generated`` field).  The generator runs on the rows the Predictor
    answered, with each row's own conversation; a rejected record keeps its
    error and gets no text.  One home for the batch job and the stream."""
    answered = set(results.positions.tolist())
    rows = [i for i, p in enumerate(batch.positions.tolist()) if p in answered]
    part = batch.take(rows)
    by_pos = {int(p): g.as_generated()
              for p, g in zip(part.positions.tolist(), generator.generate(part.rows()) if rows else [], strict=True)}
    return replace(results, generated=[by_pos[int(p)] for p in results.positions.tolist()])


def _item_id(item: Any) -> str:
    if isinstance(item, (Prepared, Record)):
        return item.id
    if isinstance(item, dict) and isinstance(item.get("id"), str):
        return item["id"]
    return ""


def _gpu(engine: EngineConfig) -> bool:
    import onnxruntime as ort

    from pipeline.engines.onnx_engine import CPU, choose_providers

    return choose_providers(engine.providers, engine.device, ort.get_available_providers(), quiet=True)[0] != CPU
