"""The HTTP API: native and OpenAI-compatible client routes, worker, admin and ops routes."""

from inferq.api.app import create_app

__all__ = ["create_app"]
