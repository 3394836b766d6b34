"""A scripted stand-in for the daemon's worker routes and an upstream, for worker process tests.

One aiohttp server in a thread of the test process serves both: ``/v1/worker/...`` (bind,
claim, heartbeat, outcomes, release, unbind) and an OpenAI-compatible upstream under
``/up/v1``. What the claim or the upstream answers is chosen per test (``claim_answer``,
``upstream_answer``); the server records the requests and outcomes it received, and a test
waits on its threading events. It exists so a worker process can be fed answers the real
daemon would never send (512 MiB), without PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]
BIG_BYTES = 512 << 20


class FakeDaemon:
    """Worker routes and an upstream on one loopback port (see the module docstring)."""

    def __init__(self) -> None:
        self.url = ""
        self.tasks_on_bind: list[dict[str, Any]] = []
        self.claim_answer: Answer = self._empty_claim
        self.upstream_answer: Answer = self._never
        self.outcomes: list[dict[str, Any]] = []
        self.released: list[str] = []
        self.authorizations: list[str] = []
        self.claimed = threading.Event()  # a claim request arrived
        self.upstream_called = threading.Event()
        self.go = threading.Event()  # the test lets a scripted answer start
        self.sent_bytes = 0

    # -- routes ---------------------------------------------------------------------------------

    async def bind(self, request: web.Request) -> web.StreamResponse:
        self.authorizations.append(request.headers.get("Authorization", ""))
        body = await request.json()
        answer = {
            "session_id": str(uuid.uuid4()),
            "pools": body["pools"],
            "capacity": body["capacity"],
            "lease_s": 30.0,
            "heartbeat_s": 30.0,
            "tasks": self.tasks_on_bind,
        }
        self.tasks_on_bind = []
        return web.json_response(answer, status=201)

    async def claim(self, request: web.Request) -> web.StreamResponse:
        self.claimed.set()
        return await self.claim_answer(request)

    async def post_outcomes(self, request: web.Request) -> web.StreamResponse:
        items = (await request.json())["outcomes"]
        self.outcomes += items
        results = [{"id": i["task_id"], "status_code": 200, "task": None} for i in items]
        return web.json_response({"results": results, "tasks": []})

    async def task_call(self, request: web.Request) -> web.StreamResponse:
        """start, chunks, release: each answered as the daemon would, briefly."""
        task_id, action = request.match_info["tid"], request.match_info["action"]
        body = await request.json()
        if action == "chunks":
            return web.json_response({"last_seq": body["chunks"][-1]["seq"]})
        if action == "release":
            self.released.append(task_id)
        status = {"start": "running", "release": "pending"}[action]
        task = {"id": task_id, "status": status, "pool": "p", "created_at": "2026-01-01T00:00:00Z"}
        return web.json_response(task)

    async def heartbeat(self, request: web.Request) -> web.StreamResponse:
        body = {"cancelled": [], "lost": [], "lease_s": 30.0, "heartbeat_s": 30.0}
        return web.json_response(body)

    async def unbind(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"released": 0})

    async def models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def completion(self, request: web.Request) -> web.StreamResponse:
        self.upstream_called.set()
        return await self.upstream_answer(request)

    # -- scripted answers -----------------------------------------------------------------------

    async def _empty_claim(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep((await request.json())["wait_s"])
        return web.json_response({"tasks": []})

    async def _never(self, request: web.Request) -> web.StreamResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def big(self, chunked: bool, prefix: bytes) -> Answer:
        """An answer of BIG_BYTES (``prefix``, then padding), sent once ``go`` is set, until
        the client hangs up."""

        async def answer(request: web.Request) -> web.StreamResponse:
            await asyncio.to_thread(self.go.wait)
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            if chunked:
                resp.enable_chunked_encoding()
            else:
                resp.content_length = BIG_BYTES
            await resp.prepare(request)
            block = b"x" * (1 << 20)
            with contextlib.suppress(ConnectionError):
                await resp.write(prefix)
                self.sent_bytes += len(prefix)
                while self.sent_bytes + len(block) <= BIG_BYTES:
                    await resp.write(block)
                    self.sent_bytes += len(block)
            return resp

        return answer

    # -- running --------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        worker = "/v1/worker"
        app.router.add_post(f"{worker}/sessions", self.bind)
        app.router.add_post(f"{worker}/sessions/{{sid}}/claim", self.claim)
        app.router.add_post(f"{worker}/sessions/{{sid}}/heartbeat", self.heartbeat)
        app.router.add_post(f"{worker}/sessions/{{sid}}/outcomes", self.post_outcomes)
        app.router.add_delete(f"{worker}/sessions/{{sid}}", self.unbind)
        app.router.add_post(f"{worker}/tasks/{{tid}}/{{action}}", self.task_call)
        app.router.add_get("/up/v1/models", self.models)
        app.router.add_post("/up/v1/chat/completions", self.completion)
        return app


@contextlib.contextmanager
def running(daemon: FakeDaemon) -> Iterator[FakeDaemon]:
    """Serve ``daemon`` on a free loopback port from a thread until the block ends."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner = web.AppRunner(daemon.app(), handle_signals=False, shutdown_timeout=0.5)

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        daemon.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    ready.wait(10)
    try:
        yield daemon
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        asyncio.run_coroutine_threadsafe(_cancel_the_rest(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _cancel_the_rest() -> None:
    """Long-polls still parked in handlers when the server stops."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
