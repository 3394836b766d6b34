"""Every bad request gets its status and OpenAI-style error JSON, and writes nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from inferq.bench.polling import eventually
from inferq.settings import Settings
from tests.api_helpers import (
    MODEL,
    POOL,
    Server,
    Tokens,
    auth,
    count_rows,
    make_tokens,
    read_task,
    serve_app,
)

pytestmark = pytest.mark.db

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
MAX_BODY = 4096
MAX_DEPTH = 8


@dataclass
class Env:
    server: Server
    tokens: Tokens
    http: httpx.AsyncClient
    task_id: str  # one of alice's pending tasks
    session_id: str  # a session of the "gpus" worker owner


@pytest.fixture
async def env(settings: Settings, dsn: str) -> AsyncIterator[Env]:
    limited = settings.model_copy(
        update={"max_body_bytes": MAX_BODY, "max_json_depth": MAX_DEPTH, "max_wait_s": 0.5}
    )
    tokens = await make_tokens(limited, dsn)
    async with (
        serve_app(limited, dsn) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
    ):
        r = await http.post(
            "/v1/tasks", json={"pool": "idle-pool", "request": CHAT}, headers=auth(tokens.alice)
        )
        assert r.status_code == 201
        r2 = await http.post(
            "/v1/worker/sessions", json={"pools": ["idle-pool-2"]}, headers=auth(tokens.worker)
        )
        assert r2.status_code == 201
        yield Env(server, tokens, http, r.json()["id"], r2.json()["session_id"])


Call = Callable[[Env], Awaitable[httpx.Response]]


def post_raw(
    path: str, content: Any, content_type: str = "application/json", who: str = "alice"
) -> Call:
    async def call(env: Env) -> httpx.Response:
        headers = {"Content-Type": content_type, **auth(getattr(env.tokens, who))}
        return await env.http.post(path, content=content, headers=headers)

    return call


def post_json(
    path: str, body: Any, who: str = "alice", headers: dict[str, str] | None = None
) -> Call:
    async def call(env: Env) -> httpx.Response:
        path_ = path.format(task=env.task_id, session=env.session_id)
        raw = json.dumps(body).replace("{session}", env.session_id).replace("{task}", env.task_id)
        return await env.http.post(
            path_,
            json=json.loads(raw),
            headers={**auth(getattr(env.tokens, who)), **(headers or {})},
        )

    return call


def request(
    method: str, path: str, headers: dict[str, str] | None = None, who: str | None = "alice"
) -> Call:
    async def call(env: Env) -> httpx.Response:
        h = dict(headers or {})
        if who:
            h.update(auth(getattr(env.tokens, who)))
        return await env.http.request(method, path.format(task=env.task_id), headers=h)

    return call


def revoked_token() -> Call:
    async def call(env: Env) -> httpx.Response:
        tid = env.tokens.ids["alice"]
        r = await env.http.delete(f"/v1/admin/tokens/{tid}", headers=auth(env.tokens.admin))
        assert r.status_code == 200
        return await env.http.post(
            "/v1/tasks", json={"model": MODEL, "request": CHAT}, headers=auth(env.tokens.alice)
        )

    return call


def revoked_twice() -> Call:
    async def call(env: Env) -> httpx.Response:
        path = f"/v1/admin/tokens/{env.tokens.ids['worker_other']}"
        first = await env.http.delete(path, headers=auth(env.tokens.admin))
        assert first.status_code == 200
        return await env.http.delete(path, headers=auth(env.tokens.admin))

    return call


def chunked_oversized() -> Call:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"model": "echo-model", "request": {"messages": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}}'

    async def call(env: Env) -> httpx.Response:
        headers = {"Content-Type": "application/json", **auth(env.tokens.alice)}
        return await env.http.post("/v1/tasks", content=body(), headers=headers)

    return call


def nested(depth: int) -> str:
    return '{"model": "echo-model", "request": {"a": ' + "[" * depth + "]" * depth + "}}"


SUBMIT = {"model": MODEL, "request": CHAT}

ROWS: list[tuple[str, Call, int, str]] = [
    ("malformed json", post_raw("/v1/tasks", b'{"model": '), 400, "invalid_json"),
    ("malformed json (openai)", post_raw("/v1/chat/completions", b"{,}"), 400, "invalid_json"),
    (
        "wrong content type",
        post_raw("/v1/tasks", json.dumps(SUBMIT), "text/plain"),
        415,
        "unsupported_media_type",
    ),
    (
        "form body",
        post_raw("/v1/chat/completions", b"model=x", "application/x-www-form-urlencoded"),
        415,
        "unsupported_media_type",
    ),
    (
        "body over the limit with Content-Length",
        post_json("/v1/tasks", {"model": MODEL, "request": {"x": "y" * MAX_BODY}}),
        413,
        "body_too_large",
    ),
    ("body over the limit, chunked", chunked_oversized(), 413, "body_too_large"),
    ("nesting past the limit", post_raw("/v1/tasks", nested(MAX_DEPTH + 2)), 400, "json_too_deep"),
    ("nesting far past the limit", post_raw("/v1/tasks", nested(1500)), 400, "json_too_deep"),
    (
        "NUL in a string",
        post_json("/v1/tasks", {"model": MODEL, "request": {"p": "a\u0000b"}}),
        400,
        "nul_character",
    ),
    (
        "NUL in a key",
        post_json("/v1/chat/completions", {"model": MODEL, "messages": [], "k\u0000": 1}),
        400,
        "nul_character",
    ),
    (
        "unknown model",
        post_json("/v1/tasks", {"model": "nope", "request": CHAT}),
        404,
        "model_not_found",
    ),
    (
        "unknown model (openai)",
        post_json("/v1/chat/completions", {"model": "nope", **CHAT}),
        404,
        "model_not_found",
    ),
    ("no model nor pool", post_json("/v1/tasks", {"request": CHAT}), 400, "invalid_request"),
    (
        "priority out of range",
        post_json("/v1/tasks", {**SUBMIT, "priority": 5000}),
        422,
        "invalid_body",
    ),
    ("unknown field", post_json("/v1/tasks", {**SUBMIT, "colour": "red"}), 422, "invalid_body"),
    (
        "invalid pool name",
        post_json("/v1/tasks", {"pool": "bad pool!", "request": CHAT}),
        400,
        "invalid_value",
    ),
    (
        "openai without messages",
        post_json("/v1/chat/completions", {"model": MODEL}),
        400,
        "invalid_request",
    ),
    ("missing token", request("GET", "/v1/tasks", who=None), 401, "invalid_api_key"),
    (
        "malformed token",
        request("GET", "/v1/tasks", {"Authorization": "Basic Zm9vOmJhcg=="}, who=None),
        401,
        "invalid_api_key",
    ),
    (
        "unknown token",
        request("GET", "/v1/tasks", {"Authorization": "Bearer iq_nope"}, who=None),
        401,
        "invalid_api_key",
    ),
    ("revoked token", revoked_token(), 401, "invalid_api_key"),
    (
        "client token on worker bind",
        post_json("/v1/worker/sessions", {"pools": [POOL]}),
        403,
        "forbidden",
    ),
    (
        "client token on worker complete",
        post_json(
            "/v1/worker/tasks/{task}/complete",
            {"session_id": "00000000-0000-0000-0000-000000000000", "attempt": 1, "response": {}},
        ),
        403,
        "forbidden",
    ),
    (
        "client token on admin",
        post_json("/v1/admin/llms", {"name": "x", "pool": POOL}),
        403,
        "forbidden",
    ),
    (
        "worker token on a pool it may not serve",
        post_json("/v1/worker/sessions", {"pools": [POOL]}, who="worker_other"),
        403,
        "forbidden",
    ),
    (
        "worker token on client routes",
        post_json("/v1/tasks", SUBMIT, who="worker"),
        403,
        "forbidden",
    ),
    (
        "stale attempt",
        post_json(
            "/v1/worker/tasks/{task}/start", {"session_id": "{session}", "attempt": 1}, who="worker"
        ),
        409,
        "lease_lost",
    ),
    (
        "unknown session",
        post_json(
            "/v1/worker/sessions/6d1f0c36-7c55-4a43-9a57-1b0b8c4c2f7e/claim",
            {"wait_s": 0},
            who="worker",
        ),
        404,
        "session_not_found",
    ),
    (
        "another owner's task: get",
        request("GET", "/v1/tasks/{task}", who="bob"),
        404,
        "task_not_found",
    ),
    (
        "another owner's task: wait",
        request("GET", "/v1/tasks/{task}/wait?timeout=0", who="bob"),
        404,
        "task_not_found",
    ),
    (
        "another owner's task: events",
        request("GET", "/v1/tasks/{task}/events", who="bob"),
        404,
        "task_not_found",
    ),
    (
        "another owner's task: cancel",
        request("POST", "/v1/tasks/{task}/cancel", who="bob"),
        404,
        "task_not_found",
    ),
    ("not a task id", request("GET", "/v1/tasks/not-a-uuid"), 404, "task_not_found"),
    (
        "bad Last-Event-ID",
        request("GET", "/v1/tasks/{task}/events", {"Last-Event-ID": "x"}),
        400,
        "invalid_request",
    ),
    ("bad cursor", request("GET", "/v1/tasks?cursor=%%%"), 400, "invalid_request"),
    ("unknown route", request("GET", "/v1/nothing"), 404, "route_not_found"),
    (
        "revoke an unknown token",
        request("DELETE", "/v1/admin/tokens/" + str(uuid.UUID(int=7)), who="admin"),
        404,
        "token_not_found",
    ),
    ("revoke a revoked token", revoked_twice(), 404, "token_not_found"),
]


@pytest.mark.parametrize(
    ("call", "status", "code"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
async def test_bad_input(env: Env, dsn: str, call: Call, status: int, code: str) -> None:
    tasks_before = count_rows(dsn)
    sessions_before = count_rows(dsn, "inferq.worker_session")
    r = await call(env)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["type"]
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert count_rows(dsn) == tasks_before
    assert count_rows(dsn, "inferq.worker_session") == sessions_before
    # The task another owner poked at is untouched, as stored: alice's, pending, never
    # claimed, no answer.
    row = read_task(dsn, env.task_id)
    assert {k: row[k] for k in ("owner_id", "status", "attempt", "claimed_by")} == {
        "owner_id": "alice",
        "status": "pending",
        "attempt": 0,
        "claimed_by": None,
    }
    assert (row["response_body"], row["error_message"], row["completed_at"]) == (None, None, None)
    own = await env.http.get(f"/v1/tasks/{env.task_id}", headers=auth(env.tokens.admin))
    assert own.status_code == 404  # admin is an owner too: scoping holds for every role
    with_owner = await env.http.get(f"/v1/tasks/{env.task_id}", headers=auth(env.tokens.bob))
    assert with_owner.status_code == 404


async def test_too_many_pending_is_429(settings: Settings, dsn: str) -> None:
    capped = settings.model_copy(update={"max_pending_per_token": 2})
    tokens = await make_tokens(capped, dsn)
    async with serve_app(capped, dsn) as server, httpx.AsyncClient(base_url=server.url) as http:
        codes = [
            (await http.post("/v1/tasks", json=SUBMIT, headers=auth(tokens.alice))).status_code
            for _ in range(2)
        ]
        r = await http.post("/v1/tasks", json=SUBMIT, headers=auth(tokens.alice))
        bobs = await http.post("/v1/tasks", json=SUBMIT, headers=auth(tokens.bob))
    assert codes == [201, 201]
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "too_many_pending"
    assert int(r.headers["retry-after"]) >= 1
    assert bobs.status_code == 201
    assert count_rows(dsn) == 3


async def test_too_many_waits_is_429(settings: Settings, dsn: str) -> None:
    import asyncio

    capped = settings.model_copy(update={"max_waits_per_token": 1})
    tokens = await make_tokens(capped, dsn)
    async with serve_app(capped, dsn) as server, httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post("/v1/tasks", json=SUBMIT, headers=auth(tokens.alice))
        tid = r.json()["id"]
        first = asyncio.create_task(
            http.get(f"/v1/tasks/{tid}/wait?timeout=5", headers=auth(tokens.alice), timeout=10)
        )
        svc = server.replica.services
        assert svc is not None
        await eventually(lambda: svc.tasks.slots.open_count > 0)
        second = await http.get(f"/v1/tasks/{tid}/wait?timeout=5", headers=auth(tokens.alice))
        other = await http.get(f"/v1/tasks/{tid}/cancel", headers=auth(tokens.alice))
        await http.post(f"/v1/tasks/{tid}/cancel", headers=auth(tokens.alice))
        answered = await first
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "too_many_waits"
    assert second.headers["retry-after"]
    assert other.status_code == 405
    assert answered.json()["status"] == "cancelled"
