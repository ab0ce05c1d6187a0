"""router/prefix_index.py: block hashing, the bounded LRU index, the prefix scorer and
bounded load, in process."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from router.prefix_index import (
    PrefixIndex,
    PrefixIndexes,
    prefix_scores,
    text_blocks,
    token_blocks,
    within_bounded_load,
)


# -- hashing ------------------------------------------------------------------------------
def test_text_blocks_hash_whole_blocks_only() -> None:
    assert len(text_blocks("a" * 99, 10)) == 9
    assert len(text_blocks("a" * 100, 10)) == 10
    assert text_blocks("short", 10) == []
    assert text_blocks("a" * 100, 10)[:9] == text_blocks("a" * 99, 10)


def test_a_block_hash_covers_everything_before_it() -> None:
    shared = "system prompt " * 20
    one = text_blocks(shared + "first user", 8)
    two = text_blocks(shared + "other user", 8)
    common = len(shared) // 8
    assert one[:common] == two[:common]
    # the same 8 characters after a different prefix are a different block
    assert text_blocks("xxxxxxxx" + "samesame", 8)[1] != text_blocks("yyyyyyyy" + "samesame", 8)[1]
    # equal blocks at different depths hash differently (no match that is not a prefix)
    repeated = text_blocks("abcdefgh" * 3, 8)
    assert len(set(repeated)) == 3


def test_token_blocks_chain_whole_blocks_and_resume_from_a_parent() -> None:
    tokens = list(range(1000, 1010))
    hashes = token_blocks(tokens, 4)
    assert len(hashes) == 2  # 10 tokens: two whole blocks of 4, the tail of 2 is not hashed
    assert token_blocks(tokens[:8], 4) == hashes
    assert token_blocks(tokens[4:8], 4, parent=hashes[0]) == hashes[1:]
    assert token_blocks([9, *tokens[1:]], 4)[1] != hashes[1]  # a change in block 0 moves block 1
    assert token_blocks(tuple(tokens), 4) == hashes


def test_block_sizes_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="block_chars"):
        text_blocks("abc", 0)
    with pytest.raises(ValueError, match="block_size"):
        token_blocks([1, 2], 0)


def test_hashing_an_8k_character_prompt_is_cheap() -> None:
    text = "".join(random.Random(1).choice("abcdefgh ijkl") for _ in range(8192))
    runs = 200
    best = min(_time(lambda: text_blocks(text, 128), runs) for _ in range(3))
    assert best < 200e-6, f"{best * 1e6:.1f} µs per 8k-character prompt"


def _time(call: object, runs: int) -> float:
    assert callable(call)
    start = time.perf_counter()
    for _ in range(runs):
        call()
    return (time.perf_counter() - start) / runs


# -- the index ----------------------------------------------------------------------------
def test_match_counts_the_leading_blocks_each_endpoint_holds() -> None:
    index = PrefixIndex(max_blocks=100)
    prompt = token_blocks(list(range(40)), 4)  # 10 blocks
    index.record("a", prompt[:6])
    index.record("b", prompt[:2])
    index.record("c", token_blocks(list(range(100, 140)), 4))
    assert index.match(prompt) == {"a": 6, "b": 2}
    assert index.match(prompt[:1]) == {"a": 1, "b": 1}
    assert index.match(token_blocks(list(range(200, 240)), 4)) == {}
    assert index.match([]) == {}


def test_match_stops_at_the_first_block_an_endpoint_lacks() -> None:
    index = PrefixIndex(max_blocks=100)
    prompt = token_blocks(list(range(20)), 4)  # 5 blocks
    index.stored("a", prompt)
    index.removed("a", prompt[2:3])  # a hole: blocks 3 and 4 are no use without block 2
    index.stored("b", prompt)
    assert index.match(prompt) == {"a": 2, "b": 5}


def test_the_index_holds_at_most_max_blocks_and_forgets_the_least_recently_used() -> None:
    index = PrefixIndex(max_blocks=10)
    old = token_blocks(list(range(24)), 4)  # 6 blocks
    new = token_blocks(list(range(100, 124)), 4)
    index.record("a", old)
    index.record("b", new)
    assert len(index) == 10
    # the old prompt's tail went first: its head is still matched
    assert index.match(old) == {"a": 4}
    assert index.match(new) == {"b": 6}
    index.record("a", old[:4])  # touched: now the new prompt is the older one
    index.record("c", token_blocks(list(range(200, 212)), 4))
    assert len(index) == 10
    assert index.match(old) == {"a": 4}
    assert index.match(new) == {"b": 3}
    assert index.held_by("b") == 3


def test_a_per_endpoint_bound_ages_one_endpoint_without_touching_the_others() -> None:
    index = PrefixIndex(max_blocks=1000, per_endpoint=5)
    first = token_blocks(list(range(16)), 4)  # 4 blocks
    second = token_blocks(list(range(100, 116)), 4)
    index.record("a", first)
    index.record("b", first)
    index.record("a", second)
    assert index.held_by("a") == 5
    assert index.match(first) == {"a": 1, "b": 4}
    assert index.match(second) == {"a": 4}
    assert len(index) == 8


def test_removed_cleared_forget_and_retain() -> None:
    index = PrefixIndex(max_blocks=100)
    prompt = token_blocks(list(range(16)), 4)
    for endpoint in ("a", "b", "c", "d"):
        index.stored(endpoint, prompt)
    index.removed("a", prompt[1:])
    index.removed("z", prompt)  # an endpoint never seen: nothing happens
    assert index.match(prompt) == {"a": 1, "b": 4, "c": 4, "d": 4}
    index.cleared("b")
    index.forget("c")
    assert index.match(prompt) == {"a": 1, "d": 4}
    index.retain(["a"])
    assert index.match(prompt) == {"a": 1}
    assert index.endpoints() == ["a"]
    index.removed("a", prompt[:1])
    assert len(index) == 0 and index.endpoints() == []


def test_resize_shrinks_to_the_most_recently_used() -> None:
    index = PrefixIndex(max_blocks=100)
    old = token_blocks(list(range(16)), 4)
    new = token_blocks(list(range(100, 116)), 4)
    index.record("a", old)
    index.record("b", new)
    index.resize(5, per_endpoint=None)
    assert len(index) == 5
    assert index.match(new) == {"b": 4}
    assert index.match(old) == {"a": 1}
    index.resize(5, per_endpoint=2)
    assert index.match(new) == {"b": 2}
    with pytest.raises(ValueError, match="max_blocks"):
        PrefixIndex(0)


def test_indexes_outlive_reloads_and_keep_only_configured_models() -> None:
    indexes = PrefixIndexes()
    chat = indexes.get("chat", max_blocks=100)
    chat.record("a", token_blocks(list(range(8)), 4))
    assert indexes.get("chat", max_blocks=100) is chat  # the next snapshot finds it
    assert indexes.get("chat", max_blocks=1) is chat and len(chat) == 1  # new bound applied
    indexes.get("embed", max_blocks=10)
    assert sorted(indexes.sizes()) == [("chat", 1), ("embed", 0)]
    indexes.retain(["embed"])
    assert indexes.sizes() == [("embed", 0)]


# -- the scorer ---------------------------------------------------------------------------
def test_prefix_scores_are_matched_over_total_blocks_in_the_given_order() -> None:
    index = PrefixIndex(max_blocks=100)
    prompt = token_blocks(list(range(40)), 4)  # 10 blocks
    index.record("a", prompt[:5])
    index.record("b", prompt)
    assert prefix_scores(index, prompt, ["c", "b", "a"]) == [0.0, 1.0, 0.5]
    assert prefix_scores(index, [], ["a", "b"]) == [0.0, 0.0]
    assert prefix_scores(index, token_blocks([7] * 8, 4), ["a"]) == [0.0]


def test_within_bounded_load_allows_up_to_the_factor_of_the_mean() -> None:
    assert within_bounded_load([0, 0, 0, 0], 1.25) == [True] * 4
    # mean with the new request: 9/4 = 2.25, bound ceil(2.8) = 3: 3 + 1 is over it
    assert within_bounded_load([3, 2, 2, 1], 1.25) == [False, True, True, True]
    assert within_bounded_load([], 1.25) == []
    assert any(within_bounded_load([5, 5], 1.0))
    with pytest.raises(ValueError, match="load_factor"):
        within_bounded_load([1], 0.5)


# -- a shared system prompt under prefix + load scoring -------------------------------------
ENDPOINTS = ["e0", "e1", "e2", "e3"]
SYSTEM = "You are the support assistant of Example Corp. Answer politely. " * 40  # 20 blocks
BLOCK_CHARS = 128


def _route_sessions(load_factor: float | None, sessions: int = 100) -> Counter[str]:
    """A scoring loop as ``cache_aware`` would run it: score = 3 * prefix + 2 * (1 - this
    endpoint's share of the requests in flight), max wins (first on a tie); every session's
    request stays in flight. With ``load_factor``, only endpoints within bounded load are
    scored."""
    index = PrefixIndex(max_blocks=100_000)
    in_flight = dict.fromkeys(ENDPOINTS, 0)
    for session in range(sessions):
        prompt = SYSTEM + f"user {session}: my order {session * 7919} is late. " * 5
        hashes = text_blocks(prompt, BLOCK_CHARS)
        total = sum(in_flight.values())
        loads = [in_flight[e] / total if total else 0.0 for e in ENDPOINTS]
        prefix = prefix_scores(index, hashes, ENDPOINTS)
        allowed = (within_bounded_load([in_flight[e] for e in ENDPOINTS], load_factor)
                   if load_factor is not None else [True] * len(ENDPOINTS))
        scores = [3 * p + 2 * (1 - load) if ok else float("-inf")
                  for p, load, ok in zip(prefix, loads, allowed, strict=True)]
        pick = ENDPOINTS[scores.index(max(scores))]
        in_flight[pick] += 1
        index.record(pick, hashes)
    return Counter(in_flight)


def test_weights_alone_send_every_session_with_a_shared_prompt_to_one_backend() -> None:
    # why bounded load is needed: 3 * 20/21 of a shared prefix beats 2 * an idle backend
    assert _route_sessions(load_factor=None) == Counter({"e0": 100, "e1": 0, "e2": 0, "e3": 0})


def test_bounded_load_spreads_sessions_sharing_a_long_system_prompt() -> None:
    spread = _route_sessions(load_factor=1.25)
    assert sum(spread.values()) == 100
    assert max(spread.values()) <= 32  # ceil(1.25 * 100 / 4): the bound holds
    assert min(spread.values()) >= 18  # and every backend takes a fair share


def test_bounded_load_keeps_a_session_on_the_backend_that_has_its_turns() -> None:
    index = PrefixIndex(max_blocks=100_000)
    in_flight = dict.fromkeys(ENDPOINTS, 5)  # an even background load
    conversation = SYSTEM + "user 1: my order is late"
    first = text_blocks(conversation, BLOCK_CHARS)
    index.record("e2", first)
    for turn in range(3):
        conversation += f"\nassistant: answer {turn}\nuser: question {turn + 1}" * 5
        hashes = text_blocks(conversation, BLOCK_CHARS)
        allowed = within_bounded_load([in_flight[e] for e in ENDPOINTS], 1.25)
        scores = [3 * p if ok else float("-inf")
                  for p, ok in zip(prefix_scores(index, hashes, ENDPOINTS), allowed, strict=True)]
        assert ENDPOINTS[scores.index(max(scores))] == "e2"
        index.record("e2", hashes)
