"""The worker SDK: bind to an inferq daemon over HTTP and run inference tasks.

Imports only httpx, pydantic, structlog and the wire schemas, so a GPU box installs no server
packages. Typical use::

    async with WorkerClient(url, token) as client:
        await Worker(client, ["gpu-a"], EchoBackend(), capacity=4).run()
"""

from inferq.worker.backends import EchoBackend, OpenAIBackend, UpstreamError
from inferq.worker.client import WorkerClient
from inferq.worker.errors import (
    AuthenticationError,
    LeaseLostError,
    SessionNotFoundError,
    TaskNotFoundError,
    UnavailableError,
    WorkerApiError,
)
from inferq.worker.outcomes import OutcomeBatcher
from inferq.worker.runner import Handler, TaskContext, Worker
from inferq.worker.stream import ChunkStream

__all__ = [
    "AuthenticationError",
    "ChunkStream",
    "EchoBackend",
    "Handler",
    "LeaseLostError",
    "OpenAIBackend",
    "OutcomeBatcher",
    "SessionNotFoundError",
    "TaskContext",
    "TaskNotFoundError",
    "UnavailableError",
    "UpstreamError",
    "Worker",
    "WorkerApiError",
    "WorkerClient",
]
