"""The dashboard in a real browser (headless chromium), live across two replicas: the page is
served by replica A, every event goes through replica B, and each update must show within
2 s. The times measured are printed (``pytest -s``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
from playwright.async_api import Page, expect

from inferq.bench.polling import eventually
from inferq.worker import EchoBackend, Worker, WorkerClient
from tests.api_helpers import MODEL, POOL, EchoWorker, auth, chat_chunk, running_worker
from tests.browser.conftest import LIVE_MS, Pair, live
from tests.integration.test_batches import ENDPOINT, jsonl, line, settle
from tests.integration.test_quotas import put_quota

pytestmark = pytest.mark.db

DOCS = Path(__file__).resolve().parents[2] / "docs"


def report(what: str, started: float) -> float:
    elapsed = time.perf_counter() - started
    print(f"live update: {what}: {elapsed * 1000:.0f} ms")
    return elapsed


async def submit(
    http: httpx.AsyncClient, secret: str, *, stream: bool = False, text: str = "hi"
) -> str:
    body: dict[str, Any] = {
        "model": MODEL,
        "request": {"messages": [{"role": "user", "content": text}]},
    }
    if stream:
        body["streaming"] = True
    r = await http.post("/v1/tasks", json=body, headers=auth(secret))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def test_login_keeps_the_token_out_of_the_browser(page: Page, pair: Pair) -> None:
    [cookie] = await page.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert pair.tokens.admin not in cookie["value"]
    stored = await page.evaluate(
        "() => JSON.stringify([document.cookie, {...localStorage}, {...sessionStorage}])"
    )
    assert pair.tokens.admin not in stored and "inferq_session" not in stored
    assert pair.tokens.admin not in page.url


async def test_a_pools_depth_changes_live(page: Page, pair: Pair) -> None:
    await live(page)
    pending = page.locator(f'tr[data-pool="{POOL}"] td.pending')
    async with httpx.AsyncClient(base_url=pair.b.url) as b:
        started = time.perf_counter()
        for _ in range(3):
            await submit(b, pair.tokens.bob)
        await expect(pending).to_have_text("3", timeout=LIVE_MS)
        report("pool depth 0 -> 3 (tasks submitted through replica B)", started)
        started = time.perf_counter()
        await submit(b, pair.tokens.alice)
        await expect(pending).to_have_text("4", timeout=LIVE_MS)
        report("pool depth 3 -> 4", started)
        # Work claimed through B: pending drains, running shows it.
        async with running_worker(EchoWorker(pair.b.url, pair.tokens.worker, gap_s=30)):
            started = time.perf_counter()
            await expect(pending).to_have_text("0", timeout=LIVE_MS + 3000)
            report("pool depth 4 -> 0 (claimed by a worker on B)", started)


async def test_a_tasks_output_streams_in(page: Page, pair: Pair) -> None:
    async with httpx.AsyncClient(base_url=pair.b.url) as b:
        task_id = await submit(b, pair.tokens.bob, stream=True)
        await page.goto(f"{pair.a.url}/dashboard/tasks/{task_id}")
        await live(page)
        worker = auth(pair.tokens.worker)
        r = await b.post(
            "/v1/worker/sessions", json={"pools": [POOL], "capacity": 1}, headers=worker
        )
        sid = r.json()["session_id"]
        # Binding hands the worker the pending work of its pools at once.
        [task] = r.json()["tasks"]
        holder = {"session_id": sid, "attempt": task["attempt"]}
        started = time.perf_counter()
        r = await b.post(f"/v1/worker/tasks/{task_id}/start", json=holder, headers=worker)
        r.raise_for_status()
        await expect(page.locator("#task-status")).to_have_text("running", timeout=LIVE_MS)
        report("task status running", started)
        output = page.locator("#output")
        text = ""
        for seq, word in enumerate(["Streaming", " from", " replica", " B"], start=1):
            text += word
            started = time.perf_counter()
            r = await b.post(
                f"/v1/worker/tasks/{task_id}/chunks",
                json={**holder, "chunks": [{"seq": seq, "data": chat_chunk(task, word)}]},
                headers=worker,
            )
            r.raise_for_status()
            await expect(output).to_have_text(text, timeout=LIVE_MS)
            report(f"output chunk {seq}", started)
        started = time.perf_counter()
        response = {
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
        }
        r = await b.post(
            f"/v1/worker/tasks/{task_id}/complete",
            json={**holder, "response": response},
            headers=worker,
        )
        r.raise_for_status()
        await expect(page.locator("#task-status")).to_have_text("completed", timeout=LIVE_MS)
        report("task completed", started)
        await expect(output).to_have_text(text)


@contextlib.asynccontextmanager
async def bound_worker(pair: Pair, name: str) -> AsyncIterator[asyncio.Task[None]]:
    """A worker session on B kept alive by heartbeats; cancelling the task is a kill -9 (the
    session is never unbound: it expires and is reaped)."""
    http = httpx.AsyncClient(base_url=pair.b.url, headers=auth(pair.tokens.worker))
    r = await http.post("/v1/worker/sessions", json={"pools": [POOL], "capacity": 4, "name": name})
    sid = r.json()["session_id"]

    async def beat() -> None:
        while True:
            await http.post(f"/v1/worker/sessions/{sid}/heartbeat", json={"tasks": []})
            await asyncio.sleep(0.2)

    task = asyncio.create_task(beat())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await http.aclose()


async def test_a_worker_disappears_when_it_is_killed(page: Page, pair: Pair) -> None:
    await page.goto(f"{pair.a.url}/dashboard/workers")
    await live(page)
    rows = page.locator("tr[data-session]")
    await expect(rows).to_have_count(0)
    started = time.perf_counter()
    async with bound_worker(pair, "gpu-box-1") as heartbeats:
        bound = time.perf_counter()
        await expect(rows).to_have_count(1, timeout=LIVE_MS)
        report("worker bound through B appears (from the bind's answer)", bound)
        report("worker bound through B appears (from before the bind's request)", started)
        await expect(rows.first).to_contain_text("gpu-box-1")
        heartbeats.cancel()
        killed = time.perf_counter()
        # The session lives for its TTL (1 s here) after the last heartbeat, then the reaper
        # deletes it and the page hears of it.
        await expect(rows).to_have_count(0, timeout=LIVE_MS)
        report("killed worker gone (session TTL 1 s included)", killed)


async def test_cancel_a_task_from_its_page(page: Page, pair: Pair) -> None:
    async with httpx.AsyncClient(base_url=pair.b.url) as b:
        task_id = await submit(b, pair.tokens.bob)
        await page.goto(f"{pair.a.url}/dashboard/tasks/{task_id}")
        await live(page)
        await expect(page.locator("#task-status")).to_have_text("pending")
        await page.click("#cancel-task")
        dialog = page.locator("dialog#confirm")
        await expect(dialog).to_be_visible()
        await expect(dialog).to_contain_text(task_id)
        # "Keep" changes nothing.
        await page.click("dialog#confirm button[value=cancel]")
        await expect(dialog).to_be_hidden()
        r = await b.get(f"/v1/tasks/{task_id}", headers=auth(pair.tokens.bob))
        assert r.json()["status"] == "pending"
        await page.click("#cancel-task")
        started = time.perf_counter()
        await page.click("#confirm-ok")
        await expect(page.locator("#task-status")).to_have_text("cancelled", timeout=LIVE_MS)
        report("task cancelled from its page", started)
        await expect(page.locator("#cancel-task")).to_have_count(0)
        r = await b.get(f"/v1/tasks/{task_id}", headers=auth(pair.tokens.bob))
        assert r.json()["status"] == "cancelled"


async def test_revoke_a_token_from_the_owners_page(page: Page, pair: Pair) -> None:
    alice = str(pair.tokens.ids["alice"])
    await page.goto(f"{pair.a.url}/dashboard/owners")
    await live(page)
    row = page.locator(f'tr[data-token="{alice}"]')
    await expect(row).to_have_count(1)
    await row.locator("button[data-action]").click()
    await expect(page.locator("dialog#confirm")).to_contain_text("alice")
    started = time.perf_counter()
    await page.click("#confirm-ok")
    await expect(row).to_have_count(0, timeout=LIVE_MS)
    report("revoked token gone from the Owners page", started)
    async with httpx.AsyncClient(base_url=pair.b.url) as b:
        r = await b.get("/v1/tasks", headers=auth(pair.tokens.alice))
        assert r.status_code == 401


async def test_swagger_ui_works_offline(page: Page, pair: Pair) -> None:
    await page.goto(f"{pair.a.url}/docs")
    await expect(page.locator(".swagger-ui .info .title")).to_contain_text("inferq")
    await expect(page.locator(".opblock-tag-section").first).to_be_visible()


async def demo_history(dsn: str) -> None:
    """An hour of per-minute samples for the screenshots' charts, as the rollup would have
    written them (a demo: the test runs for seconds, not an hour)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            """
            INSERT INTO inferq.queue_minute (minute, pool_name, pending, running, completed, errors)
            SELECT date_trunc('minute', now()) - make_interval(mins => m), pool,
                   greatest(0, round(depth * (1 + sin(m / 6.0))))::int, 4,
                   greatest(0, round(rate * (1 + cos(m / 9.0))))::int, (m % 17 = 0)::int
            FROM generate_series(1, 59) AS m,
                 (VALUES ('gpu-a', 12, 40), ('gpu-b', 5, 15)) AS p(pool, depth, rate)
            """
        )


async def test_screenshots_of_every_page(page: Page, pair: Pair, tmp_path: Path) -> None:
    """Every page renders with data, on a laptop and a phone, light and dark; with
    INFERQ_DASHBOARD_SCREENSHOTS=1 the images go to docs/ (committed), else to a temp dir."""
    out = DOCS if os.environ.get("INFERQ_DASHBOARD_SCREENSHOTS") else tmp_path
    await demo_history(pair.dsn)
    # Weights and quotas for the Owners page: bob weighs 3 to alice's 1; alice is limited.
    async with httpx.AsyncClient(base_url=pair.b.url) as admin:
        r = await admin.patch(
            f"/v1/admin/tokens/{pair.tokens.ids['bob']}",
            json={"weight": 3},
            headers=auth(pair.tokens.admin),
        )
        assert r.status_code == 200, r.text
    await put_quota(pair.b.url, pair.tokens, "alice", max_pending=10, requests_per_minute=60)
    async with contextlib.AsyncExitStack() as stack:
        b = await stack.enter_async_context(httpx.AsyncClient(base_url=pair.b.url))
        for n in range(3):  # a pool no worker serves: its queue ages
            r = await b.post(
                "/v1/tasks",
                json={"pool": "gpu-b", "request": {"prompt": f"waiting {n}"}},
                headers=auth(pair.tokens.alice),
            )
            assert r.status_code == 201, r.text
        ids = [await submit(b, pair.tokens.bob, text=f"question {n}") for n in range(6)]
        ids += [await submit(b, pair.tokens.alice, text=f"FAIL: bad {n}") for n in range(2)]
        client = openai.AsyncOpenAI(
            base_url=pair.b.url + "/v1", api_key=pair.tokens.bob, max_retries=0
        )
        await stack.enter_async_context(client)
        uploaded = await client.files.create(
            file=("eval.jsonl", jsonl([line(i) for i in range(40)])), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h"
        )
        async with running_worker(EchoWorker(pair.b.url, pair.tokens.worker)) as worker:
            await eventually(lambda: worker.handled >= len(ids), timeout_s=10)
        # The SDK's worker heartbeats (the pair's sessions live 1 s without one).
        async with WorkerClient(pair.b.url, pair.tokens.worker) as wc:
            sdk = Worker(wc, [POOL], EchoBackend(), capacity=16)
            run = asyncio.create_task(sdk.run())
            try:
                done = await settle(client, batch.id, "completed", "failed")
            finally:
                sdk.stop()
                await asyncio.wait_for(run, 30)
            assert done.status == "completed", done.errors
            async with bound_worker(pair, "gpu-box-7"):
                shots: list[tuple[str, str]] = [
                    ("overview", "/dashboard/overview"),
                    ("workers", "/dashboard/workers"),
                    ("owners", "/dashboard/owners"),
                    ("batches", "/dashboard/batches"),
                    ("tasks", "/dashboard/tasks"),
                    ("task", f"/dashboard/tasks/{ids[0]}"),
                ]
                for name, path in shots:
                    await page.goto(pair.a.url + path)
                    # A finished task's stream ends after replaying it.
                    await expect(page.locator("#live-state")).to_have_attribute(
                        "data-state", re.compile("live|ended")
                    )
                    await page.screenshot(path=str(out / f"dashboard-{name}.png"), full_page=True)
                await page.goto(pair.a.url + "/dashboard/overview")
                await page.emulate_media(color_scheme="dark")
                await live(page)
                await page.screenshot(path=str(out / "dashboard-overview-dark.png"), full_page=True)
                await page.set_viewport_size({"width": 390, "height": 844})
                await page.screenshot(
                    path=str(out / "dashboard-overview-phone.png"), full_page=True
                )
    for png in out.glob("dashboard-*.png"):
        assert png.stat().st_size > 5000, png
