"""The router's own errors quote a client's model name cut short, never whole."""

from __future__ import annotations

import openai
import pytest

from tests.harness import Router


def test_a_megabyte_model_name_is_not_echoed_whole(router: Router) -> None:
    name = "x" * 1_000_000
    r = router.client.post("/v1/chat/completions", json={
        "model": name, "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 404 and len(r.content) < 1000, len(r.content)
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["message"] == f"The model `{'x' * 256}…` does not exist."
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="é" * 300, input="a")
    assert info.value.code == "model_not_found"
    assert f"`{'é' * 256}…`" in info.value.message


def test_a_short_unknown_name_is_quoted_whole(router: Router) -> None:
    r = router.client.post("/v1/chat/completions", json={"model": "n" * 256, "messages": []})
    assert r.json()["error"]["message"] == f"The model `{'n' * 256}` does not exist."
