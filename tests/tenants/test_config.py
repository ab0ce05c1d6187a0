"""The ``auth:`` block: validation, secrets from env and files, and the hash-key command."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from router.tenants import AuthConfig, hash_key, new_key, resolve_auth
from router.tenants.cli import hash_key_command
from router.tenants.config import MIN_KEY_LENGTH, key_digest
from tests.tenants.conftest import KEY_ADMIN, KEY_ALICE, KEY_BOB, alice


def config(**auth: object) -> AuthConfig:
    return AuthConfig.model_validate(auth)


def test_hash_key_is_sha256_hex_of_the_key() -> None:
    assert hash_key("abc") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_new_keys_are_long_random_and_distinct() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(k.startswith("ry-") and len(k) >= 43 + 3 for k in keys)


def test_uppercase_hash_is_accepted_and_normalized() -> None:
    upper = "sha256:" + hash_key(KEY_ALICE).removeprefix("sha256:").upper()
    auth = resolve_auth(config(keys=[alice(hash=upper)]))
    assert auth.keys[0].digests == (key_digest(KEY_ALICE),)


@pytest.mark.parametrize("bad", ["sha256:abc", "md5:" + "0" * 32, "sha256:" + "g" * 64])
def test_malformed_hash_is_refused_with_the_fix(bad: str) -> None:
    with pytest.raises(ValidationError, match="routeyard hash-key"):
        config(keys=[alice(hash=bad)])


def test_plain_key_pasted_as_hash_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as info:
        config(keys=[alice(hash=KEY_ALICE)])
    assert KEY_ALICE not in str(info.value)


def test_a_key_needs_exactly_one_secret_source() -> None:
    with pytest.raises(ValidationError, match="exactly one of hash, key_env or key_file"):
        config(keys=[alice(hash=None)])
    with pytest.raises(ValidationError, match=r"got hash, key_env"):
        config(keys=[alice(key_env="X")])


def test_unknown_fields_and_missing_models_are_refused() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        config(keys=[alice(rpm=5)])
    with pytest.raises(ValidationError, match="models"):
        config(keys=[alice(models=[])])
    with pytest.raises(ValidationError, match="id"):
        config(keys=[alice(id="has space")])


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="greater than 0"):
        config(keys=[alice(limits={"rpm": 0})])


def test_config_is_frozen() -> None:
    auth = config(keys=[alice()])
    with pytest.raises(ValidationError):
        auth.keys[0].models = ["*"]


def test_key_env_is_read_and_hashed() -> None:
    cfg = config(keys=[alice(hash=None, key_env="ALICE_KEY")])
    auth = resolve_auth(cfg, environ={"ALICE_KEY": KEY_ALICE + "\n"})
    assert auth.keys[0].digests == (key_digest(KEY_ALICE),)
    assert auth.keys[0].tenant == "team-a"


def test_missing_env_variable_names_the_key_and_variable() -> None:
    with pytest.raises(ValueError, match=r"auth.keys\[alice\]: environment variable ALICE_KEY"):
        resolve_auth(config(keys=[alice(hash=None, key_env="ALICE_KEY")]), environ={})


def test_short_plain_key_is_refused() -> None:
    with pytest.raises(ValueError, match=f"at least {MIN_KEY_LENGTH}"):
        resolve_auth(config(keys=[alice(hash=None, key_env="K")]), environ={"K": "hunter2"})


def test_key_file_is_relative_to_the_routes_directory(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "alice.key").write_text(KEY_ALICE + "\n")
    auth = resolve_auth(config(keys=[alice(hash=None, key_file="secrets/alice.key")]), tmp_path)
    assert auth.keys[0].digests == (key_digest(KEY_ALICE),)
    assert auth.watch_paths == (tmp_path / "secrets" / "alice.key",)


def test_unreadable_key_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"auth.keys\[alice\]: cannot read key_file .*nope"):
        resolve_auth(config(keys=[alice(hash=None, key_file="nope")]), tmp_path)


def test_keys_file_adds_keys_and_admin_keys(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "bob.key").write_text(KEY_BOB)
    (tmp_path / "keys" / "keys.yaml").write_text(
        "keys:\n  - id: bob\n    key_file: bob.key\n    models: ['*']\n"
        f"admin_keys:\n  - id: ops\n    hash: {hash_key(KEY_ADMIN)}\n"
    )
    auth = resolve_auth(config(keys=[alice()], keys_file="keys/keys.yaml"), tmp_path)
    assert [(k.id, k.admin) for k in auth.keys] == [("alice", False), ("bob", False), ("ops", True)]
    assert auth.keys[1].digests == (key_digest(KEY_BOB),)
    assert set(auth.watch_paths) == {tmp_path / "keys" / "keys.yaml", tmp_path / "keys" / "bob.key"}


def test_invalid_keys_file_names_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text("keys:\n- id: bob\n  hash: sha256:00\n  models: [a]\n")
    with pytest.raises(ValueError, match=r"keys.yaml: keys.0.hash: .*not a key hash"):
        resolve_auth(config(keys_file="keys.yaml"), tmp_path)
    (tmp_path / "keys.yaml").write_text("keys: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        resolve_auth(config(keys_file="keys.yaml"), tmp_path)
    with pytest.raises(ValueError, match="cannot read"):
        resolve_auth(config(keys_file="missing.yaml"), tmp_path)


def test_duplicate_ids_and_shared_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="'alice' is used twice"):
        resolve_auth(config(keys=[alice(), alice(hash=hash_key(KEY_BOB))]))
    with pytest.raises(ValueError, match=r"auth.admin_keys\[ops\]: the same key is also"):
        admin = {"id": "ops", "hash": hash_key(KEY_ALICE)}
        resolve_auth(config(keys=[alice()], admin_keys=[admin]))


def test_fingerprint_follows_key_file_content(tmp_path: Path) -> None:
    path = tmp_path / "alice.key"
    path.write_text(KEY_ALICE)
    cfg = config(keys=[alice(hash=None, key_file="alice.key")])
    first = resolve_auth(cfg, tmp_path).fingerprint
    assert resolve_auth(cfg, tmp_path).fingerprint == first
    path.write_text(KEY_BOB)
    assert resolve_auth(cfg, tmp_path).fingerprint != first


def test_hash_key_command_prints_a_new_key_and_its_hash() -> None:
    out = io.StringIO()
    assert hash_key_command([], stdout=out) == 0
    key, digest = re.findall(r"^(?:key|hash):\s+(\S+)$", out.getvalue(), re.MULTILINE)
    assert digest == hash_key(key)


def test_hash_key_command_hashes_a_key_from_stdin(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert hash_key_command(["--stdin"], stdin=io.StringIO(KEY_ALICE + "\n"), stdout=out) == 0
    assert out.getvalue() == hash_key(KEY_ALICE) + "\n"
    assert hash_key_command(["--stdin"], stdin=io.StringIO("short"), stdout=out) == 2
    assert "at least" in capsys.readouterr().err


def test_public_metrics_is_a_boolean_off_by_default() -> None:
    assert config().public_metrics is False
    assert resolve_auth(config(public_metrics=True)).public_metrics is True
    with pytest.raises(ValidationError, match="public_metrics"):
        config(public_metrics="yes")
