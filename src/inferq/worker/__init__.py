"""The worker SDK: bind to an inferq daemon over HTTP and run inference tasks.

Imports only aiohttp, orjson, pydantic, structlog and the wire schemas, so a GPU box installs
no server packages (``pip install inferq``; the daemon is ``inferq[server]``). Typical use::

    async with WorkerClient(url, token) as client:
        await Worker(client, ["gpu-a"], EchoBackend(), capacity=4).run()
"""

from inferq.worker.backends import EchoBackend, OpenAIBackend, UpstreamError
from inferq.worker.client import WorkerClient
from inferq.worker.context import Handler, TaskContext
from inferq.worker.errors import (
    AuthenticationError,
    BackendUnavailableError,
    LeaseLostError,
    SessionNotFoundError,
    TaskNotFoundError,
    UnavailableError,
    WorkerApiError,
)
from inferq.worker.outcomes import OutcomeBatcher
from inferq.worker.runner import Worker
from inferq.worker.stream import ChunkStream

__all__ = [
    "AuthenticationError",
    "BackendUnavailableError",
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
