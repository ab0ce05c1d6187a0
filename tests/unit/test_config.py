"""routes.yaml parsing and validation: the minimal form, defaults, and errors with lines."""

from __future__ import annotations

import textwrap

import pytest

from router.config import ConfigError, parse
from tests.harness import run_cli

MINIMAL = b"""\
models:
  qwen25-15b-instruct:
    backends:
      - url: http://127.0.0.1:8001
    endpoints: [chat, completions, tokenize]
  jina-embeddings-v3:
    backends:
      - url: http://127.0.0.1:8002
    endpoints: [embeddings]
"""


def test_minimal_form_from_the_issue() -> None:
    config = parse(MINIMAL)
    qwen = config.models["qwen25-15b-instruct"]
    assert qwen.endpoints == {"chat", "completions", "tokenize"}
    assert [b.url for b in qwen.backends] == ["http://127.0.0.1:8001"]
    assert config.models["jina-embeddings-v3"].endpoints == {"embeddings"}
    assert qwen.timeouts.connect == 5 and qwen.max_body_size == 32 * 1024 * 1024


def test_defaults_apply_and_models_override() -> None:
    config = parse(textwrap.dedent("""\
        defaults:
          endpoints: [chat]
          timeouts: {connect: 250ms, first_byte: 2m, idle: 30s}
          max_body_size: 1MiB
        models:
          a:
            backends: [{url: "http://a:8000/"}]
          b:
            backends: [{url: "http://b:8000"}]
            endpoints: [embeddings]
            timeouts: {idle: 1h}
            max_body_size: 512KB
            backend_model: real-b
        """).encode())
    a, b = config.models["a"], config.models["b"]
    assert a.endpoints == {"chat"} and b.endpoints == {"embeddings"}
    assert a.timeouts.connect == 0.25 and a.timeouts.first_byte == 120
    assert b.timeouts.idle == 3600 and b.timeouts.connect == 0.25
    assert a.max_body_size == 1024 * 1024 and b.max_body_size == 512_000
    assert a.backends[0].url == "http://a:8000"
    assert b.backend_model == "real-b"


@pytest.mark.parametrize(
    ("text", "line", "col", "words"),
    [
        ("models:\n  a:\n    backends: []\n    endpoints: [chat]\n", 3, 5, "at least 1"),
        ("models:\n  a:\n    backends:\n      - url: ftp://x\n    endpoints: [chat]\n",
         4, 9, "not an http(s) URL"),
        ("models:\n  a:\n    backends:\n      - url: http://x\n    endpoints: [chat, chatt]\n",
         5, 5, "unknown endpoint group(s) chatt"),
        ("models:\n  a:\n    backends:\n      - url: http://x\n    endpoints: [chat]\n"
         "    timeout: 3\n", 6, 5, "Extra inputs"),
        ("models:\n  a:\n    backends:\n      - url: http://x\n", 2, 3, "no endpoints enabled"),
        ("models:\n  a:\n    backends:\n      - url: http://x\n    endpoints: [chat]\n"
         "    timeouts: {idle: soon}\n", 6, 16, "not a duration"),
        ("models:\n  a: [\n", 3, 1, "invalid YAML"),
        ("- just a list\n", 1, 1, "must be a mapping"),
    ],
)
def test_errors_name_line_and_column(text: str, line: int, col: int, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text.encode(), "routes.yaml")
    error = info.value
    assert (error.line, error.col) == (line, col), str(error)
    assert words in str(error)
    assert str(error).startswith(f"routes.yaml:{line}:{col}: ")


def test_example_config_is_valid() -> None:
    from pathlib import Path

    from router.config import load_file

    config = load_file(Path(__file__).parents[2] / "configs" / "routes.yaml")
    assert len(config.models) >= 5


def test_check_command(tmp_path) -> None:
    good = tmp_path / "good.yaml"
    good.write_bytes(MINIMAL)
    out = run_cli("check", str(good))
    assert out.returncode == 0
    assert "qwen25-15b-instruct: 1 backend(s)" in out.stdout
    assert "endpoints: chat, completions, tokenize" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(MINIMAL.replace(b"[embeddings]", b"[embedings]"))
    out = run_cli("check", str(bad))
    assert out.returncode == 1
    assert f"{bad}:9:5:" in out.stderr and "embedings" in out.stderr


def test_check_without_secrets_validates_a_file_whose_keys_live_elsewhere(tmp_path) -> None:
    """The production routes file names key files that exist only in the pod."""
    routes = tmp_path / "routes.yaml"
    routes.write_bytes(MINIMAL + b"""\
auth:
  keys_file: /nonexistent/keys/keys.yaml
  admin_keys:
    - {id: ops, key_file: /nonexistent/keys/admin-key}
""")
    out = run_cli("check", str(routes))
    assert out.returncode == 1 and "cannot read" in out.stderr
    out = run_cli("check", "--no-secrets", str(routes))
    assert out.returncode == 0, out.stderr
    assert "ok: 2 model(s)" in out.stdout and "--no-secrets" in out.stdout
    # the file itself is still validated in full
    routes.write_bytes(routes.read_bytes().replace(b"keys_file:", b"key_files:"))
    out = run_cli("check", "--no-secrets", str(routes))
    assert out.returncode == 1 and "key_files" in out.stderr


def test_no_secrets_skips_the_engine_key_variable_only() -> None:
    text = MINIMAL.replace(b"- url: http://127.0.0.1:8001",
                           b"- {url: 'http://127.0.0.1:8001', api_key_env: ROUTEYARD_TEST_UNSET}")
    with pytest.raises(ConfigError, match="ROUTEYARD_TEST_UNSET"):
        parse(text)
    config = parse(text, secrets=False)
    assert config.models["qwen25-15b-instruct"].backends[0].api_key_env == "ROUTEYARD_TEST_UNSET"
    assert config.auth is None


def test_relative_batch_paths_resolve_against_the_routes_file(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Like ``key_file``: a SQLite file and a local storage directory named relatively
    are found beside the routes file, whatever the working directory."""
    monkeypatch.delenv("ROUTEYARD_BATCH_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "conf"
    conf.mkdir()
    source = str(conf / "routes.yaml")
    relative = parse(MINIMAL + b"batch:\n  database_url: sqlite+aiosqlite:///state/b.db\n"
                     b"  storage: {url: ./files}\n", source).batch
    assert relative is not None
    assert relative.database_url == f"sqlite+aiosqlite:///{conf}/state/b.db"
    assert relative.storage.url == str(conf / "files")
    defaults = parse(MINIMAL + b"batch: {}\n", source).batch
    assert defaults is not None
    assert defaults.database_url == f"sqlite+aiosqlite:///{conf}/routeyard-batch.db"
    assert defaults.storage.url == str(conf / "routeyard-batch-files")
    kept = parse(MINIMAL + b"batch:\n  database_url: sqlite+aiosqlite:////abs/b.db\n"
                 b"  storage: {url: 's3://bucket/prefix'}\n", source).batch
    assert kept is not None
    assert kept.database_url == "sqlite+aiosqlite:////abs/b.db"
    assert kept.storage.url == "s3://bucket/prefix"
    local = parse(MINIMAL + b"batch:\n  database_url: 'postgresql+asyncpg://u:pw@db/x'\n"
                  b"  storage: {url: 'file://data'}\n", source).batch
    assert local is not None
    assert local.database_url == "postgresql+asyncpg://u:pw@db/x"
    assert local.storage.url == str(conf / "data")


SCORED = """\
defaults:
  endpoints: [chat]
  scoring:
    weights: {queue: 4, kv_cache: 1}
    saturation: {queue: 8}
models:
  a:
    policy: load_aware
    backends: [{url: "http://a:8000"}]
    scoring:
      weights: {kv_cache: 3}
  b:
    policy: cache_aware
    engine_metrics: {interval: 50ms, max_age: 1s}
    backends: [{url: "http://b:8000", name: gpu-b}]
  c:
    backends: [{url: "http://c:8000"}]
"""


def test_scoring_blocks_merge_key_by_key_with_the_defaults() -> None:
    config = parse(SCORED.encode())
    a, b, c = (config.models[n] for n in "abc")
    assert (a.scoring.weights.queue, a.scoring.weights.kv_cache) == (4, 3)
    assert a.scoring.saturation.queue == 8 and a.scoring.saturation.kv_cache == 0.9
    assert b.scoring.weights.prefix == 6 and b.scoring.weights.queue == 4
    assert (b.engine_metrics.interval, b.engine_metrics.max_age) == (0.05, 1.0)
    assert b.engine_metrics.timeout == 0.2 and b.backends[0].name == "gpu-b"
    assert a.scrapes and b.scrapes and not c.scrapes


@pytest.mark.parametrize(("snippet", "line", "words"), [
    ("    scoring: {weights: {lora: 1}}\n", 6, "scoring.weights.lora: Extra inputs"),
    ("    scoring: {weights: {prefix: 2}}\n", 6,
     "scoring.weights.prefix: the prefix scorer needs policy cache_aware"),
    ("    engine_metrics: {enabled: false}\n", 6,
     "policy load_aware routes on the engines' /metrics"),
    ("    scoring: {saturation: {kv_cache: 1.5}}\n", 6, "less than or equal to 1"),
    ("    engine_metrics: {interval: 0s}\n", 6, "greater than zero"),
])
def test_scoring_errors_name_their_line(snippet: str, line: int, words: str) -> None:
    text = ("defaults:\n  endpoints: [chat]\nmodels:\n  a:\n    policy: load_aware\n"
            + snippet + "    backends: [{url: \"http://a:8000\"}]\n")
    with pytest.raises(ConfigError) as err:
        parse(text.encode(), "routes.yaml")
    assert err.value.line == line and words in err.value.message, err.value


def test_a_session_weight_under_cache_aware_is_refused() -> None:
    text = ("defaults:\n  endpoints: [chat]\nmodels:\n  a:\n    policy: cache_aware\n"
            "    scoring:\n      weights: {session: 1}\n    backends: [{url: \"http://a:8000\"}]\n")
    with pytest.raises(ConfigError, match=r"routes.yaml:7:\d+: .*session scorer needs policy "
                                          "load_aware"):
        parse(text.encode(), "routes.yaml")


@pytest.mark.parametrize(("backends", "words"), [
    ('[{url: "http://a:8000", name: x}, {url: "http://b:8000", name: x}]', "unique"),
    ('[{url: "http://a:8000", name: "1"}, {url: "http://b:8000"}]', "unique"),
    ('[{url: "http://a:8000", name: "a b"}]', "should match pattern"),
])
def test_backend_names_are_header_safe_and_unique(backends: str, words: str) -> None:
    text = f"models:\n  a:\n    endpoints: [chat]\n    backends: {backends}\n"
    with pytest.raises(ConfigError, match=words):
        parse(text.encode())
