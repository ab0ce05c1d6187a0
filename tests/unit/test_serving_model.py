"""The fake engine's serving model, in process: slots and the FIFO queue, the token budget,
prefix-cache hits by chained block hashes, LRU eviction, step costs, and its vLLM metrics."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.fake_engine.serving import (
    EngineRequest,
    ServingModel,
    ServingParams,
    block_hashes,
    token_ids,
)
from router.fake_engine.simulated import SimulatedEngine

BS = 4


def params(**changes: float) -> ServingParams:
    base = {"block_size": BS, "num_blocks": 64, "max_num_seqs": 4, "max_num_batched_tokens": 64,
            "prefill_s_per_token": 0.001, "step_base_s": 0.01, "step_per_seq_s": 0.002}
    return ServingParams(**{**base, **changes})  # type: ignore[arg-type]


def prompt(tag: int, n: int) -> list[int]:
    return [tag * 1000 + i for i in range(n)]


def run_to_end(model: ServingModel, limit: int = 10_000) -> float:
    """Run steps until idle; the simulated time they took."""
    total = 0.0
    for _ in range(limit):
        step = model.schedule()
        if step is None:
            return total
        total += step.duration_s
        model.complete(step)
    raise AssertionError("the model never went idle")


def test_tokens_are_words_and_block_hashes_chain_the_whole_prefix() -> None:
    assert token_ids("a  b\nc") == token_ids("a b c") and len(token_ids("a b c")) == 3
    assert token_ids("a b") != token_ids("a c")
    one, two = block_hashes(prompt(1, 9), BS), block_hashes([*prompt(1, 8), 5, 6], BS)
    assert len(one) == 2 and one == two  # the partial last block has no hash
    changed_head = block_hashes([99, *prompt(1, 8)[1:]], BS)
    assert changed_head[1] != one[1]  # block 1's hash depends on block 0's tokens


def test_slots_bound_the_running_set_and_the_queue_is_first_come_first_served() -> None:
    model = ServingModel(params(max_num_seqs=2))
    seqs = [model.submit(prompt(i, 3), 5 + 4 * i) for i in range(4)]
    step = model.schedule()
    assert step is not None
    assert model.running == seqs[:2] and list(model.waiting) == seqs[2:]
    model.complete(step)
    while not seqs[0].finished:
        s = model.schedule()
        assert s is not None and len(model.running) <= 2
        model.complete(s)
    step = model.schedule()
    assert seqs[2] in model.running and list(model.waiting) == [seqs[3]]
    run_to_end(model)
    assert all(s.finished and s.generated == s.max_tokens for s in seqs)
    assert model.counters.finished == 4 and model.counters.generation_tokens == 5 * 4 + 4 * 6


def test_step_time_is_base_plus_decodes_plus_prefill_tokens() -> None:
    p = params()
    model = ServingModel(p)
    model.submit(prompt(1, 10), 3)
    first = model.schedule()
    assert first is not None
    assert first.duration_s == pytest.approx(p.step_base_s + 10 * p.prefill_s_per_token)
    model.complete(first)
    model.submit(prompt(2, 6), 3)
    second = model.schedule()
    assert second is not None  # one decode, plus the new prompt's prefill
    assert second.duration_s == pytest.approx(
        p.step_base_s + p.step_per_seq_s + 6 * p.prefill_s_per_token)


def test_the_token_budget_chunks_a_long_prefill_over_steps() -> None:
    model = ServingModel(params(max_num_batched_tokens=16))
    seq = model.submit(prompt(1, 40), 2)
    chunks = []
    while not seq.prefilled:
        step = model.schedule()
        assert step is not None
        chunks.append(sum(c for _, c in step.prefill))
        model.complete(step)
    assert chunks == [16, 16, 8]
    assert seq.generated == 1  # the last prefill step samples the first token


def test_a_shared_prefix_hits_whole_blocks_and_the_counters_say_so() -> None:
    model = ServingModel(params())
    system = prompt(7, 10)  # two full blocks and a partial one
    model.submit([*system, 1, 2], 2)
    run_to_end(model)
    c = model.counters
    assert (c.prefix_queries, c.prefix_hits) == (12, 0)
    second = model.submit([*system, 3, 4, 5], 2)
    step = model.schedule()
    assert step is not None
    assert second.cached_tokens == 8  # the two full system blocks, not the partial one
    assert step.prefill == [(second, 13 - 8)]
    assert (c.prefix_queries, c.prefix_hits) == (25, 8)
    other = ServingModel(params())
    other.submit(prompt(8, 12), 2)
    other.schedule()
    assert other.counters.prefix_hits == 0


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    model = ServingModel(params())
    model.submit(prompt(1, 8), 1)
    run_to_end(model)
    again = model.submit(prompt(1, 8), 1)
    step = model.schedule()
    assert step is not None and again.cached_tokens == 4 and step.prefill == [(again, 4)]


def test_lru_evicts_the_least_recently_used_unreferenced_blocks_first() -> None:
    # 12 blocks: each request takes 2 prompt blocks + 1 output block.
    model = ServingModel(params(num_blocks=12))
    for tag in (1, 2, 3, 4):
        model.submit(prompt(tag, 8), 2)
        run_to_end(model)
    assert model.cache.evicted == 0 and model.kv_usage() == 0
    model.submit(prompt(1, 9), 1)  # tag 1 used again: now the most recent
    run_to_end(model)
    model.submit(prompt(5, 8), 2)  # needs 3 blocks: 4 of 12 are free of any cached block
    model.submit(prompt(6, 8), 2)  # 3 more: evicts from tag 2 (least recent), tail first
    run_to_end(model)
    assert model.cache.evicted == 2
    hits = {tag: model.cache.match(block_hashes(prompt(tag, 8), BS), 2) for tag in (1, 2, 3, 4)}
    assert hits == {1: 2, 2: 0, 3: 2, 4: 2}


def test_an_admission_never_evicts_the_blocks_it_hits() -> None:
    model = ServingModel(params(num_blocks=8))
    model.submit([*prompt(1, 8), 5], 1)  # A: 2 cached blocks, the first into the LRU list
    run_to_end(model)
    model.submit([*prompt(2, 4), 5], 1)  # B: 1 cached block, after A's
    run_to_end(model)
    longer = model.submit([*prompt(1, 8), *prompt(3, 20)], 1)  # A's prefix: 5 new blocks + 1
    step = model.schedule()
    assert step is not None and model.running == [longer]
    assert longer.cached_tokens == 8 and model.cache.evicted == 1
    assert model.cache.match(block_hashes(prompt(2, 4), BS), 1) == 0  # B made the room


def test_blocks_in_use_are_never_evicted_and_admission_waits_for_room() -> None:
    model = ServingModel(params(num_blocks=6, max_num_seqs=8))
    big = model.submit(prompt(1, 16), 8)  # 4 prompt + 2 output blocks: the whole cache
    blocked = model.submit(prompt(2, 8), 1)  # 2 prompt blocks + 1 output block
    step = model.schedule()
    assert step is not None and model.running == [big] and list(model.waiting) == [blocked]
    assert model.kv_usage() == 1.0
    model.complete(step)
    run_to_end(model)
    assert blocked.finished and model.cache.evicted >= 1


def test_an_aborted_request_leaves_the_queue_or_frees_its_blocks() -> None:
    model = ServingModel(params(max_num_seqs=1))
    running = model.submit(prompt(1, 8), 50)
    waiting = model.submit(prompt(2, 8), 50)
    step = model.schedule()
    assert step is not None
    model.abort(waiting)
    assert not model.waiting
    model.abort(running)
    model.complete(step)  # the planned step skips it
    assert model.idle and model.kv_usage() == 0 and running.generated == 0
    assert model.schedule() is None


def test_listeners_hear_each_token_and_the_end() -> None:
    model = ServingModel(params())
    heard: list[int] = []
    seq: EngineRequest = model.submit(prompt(1, 5), 3, lambda: heard.append(seq.generated))
    run_to_end(model)
    assert heard == [1, 2, 3] and seq.finished


def test_reset_clears_only_an_idle_cache() -> None:
    model = ServingModel(params())
    model.submit(prompt(1, 8), 1)
    run_to_end(model)
    busy = model.submit(prompt(2, 8), 5)
    model.complete(model.schedule())  # type: ignore[arg-type]
    assert not model.cache.clear()
    model.abort(busy)
    assert model.cache.clear()
    again = model.submit(prompt(1, 8), 1)
    model.schedule()
    assert again.cached_tokens == 0


def test_parameters_parse_from_the_command_line_and_bad_ones_say_why() -> None:
    p = ServingParams.parse(["max_num_seqs=8", "time_scale=0.5"])
    assert (p.max_num_seqs, p.time_scale, p.block_size) == (8, 0.5, 16)
    for bad, says in (["max_num_seqs"], "NAME=VALUE"), (["slots=3"], "NAME=VALUE"), \
            (["max_num_seqs=x"], "not a int"), (["num_blocks=0"], "greater than 0"):
        with pytest.raises(ValueError, match=says):
            ServingParams.parse(bad)


def test_metrics_have_vllms_names_labels_and_values() -> None:
    p = params(num_blocks=10, max_num_seqs=1)
    engine = SimulatedEngine(p, "fleet-model")
    model = engine.model
    model.submit(prompt(1, 8), 1)
    run_to_end(model)
    model.submit([*prompt(1, 8), 9], 4)
    model.submit(prompt(2, 4), 1)
    model.complete(model.schedule())  # type: ignore[arg-type]
    samples = {s.name: s for f in text_string_to_metric_families(engine.metrics().decode())
               for s in f.samples}
    values = {name: s.value for name, s in samples.items()}
    assert values["vllm:num_requests_running"] == 1
    assert values["vllm:num_requests_waiting"] == 1
    assert values["vllm:kv_cache_usage_perc"] == pytest.approx(model.kv_usage())
    assert 0 < values["vllm:kv_cache_usage_perc"] < 1
    assert values["vllm:prefix_cache_queries_total"] == 17
    assert values["vllm:prefix_cache_hits_total"] == 8
    assert values["vllm:request_success_total"] == 1
    labels = samples["vllm:num_requests_running"].labels
    assert labels == {"engine": "0", "model_name": "fleet-model"}
    info = samples["vllm:cache_config_info"].labels
    assert info["block_size"] == "4" and info["enable_prefix_caching"] == "True"
    assert info["num_gpu_blocks"] == "10" and info["kv_cache_size_tokens"] == "40"
    assert info["engine"] == "0" and info["model_name"] == "fleet-model"
