"""The fake engine with a serving model (``--simulate``): chat completions wait for slots,
prefill and decode as ``serving.ServingModel`` says, and ``/metrics`` has vLLM's gauges
and counters for the router to score.

One driver task per engine runs the model: plan a step, sleep its duration (times
``time_scale``), apply it, wake the requests it advanced. A streamed answer opens at
once (headers), sends vLLM's role chunk with the first token when the prefill step ends,
then one ``chat.completion.chunk`` per ``stream_interval`` tokens. Prompts are tokenized
as words (``serving.token_ids``); ``/tokenize`` gives the same ids. The number of
generated tokens is ``max_tokens`` (or ``max_completion_tokens``) when given, as with
vLLM's ``ignore_eos``, else the ``tokens`` knob.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sanic import HTTPResponse
from sanic.response import raw

import router.fake_engine.formats as fmt
import router.fake_engine.tokens as tokens
from router.fake_engine.call import Call, Stream, json_response
from router.fake_engine.generate import max_tokens, render, require_list, stream_flags
from router.fake_engine.serving import EngineRequest, ServingModel, ServingParams, token_ids
from router.fake_engine.state import EngineError, Tokenizer

#: ``/tokenize`` of a simulated engine: the serving model's word tokens.
WORD_TOKENIZER = Tokenizer(token_ids, str.split)

log = logging.getLogger("routeyard.fake_engine")

#: vLLM's engine index label (one engine core per server here).
ENGINE_LABEL = "0"

#: Past this lag (real seconds) behind its schedule the driver stops catching up.
MAX_LAG_S = 0.05


class SimulatedEngine:
    """A ``ServingModel`` driven in real time, and its Prometheus exposition."""

    def __init__(self, params: ServingParams, model_name: str) -> None:
        self.params = params
        self.model = ServingModel(params)
        self.model_name = model_name
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._drive())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def submit(self, prompt: list[int], max_tokens: int) -> tuple[EngineRequest, asyncio.Event]:
        changed = asyncio.Event()
        seq = self.model.submit(prompt, max_tokens, changed.set)
        self._wake.set()
        return seq, changed

    async def _drive(self) -> None:
        try:
            await self._steps()
        except Exception:
            log.exception("the serving model failed; this engine answers no more chats")
            raise

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        scale = self.params.time_scale
        deadline = loop.time()
        while True:
            step = self.model.schedule()
            if step is None:
                self._wake.clear()
                await self._wake.wait()
                deadline = loop.time()
                continue
            now = loop.time()
            deadline = max(deadline, now - MAX_LAG_S) + step.duration_s * scale
            if deadline > now:
                await asyncio.sleep(deadline - now)
            self.model.complete(step)

    def metrics(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    """vLLM 0.32's metric names and help texts, with its ``engine`` and ``model_name``
    labels, read from the model at scrape time."""

    def __init__(self, engine: SimulatedEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        m = e.model
        c = m.counters
        p = e.params
        names = ["engine", "model_name"]
        labels = [ENGINE_LABEL, e.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(labels, value)
            return family

        yield gauge("vllm:num_requests_running", "Number of requests in model execution "
                    "batches.", len(m.running))
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be "
                    "processed.", len(m.waiting))
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    m.kv_usage())
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number "
                      "of queried tokens.", c.prefix_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of "
                      "cached tokens.", c.prefix_hits)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                      c.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.",
                      c.generation_tokens)
        success = CounterMetricFamily("vllm:request_success", "Count of successfully "
                                      "processed requests.", labels=[*names, "finished_reason"])
        success.add_metric([*labels, "length"], c.finished)
        yield success
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine "
                                 "CacheConfig", labels=[
                                     "block_size", "cache_dtype", "enable_prefix_caching",
                                     "engine", "kv_cache_size_tokens", "model_name",
                                     "num_gpu_blocks", "prefix_caching_hash_algo"])
        info.add_metric([str(p.block_size), "auto", "True", ENGINE_LABEL,
                         str(p.kv_cache_tokens), e.model_name, str(p.num_blocks), "sha256"],
                        1.0)
        yield info


def engine_of(call: Call) -> SimulatedEngine:
    engine: SimulatedEngine = call.request.app.ctx.simulated
    return engine


async def chat_completions(call: Call) -> HTTPResponse | None:
    """``/v1/chat/completions`` through the serving model."""
    body = call.body()
    messages = require_list(body, "messages")
    stream, include_usage, continuous = stream_flags(body)
    model = call.state.resolve_model(body.get("model"))
    limit = max_tokens(body, "max_completion_tokens", "max_tokens")
    prompt, last = render(messages)
    ids = token_ids(prompt)
    n = max(1, limit if limit is not None else call.knobs.tokens)
    words = tokens.generate(tokens.seed_of(last), n)
    finish = fmt.finish_reason(n, limit)
    rid = call.request_id("chatcmpl")
    engine = engine_of(call)
    seq, changed = engine.submit(ids, n)
    try:
        if not stream:
            while not seq.finished:
                await changed.wait()
                changed.clear()
            return await call.reply(fmt.chat_completion(
                rid, call.created, model, "".join(words), finish, fmt.usage(len(ids), n)))
        head = fmt.chat_head(rid, call.created, model)
        out = Stream(call)
        await out.open()
        interval = engine.params.stream_interval
        sent = 0
        while sent < n:
            await changed.wait()
            changed.clear()
            ready = seq.generated
            if sent and ready - sent < interval and not seq.finished:
                continue
            if not sent:
                first = fmt.chat_role_chunk(head)
                if continuous:
                    first["usage"] = fmt.usage(len(ids), 0)
                await out.data(first)
            chunk = fmt.chat_token_chunk(head, "".join(words[sent:ready]),
                                         finish if ready >= n else None)
            if continuous:
                chunk["usage"] = fmt.usage(len(ids), ready)
            await out.data(chunk)
            sent = ready
        if include_usage:
            await out.data({**head, "choices": [], "usage": fmt.usage(len(ids), n)})
        await out.done()
        return None
    finally:
        engine.model.abort(seq)  # a no-op once finished; frees a request the client left


async def metrics(call: Call) -> HTTPResponse | None:
    return raw(engine_of(call).metrics(), content_type=CONTENT_TYPE_LATEST)


async def reset_prefix_cache(call: Call) -> HTTPResponse | None:
    """vLLM's ``POST /reset_prefix_cache``: drop every cached block no request holds."""
    if not engine_of(call).model.cache.clear():
        err = EngineError(409, "Conflict", "Prefix cache reset refused: requests are running.")
        return json_response(err.envelope(), 409)
    return HTTPResponse(b"", status=200)
