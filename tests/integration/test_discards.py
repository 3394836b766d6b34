"""Tasks a token throws away count against an hourly limit: submitting and cancelling (or
having tasks fail) cannot grow the task table without bound, while the pending cap never sees
a task that is cancelled before the next submit."""

from __future__ import annotations

import contextlib
from typing import Any

import httpx
import psycopg
import pytest

from inferq.settings import Settings
from tests.api_helpers import MODEL, POOL, Tokens, auth, make_tokens, serve_app

pytestmark = pytest.mark.db

LIMIT = 5
CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
SUBMIT = {"model": MODEL, "request": CHAT}


def tasks_of(dsn: str, owner: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM inferq.task WHERE owner_id = %s", (owner,))
        return int(row.fetchone()[0])  # type: ignore[index]


async def submit(http: httpx.AsyncClient, secret: str) -> httpx.Response:
    return await http.post("/v1/tasks", json=SUBMIT, headers=auth(secret))


async def submit_and_cancel(http: httpx.AsyncClient, secret: str) -> None:
    r = await submit(http, secret)
    assert r.status_code == 201, r.text
    cancelled = await http.post(f"/v1/tasks/{r.json()['id']}/cancel", headers=auth(secret))
    assert cancelled.json()["status"] == "cancelled"


async def submit_and_end(
    http: httpx.AsyncClient, tokens: Tokens, secret: str, outcome: dict[str, Any]
) -> None:
    """One task submitted by ``secret``, claimed by a worker and ended by it with ``outcome``
    (``{"error": ...}`` fails it, ``{"response": ...}`` completes it)."""
    r = await submit(http, secret)
    assert r.status_code == 201, r.text
    bound = (
        await http.post(
            "/v1/worker/sessions", json={"pools": [POOL], "capacity": 1},
            headers=auth(tokens.worker),
        )
    ).json()  # fmt: skip
    assert [t["id"] for t in bound["tasks"]] == [r.json()["id"]]
    ended = await http.post(
        f"/v1/worker/sessions/{bound['session_id']}/outcomes",
        json={"outcomes": [{"task_id": r.json()["id"], "attempt": 1, **outcome}]},
        headers=auth(tokens.worker),
    )
    assert [x["status_code"] for x in ended.json()["results"]] == [200]
    await http.delete(f"/v1/worker/sessions/{bound['session_id']}", headers=auth(tokens.worker))


def assert_refused_for_discards(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    # The oldest discard is seconds old: it leaves the rolling hour in about an hour.
    assert 3000 <= int(r.headers["Retry-After"]) <= 3660
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "cancelled or failed" in error["message"]
    assert f"discarded_per_hour={LIMIT}" in error["message"]


@contextlib.asynccontextmanager
async def client(settings: Settings, dsn: str, **overrides: Any) -> Any:
    async with (
        serve_app(settings.model_copy(update=overrides), dsn) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        yield http


async def test_cancelled_and_failed_tasks_count_against_the_hourly_limit(
    settings: Settings, dsn: str
) -> None:
    tokens = await make_tokens(settings, dsn)
    async with client(settings, dsn, max_discarded_per_hour=LIMIT) as http:
        # A task she keeps, in a pool no worker here serves.
        kept = {**auth(tokens.alice), "Idempotency-Key": "kept"}
        parked = {"pool": "parked", "request": CHAT}
        first = await http.post("/v1/tasks", json=parked, headers=kept)
        assert first.status_code == 201
        for _ in range(3):
            await submit_and_cancel(http, tokens.alice)
        for _ in range(2):
            await submit_and_end(http, tokens, tokens.alice, {"error": "upstream said 400"})
        # Completed tasks are not discards.
        for _ in range(LIMIT + 1):
            await submit_and_end(http, tokens, tokens.bob, {"response": {"text": "ok"}})
        assert tasks_of(dsn, "alice") == LIMIT + 1
        over = await submit(http, tokens.alice)
        assert_refused_for_discards(over)
        # The refused submit wrote nothing, and a keyed submit of a new task is refused too.
        assert tasks_of(dsn, "alice") == LIMIT + 1
        keyed = await http.post(
            "/v1/tasks", json=SUBMIT, headers={**auth(tokens.alice), "Idempotency-Key": "k1"}
        )
        assert_refused_for_discards(keyed)
        assert tasks_of(dsn, "alice") == LIMIT + 1
        # A keyed retry of a task she already has still finds it (a client reattaching).
        again = await http.post("/v1/tasks", json=parked, headers=kept)
        assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
        # The OpenAI route is held to the same limit.
        chat = await http.post(
            "/v1/chat/completions", json={"model": MODEL, **CHAT},
            headers=auth(tokens.alice),
        )  # fmt: skip
        assert_refused_for_discards(chat)
        # Another token of another owner is not affected.
        assert (await submit(http, tokens.bob)).status_code == 201


async def test_a_tokens_own_limit_overrides_the_default_and_old_discards_age_out(
    settings: Settings, dsn: str
) -> None:
    tokens = await make_tokens(settings, dsn)
    quota_url = f"/v1/admin/tokens/{tokens.ids['alice']}/quota"
    async with client(settings, dsn, max_discarded_per_hour=LIMIT, quota_refresh_s=0) as http:
        for _ in range(LIMIT):
            await submit_and_cancel(http, tokens.alice)
        assert_refused_for_discards(await submit(http, tokens.alice))
        # Her own, higher limit lets her in again, up to it.
        raised = {"discarded_per_hour": LIMIT + 2}
        r = await http.put(quota_url, json=raised, headers=auth(tokens.admin))
        assert r.status_code == 200 and r.json()["discarded_per_hour"] == LIMIT + 2
        for _ in range(2):
            await submit_and_cancel(http, tokens.alice)
        refused = await submit(http, tokens.alice)
        assert refused.status_code == 429
        assert f"discarded_per_hour={LIMIT + 2}" in refused.json()["error"]["message"]
        # Null goes back to the server's default.
        r = await http.put(quota_url, json={"discarded_per_hour": None}, headers=auth(tokens.admin))
        assert r.status_code == 200 and r.json()["discarded_per_hour"] is None
        assert_refused_for_discards(await submit(http, tokens.alice))
        # The window rolls: discards counted more than an hour ago no longer count.
        with psycopg.connect(dsn) as conn:
            conn.execute(
                "UPDATE inferq.token_rate SET minute = minute - interval '61 minutes' "
                "WHERE token_id = %s",
                (tokens.ids["alice"],),
            )
        assert (await submit(http, tokens.alice)).status_code == 201


async def test_no_limit_when_the_server_default_is_zero(settings: Settings, dsn: str) -> None:
    tokens = await make_tokens(settings, dsn)
    async with client(settings, dsn, max_discarded_per_hour=0) as http:
        for _ in range(LIMIT + 3):
            await submit_and_cancel(http, tokens.alice)
        assert (await submit(http, tokens.alice)).status_code == 201
