"""HTTP server: OpenAI-compatible routes on Litestar. Importable without Click."""

from codellm.server.app import create_app

__all__ = ["create_app"]
