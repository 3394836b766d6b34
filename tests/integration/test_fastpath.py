"""The fast path answers every hot route exactly as FastAPI does: same status, headers, body.

Two replicas on one database, one with the fast path and one without; every request below
goes to both, and the answers must match once the values that differ by nature (new ids,
timestamps, request ids) are masked. Each hot route (``@hot`` in inferq.api) is covered; a
hot route without a case here fails the last test.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from inferq.api.app import InferqApp
from inferq.api.fastpath import FastPath
from inferq.api.middleware import RequestMiddleware
from inferq.settings import Settings
from tests.api_helpers import (
    MODEL,
    POOL,
    EchoWorker,
    Server,
    Tokens,
    auth,
    make_tokens,
    running_worker,
    serve_app,
)

pytestmark = pytest.mark.db

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "same answer both ways"}]}
COMPARED_HEADERS = (
    "content-type",
    "retry-after",
    "www-authenticate",
    "x-inferq-wait",
    "cache-control",
)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?")
_EPOCH = re.compile(r'"created":\s*\d+')


@dataclass
class Pair:
    fast: httpx.AsyncClient
    slow: httpx.AsyncClient
    tokens: Tokens
    fast_path: FastPath  # the fast replica's
    routes: set[str] = field(default_factory=set)


def front(server: Server) -> RequestMiddleware:
    """The request middleware in front of a served app: it holds the fast path, if any."""
    app = server.server.config.app
    assert isinstance(app, InferqApp) and isinstance(app.front, RequestMiddleware)
    return app.front


@pytest.fixture
async def pair(settings: Settings, dsn: str) -> AsyncIterator[Pair]:
    tokens = await make_tokens(settings, dsn)
    async with (
        serve_app(settings, dsn) as fast,
        serve_app(settings, dsn, fast_path=False) as slow,
        httpx.AsyncClient(base_url=fast.url, timeout=30) as a,
        httpx.AsyncClient(base_url=slow.url, timeout=30) as b,
    ):
        fast_path = front(fast).fast_path
        assert fast_path is not None and front(slow).fast_path is None
        pair = Pair(a, b, tokens, fast_path)
        yield pair
        # The fast replica did answer on its fast path (not everything fell back to FastAPI).
        assert fast_path.answered >= 5


def masked(text: str) -> str:
    return _EPOCH.sub('"created": 0', _TIME.sub("<time>", _UUID.sub("<id>", text)))


def answer(r: httpx.Response) -> tuple[int, dict[str, str], str]:
    headers = {h: r.headers[h] for h in COMPARED_HEADERS if h in r.headers}
    return r.status_code, headers, masked(r.text)


async def both(pair: Pair, method: str, url: str | tuple[str, str], **kw: Any) -> Any:
    """Send the request to both replicas; assert the answers match; the fast one's."""
    fast_url, slow_url = (url, url) if isinstance(url, str) else url
    a = await pair.fast.request(method, fast_url, **kw)
    b = await pair.slow.request(method, slow_url, **kw)
    assert answer(a) == answer(b), f"{method} {fast_url} {kw}"
    assert a.headers.get("x-request-id") and b.headers.get("x-request-id")
    return a


async def submit(http: httpx.AsyncClient, tokens: Tokens) -> str:
    r = await http.post(
        "/v1/tasks", json={"pool": "idle", "request": {}}, headers=auth(tokens.alice)
    )
    return str(r.json()["id"])


async def bind(http: httpx.AsyncClient, tokens: Tokens) -> str:
    r = await http.post(
        "/v1/worker/sessions", json={"pools": ["idle"]}, headers=auth(tokens.worker)
    )
    return str(r.json()["session_id"])


async def test_submit(pair: Pair) -> None:
    alice, t = auth(pair.tokens.alice), pair.tokens
    sub = {"model": MODEL, "request": {"messages": []}}
    await both(pair, "POST", "/v1/tasks", json=sub, headers=alice)
    # The same key twice on each side (a key of its own per side): 201, then 200 with the
    # first task.
    for _ in range(2):
        a, b = [
            await http.post(
                "/v1/tasks",
                json={"pool": "p", "request": {"k": 1}},
                headers={**alice, "Idempotency-Key": key},
            )
            for http, key in ((pair.fast, "fast"), (pair.slow, "slow"))
        ]
        assert answer(a) == answer(b)
    await both(pair, "POST", "/v1/tasks", json={"model": "nope", "request": {}}, headers=alice)
    await both(pair, "POST", "/v1/tasks", json={**sub, "priority": 5000}, headers=alice)
    await both(pair, "POST", "/v1/tasks", content=b"{", headers=alice)
    await both(pair, "POST", "/v1/tasks", content=b"x=1",
               headers={**alice, "Content-Type": "text/plain"})  # fmt: skip
    await both(pair, "POST", "/v1/tasks", json=sub)
    await both(pair, "POST", "/v1/tasks", json=sub, headers=auth(t.worker))
    await both(pair, "POST", "/v1/tasks?x=1", json=sub, headers=alice)
    pair.routes.add("/v1/tasks")


async def test_wait(pair: Pair) -> None:
    alice = auth(pair.tokens.alice)
    tid = await submit(pair.fast, pair.tokens)
    url = f"/v1/tasks/{tid}/wait"
    for query in ("?timeout=0", "?timeout=0.0", "?timeout=soon", "?timeout=-1",
                  "?timeout=0&timeout=1", "?timeout=0&other=1", "?timeout=%30"):  # fmt: skip
        await both(pair, "GET", url + query, headers=alice)
    await both(pair, "GET", url + "?timeout=0", headers=auth(pair.tokens.bob))
    await both(pair, "GET", url + "?timeout=0", headers=auth(pair.tokens.worker))
    await both(pair, "GET", url + "?timeout=0")
    await both(pair, "GET", "/v1/tasks/not-a-uuid/wait?timeout=0", headers=alice)
    await both(pair, "GET", f"/v1/tasks/{uuid.uuid4()}/wait?timeout=0", headers=alice)
    await pair.fast.post(f"/v1/tasks/{tid}/cancel", headers=alice)
    await both(pair, "GET", url, headers=alice)
    pair.routes.add("/v1/tasks/{task_id}/wait")


async def test_completions(pair: Pair, settings: Settings) -> None:
    alice = auth(pair.tokens.alice)
    worker = EchoWorker(str(pair.fast.base_url), pair.tokens.worker, pools=[POOL])
    async with running_worker(worker):
        text = {"model": MODEL, "prompt": "same both ways"}
        for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", text)):
            await both(pair, "POST", path, json=body, headers=alice)
            await both(pair, "POST", path, json={**body, "stream": True}, headers=alice)
            await both(pair, "POST", path, json={**body, "model": "nope"}, headers=alice)
            await both(pair, "POST", path, json={"model": MODEL}, headers=alice)
            await both(pair, "POST", path, json={**body, "stream": "yes"}, headers=alice)
            await both(pair, "POST", path, content=b"[1, 2]", headers=alice)
            await both(pair, "POST", path, json=body, headers=auth(pair.tokens.worker))
            failing = {**CHAT, "messages": [{"role": "user", "content": "FAIL: broken"}]}
            if path == "/v1/chat/completions":
                await both(pair, "POST", path, json=failing, headers=alice)
    pair.routes.update({"/v1/chat/completions", "/v1/completions"})


async def test_claim_and_outcomes(pair: Pair) -> None:
    t = pair.tokens
    worker = auth(t.worker)
    sids = (await bind(pair.fast, t), await bind(pair.slow, t))
    claim = (f"/v1/worker/sessions/{sids[0]}/claim", f"/v1/worker/sessions/{sids[1]}/claim")
    outcomes = (claim[0].replace("/claim", "/outcomes"), claim[1].replace("/claim", "/outcomes"))
    await both(pair, "POST", claim, json={"max_tasks": 2, "wait_s": 0}, headers=worker)
    await both(pair, "POST", claim, json={"max_tasks": 0}, headers=worker)
    await both(pair, "POST", claim, json={"wait_s": 0}, headers=auth(t.alice))
    await both(pair, "POST", claim, json={"wait_s": 0}, headers=auth(t.worker_other))
    await both(pair, "POST", "/v1/worker/sessions/nope/claim", json={"wait_s": 0}, headers=worker)
    await both(pair, "POST", f"/v1/worker/sessions/{uuid.uuid4()}/claim", json={"wait_s": 0},
               headers=worker)  # fmt: skip
    # The claim that finds work: one task for each side.
    for http in (pair.fast, pair.slow):
        await http.post(
            "/v1/tasks", json={"pool": "idle", "request": {"n": 1}}, headers=auth(t.alice)
        )
    got = [await pair.fast.post(claim[0], json={"wait_s": 0}, headers=worker),
           await pair.slow.post(claim[1], json={"wait_s": 0}, headers=worker)]  # fmt: skip
    assert answer(got[0]) == answer(got[1])
    tasks = [r.json()["tasks"][0] for r in got]
    items = [{"outcomes": [{"task_id": k["id"], "attempt": k["attempt"], "response": {"ok": 1}},
                           {"task_id": str(uuid.uuid4()), "attempt": 1, "error": "gone"}]}
             for k in tasks]  # fmt: skip
    a = await pair.fast.post(outcomes[0], json=items[0], headers=worker)
    b = await pair.slow.post(outcomes[1], json=items[1], headers=worker)
    assert answer(a) == answer(b)
    assert [r["status_code"] for r in a.json()["results"]] == [200, 404]
    await both(pair, "POST", outcomes, json={"outcomes": []}, headers=worker)
    await both(pair, "POST", outcomes, content=b"{", headers=worker)
    pair.routes.update({"/v1/worker/sessions/{session_id}/claim",
                        "/v1/worker/sessions/{session_id}/outcomes"})  # fmt: skip


def test_every_hot_route_has_a_case() -> None:
    from fastapi.routing import APIRoute

    from inferq.api import admin, openai, ops, tasks, worker

    hot = {
        r.path
        for m in (admin, openai, ops, tasks, worker)
        for r in m.router.routes
        if isinstance(r, APIRoute) and getattr(r.endpoint, "hot", False)
    }
    covered = {
        "/v1/tasks",
        "/v1/tasks/{task_id}/wait",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/worker/sessions/{session_id}/claim",
        "/v1/worker/sessions/{session_id}/outcomes",
    }
    assert hot == covered, "a hot route needs a case in this module (and in this list)"
    assert json.dumps(sorted(hot))  # the list above is what the cases exercise
