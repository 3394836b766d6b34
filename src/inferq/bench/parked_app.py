"""The memory floor of the HTTP stack: an ASGI app that only parks requests, on uvicorn.

``inferq bench`` runs it with the very uvicorn settings ``inferq serve`` uses
(``python -m inferq.bench.parked_app PORT``) and opens the same long-polls on it as on a replica.
Every request except ``GET /parked`` (the count so far) waits forever; the resident memory per
parked request is then what uvicorn, its HTTP parser, the event loop's transport and the
socket cost before any application code holds a byte: the floor under a replica's figure.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from inferq.daemon import uvicorn_config
from inferq.http_protocol import HttpLimits
from inferq.runtime import freeze_startup_heap, run
from inferq.settings import Settings

_parked = 0


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _parked
    if scope["type"] != "http":
        return
    if scope["path"] == "/parked":
        body = str(_parked).encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    _parked += 1
    await asyncio.Event().wait()


def main() -> None:
    import uvicorn

    # The limits of the environment (INFERQ_MAX_CONNECTIONS: the bench parks 10,000 requests).
    limits = HttpLimits.from_settings(Settings())
    config = uvicorn_config(app, limits=limits, host="127.0.0.1", port=int(sys.argv[1]))
    freeze_startup_heap()
    run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
