"""Clients never see database error text: bad inputs on every route (bad pool names, over-long
keys and names, NULs, out-of-range numbers, odd ids) get a 4xx with our own JSON error, never a
500 and never a word of PostgreSQL's."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from inferq.settings import Settings
from tests.api_helpers import MODEL, POOL, Tokens, auth, make_tokens, serve_app

pytestmark = pytest.mark.db

# Words of PostgreSQL's and psycopg's messages (and our schema's name) that must never reach
# a client.
LEAKS = (
    "violates",
    "constraint",
    "SQLSTATE",
    "inferq.",
    "psycopg",
    "DETAIL",
    "relation ",
    "syntax error",
    "NUL (0x00)",
    "value too long",
    "out of range for type",
    "invalid input syntax",
)

NUL = "\x00"
LONG = "x" * 300
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _cases(tokens: Tokens) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(who, method, path, request kwargs) for every bad input."""
    task = str(uuid.uuid4())
    holder = {"session_id": str(uuid.uuid4()), "attempt": 1}
    body: dict[str, Any]
    cases: list[tuple[str, str, str, dict[str, Any]]] = []
    for pool in ("gpu a", "-starts-with-dash", "é", LONG, NUL, ""):
        cases.append(("alice", "POST", "/v1/tasks", {"json": {"pool": pool, "request": CHAT}}))
        cases.append(("admin", "POST", "/v1/admin/llms", {"json": {"name": "m", "pool": pool}}))
        cases.append(("alice", "GET", "/v1/tasks", {"params": {"pool": pool}}))
        cases.append(("worker", "POST", "/v1/worker/sessions", {"json": {"pools": [pool]}}))
    submit: list[dict[str, Any]] = [
        {"pool": POOL, "request": CHAT, "agent_id": LONG},
        {"pool": POOL, "request": CHAT, "agent_id": NUL},
        {"model": LONG, "request": CHAT},
        {"model": NUL, "request": CHAT},
        {"llm": "missing", "request": CHAT},
        {"pool": POOL, "request": CHAT, "priority": 10**6},
        {"pool": POOL, "request": CHAT, "priority": 2**63},
        {"pool": POOL, "request": CHAT, "max_attempts": 0},
        {"pool": POOL, "request": {"k" + NUL: 1}},
        {"pool": POOL, "request": {"text": "a" + NUL}},
        {"pool": POOL, "request": "not an object"},
    ]
    cases += [("alice", "POST", "/v1/tasks", {"json": body}) for body in submit]
    for key in ("k" * 256, ""):
        cases.append(
            (
                "alice",
                "POST",
                "/v1/tasks",
                {"json": {"pool": POOL, "request": CHAT}, "headers": {"Idempotency-Key": key}},
            )
        )
    raw_bodies = [
        b'{"pool": "p", "request": {"x": "\\ud800"}}',
        b'{"pool": "p", "request": {"x": 100000000000000000000000000000}}',
        b'{"pool": "p", "request": {"x": 1e400}}',
        b'{"pool": "p", "request": {"x": "\\u0000"}}',
    ]
    for raw in raw_bodies:
        cases.append(
            (
                "alice",
                "POST",
                "/v1/tasks",
                {"content": raw, "headers": {"Content-Type": "application/json"}},
            )
        )
    for params in (
        {"agent_id": NUL},
        {"agent_id": LONG * 10},
        {"cursor": "garbage"},
        {"cursor": NUL},
        {"status": "bogus"},
        {"limit": "100000"},
        {"limit": "-1"},
    ):
        cases.append(("alice", "GET", "/v1/tasks", {"params": params}))
    for path in (
        "/v1/tasks/not-a-uuid",
        f"/v1/tasks/{task}",
        f"/v1/tasks/{task}/wait?timeout=nan",
        f"/v1/tasks/{task}/wait?timeout=-1",
        "/v1/models/%00",
        f"/v1/models/{LONG}",
    ):
        cases.append(("alice", "GET", path, {}))
    cases.append(("alice", "POST", f"/v1/tasks/{LONG}/cancel", {}))
    cases.append(
        (
            "alice",
            "GET",
            f"/v1/tasks/{task}/events",
            {"headers": {"Last-Event-ID": "1:99999999999"}},
        )
    )
    for body in (
        {"model": "", **CHAT},
        {"model": LONG, **CHAT},
        {"model": NUL, **CHAT},
        {"model": "missing", **CHAT},
        {"model": MODEL, "messages": "not a list"},
        {"model": MODEL, **CHAT, "stream": "maybe"},
        {"model": MODEL, **CHAT, "max_tokens": 10**12},
    ):
        cases.append(("alice", "POST", "/v1/chat/completions", {"json": body}))
    cases.append(("alice", "POST", "/v1/completions", {"json": {"model": NUL, "prompt": "x"}}))
    for body in (
        {"pools": [POOL], "capacity": 0},
        {"pools": [POOL], "capacity": 10**9},
        {"pools": [POOL], "name": LONG},
        {"pools": [POOL], "name": NUL},
        {"pools": []},
    ):
        cases.append(("worker", "POST", "/v1/worker/sessions", {"json": body}))
    sid = str(uuid.uuid4())
    for path, body in (
        (f"/v1/worker/sessions/{sid}/claim", {"wait_s": 0}),
        (f"/v1/worker/sessions/{sid}/heartbeat", {"tasks": ["nope"]}),
        (f"/v1/worker/sessions/{sid}/outcomes", {"outcomes": []}),
        (f"/v1/worker/tasks/{task}/start", {**holder, "attempt": 2**40}),
        (f"/v1/worker/tasks/{task}/chunks", {**holder, "chunks": [{"seq": 2**31, "data": {}}]}),
        (f"/v1/worker/tasks/{task}/complete", {"session_id": "x", "attempt": 1, "response": {}}),
        (f"/v1/worker/tasks/{task}/fail", {**holder, "message": NUL}),
        (f"/v1/worker/tasks/{task}/fail", {**holder, "message": "m"}),
        ("/v1/worker/sessions/not-a-uuid/claim", {"wait_s": 0}),
    ):
        cases.append(("worker", "POST", path, {"json": body}))
    for body in (
        {"name": LONG, "pool": POOL},
        {"name": NUL, "pool": POOL},
        {"name": "m", "pool": POOL, "tier": LONG},
        {"name": "m", "pool": POOL, "max_n": 0},
        {"name": "m", "pool": POOL, "max_tokens": 2**40},
    ):
        cases.append(("admin", "POST", "/v1/admin/llms", {"json": body}))
    for body in (
        {"owner": ""},
        {"owner": LONG},
        {"owner": NUL},
        {"owner": "o", "role": "root"},
        {"owner": "o", "label": LONG},
        {"owner": "o", "pools": [NUL]},
        {"owner": "o", "pools": []},
    ):
        cases.append(("admin", "POST", "/v1/admin/tokens", {"json": body}))
    for path in (
        "/v1/admin/llms/%00",
        "/v1/admin/llms/missing",
        "/v1/admin/tokens/not-a-uuid",
        f"/v1/admin/tokens/{uuid.uuid4()}",
    ):
        cases.append(("admin", "DELETE", path, {}))
    return cases


async def test_no_error_body_carries_database_text(settings: Settings, dsn: str) -> None:
    tokens = await make_tokens(settings, dsn)
    secrets = {"alice": tokens.alice, "worker": tokens.worker, "admin": tokens.admin}
    answers = []
    async with (
        serve_app(settings, dsn) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        for who, method, path, kwargs in _cases(tokens):
            headers = {**auth(secrets[who]), **kwargs.pop("headers", {})}
            r = await http.request(method, path, headers=headers, **kwargs)
            answers.append((method, path, kwargs, r))
    assert len(answers) > 90
    refused = 0
    for method, path, kwargs, r in answers:
        where = f"{method} {path!r} {kwargs}: {r.status_code} {r.text[:300]}"
        assert r.status_code < 500, where
        assert r.headers["content-type"].startswith("application/json"), where
        for word in LEAKS:
            assert word not in r.text, f"{word!r} leaked: {where}"
        if r.status_code < 400:
            # Odd but valid: a listing filter that matches nothing, a 30-digit integer.
            continue
        assert 400 <= r.status_code < 500, where
        error = r.json()["error"]
        assert error["message"] and error["type"], where
        refused += 1
    assert refused > 80
