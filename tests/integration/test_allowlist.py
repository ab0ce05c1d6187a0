"""Every group is allowed where a model enables it and refused with 403 where it does not."""

from __future__ import annotations

import pytest

from router.catalog import PROXIED, ErrorStyle
from tests.conftest import KINDS, Router
from tests.payloads import JSON_BODIES, request_for

#: Routes the engines of the test fixture answer (others are allowed through but 404 there).
SERVED = set(JSON_BODIES) - {"/v1/chat/completions/batch"} | {
    "/v1/audio/transcriptions", "/v1/audio/translations",
}
STYLES = {path: route.errors for route in PROXIED for path in route.paths}
CASES = [
    (kind, route.group, path)
    for kind in KINDS
    for route in PROXIED
    for path in route.paths
]


@pytest.mark.parametrize(("kind", "group", "path"), CASES,
                         ids=[f"{k}-{p}" for k, _, p in CASES])
def test_allowlist(router: Router, kind: str, group: str, path: str) -> None:
    model = KINDS[kind]
    if path in JSON_BODIES or path.startswith("/v1/audio/"):
        kwargs = request_for(path, model.name)
    else:
        kwargs = {"json": {"model": model.name}}
    response = router.client.post(path, **kwargs)
    if group in model.groups:
        assert response.status_code != 403, response.text
        if path in SERVED:
            assert response.status_code == 200, response.text
    else:
        assert response.status_code == 403, response.text
        body = response.json()
        style = STYLES[path]
        if style is ErrorStyle.COHERE:
            message = body["message"]
        elif style is ErrorStyle.ANTHROPIC:
            assert body["type"] == "error" and body["error"]["type"] == "permission_error"
            message = body["error"]["message"]
        else:
            assert body["error"]["code"] == "endpoint_not_enabled"
            message = body["error"]["message"]
        assert model.name in message and group in message
        for enabled in model.groups:
            assert enabled in message
