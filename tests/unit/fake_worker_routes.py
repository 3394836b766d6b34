"""An in-memory stand-in for the daemon's worker routes (no database), for the runner's tests.

It answers exactly as docs/protocol.md says, over real HTTP on a loopback port (``serving``)
and records every call; the end-to-end tests run the same paths against a real daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from aiohttp import web

from inferq.bench.polling import eventually


class FakeDaemon:
    """Worker routes over an in-memory queue; records every call."""

    def __init__(self, heartbeat_s: float = 0.05) -> None:
        self.heartbeat_s = heartbeat_s
        self.pending: list[dict[str, Any]] = []
        self.sessions: dict[str, int] = {}  # session id -> capacity
        self.held: dict[str, tuple[str, int]] = {}  # task id -> (session, attempt)
        self.chunks: dict[str, list[int]] = {}
        self.outcomes: dict[str, tuple[str, Any]] = {}
        self.cancelled: set[str] = set()
        self.calls: list[str] = []
        self.unavailable = 0  # answer this many next requests with 503
        # Refuse the outcomes route with this status; -1: never answer it.
        self.outcomes_route: int | None = None
        # When set, start calls are answered only once this event is set.
        self.hold_starts: asyncio.Event | None = None
        self.new_work = asyncio.Event()
        self.changed = asyncio.Event()

    def add(self, n: int = 1, *, streaming: bool = False) -> list[str]:
        ids = []
        for _ in range(n):
            task: dict[str, Any] = {
                "id": str(uuid.uuid4()),
                "attempt": 1,
                "pool": "p",
                "streaming": streaming,
            }
            self.pending.append({**task, "request": {"messages": []}})
            ids.append(task["id"])
        self.new_work.set()
        return ids

    def _take(self, sid: str, n: int) -> list[dict[str, Any]]:
        taken, self.pending = self.pending[:n], self.pending[n:]
        for t in taken:
            self.held[t["id"]] = (sid, t["attempt"])
        return taken

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        parts = request.url.path.split("/")[3:]  # after /v1/worker
        self.calls.append(f"{request.method} {'/'.join(p if len(p) < 30 else '*' for p in parts)}")
        try:
            if self.unavailable:
                self.unavailable -= 1
                return httpx.Response(503, json={"error": {"message": "draining", "type": "x"}})
            return await self._route(request.method, parts, body)
        finally:
            self.changed.set()

    async def _route(self, method: str, parts: list[str], body: Any) -> httpx.Response:
        if parts == ["sessions"]:
            sid = str(uuid.uuid4())
            self.sessions[sid] = body["capacity"]
            tasks = self._take(sid, body["capacity"])
            return httpx.Response(
                201,
                json={
                    "session_id": sid,
                    "pools": body["pools"],
                    "capacity": body["capacity"],
                    "lease_s": 1.0,
                    "heartbeat_s": self.heartbeat_s,
                    "tasks": tasks,
                },
            )
        if parts[0] == "sessions":
            sid = parts[1]
            if sid not in self.sessions:
                return error_response(404, "session_not_found")
            if method == "DELETE":
                mine = [t for t, (s, _) in self.held.items() if s == sid]
                for t in mine:
                    self.release(t)
                del self.sessions[sid]
                return httpx.Response(200, json={"released": len(mine)})
            if parts[2] == "outcomes" and self.outcomes_route == -1:
                await asyncio.Event().wait()  # a daemon that never answers
            if parts[2] == "outcomes" and self.outcomes_route == 404:
                return error_response(404, "route_not_found")
            if parts[2] == "outcomes" and self.outcomes_route:
                return error_response(self.outcomes_route, "invalid_body")
            if parts[2] == "outcomes":
                results = [self._finish(sid, o) for o in body["outcomes"]]
                tasks = self._take(sid, body["claim"])
                return httpx.Response(200, json={"results": results, "tasks": tasks})
            if parts[2] == "claim":
                # A session reaped during the long-poll claims nothing until the poll ends.
                while not self.pending or sid not in self.sessions:
                    self.new_work.clear()
                    try:
                        await asyncio.wait_for(self.new_work.wait(), body["wait_s"])
                    except TimeoutError:
                        break
                taken = self._take(sid, body["max_tasks"]) if sid in self.sessions else []
                return httpx.Response(200, json={"tasks": taken})
            # heartbeat
            mine = [t for t in body["tasks"] if self.held.get(t, ("",))[0] == sid]
            gone = [t for t in body["tasks"] if t not in mine and t not in self.cancelled]
            return httpx.Response(
                200,
                json={
                    "cancelled": [t for t in body["tasks"] if t in self.cancelled],
                    "lost": gone,
                    "lease_s": 1.0,
                    "heartbeat_s": self.heartbeat_s,
                },
            )
        task_id, action = parts[1], parts[2]
        if self.held.get(task_id) != (body["session_id"], body["attempt"]):
            return error_response(409, "lease_lost")
        if action == "start" and self.hold_starts is not None:
            await self.hold_starts.wait()
        if action == "chunks":
            self.chunks.setdefault(task_id, []).extend(c["seq"] for c in body["chunks"])
            return httpx.Response(200, json={"last_seq": self.chunks[task_id][-1]})
        if action in ("complete", "fail"):
            del self.held[task_id]
            self.outcomes[task_id] = (action, body.get("response", body.get("message")))
        if action == "release":
            self.release(task_id)
        return httpx.Response(
            200,
            json={
                "id": task_id,
                "status": "running",
                "pool": "p",
                "created_at": "2024-01-01T00:00:00Z",
            },
        )

    def _finish(self, sid: str, item: dict[str, Any]) -> dict[str, Any]:
        task_id = item["task_id"]
        if self.held.get(task_id) != (sid, item["attempt"]):
            return {"id": task_id, "status_code": 409, "error": _error_body("lease_lost")}
        del self.held[task_id]
        if "error" in item:
            self.outcomes[task_id] = ("fail", item["error"])
        else:
            self.outcomes[task_id] = ("complete", item["response"])
        return {"id": task_id, "status_code": 200, "task": {"id": task_id, "status": "completed"}}

    def cancel(self, task_id: str) -> None:
        """The task's client cancelled it: the next heartbeat says so."""
        del self.held[task_id]
        self.cancelled.add(task_id)

    def release(self, task_id: str) -> None:
        del self.held[task_id]
        self.outcomes[task_id] = ("released", None)

    async def until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Re-check ``predicate`` on each change of the daemon's state, up to ``timeout_s``."""
        await eventually(predicate, timeout_s, changed=self.changed)


def _error_body(code: str) -> dict[str, Any]:
    return {"message": code, "type": "x", "code": code}


def error_response(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, json={"error": _error_body(code)})


Handle = Callable[[httpx.Request], Awaitable[httpx.Response]]


@contextlib.asynccontextmanager
async def serving(handle: Handle) -> AsyncIterator[str]:
    """``handle`` (httpx request in, httpx response out) behind a real HTTP server on a
    loopback port; yields its base URL."""

    async def on_request(request: web.Request) -> web.Response:
        body = await request.read()
        answer = await handle(httpx.Request(request.method, str(request.url), content=body))
        return web.Response(
            status=answer.status_code, body=answer.content, content_type="application/json"
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", on_request)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
