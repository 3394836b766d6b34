"""The HTTP API: native and OpenAI-compatible client routes, worker, admin and ops routes."""

from inferq.api.app import create_app
from inferq.api.context import ApiContext, Drain

__all__ = ["ApiContext", "Drain", "create_app"]
