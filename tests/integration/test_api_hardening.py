"""Defects found in review of the HTTP API, each pinned by what a user would notice."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
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
    serve_app,
)

pytestmark = pytest.mark.db

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@contextlib.asynccontextmanager
async def running(
    settings: Settings, dsn: str, **update: object
) -> AsyncIterator[tuple[Server, Tokens, httpx.AsyncClient]]:
    changed = settings.model_copy(update=update)
    tokens = await make_tokens(changed, dsn)
    async with (
        serve_app(changed, dsn) as server,
        httpx.AsyncClient(base_url=server.url, timeout=20) as http,
    ):
        yield server, tokens, http


async def submit(http: httpx.AsyncClient, tokens: Tokens, request: object = CHAT) -> str:
    r = await http.post(
        "/v1/tasks", json={"pool": POOL, "request": request}, headers=auth(tokens.alice)
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def bind(http: httpx.AsyncClient, secret: str, capacity: int = 1) -> dict[str, Any]:
    r = await http.post(
        "/v1/worker/sessions", json={"pools": [POOL], "capacity": capacity}, headers=auth(secret)
    )
    assert r.status_code == 201, r.text
    bound: dict[str, Any] = r.json()
    return bound


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == code


@pytest.mark.parametrize("event_id", [b"1:\xb2", b"\xb9:1", b"1:99999999999", b"99999999999:1"])
async def test_odd_last_event_id_is_400_not_500(
    settings: Settings, dsn: str, event_id: bytes
) -> None:
    # '\xb2' is a superscript two: str.isdigit() accepts it, int() does not.
    async with running(settings, dsn) as (_, tokens, http):
        tid = await submit(http, tokens)
        # All bytes: httpx takes str or bytes headers, not both in one mapping.
        headers = {b"Authorization": f"Bearer {tokens.alice}".encode(), b"Last-Event-ID": event_id}
        r = await http.get(f"/v1/tasks/{tid}/events", headers=headers)
    assert_error(r, 400, "invalid_request")
    assert "Last-Event-ID" in r.json()["error"]["message"]


async def test_a_huge_number_in_a_request_round_trips(settings: Settings, dsn: str) -> None:
    # jsonb prints 1e26 back as a 27-digit integer, which orjson cannot write.
    async with running(settings, dsn) as (_, tokens, http):
        # Not `n`: that one is capped (INFERQ_MAX_N); any other field round-trips as is.
        tid = await submit(http, tokens, {"big": 1e26, **CHAT})
        got = await http.get(f"/v1/tasks/{tid}", headers=auth(tokens.alice))
        bound = await bind(http, tokens.worker)
    assert got.status_code == 200
    assert got.json()["request"]["big"] == 10**26
    assert [t["id"] for t in bound["tasks"]] == [tid]


async def test_an_out_of_range_seq_is_refused_without_failing_other_workers(
    settings: Settings, dsn: str
) -> None:
    # One flush window for both posts: a bad value must not fail the other worker's chunks.
    async with running(settings, dsn, chunk_flush_ms=300) as (_, tokens, http):
        await submit(http, tokens)
        await submit(http, tokens)
        bound = await bind(http, tokens.worker, capacity=2)
        sid = bound["session_id"]
        first, second = bound["tasks"]
        for task in (first, second):
            r = await http.post(
                f"/v1/worker/tasks/{task['id']}/start",
                json={"session_id": sid, "attempt": 1},
                headers=auth(tokens.worker),
            )
            assert r.status_code == 200

        def post(task: dict[str, str], seq: int) -> Awaitable[httpx.Response]:
            return http.post(
                f"/v1/worker/tasks/{task['id']}/chunks",
                json={"session_id": sid, "attempt": 1, "chunks": [{"seq": seq, "data": {}}]},
                headers=auth(tokens.worker),
            )

        bad, good = await asyncio.gather(post(first, 2**31), post(second, 1))
    assert_error(bad, 422, "invalid_body")
    assert good.status_code == 200, good.text
    assert good.json() == {"last_seq": 1}


async def test_openai_call_refused_for_too_many_waits_writes_nothing(
    settings: Settings, dsn: str
) -> None:
    async with running(settings, dsn, max_waits_per_token=1) as (server, tokens, http):
        tid = await submit(http, tokens)
        held = asyncio.create_task(
            http.get(f"/v1/tasks/{tid}/wait?timeout=10", headers=auth(tokens.alice))
        )
        svc = server.replica.services
        assert svc is not None
        await eventually(lambda: svc.tasks.slots.open_count > 0)
        before = count_rows(dsn)
        r = await http.post(
            "/v1/chat/completions", json={"model": MODEL, **CHAT}, headers=auth(tokens.alice)
        )
        after = count_rows(dsn)
        await http.post(f"/v1/tasks/{tid}/cancel", headers=auth(tokens.alice))
        await held
    assert_error(r, 429, "too_many_waits")
    assert after == before


async def test_a_wait_whose_client_left_frees_its_slot(settings: Settings, dsn: str) -> None:
    async with running(settings, dsn, max_waits_per_token=1) as (server, tokens, http):
        tid = await submit(http, tokens)
        async with httpx.AsyncClient(base_url=server.url) as gone:
            left = asyncio.create_task(
                gone.get(f"/v1/tasks/{tid}/wait?timeout=60", headers=auth(tokens.alice))
            )
            svc = server.replica.services
            assert svc is not None
            await eventually(lambda: svc.tasks.slots.open_count > 0)
            left.cancel()  # httpx closes the connection of a cancelled request
            with contextlib.suppress(asyncio.CancelledError):
                await left

        async def slot_free() -> bool:
            r = await http.get(f"/v1/tasks/{tid}/wait?timeout=0", headers=auth(tokens.alice))
            return r.status_code == 200

        await eventually(slot_free)


async def test_a_claim_whose_worker_left_takes_no_work(settings: Settings, dsn: str) -> None:
    async with running(settings, dsn) as (server, tokens, http):
        dead = await bind(http, tokens.worker)
        async with httpx.AsyncClient(base_url=server.url) as gone:
            poll = asyncio.create_task(
                gone.post(
                    f"/v1/worker/sessions/{dead['session_id']}/claim",
                    json={"wait_s": 60},
                    headers=auth(tokens.worker),
                )
            )
            hub = server.replica.waits.hub  # type: ignore[union-attr]
            await eventually(lambda: hub.waiter_count > 0)
            poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poll

        async def claim_ended() -> bool:
            text = (await http.get("/metrics")).text
            return 'route="/v1/worker/sessions/{session_id}/claim",status="499"' in text

        await eventually(claim_ended)
        tid = await submit(http, tokens)
        live = await bind(http, tokens.worker)
    assert [t["id"] for t in live["tasks"]] == [tid]


async def test_a_worker_token_cannot_drive_a_session_of_pools_it_may_not_serve(
    settings: Settings, dsn: str
) -> None:
    # worker_other belongs to the same owner but may only serve pool "other".
    async with running(settings, dsn) as (_, tokens, http):
        bound = await bind(http, tokens.worker)
        sid = bound["session_id"]
        tid = await submit(http, tokens)
        other = auth(tokens.worker_other)
        claim = await http.post(
            f"/v1/worker/sessions/{sid}/claim", json={"wait_s": 0}, headers=other
        )
        beat = await http.post(f"/v1/worker/sessions/{sid}/heartbeat", json={}, headers=other)
        unbind = await http.delete(f"/v1/worker/sessions/{sid}", headers=other)
        task = (await http.get(f"/v1/tasks/{tid}", headers=auth(tokens.alice))).json()
        live = await http.post(
            f"/v1/worker/sessions/{sid}/heartbeat", json={}, headers=auth(tokens.worker)
        )
    for r in (claim, beat, unbind):
        assert_error(r, 403, "forbidden")
    assert task["status"] == "pending"
    assert live.status_code == 200


async def test_a_worker_token_cannot_write_to_a_task_of_a_pool_it_may_not_serve(
    settings: Settings, dsn: str
) -> None:
    async with running(settings, dsn) as (_, tokens, http):
        await submit(http, tokens)
        bound = await bind(http, tokens.worker)
        [task] = bound["tasks"]
        holder = {"session_id": bound["session_id"], "attempt": 1}
        r = await http.post(
            f"/v1/worker/tasks/{task['id']}/complete",
            json={**holder, "response": {"forged": True}},
            headers=auth(tokens.worker_other),
        )
        got = (await http.get(f"/v1/tasks/{task['id']}", headers=auth(tokens.alice))).json()
    assert_error(r, 403, "forbidden")
    assert got["status"] == "claimed"


async def test_an_llm_named_like_a_hugging_face_id_can_be_removed(
    settings: Settings, dsn: str
) -> None:
    name = "meta-llama/Llama-3-8B-Instruct"
    async with running(settings, dsn) as (_, tokens, http):
        admin = auth(tokens.admin)
        r = await http.post("/v1/admin/llms", json={"name": name, "pool": POOL}, headers=admin)
        assert r.status_code == 201
        deleted = await http.delete(f"/v1/admin/llms/{name}", headers=admin)
        listed = (await http.get("/v1/models", headers=auth(tokens.alice))).json()
    assert deleted.status_code == 200, deleted.text
    assert name not in [m["id"] for m in listed["data"]]


async def test_a_token_with_an_empty_pool_list_is_refused(settings: Settings, dsn: str) -> None:
    # An empty list used to be stored as NULL, which means "every pool".
    async with running(settings, dsn) as (_, tokens, http):
        before = count_rows(dsn, "inferq.api_token")
        r = await http.post(
            "/v1/admin/tokens",
            json={"owner": "gpus", "role": "worker", "pools": []},
            headers=auth(tokens.admin),
        )
    assert_error(r, 422, "invalid_body")
    assert count_rows(dsn, "inferq.api_token") == before


async def test_binding_a_pool_name_no_task_can_have_is_refused(
    settings: Settings, dsn: str
) -> None:
    async with running(settings, dsn) as (_, tokens, http):
        r = await http.post(
            "/v1/worker/sessions", json={"pools": ["gpu a"]}, headers=auth(tokens.worker)
        )
    assert_error(r, 422, "invalid_body")
    assert count_rows(dsn, "inferq.worker_session") == 0


async def test_openapi_names_the_request_body_of_every_route_that_takes_one(
    settings: Settings, dsn: str
) -> None:
    async with running(settings, dsn) as (_, _tokens, http):
        spec = (await http.get("/openapi.json")).json()
    contents = {
        (path, method): op["requestBody"]["content"]
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if "requestBody" in op
    }
    # The one upload is a multipart form (OpenAI's shape); every other body is JSON.
    form = contents.pop(("/v1/files", "post"))["multipart/form-data"]["schema"]
    assert sorted(form["required"]) == ["file", "purpose"]
    assert form["properties"]["file"]["format"] == "binary"
    bodies = {
        key: content["application/json"]["schema"]["$ref"] for key, content in contents.items()
    }
    assert bodies[("/v1/tasks", "post")] == "#/components/schemas/SubmitRequest"
    assert bodies[("/v1/worker/tasks/{task_id}/chunks", "post")].endswith("/ChunksRequest")
    assert bodies[("/v1/admin/tokens", "post")].endswith("/TokenIn")
    schemas = spec["components"]["schemas"]
    for ref in bodies.values():
        assert ref.rsplit("/", 1)[1] in schemas  # every reference resolves
    assert schemas["ChunksRequest"]["properties"]["chunks"]["items"]["$ref"].endswith("/ChunkItem")
    assert "ChunkItem" in schemas
    assert schemas["SubmitRequest"]["properties"]["priority"]["maximum"] == 1000
