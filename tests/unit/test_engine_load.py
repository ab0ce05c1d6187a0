"""router/engine_load.py: reading vLLM's /metrics, and the reading's age and credit."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.engine_load import EngineLoad, EngineReading, parse_engine_metrics
from tests.vllm_metrics import metrics_text


def test_reads_running_waiting_and_kv_use_from_a_vllm_body() -> None:
    body = metrics_text(running=3, waiting=7, kv_cache=0.42).encode()
    assert parse_engine_metrics(body) == EngineReading(3, 7, 0.42)


def test_data_parallel_ranks_are_summed_and_the_fullest_kv_cache_counts() -> None:
    body = (metrics_text(2, 1, 0.5, engines=2)
            .replace('vllm:kv_cache_usage_perc{engine="1",model_name="chat-model"} 0.5',
                     'vllm:kv_cache_usage_perc{engine="1",model_name="chat-model"} 0.75'))
    assert parse_engine_metrics(body.encode()) == EngineReading(4, 2, 0.75)


def test_a_longer_name_and_help_lines_are_not_the_series() -> None:
    # num_requests_waiting_by_reason starts with num_requests_waiting; HELP and TYPE name it
    body = metrics_text(running=1, waiting=0).encode()
    assert b"vllm:num_requests_waiting_by_reason{" in body
    assert parse_engine_metrics(body).waiting == 0
    plain = (b"vllm:num_requests_running 2\nvllm:num_requests_waiting 5 1700000000000\n"
             b"vllm:kv_cache_usage_perc{a=\"}\"} 0.25")
    assert parse_engine_metrics(plain) == EngineReading(2, 5, 0.25)


@pytest.mark.parametrize(("body", "message"), [
    (b"", "no vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc"),
    (b"# HELP up\nup 1\nvllm:num_requests_running 1\nvllm:num_requests_waiting 0\n",
     "no vllm:kv_cache_usage_perc in /metrics"),
    (b"vllm:num_requests_running{a=\"b\"}\n", "a sample without a value"),
    (b"vllm:num_requests_running x\n", "could not convert"),
])
def test_a_body_that_is_not_vllms_is_an_error_naming_what_is_missing(body: bytes,
                                                                      message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_engine_metrics(body)


def test_kv_use_out_of_range_or_nan_is_clamped_to_full() -> None:
    base = b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
    assert parse_engine_metrics(base + b"vllm:kv_cache_usage_perc 1.5\n").kv_cache == 1.0
    assert parse_engine_metrics(base + b"vllm:kv_cache_usage_perc NaN\n").kv_cache == 1.0
    assert parse_engine_metrics(base + b"vllm:kv_cache_usage_perc -0.1\n").kv_cache == 0.0


def test_the_scanner_is_much_faster_than_the_prometheus_parser() -> None:
    """Why the scanner exists (router/engine_load.py's docstring): best of several runs."""
    body = metrics_text(3, 7, 0.42).encode()
    text = body.decode()

    def best(fn: Callable[[], object], runs: int) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(runs):
                fn()
            times.append((time.perf_counter() - t0) / runs)
        return min(times)

    scanner = best(lambda: parse_engine_metrics(body), 50)
    library = best(lambda: list(text_string_to_metric_families(text)), 3)
    assert library > 20 * scanner


def test_the_queue_credits_this_workers_dispatches_since_the_scrape() -> None:
    load = EngineLoad()
    load.update(EngineReading(running=4, waiting=2, kv_cache=0.1), at=10.0,
                scraped_at=0.0, base=3)
    assert load.queue(in_flight=3) == 6  # nothing sent since the scrape
    assert load.queue(in_flight=8) == 11  # five dispatched since
    assert load.queue(in_flight=0) == 3  # three of those counted by the engine finished
    load.update(EngineReading(0, 0, 0.0), at=11.0, scraped_at=0.0, base=5)
    assert load.queue(in_flight=1) == 0  # never below zero


def test_a_reading_is_fresh_up_to_max_age_and_a_failed_scrape_keeps_it_aging() -> None:
    load = EngineLoad()
    assert not load.fresh(0.0, 0.5)  # never read
    load.update(EngineReading(1, 0, 0.2), at=100.0, scraped_at=0.0, base=0)
    assert load.fresh(100.5, 0.5) and not load.fresh(100.51, 0.5)
    load.failed("/metrics: status 500")
    assert load.running == 1 and load.error == "/metrics: status 500"
    assert load.describe(101.0, 2) == {
        "running": 1, "waiting": 0, "kv_cache_usage": 0.2, "age_s": 1.0,
        "dispatched_since": 2, "error": "/metrics: status 500"}
    load.update(EngineReading(0, 0, 0.0), at=102.0, scraped_at=0.0, base=0)
    assert load.error is None


def test_never_read_shows_nothing_or_the_error() -> None:
    load = EngineLoad()
    assert load.describe(0.0, 0) is None
    load.failed("no answer")
    assert load.describe(0.0, 0) == {"error": "no answer"}
