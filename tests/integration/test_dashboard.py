"""The dashboard over HTTP, without a browser: login, logout and the cookie's flags, CSRF,
admin-only access, the pages and their data, the rollup sweep, and /docs served offline."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import psycopg
import pytest

from inferq.bench.polling import eventually
from inferq.db.dashboard import DashboardRepository
from inferq.db.pool import Pool, create_pool
from inferq.db.tokens import TokenRepository
from inferq.maintenance import QueueRollup
from inferq.settings import Settings
from inferq.worker import EchoBackend, Worker, WorkerClient
from tests.api_helpers import (
    MODEL,
    POOL,
    Server,
    Tokens,
    auth,
    make_tokens,
    read_events,
    serve_app,
)
from tests.integration.test_batches import ENDPOINT, jsonl, line, settle
from tests.integration.test_quotas import early_in_a_minute, put_quota
from tests.integration.test_usage import seed_usage

pytestmark = pytest.mark.db


@pytest.fixture
async def server(settings: Settings, dsn: str) -> AsyncIterator[Server]:
    async with serve_app(settings, dsn) as srv:
        yield srv


@pytest.fixture
async def tokens(settings: Settings, dsn: str) -> Tokens:
    return await make_tokens(settings, dsn)


async def login(http: httpx.AsyncClient, secret: str) -> httpx.Response:
    return await http.post("/dashboard/login", data={"token": secret})


def csrf_of(page: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert match, "the page carries no CSRF token"
    return match.group(1)


async def test_login_sets_a_strict_httponly_cookie_and_logout_ends_the_session(
    server: Server, tokens: Tokens
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/dashboard/overview")
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
        r = await login(http, tokens.admin)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/overview"
        cookie = r.headers["set-cookie"]
        assert "inferq_session=" in cookie
        flags = {part.strip().lower() for part in cookie.split(";")}
        assert "httponly" in flags
        assert "samesite=strict" in flags
        assert "path=/dashboard" in flags
        # The token itself is nowhere in what the browser gets back.
        assert tokens.admin not in cookie and tokens.admin not in r.headers.get("location", "")
        page = await http.get("/dashboard/overview")
        assert page.status_code == 200 and "Pools" in page.text
        assert tokens.admin not in page.text
        r = await http.post("/dashboard/logout", data={"csrf": csrf_of(page.text)})
        assert r.status_code == 303
        assert (await http.get("/dashboard/overview")).status_code == 303
        # The old cookie, replayed, no longer works either: the session row is gone.
        http.cookies.set("inferq_session", cookie.split(";")[0].split("=", 1)[1], path="/dashboard")
        assert (await http.get("/dashboard/workers")).status_code == 303


async def test_non_admin_tokens_and_bad_tokens_are_refused(server: Server, tokens: Tokens) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await login(http, tokens.alice)
        assert r.status_code == 403 and "set-cookie" not in r.headers
        assert "may not use this route" in r.text
        r = await login(http, tokens.worker)
        assert r.status_code == 403
        r = await login(http, "not-a-token")
        assert r.status_code == 401 and "set-cookie" not in r.headers
        # A bearer token does not open the dashboard: only the session cookie does.
        r = await http.get("/dashboard/live/overview", headers=auth(tokens.admin))
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


async def test_state_changes_without_the_csrf_token_are_refused(
    server: Server, tokens: Tokens
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post(
            "/v1/tasks", json={"model": MODEL, "request": {"prompt": "x"}}, headers=auth(tokens.bob)
        )
        task_id = r.json()["id"]
        await login(http, tokens.admin)
        page = await http.get(f"/dashboard/tasks/{task_id}")
        assert page.status_code == 200
        csrf = csrf_of(page.text)
        for headers in ({}, {"X-CSRF-Token": "forged"}, {"X-CSRF-Token": csrf[:-1]}):
            r = await http.post(f"/dashboard/tasks/{task_id}/cancel", headers=headers)
            assert r.status_code == 403, headers
            assert r.headers["content-type"].startswith("application/json")
            assert r.json()["error"]["type"] == "permission_error"
        r = await http.post("/dashboard/logout")
        assert r.status_code == 403
        got = await http.get(f"/v1/tasks/{task_id}", headers=auth(tokens.bob))
        assert got.json()["status"] == "pending"
        r = await http.post(f"/dashboard/tasks/{task_id}/cancel", headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        got = await http.get(f"/v1/tasks/{task_id}", headers=auth(tokens.bob))
        assert got.json()["status"] == "cancelled"
        # Another session's CSRF token does not fit this session.
        async with httpx.AsyncClient(base_url=server.url) as other:
            await login(other, tokens.admin)
            r = await other.post(
                f"/dashboard/tokens/{tokens.ids['alice']}/revoke", headers={"X-CSRF-Token": csrf}
            )
            assert r.status_code == 403


async def test_revoking_a_token_from_the_dashboard_refuses_it_and_ends_its_sessions(
    server: Server, tokens: Tokens
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        await login(http, tokens.admin)
        page = await http.get("/dashboard/owners")
        assert str(tokens.ids["alice"]) in page.text
        r = await http.post(
            f"/dashboard/tokens/{tokens.ids['alice']}/revoke",
            headers={"X-CSRF-Token": csrf_of(page.text)},
        )
        assert r.status_code == 200
        r = await http.get("/v1/tasks", headers=auth(tokens.alice))
        assert r.status_code == 401
        # The admin's own token revoked: its browser session ends with it.
        r = await http.post(
            f"/dashboard/tokens/{tokens.ids['admin']}/revoke",
            headers={"X-CSRF-Token": csrf_of(page.text)},
        )
        assert r.status_code == 200
        assert (await http.get("/dashboard/owners")).status_code == 303


def figures_of(page: str, attr: str, key: str) -> dict[str, str]:
    """The data attributes of the cells of the table row ``<tr attr="key">``."""
    row = re.search(rf'<tr {attr}="{re.escape(key)}">(.*?)</tr>', page, re.S)
    assert row, f"no row {attr}={key}"
    return dict(re.findall(r'<td[^>]* data-(\w+)="([^"]*)"', row.group(1)))


async def test_the_owners_page_shows_tokens_used_weights_and_quota_state(
    server: Server, tokens: Tokens, dsn: str, pool: Pool
) -> None:
    repo = TokenRepository(pool)
    assert await repo.update_policy(tokens.ids["alice"], weight=3) is not None
    await put_quota(server.url, tokens, "alice", max_running=2, requests_per_minute=60)
    await put_quota(server.url, tokens, "bob", tokens_per_day=1000)
    seed_usage(dsn, tokens.ids["alice"], "alice", [(10, 20), (5, 7)])
    seed_usage(dsn, tokens.ids["bob"], "bob", [(1, 1)])
    await early_in_a_minute(dsn, 10)
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post(
            "/v1/tasks",
            json={"model": MODEL, "request": {"prompt": "x"}},
            headers=auth(tokens.alice),
        )
        assert r.status_code == 201, r.text
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE inferq.task SET status = 'claimed' WHERE id = %s", (r.json()["id"],)
            )
        await login(http, tokens.admin)
        page = (await http.get("/dashboard/owners")).text
    alice = figures_of(page, "data-owner", "alice")
    bob = figures_of(page, "data-owner", "bob")
    assert alice["tokens"] == "42" and bob["tokens"] == "2"
    assert (alice["share"], alice["weight"]) == ("67", "3")
    assert (bob["share"], bob["weight"]) == ("33", "1")
    assert "weight 3 of 4 = 75 %" in page and "weight 1 of 4 = 25 %" in page
    assert alice["quota"] == "running 1/2 · rpm 1/60"
    assert bob["quota"] == "tpd 2/1000"
    token = figures_of(page, "data-token", str(tokens.ids["alice"]))
    assert token == {"weight": "3", "quota": "running 1/2 · rpm 1/60"}
    root = figures_of(page, "data-token", str(tokens.ids["admin"]))
    assert root == {"weight": "1", "quota": ""}


async def test_every_page_renders(server: Server, tokens: Tokens) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post(
            "/v1/tasks", json={"model": MODEL, "request": {"prompt": "x"}}, headers=auth(tokens.bob)
        )
        task_id = r.json()["id"]
        await login(http, tokens.admin)
        for path, expect in [
            ("/dashboard/overview", "gpu-a"),
            ("/dashboard/workers", "No worker is bound"),
            ("/dashboard/owners", "Tokens"),
            ("/dashboard/batches", "No batch yet"),
            ("/dashboard/tasks?owner=bob&status=pending", task_id[:8]),
            (f"/dashboard/tasks/{task_id}", "Cancel task"),
        ]:
            r = await http.get(path)
            assert r.status_code == 200, path
            assert expect in r.text, path
            assert "https://" not in r.text and "http://" not in r.text, "no external asset"
        r = await http.get("/dashboard/tasks?owner=alice")
        assert task_id[:8] not in r.text
        assert (await http.get("/dashboard/tasks?status=bogus")).status_code == 400
        assert (await http.get("/dashboard/nope")).status_code == 404
        for asset in ("/dashboard/static/dashboard.css", "/dashboard/static/dashboard.js"):
            assert (await http.get(asset)).status_code == 200


async def test_the_overview_and_the_task_search_are_per_pool_and_lane(
    server: Server, tokens: Tokens
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        ids: dict[str, list[str]] = {"interactive": [], "batch": []}
        for lane, count in (("interactive", 1), ("batch", 3)):
            for _ in range(count):
                r = await http.post(
                    "/v1/tasks",
                    json={"model": MODEL, "lane": lane, "request": {"prompt": "x"}},
                    headers=auth(tokens.bob),
                )
                assert r.status_code in (200, 201, 202), r.text
                ids[lane].append(r.json()["id"])
        await login(http, tokens.admin)
        page = (await http.get("/dashboard/overview")).text
        rows = {
            lane: re.search(
                rf'<tr data-pool="{POOL}" data-lane="{lane}">.*?class="num pending">(\d+)<',
                page,
                re.S,
            )
            for lane in ("interactive", "default", "batch")
        }
        assert rows["interactive"] and rows["interactive"].group(1) == "1"
        assert rows["batch"] and rows["batch"].group(1) == "3"
        assert rows["default"] is None, "a lane with nothing queued has no row"
        found = (await http.get(f"/dashboard/tasks?pool={POOL}&lane=batch")).text
        assert all(i[:8] in found for i in ids["batch"])
        assert ids["interactive"][0][:8] not in found
        assert (await http.get("/dashboard/tasks?lane=express")).status_code == 400


async def test_docs_are_served_from_the_package(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        page = await http.get("/docs")
        assert page.status_code == 200
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
        assert urls and all(u.startswith("/docs/assets/") for u in urls), urls
        assert "cdn" not in page.text
        for url in urls:
            r = await http.get(url)
            assert r.status_code == 200 and len(r.content) > 500, url
        assert (await http.get("/openapi.json")).status_code == 200


async def test_rollup_writes_one_row_per_pool_and_minute(
    settings: Settings, dsn: str, tokens: Tokens, server: Server
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        for _ in range(3):
            await http.post(
                "/v1/tasks",
                json={"model": MODEL, "request": {"prompt": "x"}},
                headers=auth(tokens.bob),
            )
    pool = create_pool(settings, dsn)
    await pool.open(wait=True)
    try:
        repo = DashboardRepository(pool)
        rollup = QueueRollup(repo)
        assert await rollup.run_once() == 1
        assert await rollup.run_once() == 1  # the same minute, updated in place
        overview = await repo.overview()
        [sample] = [s for s in overview.series if s.pool_name == "gpu-a"]
        assert (sample.pending, sample.running) == (3, 0)
        [figures] = overview.pools
        assert figures.pending == 3 and figures.oldest_pending_s is not None
        # Expired browser sessions go with the sweep; live ones stay.
        await repo.login("old", tokens.ids["admin"], "c" * 32, ttl_s=60)
        await repo.login("new", tokens.ids["admin"], "d" * 32, ttl_s=3600)
        await rollup.run_once(datetime.now(UTC) + timedelta(minutes=5))
        assert await repo.session("old") is None and await repo.session("new") is not None
    finally:
        await pool.close()


async def test_sessions_and_rollups_notify_every_replica(
    settings: Settings, dsn: str, tokens: Tokens, server: Server
) -> None:
    assert server.replica.waits is not None
    kinds: list[str] = []
    server.replica.waits.hub.observe(kinds.append)
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.worker)) as http:
        r = await http.post("/v1/worker/sessions", json={"pools": ["gpu-a"], "capacity": 1})
        await eventually(lambda: "sessions" in kinds, timeout_s=5)
        kinds.clear()
        await http.delete(f"/v1/worker/sessions/{r.json()['session_id']}")
        await eventually(lambda: "sessions" in kinds, timeout_s=5)
    pool = create_pool(settings, dsn)
    await pool.open(wait=True)
    try:
        kinds.clear()
        await QueueRollup(DashboardRepository(pool)).run_once()
        await eventually(lambda: "rollup" in kinds, timeout_s=5)
    finally:
        await pool.close()


async def test_batches_show_progress_link_their_files_and_cancel(
    settings: Settings, dsn: str
) -> None:
    quick = settings.model_copy(update={"batch_interval_s": 0.2})
    tokens = await make_tokens(quick, dsn)
    lines = [line(i) for i in range(5)]
    async with serve_app(quick, dsn) as server:
        client = openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=tokens.alice, max_retries=0
        )
        async with client, httpx.AsyncClient(base_url=server.url) as http:
            await login(http, tokens.admin)
            uploaded = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
            args = {"input_file_id": uploaded.id, "endpoint": ENDPOINT, "completion_window": "24h"}
            waiting = await client.batches.create(**args)  # type: ignore[arg-type]
            await settle(client, waiting.id, "in_progress")
            page = await http.get("/dashboard/batches")
            assert f'data-action="/dashboard/batches/{waiting.id}/cancel"' in page.text
            r = await http.post(
                f"/dashboard/batches/{waiting.id}/cancel",
                headers={"X-CSRF-Token": csrf_of(page.text)},
            )
            assert r.status_code == 200 and r.json()["status"] == "cancelling"
            await settle(client, waiting.id, "cancelled")
            done = await client.batches.create(**args)  # type: ignore[arg-type]
            async with WorkerClient(server.url, tokens.worker) as wc:
                worker = Worker(wc, [POOL], EchoBackend(), capacity=8)
                run = asyncio.create_task(worker.run())
                try:
                    finished = await settle(client, done.id, "completed")
                finally:
                    worker.stop()
                    await asyncio.wait_for(run, 30)
            page = await http.get("/dashboard/batches")
            row = page.text.split(f'data-batch="{done.id}"')[1].split("</tr>")[0]
            assert 'value="1.0"' in row and "100 %" in row
            assert f'href="/dashboard/files/{finished.output_file_id}"' in row
            r = await http.get(f"/dashboard/files/{finished.output_file_id}")
            assert r.status_code == 200 and len(r.text.splitlines()) == 5
            assert (await http.get("/dashboard/files/file-nope")).status_code == 404


async def test_open_pages_share_one_read_per_change_across_replicas(
    settings: Settings, dsn: str, tokens: Tokens
) -> None:
    """Five overview pages open on replica A, twenty tasks submitted through replica B: every
    page sees the final depth, and A read the overview once per snapshot it sent, not once
    per page or per task."""
    async with serve_app(settings, dsn) as a, serve_app(settings, dsn) as b:
        feed = a.replica.services.dashboard.feed  # type: ignore[union-attr]
        async with contextlib.AsyncExitStack() as stack:
            http = await stack.enter_async_context(httpx.AsyncClient(base_url=a.url))
            await login(http, tokens.admin)
            streams = [
                await stack.enter_async_context(http.stream("GET", "/dashboard/live/overview"))
                for _ in range(5)
            ]
            lines = [s.aiter_lines() for s in streams]
            for it in lines:
                await read_events(it, until=lambda f: f.get("event") == "html", timeout_s=10)
            before = feed.reads
            async with httpx.AsyncClient(base_url=b.url) as on_b:
                for _ in range(20):
                    r = await on_b.post(
                        "/v1/tasks",
                        json={"model": MODEL, "request": {"prompt": "x"}},
                        headers=auth(tokens.bob),
                    )
                    assert r.status_code == 201

            def at_twenty(frame: dict[str, Any]) -> bool:
                html = frame.get("data", {}).get("html", "") if frame.get("event") else ""
                return 'class="num pending">20<' in html

            seen = [
                sum(f.get("event") == "html" for f in await read_events(it, at_twenty, 10))
                for it in lines
            ]
            reads = feed.reads - before
        print(f"overview reads for 5 pages and 20 tasks: {reads}; frames per page: {seen}")
        # One read per snapshot, shared by the pages (a page may skip a snapshot, never get
        # one nobody read); a read per page would be five times the frames of any page.
        assert 1 <= reads <= max(seen) + 1 < 20, (reads, seen)
