"""``discovery: dns``: one endpoint per address of a name, re-resolved periodically.

On this machine ``localhost`` resolves to 127.0.0.1 alone, so pods appearing and vanishing
are simulated in-process through the event loop's ``getaddrinfo``; a real router process
then shows that a DNS backend serves end to end.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
from pathlib import Path

import pytest

from router.reload import ConfigHolder
from tests.fleet.conftest import CHAT, Fleet, chat_body, routes
from tests.harness import eventually

NAME = "pods.fleet.test"


class FakeDNS:
    """Stands in for the loop's ``getaddrinfo``: ``answers`` is what the name resolves to."""

    def __init__(self, *addresses: str) -> None:
        self.answers = list(addresses)
        self.failing = False
        self.lookups = 0

    async def getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
        self.lookups += 1
        if host != NAME:
            raise AssertionError(f"unexpected lookup of {host}")
        if self.failing:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in self.answers]


async def test_dns_addresses_appear_get_traffic_and_vanish(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    dns = FakeDNS("10.0.0.1")
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", dns.getaddrinfo)
    config = tmp_path / "routes.yaml"
    config.write_text(json.dumps({
        "defaults": {"endpoints": ["chat"], "dns_refresh": "50ms"},
        "models": {"pods": {"backends": [{"url": f"http://{NAME}:8000", "discovery": "dns",
                                          "max_in_flight": 4}]}},
    }))
    holder = ConfigHolder(config)
    await holder.load()
    cluster = holder.current.models["pods"].cluster

    def hosts() -> list[str]:
        return sorted(e.origin.host for e in cluster.endpoints)

    async def spread(n: int) -> collections.Counter[str]:
        picked: collections.Counter[str] = collections.Counter()
        for _ in range(n):
            endpoint = await cluster.acquire(None, set())
            picked[endpoint.origin.host] += 1
            cluster.release(endpoint)
        return picked

    assert hosts() == ["10.0.0.1"]
    (only,) = cluster.endpoints
    assert only.origin.host_header == f"{NAME}:8000".encode()  # Host keeps the name
    assert only.max_in_flight == 4                              # the limit is per address
    refresher = asyncio.get_running_loop().create_task(holder.refresh_dns())
    try:
        # Two pods appear: they get their share at once.
        dns.answers = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        await eventually(lambda: hosts() == ["10.0.0.1", "10.0.0.2", "10.0.0.3"], 3,
                         "the DNS refresh adds two pods")
        assert await spread(30) == {"10.0.0.1": 10, "10.0.0.2": 10, "10.0.0.3": 10}

        # One vanishes while it has a request in flight: no new requests go to it, and the
        # one in flight finishes normally.
        held = await cluster.acquire(None, set())
        while held.origin.host != "10.0.0.2":
            cluster.release(held)
            held = await cluster.acquire(None, set())
        dns.answers = ["10.0.0.1", "10.0.0.3"]
        await eventually(lambda: hosts() == ["10.0.0.1", "10.0.0.3"], 3,
                         "the DNS refresh drops a pod")
        assert await spread(30) == {"10.0.0.1": 15, "10.0.0.3": 15}
        assert held.key not in holder.registry.by_key and held.transport.closed
        cluster.release(held)
        assert held.in_flight == 0 and cluster.in_flight == 0

        # A failed lookup keeps the last good answer.
        dns.failing = True
        lookups = dns.lookups
        await eventually(lambda: dns.lookups >= lookups + 3, 3, "three more lookups")
        assert hosts() == ["10.0.0.1", "10.0.0.3"]
        assert await spread(4) == {"10.0.0.1": 2, "10.0.0.3": 2}
    finally:
        refresher.cancel()
        holder.close()


def test_dns_backend_serves_end_to_end(launch_router, fleet: Fleet) -> None:
    engine = fleet[0]
    text = routes({"dns-model": {"backends": [{"url": f"http://localhost:{engine.port}",
                                                "discovery": "dns"}],
                                 "backend_model": "fleet-model"}},
                  dns_refresh="200ms")
    router = launch_router(text)
    for i in range(10):
        r = router.client.post(CHAT, json=chat_body("dns-model", f"dns {i}"))
        assert r.status_code == 200, r.text
    assert engine.count() == 10
    assert {e["headers"]["host"] for e in engine.requests()} == {f"localhost:{engine.port}"}
    entries = router.backends("dns-model")
    assert f"127.0.0.1:{engine.port}" in [e["address"] for e in entries]
    assert all(e["url"] == f"http://localhost:{engine.port}" for e in entries)
