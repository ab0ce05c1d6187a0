"""routeyard: a declarative, YAML-driven router for OpenAI-compatible LLM serving."""

from router.app import create_app
from router.config import ConfigError, RoutesConfig, load_file, parse
from router.settings import Settings

__all__ = ["ConfigError", "RoutesConfig", "Settings", "create_app", "load_file", "parse"]
__version__ = "0.1.0"
