"""Prometheus metrics across two workers: one scrape shows them all, counts are exact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Router, Samples, free_port, start_router, wait_until
from tests.observability.conftest import CLEAN_ENV, chat_routes

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "count me"}]


DEAD = f"http://127.0.0.1:{free_port()}"


def _routes(engines: dict[str, str], comment: str = "") -> str:
    extra = (f"  obs-dead:\n    backends: [{{url: '{DEAD}'}}]\n    endpoints: [chat]\n"
             # refuses chat requests: the marker of _settled
             f"  obs-marker:\n    backends: [{{url: {engines['generate']}}}]\n"
             "    endpoints: [completions]\n")
    health = "{interval: 200ms, timeout: 200ms, unhealthy_threshold: 1}"
    return chat_routes(engines, extra, health) + comment


@pytest.fixture(scope="module")
def two_workers(engines: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    """Ready once both workers answered (``Router.wait_workers``)."""
    with start_router(tmp_path_factory.mktemp("metrics"), _routes(engines), workers=2,
                      drop_env=CLEAN_ENV) as router:
        yield router


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _markers(samples: Samples) -> float:
    """The marker requests counted: the only requests for ``obs-marker``."""
    return sum(v for (name, labels), v in samples.items()
               if name == "routeyard_requests_total" and ("model", "obs-marker") in labels)


def _settled(router: Router) -> Samples:
    """A scrape that shows all that every worker counted before this call.

    The worker answering a scrape flushes first, the other one once a second. So a marker
    request (refused: ``obs-marker`` serves no chat) goes to each worker on fresh
    connections, each worker known by its request ids; once the scrape counts every
    marker, each worker has flushed after everything it counted before its marker, and
    an overshoot would show."""
    counted = _markers(router.scrape())  # every earlier marker was counted before
    workers: set[str] = set()
    sent = 0

    def each_worker_got_one() -> bool:
        nonlocal sent
        r = _fresh_connection_post(router, {"model": "obs-marker", "messages": MESSAGES})
        assert r.status_code == 403, r.text
        sent += 1
        workers.add(r.headers["x-request-id"].rsplit("-", 1)[0])
        return len(workers) == router.workers

    wait_until(each_worker_got_one, 10, "a marker reaches each worker")

    def all_markers() -> Samples | None:
        samples = router.scrape()
        return samples if _markers(samples) - counted == sent else None

    return wait_until(all_markers, 5, f"the scrape counts all {sent} markers")


def _fresh_connection_post(router: Router, body: dict, **headers: str) -> httpx.Response:
    """One request on a new connection, so the kernel spreads them over both workers."""
    with httpx.Client(base_url=router.url, timeout=30) as client:
        return client.post(CHAT, json=body, headers=headers)


def test_counters_move_by_exactly_the_requests_sent_across_two_workers(
        two_workers: Router, engines: dict[str, str]) -> None:
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

    after = _settled(two_workers)

    def delta(name: str, **extra: str) -> float:
        return _value(after, name, **extra) - _value(before, name, **extra)

    online = {"key": "", "origin": "online"}  # no auth: no key
    assert delta("routeyard_requests_total", **labels, **online, code="200") == n_ok
    assert delta("routeyard_requests_total", model="", group="chat", backend="", **online,
                 code="404") == n_missing
    assert delta("routeyard_request_duration_seconds_count", **labels) == n_ok
    assert delta("routeyard_request_duration_seconds_bucket", **labels, le="+Inf") == n_ok
    assert delta("routeyard_time_to_first_byte_seconds_count", **labels) == n_ok
    assert delta("routeyard_router_overhead_seconds_count", model="obs-chat",
                 group="chat") == n_ok
    assert delta("routeyard_tokens_total", model="obs-chat", **online,
                 type="input") == tokens_in
    assert delta("routeyard_tokens_total", model="obs-chat", **online,
                 type="output") == tokens_out
    assert _value(after, "routeyard_backend_in_flight_requests", backend=backend) == 0
    assert _value(after, "routeyard_backend_up", backend=backend) == 1


def test_router_overhead_is_a_small_part_of_the_duration(two_workers: Router,
                                                          engines: dict[str, str]) -> None:
    labels = {"model": "obs-chat", "group": "chat"}
    before = two_workers.scrape()
    for _ in range(4):
        _fresh_connection_post(two_workers, {"model": "obs-chat", "messages": MESSAGES},
                               **{"x-fake-latency-ms": "50"})
    after = _settled(two_workers)

    def delta(name: str, **extra: str) -> float:
        return _value(after, name, **extra) - _value(before, name, **extra)

    overhead = delta("routeyard_router_overhead_seconds_sum", **labels)
    assert delta("routeyard_router_overhead_seconds_count", **labels) == 4
    duration = delta("routeyard_request_duration_seconds_sum", **labels,
                     backend=engines["generate"])
    assert 0 < overhead / 4 < 0.01
    assert duration > 4 * 0.05 > overhead


def test_backend_up_follows_the_health_checks(two_workers: Router,
                                              engines: dict[str, str]) -> None:
    def dead_reported_down() -> Samples | None:
        samples = two_workers.scrape()
        key = ("routeyard_backend_up", (("backend", DEAD),))
        return samples if key in samples and samples[key] == 0 else None

    samples = wait_until(dead_reported_down, 5, "the dead backend is reported down")
    assert _value(samples, "routeyard_backend_up", backend=engines["generate"]) == 1
    # per model: obs-dead has no backend that gets traffic, obs-marker its one engine
    assert ("routeyard_model_backends_up", (("model", "obs-dead"),)) in samples
    assert _value(samples, "routeyard_model_backends_up", model="obs-dead") == 0
    assert _value(samples, "routeyard_model_backends_up", model="obs-marker") == 1


def test_names_and_types_follow_prometheus_conventions(two_workers: Router) -> None:
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
        "routeyard_model_backends_up": "gauge",
        "routeyard_config_info": "gauge",
        "routeyard_config_reloads": "counter",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name


def test_config_hash_and_reloads_follow_an_edit(two_workers: Router,
                                                engines: dict[str, str]) -> None:
    old = two_workers.client.get("/admin/config").json()["sha256"]
    before = two_workers.scrape()
    assert _value(before, "routeyard_config_info", sha256=old) == 1
    two_workers.config.write_text(_routes(engines, "# edited\n"))

    def both_reloaded() -> Samples | None:  # each worker reloads (and counts) for itself
        after = two_workers.scrape()
        ok = (_value(after, "routeyard_config_reloads_total", result="ok")
              - _value(before, "routeyard_config_reloads_total", result="ok"))
        return after if ok == 2 else None

    after = wait_until(both_reloaded, 10, "both workers count the reload")
    new = two_workers.client.get("/admin/config").json()["sha256"]
    assert new != old
    assert _value(after, "routeyard_config_info", sha256=new) == 1
    assert _value(after, "routeyard_config_info", sha256=old) == 0


def test_multiprocess_directory_is_made_per_run_and_removed(
        engines: dict[str, str], tmp_path: Path) -> None:
    with start_router(tmp_path, chat_routes(engines), workers=2, drop_env=CLEAN_ENV) as router:
        match = router.find_log(r"PROMETHEUS_MULTIPROC_DIR=(\S+)")
        assert match, router.log_text()
        path = Path(match.group(1))
        assert path.is_dir()
        assert router.client.post(CHAT, json={"model": "obs-chat",
                                              "messages": MESSAGES}).status_code == 200
        assert list(path.glob("*.db"))
    assert not path.exists()


def test_switches_off_metrics_and_access_log(engines: dict[str, str], launch_router) -> None:
    router = launch_router(chat_routes(engines), drop_env=CLEAN_ENV,
                           env={"ROUTEYARD_METRICS": "false", "ROUTEYARD_ACCESS_LOG": "false"})
    assert router.client.get("/metrics").status_code == 404
    r = router.client.post(CHAT, json={"model": "obs-chat", "messages": MESSAGES})
    assert r.status_code == 200
    assert router.stop() == 0  # a clean shutdown: a worker writes out every line it holds
    assert router.access_lines() == []


def test_the_docs_metric_table_lists_every_metric_with_its_type_and_labels() -> None:
    """docs/observability.md's table mirrors the registry: names, types and labels."""
    import re

    from prometheus_client.metrics import MetricWrapperBase

    from router.metrics import Metrics

    doc = (Path(__file__).parents[2] / "docs" / "observability.md").read_text()
    documented = {}
    for name, kind, labels in re.findall(r"^\| `(routeyard_\w+)` \| (\w+) \|([^|]*)\|", doc,
                                         re.MULTILINE):
        top_level = re.sub(r"\([^)]*\)", "", labels)  # `type` (`input`, `output`): values
        documented[name] = (kind, tuple(re.findall(r"`(\w+)`", top_level)))
    exported = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            kind = metric._type
            name = metric._name + ("_total" if kind == "counter" else "")
            exported[name] = (kind, tuple(metric._labelnames))
    assert documented == exported
