"""Routing on engine state, proven on two real vLLM engines (CPU build).

Two engines of the tiny chat model, each with ``--max-num-seqs 2`` and a 48-block KV cache,
behind one router with three models over the same two engines: ``load`` (``load_aware``,
``scoring.explain``), ``rr`` (``round_robin``) and ``ca`` (``cache_aware``). What each engine
did is read from its own ``/metrics`` (``vllm:request_success_total``,
``vllm:prefix_cache_hits_total`` / ``vllm:prefix_cache_queries_total``), as deltas: the
engines are shared by the three tests and never reset.

- a flooded engine gets almost none of the router's short requests (``load_aware``);
- a stopped engine (SIGSTOP: its ``/metrics`` hangs) goes stale and traffic moves to the
  other within a second, and comes back after SIGCONT;
- six tenants with long system prompts hit the prefix cache more with ``cache_aware`` than
  with ``round_robin``, whose spreading makes each engine's cache evict.

Active health checks are off in the router, so only the engine readings move traffic.

Run: ``bash scripts/real_vllm/install.sh && pytest -m real_vllm tests/real_vllm -s``.
Outside CI a missing vLLM venv skips; in CI (``CI=true``) it fails the tier.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Router, eventually, scrape, start_router
from tests.real_vllm.serve_script import serve

pytestmark = pytest.mark.real_vllm

MODEL = "tiny-qwen2"
#: vLLM's CPU block size in tokens (``vllm:cache_config_info``).
BLOCK = 128
#: 6 MiB is 48 blocks of the tiny model: room for about four tenants' system prompts.
KV_CACHE_BYTES = 6 * 1024 * 1024
#: The router's ``engine_metrics.max_age`` (its default): older readings are stale.
MAX_AGE_S = 0.5


@dataclass(frozen=True, slots=True)
class Engine:
    """A real engine: its base URL and the process group a signal stops."""

    name: str
    url: str
    pgid: int

    def counts(self) -> dict[str, float]:
        """Its own counters: successes (all finish reasons, and without aborts), prefix-cache
        hits and queries (tokens), and what runs and waits now."""
        totals: Counter[str] = Counter()
        for (name, labels), value in scrape(f"{self.url}/metrics").items():
            if name == "vllm:request_success_total":
                totals["success"] += value
                if ("finished_reason", "abort") not in labels:
                    totals["done"] += value
            elif name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
                          "vllm:num_requests_running", "vllm:num_requests_waiting"):
                totals[name.removeprefix("vllm:").removesuffix("_total")] += value
        return dict(totals)

    def idle(self) -> bool:
        counts = self.counts()
        return counts["num_requests_running"] + counts["num_requests_waiting"] == 0


@dataclass(frozen=True, slots=True)
class Fleet:
    a: Engine
    b: Engine
    router: Router


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    vllm = serve.venv() / "bin" / "vllm"
    if not vllm.exists():
        message = f"no vLLM at {vllm}: run `bash scripts/real_vllm/install.sh` first"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    models = serve.build_models()
    chat = serve.SPECS["chat"]
    spec = serve.Spec("chat", chat.names, (*chat.flags, "--max-num-seqs", "2"),
                      kv_cache_bytes=KV_CACHE_BYTES)
    started = time.monotonic()
    engines = {name: serve.launch(spec, models["chat"],
                                  Path(tmp_path_factory.mktemp(f"vllm-{name}")))
               for name in ("a", "b")}
    try:
        deadline = time.monotonic() + 600
        while not all(serve.healthy(e.url) for e in engines.values()):
            for e in engines.values():
                if e.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vllm serve not healthy:\n{serve.tail(e.log)}")
            time.sleep(0.5)
        print(f"\nrouting: two engines healthy after {time.monotonic() - started:.0f} s")
        a, b = (Engine(n, e.url, e.proc.pid) for n, e in engines.items())
        with start_router(tmp_path_factory.mktemp("routing-router"), _routes(a, b)) as router:
            yield Fleet(a, b, router)
    finally:
        serve.stop(engines)


#: ``ca``'s prompt key covers the whole system prompt (about 2,700 characters) and the
#: question, so the index learns every block of it; a block of 256 characters is about one
#: engine block (128 tokens) of this tokenizer, at about 2 characters a token.
PREFIX_CHARS = 4096
PREFIX_BLOCK_CHARS = 256


def _routes(a: Engine, b: Engine) -> str:
    def model(name: str, policy: str, extra: str = "") -> str:
        return (f"  {name}:\n    policy: {policy}\n    backend_model: {MODEL}\n{extra}"
                f"    backends:\n      - {{url: {a.url}, name: a}}\n"
                f"      - {{url: {b.url}, name: b}}\n    endpoints: [chat]\n")

    return ("defaults:\n  health_checks: {enabled: false}\nmodels:\n"
            + model("load", "load_aware", "    scoring: {explain: true}\n")
            + model("rr", "round_robin")
            + model("ca", "cache_aware", f"    prefix: {{chars: {PREFIX_CHARS}, "
                                         f"block_chars: {PREFIX_BLOCK_CHARS}}}\n"))


def _chat(model: str, content: str, max_tokens: int = 4, system: str | None = None,
          **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return {"model": model, "messages": messages, "max_tokens": max_tokens, **extra}


async def _all_idle(fleet: Fleet) -> None:
    await eventually(lambda: fleet.a.idle() and fleet.b.idle(), 60, "both engines idle")


async def test_a_flooded_engine_gets_almost_none_of_the_routers_requests(fleet: Fleet) -> None:
    """(a) While A runs long generations sent to it directly (the router sees none of
    them), at least 90 % of 50 short requests through ``load_aware`` are answered by B."""
    a, b = fleet.a, fleet.b
    await _all_idle(fleet)
    before_a, before_b = a.counts(), b.counts()
    floods_done = 0

    async def flood(client: httpx.AsyncClient) -> None:
        """Keep one long generation in flight on A, one after another."""
        nonlocal floods_done
        body = {**_chat(MODEL, "Tell me everything.", 1000), "ignore_eos": True, "stream": True}
        while True:
            async with client.stream("POST", f"{a.url}/v1/chat/completions",
                                     json=body) as response:
                assert response.status_code == 200
                async for _ in response.aiter_bytes():
                    pass
            floods_done += 1

    answered: Counter[str] = Counter()
    why_a: list[str] = []  # the scores of each pick of A

    async def shorts(client: httpx.AsyncClient, count: int) -> None:
        for i in range(count):
            response = await client.post(f"{fleet.router.url}/v1/chat/completions",
                                         json=_chat("load", f"Short question {i}?"))
            assert response.status_code == 200, response.text
            answered[response.headers["x-routeyard-backend"]] += 1
            if response.headers["x-routeyard-backend"] == "a":
                why_a.append(response.headers["x-routeyard-scores"])

    async with httpx.AsyncClient(timeout=120) as client:
        # four on A: two in its batch, two waiting
        floods = [asyncio.create_task(flood(client)) for _ in range(4)]
        try:
            def flooded() -> bool:
                counts = a.counts()
                return counts["num_requests_running"] == 2 and counts["num_requests_waiting"] >= 1

            await eventually(flooded, 30, "A running two and queueing")

            async def router_sees_it() -> bool:
                view = (await client.get(f"{fleet.router.url}/admin/backends")).json()
                (load,) = [x["engine_load"] for x in view["load"]["backends"] if x["name"] == "a"]
                return bool(load["running"] == 2 and load["waiting"] >= 1)

            await eventually(router_sees_it, 10, "the router's reading of A flooded")
            started = time.monotonic()
            await asyncio.gather(shorts(client, 25), shorts(client, 25))  # two at a time
            took = time.monotonic() - started
        finally:
            for task in floods:
                task.cancel()
            await asyncio.gather(*floods, return_exceptions=True)

    def by_b() -> float:
        return b.counts()["success"] - before_b["success"]

    # B serves nothing but the router's short requests: its own counter counts them
    await eventually(lambda: by_b() == answered["b"], 10, "B's counter matches the headers")
    on_b = by_b()
    on_a = a.counts()["done"] - before_a["done"] - floods_done
    print(f"routing (a): of 50 short requests B answered {on_b:.0f} ({on_b / 50:.0%}), "
          f"A {on_a:.0f}, in {took:.1f} s, beside {floods_done} long generations on A "
          f"finished and {len(floods)} aborted; A was picked with {why_a}")
    assert sum(answered.values()) == 50
    assert on_b >= 45
    assert on_a >= answered["a"]  # A's own counter has every one the router sent it


@dataclass(slots=True)
class Sent:
    at: float  # seconds after the SIGSTOP (negative: before)
    backend: str = "pending"  # the answering backend's name, or "timeout"
    scores: str = ""


async def test_a_stopped_engine_goes_stale_and_traffic_moves_within_a_second(
    fleet: Fleet,
) -> None:
    """(b) SIGSTOP of B's processes: its ``/metrics`` hangs, the router's reading of it ages
    past ``max_age`` and B counts as saturated; requests sent through the router from then
    on are answered by A. After SIGCONT, B is picked again."""
    a, b = fleet.a, fleet.b
    await _all_idle(fleet)
    stop_window_s = 2.0
    sent: list[Sent] = []
    stopped_at = time.monotonic()  # set again at the SIGSTOP
    in_flight: set[asyncio.Task[None]] = set()

    async def one(client: httpx.AsyncClient, record: Sent) -> None:
        try:
            response = await client.post(f"{fleet.router.url}/v1/chat/completions",
                                         json=_chat("load", "Ping?", 2))
        except httpx.TimeoutException:
            record.backend = "timeout"  # it went to B, which does not answer while stopped
            return
        assert response.status_code == 200, response.text
        record.backend = response.headers["x-routeyard-backend"]
        record.scores = response.headers.get("x-routeyard-scores", "")

    def send(client: httpx.AsyncClient, log: list[Sent]) -> Sent:
        record = Sent(time.monotonic() - stopped_at)
        log.append(record)
        task = asyncio.create_task(one(client, record))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        return record

    async with httpx.AsyncClient(timeout=httpx.Timeout(3.0)) as client, \
            httpx.AsyncClient(base_url=fleet.router.url, timeout=10) as admin:
        # both engines answer before the stop
        warm_up: list[Sent] = []
        while len({r.backend for r in warm_up}) < 2:
            record = send(client, warm_up)
            await eventually(lambda r=record: r.backend != "pending", 10, "an answer")
        stopped_at = time.monotonic()
        os.killpg(b.pgid, signal.SIGSTOP)
        try:
            while time.monotonic() - stopped_at < stop_window_s:
                send(client, sent)
                await asyncio.sleep(0.05)
            view = (await admin.get("/admin/backends")).json()["load"]["backends"]
        finally:
            os.killpg(b.pgid, signal.SIGCONT)
        continued = time.monotonic() - stopped_at
        # after SIGCONT B is fresh again and gets requests sent after it
        back: Sent | None = None
        deadline = time.monotonic() + 15
        while back is None and time.monotonic() < deadline:
            send(client, sent)
            await asyncio.sleep(0.05)
            back = next((r for r in sent if r.at >= continued and r.backend == "b"), None)
        await asyncio.gather(*in_flight, return_exceptions=True)

    during = [r for r in sent if 0 <= r.at < continued]
    stale = [r for r in during if "b stale" in r.scores]
    assert stale, [(round(r.at, 2), r.backend, r.scores) for r in during]
    stale_after = stale[0].at
    to_b = [r for r in during if r.backend != "a"]
    moved_after = max((r.at for r in to_b), default=0.0)
    (b_state,) = [x["engine_load"] for x in view if x["name"] == "b"]
    print(f"routing (b): B stale for the router {stale_after:.2f} s after SIGSTOP; the last "
          f"request routed to B was sent {moved_after:.2f} s after it ({len(to_b)} of "
          f"{len(during)} sent while stopped); /admin/backends then: B's reading "
          f"{b_state['age_s']:.2f} s old, error {b_state['error']!r}; after SIGCONT B "
          f"answered again a request sent "
          f"{(back.at - continued) if back else float('nan'):.2f} s after it")
    assert stale_after <= 1.0
    assert moved_after <= 1.0
    # from the first stale reading on, every request went to A and was answered at once
    assert all(r.backend == "a" and "b stale" in r.scores for r in during if r.at >= stale_after)
    assert b_state["age_s"] > MAX_AGE_S
    assert back is not None, [(round(r.at, 2), r.backend) for r in sent if r.at >= continued]
    await eventually(lambda: a.idle() and b.idle(), 60, "both engines idle after SIGCONT")


#: Tenants' names, a set per policy so that neither phase finds the other's prompts cached;
#: all twelve start with a different letter, so no two prompts share a first block.
TENANTS = {"rr": ("Aldermoor", "Brightwater", "Copperfield", "Driftwood", "Elmstead",
                  "Foxglove"),
           "ca": ("Greystone", "Hollowbrook", "Ironbridge", "Juniper", "Kestrel", "Larkspur")}
#: Each system prompt is about 11 blocks of 128 tokens: six of them (round robin: every
#: tenant on both engines) overflow an engine's 48 blocks, three (one engine's share under
#: ``cache_aware``) fit.
RULES = 45
ROUNDS = 5


def _system_prompt(tenant: str) -> str:
    return f"{tenant} support policy. " + " ".join(
        f"{tenant} rule {i}: answer about product {tenant[:3]}-{i * 37 % 101} politely."
        for i in range(RULES))


def _workload(phase: str) -> list[str]:
    """The tenants in order once, then ``ROUNDS - 1`` rounds in a shuffled order (the same
    shuffles for both phases)."""
    tenants = list(TENANTS[phase])
    order = list(tenants)
    shuffler = random.Random(16)
    for _ in range(ROUNDS - 1):
        shuffled = list(tenants)
        shuffler.shuffle(shuffled)
        order += shuffled
    return order


async def test_cache_aware_hits_the_prefix_cache_more_than_round_robin(fleet: Fleet) -> None:
    """(c) The same six-tenant workload through ``round_robin`` and then ``cache_aware``:
    the engines' own prefix-cache hit ratio is higher with ``cache_aware``."""
    a, b = fleet.a, fleet.b
    async with httpx.AsyncClient(base_url=a.url, timeout=30) as client:
        tokens = [(await client.post("/tokenize", json={
            "model": MODEL, "prompt": _system_prompt(t)})).json()["count"]
            for names in TENANTS.values() for t in names]
    assert all(9 * BLOCK <= n < 12 * BLOCK for n in tokens), tokens
    assert all(len(_system_prompt(t)) < PREFIX_CHARS - 100
               for names in TENANTS.values() for t in names)
    ratios: dict[str, float] = {}
    #: cache_aware's affinity keeps each tenant's blocks on one engine: without it the hit
    #: ratio is round robin's (ties rotate as round robin does), so a clear margin is asked
    margin = 0.15
    placed: dict[str, set[str]] = {}  # cache_aware: tenant → the backends it went to
    async with httpx.AsyncClient(base_url=fleet.router.url, timeout=60) as client:
        for phase in ("rr", "ca"):
            await _all_idle(fleet)
            before = [a.counts(), b.counts()]
            for n, tenant in enumerate(_workload(phase)):
                response = await client.post("/v1/chat/completions", json=_chat(
                    phase, f"Question {n}: where is order {n * 7919}?", 1,
                    system=_system_prompt(tenant)))
                assert response.status_code == 200, response.text
                if phase == "ca":  # round robin's answers name no backend
                    placed.setdefault(tenant, set()).add(response.headers["x-routeyard-backend"])
            after = [a.counts(), b.counts()]
            hits = sum(x["prefix_cache_hits"] - y["prefix_cache_hits"]
                       for x, y in zip(after, before, strict=True))
            queries = sum(x["prefix_cache_queries"] - y["prefix_cache_queries"]
                          for x, y in zip(after, before, strict=True))
            ratios[phase] = hits / queries
    print(f"routing (c): prefix-cache hit ratio round_robin {ratios['rr']:.1%}, cache_aware "
          f"{ratios['ca']:.1%} ({len(_workload('rr'))} requests each, system prompts of "
          f"{min(tokens)} to {max(tokens)} tokens); cache_aware placed "
          + ", ".join(f"{t}→{'/'.join(sorted(s))}" for t, s in placed.items()))
    assert ratios["ca"] >= ratios["rr"] + margin
