"""inferq: a durable queue for LLM inference requests, kept in PostgreSQL."""

from inferq.domain.task import Task, TaskStatus
from inferq.errors import InferqError

__all__ = ["InferqError", "Task", "TaskStatus", "__version__"]

__version__ = "0.1.0"
