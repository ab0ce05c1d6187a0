"""A small vLLM-compatible engine for tests and the demo; see ``app`` for the knobs."""

from router.fake_engine.app import create_app, run

__all__ = ["create_app", "run"]
