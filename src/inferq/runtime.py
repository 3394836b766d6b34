"""How long-running inferq processes (replica, worker, bench stacks) run.

``uvicorn_config``: the HTTP server settings of ``inferq serve``, shared with the bench's
parked app (which measures that server's own memory floor) and the tests' in-process servers.

``run``: the process's event loop is uvloop when it is installed (it is with the server; a
bare worker install may lack it), else asyncio's own.

``freeze_startup_heap``: after startup, everything imported and built so far (modules, the
FastAPI app, pydantic schemas, the pool) lives as long as the process. CPython's cyclic
garbage collector still walks all of it on every full collection, which paused a replica for
30-65 ms at a time under load (measured with gc callbacks in the relay benchmark; it was most
of the relay's p99). ``gc.freeze()`` moves those objects to a permanent generation the
collector skips, so a full collection only walks what the process allocated since.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import uvicorn

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new event loop (see the module docstring)."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def freeze_startup_heap() -> None:
    """Collect once, then exempt every surviving object from future collections."""
    gc.collect()
    gc.freeze()


def uvicorn_config(app: Any, **options: Any) -> uvicorn.Config:
    """uvicorn.Config for ``app`` as ``inferq serve`` runs it: httptools, no lifespan (the
    caller starts and stops the replica), inferq's own logging (no access log, no default log
    config), no Server header; ``options`` add to or override these."""
    import uvicorn

    defaults: dict[str, Any] = {
        "http": "httptools",
        "lifespan": "off",
        "log_config": None,
        "access_log": False,
        "server_header": False,
    }
    return uvicorn.Config(app, **(defaults | options))
