"""codellm: local code-assistant models (registry, engine, server, trainer)."""

__version__ = "0.1.0"
