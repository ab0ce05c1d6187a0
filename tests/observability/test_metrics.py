"""Prometheus metrics across two workers: one scrape shows them all, counts are exact."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, stop
from tests.observability.conftest import ObservedRouter, chat_routes, start_observed

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "count me"}]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


DEAD = f"http://127.0.0.1:{free_port()}"


def _routes(engines: dict[str, str], comment: str = "") -> str:
    extra = f"  obs-dead:\n    backends: [{{url: '{DEAD}'}}]\n    endpoints: [chat]\n"
    health = "{interval: 200ms, timeout: 200ms, unhealthy_threshold: 1}"
    return chat_routes(engines, extra, health) + comment


@pytest.fixture(scope="module")
def two_workers(engines: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObservedRouter]:
    router = start_observed(tmp_path_factory.mktemp("metrics"), _routes(engines), {}, workers=2)
    yield router
    stop(router.proc)


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _settled(router: ObservedRouter, name: str, expected: float, *, before: Samples,
             **labels: str) -> Samples:
    """A scrape once ``name`` grew by ``expected`` (within 3 s), checked again a flush later
    so that an overshoot would show."""
    deadline = time.monotonic() + 3
    while True:
        samples = router.scrape()
        if _value(samples, name, **labels) - _value(before, name, **labels) >= expected:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    time.sleep(1.1)
    return router.scrape()


def _fresh_connection_post(router: ObservedRouter, body: dict, **headers: str) -> httpx.Response:
    """One request on a new connection, so the kernel spreads them over both workers."""
    with httpx.Client(base_url=router.url, timeout=30) as client:
        return client.post(CHAT, json=body, headers=headers)


def test_counters_move_by_exactly_the_requests_sent_across_two_workers(
        two_workers: ObservedRouter, engines: dict[str, str]) -> None:
    backend = engines["generate"]
    labels = {"model": "obs-chat", "group": "chat", "backend": backend}
    before = two_workers.scrape()
    n_ok, n_missing = 24, 3
    prefixes = set()
    tokens_in = tokens_out = 0
    for i in range(n_ok):
        body = {"model": "obs-chat", "messages": MESSAGES}
        if i % 2:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            r = _fresh_connection_post(two_workers, body)
            events = [e for e in r.content.split(b"\n\n") if b'"usage"' in e]
            usage = orjson.loads(events[-1].removeprefix(b"data: "))["usage"]
        else:
            r = _fresh_connection_post(two_workers, body)
            usage = r.json()["usage"]
        assert r.status_code == 200
        tokens_in += usage["prompt_tokens"]
        tokens_out += usage["completion_tokens"]
        prefixes.add(r.headers["x-request-id"].rsplit("-", 1)[0])
    for _ in range(n_missing):
        r = _fresh_connection_post(two_workers, {"model": "nope", "messages": MESSAGES})
        assert r.status_code == 404
        prefixes.add(r.headers["x-request-id"].rsplit("-", 1)[0])
    assert len(prefixes) == 2, "both workers should have served requests (ids per process)"

    # The worker that answers a scrape flushes first; the other one flushes every second.
    after = _settled(two_workers, "routeyard_requests_total", n_ok, **labels, code="200",
                     before=before)

    def delta(name: str, **extra: str) -> float:
        return _value(after, name, **extra) - _value(before, name, **extra)

    assert delta("routeyard_requests_total", **labels, code="200") == n_ok
    assert delta("routeyard_requests_total", model="", group="chat", backend="",
                 code="404") == n_missing
    assert delta("routeyard_request_duration_seconds_count", **labels) == n_ok
    assert delta("routeyard_request_duration_seconds_bucket", **labels, le="+Inf") == n_ok
    assert delta("routeyard_time_to_first_byte_seconds_count", **labels) == n_ok
    assert delta("routeyard_router_overhead_seconds_count", model="obs-chat",
                 group="chat") == n_ok
    assert delta("routeyard_tokens_total", model="obs-chat", type="input") == tokens_in
    assert delta("routeyard_tokens_total", model="obs-chat", type="output") == tokens_out
    assert _value(after, "routeyard_backend_in_flight_requests", backend=backend) == 0
    assert _value(after, "routeyard_backend_up", backend=backend) == 1


def test_router_overhead_is_a_small_part_of_the_duration(two_workers: ObservedRouter,
                                                          engines: dict[str, str]) -> None:
    labels = {"model": "obs-chat", "group": "chat"}
    before = two_workers.scrape()
    for _ in range(4):
        _fresh_connection_post(two_workers, {"model": "obs-chat", "messages": MESSAGES},
                               **{"x-fake-latency-ms": "50"})
    after = _settled(two_workers, "routeyard_router_overhead_seconds_count", 4, before=before,
                     **labels)

    def delta(name: str, **extra: str) -> float:
        return _value(after, name, **extra) - _value(before, name, **extra)

    overhead = delta("routeyard_router_overhead_seconds_sum", **labels)
    assert delta("routeyard_router_overhead_seconds_count", **labels) == 4
    duration = delta("routeyard_request_duration_seconds_sum", **labels,
                     backend=engines["generate"])
    assert 0 < overhead / 4 < 0.01
    assert duration > 4 * 0.05 > overhead


def test_backend_up_follows_the_health_checks(two_workers: ObservedRouter,
                                              engines: dict[str, str]) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        samples = two_workers.scrape()
        if _value(samples, "routeyard_backend_up", backend=DEAD) == 0 and \
                ("routeyard_backend_up", (("backend", DEAD),)) in samples:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the dead backend was never reported down")
    assert _value(samples, "routeyard_backend_up", backend=engines["generate"]) == 1


def test_names_and_types_follow_prometheus_conventions(two_workers: ObservedRouter) -> None:
    text = httpx.get(f"{two_workers.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert all(name.startswith("routeyard_") for name in families)
    for family in families.values():
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith("_seconds")
    assert not [n for n in families if n.endswith("_created")]
    expected = {
        "routeyard_requests": "counter",
        "routeyard_request_duration_seconds": "histogram",
        "routeyard_time_to_first_byte_seconds": "histogram",
        "routeyard_router_overhead_seconds": "histogram",
        "routeyard_backend_in_flight_requests": "gauge",
        "routeyard_backend_up": "gauge",
        "routeyard_config_info": "gauge",
        "routeyard_config_reloads": "counter",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name


def test_config_hash_and_reloads_follow_an_edit(two_workers: ObservedRouter,
                                                engines: dict[str, str]) -> None:
    old = two_workers.client.get("/admin/config").json()["sha256"]
    before = two_workers.scrape()
    assert _value(before, "routeyard_config_info", sha256=old) == 1
    two_workers.config.write_text(_routes(engines, "# edited\n"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = two_workers.scrape()
        ok = (_value(after, "routeyard_config_reloads_total", result="ok")
              - _value(before, "routeyard_config_reloads_total", result="ok"))
        if ok == 2:  # each worker reloads (and counts) for itself
            break
        time.sleep(0.1)
    else:
        raise AssertionError("both workers did not count the reload")
    new = two_workers.client.get("/admin/config").json()["sha256"]
    assert new != old
    assert _value(after, "routeyard_config_info", sha256=new) == 1
    assert _value(after, "routeyard_config_info", sha256=old) == 0


def test_multiprocess_directory_is_made_per_run_and_removed(
        engines: dict[str, str], tmp_path: Path) -> None:
    router = start_observed(tmp_path, chat_routes(engines), {}, workers=2)
    try:
        match = re.search(r"PROMETHEUS_MULTIPROC_DIR=(\S+)", router.log.read_text())
        assert match, router.log.read_text()
        path = Path(match.group(1))
        assert path.is_dir()
        assert router.client.post(CHAT, json={"model": "obs-chat",
                                              "messages": MESSAGES}).status_code == 200
        assert list(path.glob("*.db"))
    finally:
        stop(router.proc)
    assert not path.exists()


def test_switches_off_metrics_and_access_log(engines: dict[str, str], tmp_path: Path) -> None:
    router = start_observed(tmp_path, chat_routes(engines),
                            {"ROUTEYARD_METRICS": "false", "ROUTEYARD_ACCESS_LOG": "false"})
    try:
        assert router.client.get("/metrics").status_code == 404
        r = router.client.post(CHAT, json={"model": "obs-chat", "messages": MESSAGES})
        assert r.status_code == 200
        time.sleep(0.3)  # longer than the access log's flush interval
        assert router.access_lines() == []
    finally:
        stop(router.proc)
