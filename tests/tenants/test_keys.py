"""Authentication: every status, header forms, timing-safe lookup, model patterns."""

from __future__ import annotations

import hmac

import pytest

from router.errors import ClientError
from router.tenants import AdminKeyRequired, Authenticator, InvalidApiKey, Limits, hash_key
from router.tenants.config import ResolvedAuth, ResolvedKey, key_digest
from router.tenants.keys import Tenant
from tests.tenants.conftest import KEY_ADMIN, KEY_ALICE, KEY_BOB, alice, authenticator


@pytest.fixture
def auth() -> Authenticator:
    bob = {"id": "bob", "hash": hash_key(KEY_BOB), "models": ["*"]}
    return authenticator([alice(), bob], admin_keys=[{"id": "ops", "hash": hash_key(KEY_ADMIN)}])


def test_bearer_key_authenticates_to_its_tenant(auth: Authenticator) -> None:
    tenant = auth.authenticate(f"Bearer {KEY_ALICE}", None)
    assert (tenant.key_id, tenant.tenant_id, tenant.admin) == ("alice", "team-a", False)


@pytest.mark.parametrize(
    "header", [f"bearer {KEY_BOB}", f"BEARER  {KEY_BOB} ", f"Bearer\t{KEY_BOB}"]
)
def test_bearer_scheme_is_case_insensitive(auth: Authenticator, header: str) -> None:
    assert auth.authenticate(header, None).key_id == "bob"


def test_x_api_key_header_authenticates(auth: Authenticator) -> None:
    assert auth.authenticate(None, KEY_BOB).key_id == "bob"
    assert auth.authenticate(f"Bearer {KEY_BOB}", KEY_BOB).key_id == "bob"


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "says"),
    [
        (None, None, "didn't provide an API key"),
        ("", "", "didn't provide an API key"),
        ("Bearer", None, "must be `Authorization: Bearer <key>`"),
        (f"Basic {KEY_ALICE}", None, "must be `Authorization: Bearer <key>`"),
        (f"Bearer {KEY_ALICE}", KEY_BOB, "different keys"),
        ("Bearer ry-not-a-configured-key-0123456789abcdef", None, "Invalid API key"),
        (None, KEY_ALICE.upper(), "Invalid API key"),
    ],
)
def test_missing_malformed_or_unknown_key_is_401(
    auth: Authenticator, authorization: str | None, x_api_key: str | None, says: str
) -> None:
    with pytest.raises(InvalidApiKey, match=says) as info:
        auth.authenticate(authorization, x_api_key)
    error = info.value
    assert isinstance(error, ClientError)
    assert error.status == 401
    assert error.to_envelope()["error"]["code"] == "invalid_api_key"
    assert error.to_envelope()["error"]["type"] == "invalid_request_error"
    assert error.headers["www-authenticate"].startswith("Bearer")
    for key in (KEY_ALICE, KEY_BOB, KEY_ALICE.upper()):
        assert key not in error.message


def test_admin_key_opens_admin_only(auth: Authenticator) -> None:
    admin = auth.authenticate_admin(f"Bearer {KEY_ADMIN}", None)
    assert admin.admin and admin.key_id == "ops"
    assert not admin.can_use("chat-small")
    assert not admin.can_use("embed-model")


def test_client_key_on_admin_is_403_and_unknown_key_is_401(auth: Authenticator) -> None:
    with pytest.raises(AdminKeyRequired) as info:
        auth.authenticate_admin(f"Bearer {KEY_ALICE}", None)
    assert info.value.status == 403
    assert info.value.to_envelope()["error"]["code"] == "admin_key_required"
    with pytest.raises(InvalidApiKey):
        auth.authenticate_admin(None, None)


def test_lookup_is_confirmed_with_compare_digest_on_the_hash(
    auth: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("router.tenants.keys.hmac.compare_digest", spy)
    auth.authenticate(f"Bearer {KEY_ALICE}", None)
    assert calls == [(key_digest(KEY_ALICE), key_digest(KEY_ALICE))]


def test_a_stored_digest_differing_in_one_byte_does_not_match() -> None:
    near = bytearray(key_digest(KEY_ALICE))
    near[-1] ^= 1
    key = ResolvedKey("alice", "alice", (bytes(near),), ("*",), Limits(), (), False)
    auth = Authenticator(ResolvedAuth((key,), "x", ()))
    with pytest.raises(InvalidApiKey):
        auth.authenticate(f"Bearer {KEY_ALICE}", None)


def test_authenticator_keeps_no_plain_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALICE_KEY", KEY_ALICE)
    from router.tenants import AuthConfig

    config = AuthConfig.model_validate({"keys": [alice(hash=None, key_env="ALICE_KEY")]})
    auth = Authenticator.from_config(config)
    assert auth.authenticate(None, KEY_ALICE).key_id == "alice"
    assert KEY_ALICE not in repr(vars(auth)) + repr(auth.tenants)


def test_rotation_lists_two_hashes_on_one_key(auth: Authenticator) -> None:
    rotating = authenticator([alice(hash=[hash_key(KEY_ALICE), hash_key(KEY_BOB)])])
    assert rotating.authenticate(None, KEY_ALICE) is rotating.authenticate(None, KEY_BOB)


def test_revoked_key_fails_once_the_new_config_is_built() -> None:
    before = authenticator([alice(), {"id": "bob", "hash": hash_key(KEY_BOB), "models": ["*"]}])
    after = authenticator([alice()])
    assert before.authenticate(None, KEY_BOB).key_id == "bob"
    assert before.fingerprint != after.fingerprint
    with pytest.raises(InvalidApiKey):
        after.authenticate(None, KEY_BOB)


@pytest.mark.parametrize(
    ("model", "allowed"),
    [
        ("chat-small", True),
        ("chat-", True),
        ("embed-model", True),
        ("xchat-small", False),
        ("Chat-small", False),
        ("embed-model-2", False),
        ("rerank-model", False),
        ("", False),
    ],
)
def test_models_match_names_and_globs(model: str, allowed: bool) -> None:
    tenant = authenticator([alice()]).tenants["alice"]
    assert tenant.can_use(model) is allowed


def test_glob_forms() -> None:
    tenant = authenticator([alice(models=["org/*", "m?", "v[12]"])]).tenants["alice"]
    assert [m for m in ["org/a/b", "org", "m1", "m12", "v1", "v3"] if tenant.can_use(m)] == [
        "org/a/b", "m1", "v1",
    ]


def test_model_limits_first_matching_entry_wins() -> None:
    entry = alice(model_limits={"chat-big": {"rpm": 1}, "chat-*": {"rpm": 5}})
    tenant: Tenant = authenticator([entry]).tenants["alice"]
    assert tenant.limits_for("chat-big") == Limits(rpm=1)
    assert tenant.limits_for("chat-small") == Limits(rpm=5)
    assert tenant.limits_for("embed-model") is None
