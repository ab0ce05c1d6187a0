"""router/balancer.py: the four policies' picks, exactly, with no sockets."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from router.balancer import BoundedPrefix, HashRing, LeastRequest, RoundRobin, make_balancer
from router.endpoint import Endpoint
from tests.unit.fleet_core import eject, endpoints, members, model_config, registry


def names(picks: list[Endpoint | None]) -> list[str]:
    return ["-" if e is None else e.origin.host for e in picks]


def picks(balancer: RoundRobin | LeastRequest | HashRing, n: int, key: str | None = None,
          exclude: set[Endpoint] | None = None) -> list[str]:
    return names([balancer.pick(key, exclude or set()) for _ in range(n)])


# -- round robin --------------------------------------------------------------------------
def test_round_robin_equal_weights_rotate_exactly() -> None:
    balancer = RoundRobin(members(endpoints(registry(), 3)))
    assert picks(balancer, 9) == ["e0", "e1", "e2"] * 3


def test_round_robin_5_1_1_interleaves_like_nginx() -> None:
    # nginx's documented smooth WRR sequence for weights a=5, b=1, c=1: a a b a c a a.
    balancer = RoundRobin(members(endpoints(registry(), 3), [5, 1, 1]))
    assert picks(balancer, 14) == ["e0", "e0", "e1", "e0", "e2", "e0", "e0"] * 2


def test_round_robin_skips_down_full_and_excluded() -> None:
    eps = endpoints(registry(), 4, max_in_flight=1)
    balancer = RoundRobin(members(eps))
    eject(eps[1])
    eps[2].in_flight = 1  # at its max_in_flight
    assert picks(balancer, 5, exclude={eps[3]}) == ["e0"] * 5
    assert picks(balancer, 4, exclude={eps[0]}) == ["e3"] * 4
    assert balancer.pick(None, {eps[0], eps[3]}) is None
    eps[2].in_flight = 0
    assert set(picks(balancer, 3, exclude={eps[0], eps[3]})) == {"e2"}


def test_round_robin_single_member() -> None:
    (ep,) = endpoints(registry(), 1, max_in_flight=1)
    balancer = RoundRobin(members([ep]))
    assert balancer.pick(None, set()) is ep
    assert balancer.pick(None, {ep}) is None
    ep.in_flight = 1
    assert balancer.pick(None, set()) is None
    ep.in_flight = 0
    eject(ep)
    assert balancer.pick(None, set()) is None


# -- least request ------------------------------------------------------------------------
def test_least_request_picks_fewest_in_flight() -> None:
    eps = endpoints(registry(), 3)
    for ep, n in zip(eps, (3, 1, 2), strict=True):
        ep.in_flight = n
    balancer = LeastRequest(members(eps))
    assert picks(balancer, 4) == ["e1"] * 4


def test_least_request_is_relative_to_weight() -> None:
    eps = endpoints(registry(), 2)
    eps[0].in_flight, eps[1].in_flight = 4, 2  # 4/4 = 1 < 2/1 = 2
    balancer = LeastRequest(members(eps, [4, 1]))
    assert picks(balancer, 3) == ["e0"] * 3
    eps[0].in_flight = 12  # 12/4 = 3 > 2
    assert picks(balancer, 3) == ["e1"] * 3


def test_least_request_ties_rotate() -> None:
    balancer = LeastRequest(members(endpoints(registry(), 3)))
    chosen = picks(balancer, 9)
    assert Counter(chosen) == {"e0": 3, "e1": 3, "e2": 3}
    assert all(len(set(chosen[i:i + 3])) == 3 for i in range(0, 9, 3))


def test_least_request_skips_down_full_and_excluded() -> None:
    eps = endpoints(registry(), 4, max_in_flight=2)
    eps[0].in_flight = 1  # the most loaded usable one
    eject(eps[1])
    eps[2].in_flight = 2  # full
    balancer = LeastRequest(members(eps))
    assert picks(balancer, 3) == ["e3"] * 3
    assert picks(balancer, 3, exclude={eps[3]}) == ["e0"] * 3
    assert balancer.pick(None, {eps[0], eps[3]}) is None


# -- session: consistent hashing ----------------------------------------------------------
KEYS = [f"session-{i}" for i in range(1000)]


def session_balancer(eps: list[Endpoint]) -> HashRing:
    balancer = make_balancer(model_config(policy="session"), members(eps))
    assert isinstance(balancer, HashRing)
    return balancer


def owners(balancer: HashRing) -> dict[str, Endpoint | None]:
    return {k: balancer.pick(k, set()) for k in KEYS}


def test_session_hashing_is_stable_and_spread() -> None:
    eps = endpoints(registry(), 4)
    first = owners(session_balancer(eps))
    assert owners(session_balancer(eps)) == first  # a rebuilt ring agrees
    assert all(session_balancer(eps).pick(k, set()) is first[k] for k in KEYS[:50] * 3)
    share = Counter(e.key for e in first.values() if e is not None)
    assert len(share) == 4 and min(share.values()) > 100  # 64 vnodes each: roughly even


def test_session_removed_member_moves_only_its_own_keys() -> None:
    eps = endpoints(registry(), 4)
    before = owners(session_balancer(eps))
    after = owners(session_balancer([eps[0], eps[1], eps[3]]))
    moved = {k for k in KEYS if after[k] is not before[k]}
    owned_by_gone = {k for k in KEYS if before[k] is eps[2]}
    assert moved == owned_by_gone and 100 < len(moved) < 400
    assert all(after[k] is not eps[2] for k in KEYS)


def test_session_down_member_moves_only_its_keys_and_they_come_back() -> None:
    eps = endpoints(registry(), 4)
    balancer = session_balancer(eps)
    before = owners(balancer)
    eject(eps[1])
    during = owners(balancer)
    assert {k for k in KEYS if during[k] is not before[k]} == {
        k for k in KEYS if before[k] is eps[1]}
    eps[1].health.ejected, eps[1].health.up = False, True
    assert owners(balancer) == before


def test_session_skips_excluded_and_full_but_keeps_other_keys() -> None:
    eps = endpoints(registry(), 3, max_in_flight=1)
    balancer = session_balancer(eps)
    key = KEYS[0]
    home = balancer.pick(key, set())
    assert home is not None
    walk = list(balancer.walk(key))
    assert walk[0] is home and len(walk) == 3
    assert balancer.pick(key, {home}) is walk[1]
    home.in_flight = 1
    assert balancer.pick(key, set()) is walk[1]
    assert balancer.pick(key, {walk[1], walk[2]}) is None


def test_session_without_key_falls_back_to_round_robin() -> None:
    balancer = session_balancer(endpoints(registry(), 3))
    assert picks(balancer, 6, key=None) == ["e0", "e1", "e2"] * 2


# -- prefix: consistent hashing with bounded loads ----------------------------------------
def prefix_balancer(eps: list[Endpoint], load_factor: float = 1.25) -> BoundedPrefix:
    balancer = make_balancer(model_config(policy="prefix", prefix={"load_factor": load_factor}),
                             members(eps))
    assert isinstance(balancer, BoundedPrefix)
    assert balancer.load_factor == load_factor
    return balancer


def test_prefix_same_key_sticks_while_load_is_low() -> None:
    eps = endpoints(registry(), 4)
    balancer = prefix_balancer(eps)
    home = next(balancer.walk("system: you are helpful"))
    for e in eps:
        e.in_flight = 0 if e is home else 1  # the home is below the bound: it keeps the key
    assert all(balancer.pick("system: you are helpful", set()) is home for _ in range(20))
    others = {balancer.pick(f"another prompt {i}", set()) for i in range(50)}
    assert len(others) > 1  # other prefixes hash elsewhere


def test_prefix_hot_key_spreads_above_load_factor_times_mean() -> None:
    eps = endpoints(registry(), 4)
    balancer = prefix_balancer(eps, load_factor=1.25)
    key = "the hot prompt"
    walk = list(balancer.walk(key))
    others = [e for e in eps if e is not walk[0]]
    for e in others:
        e.in_flight = 2
    # bound = ceil(1.25 * (in flight + 1) / 4): the favourite with 3 is still under it...
    walk[0].in_flight = 3
    assert balancer.pick(key, set()) is walk[0]
    # ...with 4 it would exceed it, so the key's next endpoint on the ring takes it.
    walk[0].in_flight = 4
    assert balancer.pick(key, set()) is walk[1]


def test_prefix_hot_key_load_stays_bounded() -> None:
    eps = endpoints(registry(), 4)
    balancer = prefix_balancer(eps, load_factor=1.25)
    favourite = next(balancer.walk("hot"))
    for total in range(1, 41):
        chosen = balancer.pick("hot", set())
        assert chosen is not None
        chosen.in_flight += 1
        assert max(e.in_flight for e in eps) <= math.ceil(1.25 * total / 4)
    assert all(e.in_flight > 0 for e in eps)
    assert favourite.in_flight == max(e.in_flight for e in eps)


def test_prefix_skips_down_favourite() -> None:
    eps = endpoints(registry(), 3)
    balancer = prefix_balancer(eps)
    walk = list(balancer.walk("k"))
    eject(walk[0])
    assert balancer.pick("k", set()) is walk[1]
    assert balancer.pick("k", {walk[1]}) is walk[2]
    for e in eps:
        eject(e)
    assert balancer.pick("k", set()) is None


def test_prefix_without_key_falls_back_to_least_request() -> None:
    eps = endpoints(registry(), 3)
    eps[0].in_flight, eps[1].in_flight, eps[2].in_flight = 2, 0, 1
    balancer = prefix_balancer(eps)
    assert picks(balancer, 3, key=None) == ["e1"] * 3


@pytest.mark.parametrize("policy, kind", [
    ("round_robin", RoundRobin), ("least_request", LeastRequest),
    ("session", HashRing), ("prefix", BoundedPrefix),
])
def test_make_balancer_by_policy(policy: str, kind: type) -> None:
    balancer = make_balancer(model_config(policy=policy), members(endpoints(registry(), 2)))
    assert type(balancer) is kind
