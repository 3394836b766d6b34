"""How long-running inferq processes (replica, worker, bench stacks) run; imports nothing
server-side, so the worker uses it too.

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
from typing import Any, TypeVar

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
