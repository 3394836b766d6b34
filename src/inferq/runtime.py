"""Process-wide settings for long-running inferq processes (replica, worker, bench stacks).

``freeze_startup_heap``: after startup, everything imported and built so far (modules, the
FastAPI app, pydantic schemas, the pool) lives as long as the process. CPython's cyclic
garbage collector still walks all of it on every full collection, which paused a replica for
30-65 ms at a time under load (measured with gc callbacks in the relay benchmark; it was most
of the relay's p99). ``gc.freeze()`` moves those objects to a permanent generation the
collector skips, so a full collection only walks what the process allocated since.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect once, then exempt every surviving object from future collections."""
    gc.collect()
    gc.freeze()
