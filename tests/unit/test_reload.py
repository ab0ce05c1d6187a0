"""router/reload.py: ConfigHolder over a routes file in tmp_path, reloads called directly,
DNS refreshes through a fake resolver."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from pathlib import Path

import pytest

from router.config import ConfigError, parse
from router.discovery import Resolver
from router.reload import HISTORY, ConfigHolder
from router.tenants.config import hash_key, new_key
from tests.unit.fleet_core import eventually, registry

ROUTES = """\
defaults:
  endpoints: [chat]
  health_checks: {interval: 2s, unhealthy_threshold: 3}
  outlier_detection: {consecutive_failures: 4, ejection: 7s}
models:
  m:
    backends:
      - url: http://a:8000
        max_in_flight: 2
"""

CHANGED = ROUTES + """\
      - url: http://b:8000
  n:
    backends: [{url: "http://a:8000"}]
"""

INVALID = """\
models:
  m:
    backends:
      - url: http://a:8000
        weight: 0
    endpoints: [chat]
"""


class Loads:
    """A load listener that records (result, sha256 now served)."""

    def __init__(self, holder: ConfigHolder) -> None:
        self.seen: list[tuple[str | None, str]] = []
        holder.listeners.append(
            lambda result, snap: self.seen.append((result, snap.config.sha256)))


def write(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    write(path, ROUTES)
    return path


async def loaded(path: Path) -> tuple[ConfigHolder, Loads]:
    holder = ConfigHolder(path, registry())
    loads = Loads(holder)
    await holder.load()
    return holder, loads


async def test_load_reads_the_file(routes_file: Path) -> None:
    holder, loads = await loaded(routes_file)
    snap = holder.current
    assert snap.config.source == str(routes_file) and list(snap.models) == ["m"]
    assert loads.seen == [(None, snap.config.sha256)]
    assert holder.reloads == {"ok": 0, "error": 0, "unchanged": 0}
    checks, outlier = holder.health_settings()
    assert checks.interval == 2.0 and checks.unhealthy_threshold == 3
    assert (outlier.consecutive_failures, outlier.ejection) == (4, 7.0)


async def test_load_of_a_parsed_config_does_not_read_the_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    holder = ConfigHolder(path, registry())
    config = parse(ROUTES.encode(), str(path))
    await holder.load(config)
    assert holder.current.config is config


async def test_load_of_an_invalid_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    write(path, INVALID)
    with pytest.raises(ConfigError, match=r"routes\.yaml:5:9: models\.m\.backends\.0\.weight"):
        await ConfigHolder(path, registry()).load()


async def test_reload_of_a_changed_file_swaps_the_snapshot(routes_file: Path) -> None:
    holder, loads = await loaded(routes_file)
    old = holder.current
    write(routes_file, CHANGED)
    assert await holder.reload() is True
    new = holder.current
    assert new is not old and list(new.models) == ["m", "n"]
    assert holder.reloads == {"ok": 1, "error": 0, "unchanged": 0}
    assert loads.seen[-1] == ("ok", new.config.sha256) != loads.seen[0]
    assert list(old.models) == ["m"]  # requests holding the old snapshot see no change


async def test_reload_of_an_unchanged_file_is_a_no_op(routes_file: Path) -> None:
    holder, loads = await loaded(routes_file)
    old = holder.current
    write(routes_file, ROUTES)  # rewritten, same bytes
    assert await holder.reload() is False
    assert holder.current is old
    assert holder.reloads == {"ok": 0, "error": 0, "unchanged": 1}
    assert loads.seen == [(None, old.config.sha256), ("unchanged", old.config.sha256)]


async def test_an_invalid_file_is_refused_and_the_old_snapshot_kept(routes_file: Path) -> None:
    holder, loads = await loaded(routes_file)
    old = holder.current
    write(routes_file, INVALID)
    assert await holder.reload() is False
    assert holder.current is old
    assert holder.reloads == {"ok": 0, "error": 1, "unchanged": 0}
    assert holder.last_error is not None
    assert holder.last_error.startswith(f"{routes_file}:5:9: models.m.backends.0.weight")
    assert loads.seen[-1] == ("error", old.config.sha256)
    routes_file.write_text("models: [\n")
    assert await holder.reload() is False and holder.reloads["error"] == 2
    assert "invalid YAML" in holder.last_error
    write(routes_file, CHANGED)  # fixed: served, and the error cleared
    assert await holder.reload() is True
    assert holder.last_error is None and holder.reloads == {"ok": 1, "error": 2, "unchanged": 0}
    assert [r for r, _ in loads.seen] == [None, "error", "error", "ok"]


async def test_a_revert_to_the_file_served_clears_the_refusal(routes_file: Path) -> None:
    holder, _ = await loaded(routes_file)
    served = holder.current.config.sha256
    write(routes_file, INVALID)
    assert await holder.reload() is False and holder.last_error is not None
    write(routes_file, ROUTES)  # back to the last good file: nothing is refused any more
    assert await holder.reload() is False
    assert holder.last_error is None and holder.current.config.sha256 == served
    results = [(result, sha, error is not None) for _, result, sha, error in holder.history]
    assert results == [("start", served, False), ("error", served, True),
                       ("unchanged", served, False)]


async def test_the_reload_history_is_bounded(routes_file: Path) -> None:
    holder, _ = await loaded(routes_file)
    for _ in range(HISTORY + 3):
        await holder.reload()
    assert len(holder.history) == HISTORY
    assert {result for _, result, _, _ in holder.history} == {"unchanged"}


async def test_endpoints_are_kept_across_reloads(routes_file: Path) -> None:
    holder, _ = await loaded(routes_file)
    old = holder.current.models["m"].cluster
    (a,) = old.endpoints
    assert old.try_acquire(None, set()) is a
    write(routes_file, CHANGED)
    await holder.reload()
    cluster = holder.current.models["m"].cluster
    assert cluster.endpoints[0] is a and a.in_flight == 1
    assert holder.current.models["n"].cluster.endpoints == (a,)
    assert a.max_in_flight == 2 and a.transport.closed == 0  # type: ignore[attr-defined]
    write(routes_file, ROUTES)
    await holder.reload()
    (b,) = [e for e in cluster.endpoints if e is not a]
    assert b.transport.closed == 1  # type: ignore[attr-defined]
    assert set(holder.registry.by_key) == {"http://a:8000"}
    old.release(a)
    assert a.in_flight == 0
    holder.close()
    assert a.transport.closed == 1 and not holder.registry.by_key  # type: ignore[attr-defined]


# -- what the watcher looks at ------------------------------------------------------------
def auth_routes(tmp_path: Path) -> Path:
    """A routes file whose ``auth:`` block reads a key file and a keys file, each in a
    directory of its own (as Secret volumes are mounted)."""
    admin_dir, keys_dir = tmp_path / "admin-secret", tmp_path / "keys-secret"
    admin_dir.mkdir()
    keys_dir.mkdir()
    (admin_dir / "admin-key").write_text(new_key())
    (keys_dir / "keys.yaml").write_text(
        f"keys:\n  - id: extra\n    hash: {hash_key(new_key())}\n    models: ['*']\n")
    path = tmp_path / "config" / "routes.yaml"
    path.parent.mkdir()
    path.write_text(ROUTES + textwrap.dedent(f"""\
        auth:
          keys:
            - id: app
              hash: {hash_key(new_key())}
              models: [m]
          admin_keys:
            - id: ops
              key_file: {admin_dir / "admin-key"}
          keys_file: ../keys-secret/keys.yaml
        """))
    return path


async def test_relevant_accepts_the_routes_file_and_volume_swaps_only(routes_file: Path) -> None:
    holder, _ = await loaded(routes_file)
    directory = routes_file.parent
    assert holder._relevant(None, str(routes_file))
    assert holder._relevant(None, str(directory / "..data"))
    assert holder._relevant(None, str(directory / "..2026_01_02_03_04_05.123"))
    for other in ("routes.yaml.swp", ".routes.yaml.swp", "routes.yaml~", "access.log",
                  "other.yaml"):
        assert not holder._relevant(None, str(directory / other)), other


async def test_watched_includes_the_key_file_directories(tmp_path: Path) -> None:
    path = auth_routes(tmp_path)
    holder, _ = await loaded(path)
    assert {p.resolve() for p in holder.watched()} == {
        p.resolve() for p in (path.parent, tmp_path / "admin-secret", tmp_path / "keys-secret")}
    assert holder._relevant(None, str(tmp_path / "admin-secret" / "admin-key"))
    assert holder._relevant(None, str(tmp_path / "keys-secret" / "keys.yaml"))
    assert not holder._relevant(None, str(tmp_path / "keys-secret" / "notes.txt"))


async def test_watched_is_the_routes_directory_without_auth(routes_file: Path) -> None:
    holder, _ = await loaded(routes_file)
    assert holder.watched() == {routes_file.parent}


async def test_a_changed_key_file_reloads_with_routes_unchanged(tmp_path: Path) -> None:
    path = auth_routes(tmp_path)
    holder, loads = await loaded(path)
    old = holder.current
    assert holder.current.auth is not None and "ops" in holder.current.auth.tenants
    (tmp_path / "admin-secret" / "admin-key").write_text(new_key())  # rotated
    assert await holder.reload() is True
    assert holder.current is not old
    assert holder.current.config.sha256 == old.config.sha256
    assert holder.current.fingerprint != old.fingerprint
    assert await holder.reload() is False and holder.reloads["unchanged"] == 1
    (tmp_path / "admin-secret" / "admin-key").write_text("short")
    assert await holder.reload() is False and holder.current.fingerprint[1] is not None
    assert "32" in (holder.last_error or "") and [r for r, _ in loads.seen][-1] == "error"


# -- DNS refresh --------------------------------------------------------------------------
class FakeResolver(Resolver):
    """Answers from a dict instead of DNS."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        super().__init__()
        self.answers = answers
        self.asked: list[str] = []

    async def addresses(self, url: str) -> list[str]:
        self.asked.append(url)
        return list(self.answers.get(url, []))


DNS_ROUTES = """\
defaults:
  endpoints: [chat]
  dns_refresh: 10ms
models:
  m:
    backends:
      - url: http://vllm.ns.svc:8000
        discovery: dns
        max_in_flight: 3
      - url: http://static:8000
"""


async def test_refresh_dns_updates_members(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(DNS_ROUTES)
    holder = ConfigHolder(path, registry())
    url = "http://vllm.ns.svc:8000"
    resolver = holder.resolver = FakeResolver({url: ["10.0.0.1", "10.0.0.2"]})
    await holder.load()
    cluster = holder.current.models["m"].cluster
    first = {e.key: e for e in cluster.endpoints}
    assert set(first) == {f"{url}@10.0.0.1", f"{url}@10.0.0.2", "http://static:8000"}
    pod1 = first[f"{url}@10.0.0.1"]
    assert (pod1.origin.host, pod1.origin.host_header) == ("10.0.0.1", b"vllm.ns.svc:8000")
    assert pod1.max_in_flight == 3
    balancer = cluster.balancer
    resolver.answers[url] = ["10.0.0.2", "10.0.0.3"]  # pod 1 left, pod 3 came
    task = asyncio.get_running_loop().create_task(holder.refresh_dns())
    try:
        await eventually(lambda: f"{url}@10.0.0.3" in {e.key for e in cluster.endpoints},
                         what="the new address in the cluster")
        now = {e.key: e for e in cluster.endpoints}
        assert set(now) == {f"{url}@10.0.0.2", f"{url}@10.0.0.3", "http://static:8000"}
        assert now[f"{url}@10.0.0.2"] is first[f"{url}@10.0.0.2"]  # kept, not rebuilt
        assert now[f"{url}@10.0.0.3"].max_in_flight == 3
        assert cluster.balancer is not balancer
        assert holder.current.models["m"].cluster is cluster  # the same snapshot
        assert pod1.transport.closed == 1  # type: ignore[attr-defined]
        assert f"{url}@10.0.0.1" not in holder.registry.by_key
        asked = len(resolver.asked)
        await eventually(lambda: len(resolver.asked) > asked + 1, what="more refreshes")
        assert cluster.balancer is not balancer and set(now) == {
            e.key for e in cluster.endpoints}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_refresh_dns_leaves_unchanged_members_alone(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(DNS_ROUTES)
    holder = ConfigHolder(path, registry())
    resolver = holder.resolver = FakeResolver({"http://vllm.ns.svc:8000": ["10.0.0.1"]})
    await holder.load()
    cluster = holder.current.models["m"].cluster
    balancer, members = cluster.balancer, cluster.members
    task = asyncio.get_running_loop().create_task(holder.refresh_dns())
    try:
        await eventually(lambda: len(resolver.asked) >= 3, what="two refreshes")
        assert cluster.balancer is balancer and cluster.members is members
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- what reloads and DNS refreshes log ---------------------------------------------------

def reload_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "routeyard.reload"]


async def test_a_reload_logs_what_changed(routes_file: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="routeyard.reload")
    holder, _loads = await loaded(routes_file)
    write(routes_file, CHANGED)
    assert await holder.reload() is True
    sha = holder.current.config.sha256
    assert reload_lines(caplog) == [
        ("INFO", f"config reloaded: sha256 {sha[:12]}, 2 models; added: n; changed: m")]
    caplog.clear()
    write(routes_file, CHANGED.replace("interval: 2s", "interval: 3s")
          .replace("  n:\n    backends: [{url: \"http://a:8000\"}]\n", ""))
    assert await holder.reload() is True
    [(level, message)] = reload_lines(caplog)
    assert level == "INFO"
    assert message.endswith("1 models; removed: n; also changed: health_checks")


async def test_a_refused_edit_is_one_error_line(routes_file: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="routeyard.reload")
    holder, _loads = await loaded(routes_file)
    sha = holder.current.config.sha256
    write(routes_file, INVALID)
    assert await holder.reload() is False
    [(level, message)] = reload_lines(caplog)
    assert level == "ERROR"
    assert message.startswith(f"config reload refused, still serving sha256 {sha[:12]}: "
                              f"{routes_file}:5:9: models.m.backends.0.weight")


async def test_a_worker_that_does_not_report_logs_reloads_at_debug(
        routes_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="routeyard.reload")
    holder, _loads = await loaded(routes_file)
    holder.reports = False
    write(routes_file, INVALID)
    assert await holder.reload() is False
    write(routes_file, CHANGED)
    assert await holder.reload() is True
    assert [level for level, _ in reload_lines(caplog)] == ["DEBUG", "DEBUG"]


async def test_a_dns_membership_change_is_logged_at_info(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="routeyard.reload")
    path = tmp_path / "routes.yaml"
    path.write_text(DNS_ROUTES)
    holder = ConfigHolder(path, registry())
    url = "http://vllm.ns.svc:8000"
    resolver = holder.resolver = FakeResolver({url: ["10.0.0.1", "10.0.0.2"]})
    await holder.load()
    asked = len(resolver.asked)
    task = asyncio.get_running_loop().create_task(holder.refresh_dns())
    try:
        await eventually(lambda: len(resolver.asked) > asked + 1, what="a refresh")
        assert reload_lines(caplog) == []  # the same addresses: nothing to say
        resolver.answers[url] = ["10.0.0.2", "10.0.0.3"]
        await eventually(lambda: reload_lines(caplog), what="a membership line")
        assert reload_lines(caplog) == [(
            "INFO", f"model m: DNS members now 3 (added: {url}@10.0.0.3; "
                    f"removed: {url}@10.0.0.1)")]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
