"""docs/supported-apis.md is generated from the catalog and must stay in step with it."""

from __future__ import annotations

from router.catalog import GROUPS, PROXIED, ROUTES
from router.supported_apis import DOC, render


def test_doc_matches_catalog() -> None:
    assert render() in DOC.read_text(encoding="utf-8"), (
        "docs/supported-apis.md is stale: run `python -m router.supported_apis`"
    )


def test_catalog_is_consistent() -> None:
    paths = [(r.method, p) for r in ROUTES for p in r.paths]
    assert len(paths) == len(set(paths)), "a path appears twice in the catalog"
    assert set(GROUPS) == {r.group for r in PROXIED}
    for group in ("chat", "completions", "responses", "messages", "embeddings", "pooling",
                  "classify", "score", "rerank", "tokenize", "transcription", "translation"):
        assert group in GROUPS
