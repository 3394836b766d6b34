"""TaskContext: what a handler gets next to its task, and the Handler type itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from inferq.wire import JsonValue, WorkerTask
from inferq.worker.stream import ChunkStream


class TaskContext:
    """What a handler gets next to its task: :meth:`emit` for stream chunks."""

    def __init__(self, task: WorkerTask, stream: ChunkStream) -> None:
        self.task = task
        self._stream = stream

    def emit(self, chunk: JsonValue) -> None:
        """Relay one stream chunk (an OpenAI chunk object) to the task's client, in order.

        Ignored for a non-streaming task, so a backend may always emit."""
        if self.task.streaming:
            self._stream.emit(chunk)


Handler = Callable[[WorkerTask, TaskContext], Awaitable[JsonValue]]
