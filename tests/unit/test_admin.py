"""router/admin.py's views and router/status_page.py's HTML, in process."""

from __future__ import annotations

import asyncio
import re
import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest

from router.admin import backends_view, config_view
from router.discovery import Resolver
from router.reload import ConfigHolder
from router.status_page import render
from router.tenants.config import hash_key
from tests.unit.fleet_core import registry

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
DNS = "http://vllm.ns.svc:8000"


def holder_for(tmp_path: Path, text: str) -> ConfigHolder:
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent(text))
    return ConfigHolder(path, registry())


async def test_a_failing_dns_lookup_is_shown_with_its_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    holder = holder_for(tmp_path, f"""\
        models:
          m:
            backends: [{{url: "{DNS}", discovery: dns}}]
            endpoints: [chat]
        """)
    answer: list[Any] = []

    async def getaddrinfo(host: str, port: int, **_kw: Any) -> list[Any]:
        if not answer:
            raise socket.gaierror(-2, "Name or service not known")
        return answer

    holder.resolver = Resolver()
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    await holder.load()
    view = backends_view(holder)["m"]
    assert view["backends"] == []
    assert view["discovery_errors"] == {
        DNS: "cannot resolve vllm.ns.svc: [Errno -2] Name or service not known"}
    answer.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 8000)))
    assert await holder.resolver.addresses(DNS) == ["10.0.0.1"]
    assert backends_view(holder)["m"]["discovery_errors"] == {}


async def test_the_config_view_has_key_ids_and_limits_never_secrets(tmp_path: Path) -> None:
    client_hash = hash_key("sk-client-secret")
    admin_hash = hash_key("sk-admin-secret")
    holder = holder_for(tmp_path, f"""\
        models:
          m:
            backends: [{{url: "http://a:8000"}}]
            endpoints: [chat]
        auth:
          keys:
            - id: team-a
              hash: "{client_hash}"
              models: ["m*"]
              limits: {{rpm: 60}}
              model_limits: {{m: {{tpm: 1000}}}}
          admin_keys:
            - id: ops
              hash: "{admin_hash}"
        """)
    await holder.load()
    view = config_view(holder)
    assert view["auth"] == {
        "keys": [{"id": "team-a", "tenant": "team-a", "models": ["m*"],
                  "limits": {"rpm": 60, "tpm": None},
                  "model_limits": {"m": {"rpm": None, "tpm": 1000}}}],
        "admin_keys": ["ops"]}
    text = repr(view)
    assert client_hash not in text and admin_hash not in text and "secret" not in text
    assert ISO.match(view["loaded_at"])
    (start,) = view["recent_reloads"]
    assert start["result"] == "start" and ISO.match(start["at"])


def sample_views() -> tuple[dict[str, Any], dict[str, Any]]:
    backends = {"chat<b>": {
        "policy": "round_robin", "groups": ["chat"], "in_flight": 2, "queued": 1,
        "backends": [
            {"name": "gpu-a", "url": "http://a:8000", "address": "a:8000", "state": "healthy",
             "up": True, "in_flight": 2, "max_in_flight": 8, "consecutive_5xx": 0,
             "last_error": None,
             "engine_load": {"running": 4, "waiting": 1, "kv_cache_usage": 0.425,
                             "age_s": 0.12, "dispatched_since": 1,
                             "error": "/metrics: <timed out>"}},
            {"url": "http://b:8000", "address": "b:8000", "state": "unhealthy", "up": False,
             "in_flight": 0, "max_in_flight": None, "consecutive_5xx": 3,
             "engine_load": {"error": "/metrics: status 404"},
             "last_error": "model x not served (engine serves: <script>alert(1)</script>)"},
        ],
        "discovery_errors": {"http://dns:8000": "cannot resolve dns: nope"}}}
    config = {"sha256": "ab" * 32, "source": "/etc/routes.yaml",
              "loaded_at": "2026-12-04T19:02:03.123Z",
              "models": {"chat<b>": {"endpoints": ["chat"]}}, "last_error": None,
              "recent_reloads": [
                  {"at": "2026-12-04T19:00:00.000Z", "result": "start", "sha256": "ab" * 32,
                   "error": None},
                  {"at": "2026-12-04T19:01:00.000Z", "result": "error", "sha256": "ab" * 32,
                   "error": "routes.yaml:3:1: bad & worse"}]}
    return backends, config


def test_the_status_page_shows_models_backends_reloads_and_escapes_values() -> None:
    backends, config = sample_views()
    page = render(backends, config, None, "2026-12-04T19:02:05.000Z")
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert "chat&lt;b&gt;" in page and "chat<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "bad &amp; worse" in page and "cannot resolve dns: nope" in page
    assert 'class="unhealthy"' in page and "1 of 2" in page
    assert "gpu-a: http://a:8000" in page
    assert "waiting 1, running 4, KV 42 %, 0.12 s old" in page
    assert "/metrics: &lt;timed out&gt;" in page and "/metrics: status 404" in page
    assert "Batches" not in page  # batch: off
    assert not re.search(r"(src|href)=", page)  # no external asset


def test_the_status_page_shows_batch_progress_or_why_not() -> None:
    backends, config = sample_views()
    batches = [{"id": "batch_1", "tenant": "A", "status": "in_progress",
                "endpoint": "/v1/chat/completions", "model": "chat-model",
                "created_at": "2026-12-04T19:00:00.000Z",
                "request_counts": {"total": 8, "completed": 3, "failed": 1}}]
    page = render(backends, config, batches, "now")
    assert "batch_1" in page and "4 of 8 (1 failed)" in page and "width:50%" in page
    page = render(backends, config, [], "now")
    assert "no batch in progress" in page
    page = render(backends, config, "the batch database did not answer within 2 s", "now")
    assert "batches unavailable: the batch database did not answer" in page
