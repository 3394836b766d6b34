"""Caps on `n` and `max_tokens`: the replica's defaults, a model's own caps from the registry
(admin API and `inferq llm add`), on both OpenAI routes and the native submit; a refusal is a
400 naming the cap and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import httpx
import pytest

from inferq.settings import Settings
from tests.api_helpers import (
    MODEL,
    POOL,
    EchoWorker,
    auth,
    count_rows,
    make_tokens,
    running_worker,
    serve_app,
)

pytestmark = pytest.mark.db

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def assert_refused(r: httpx.Response, field: str, cap: int, code: str = "above_cap") -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["param"] == field, error
    if code == "above_cap":
        assert f"`{field}` may be at most {cap} " in error["message"], error["message"]


async def test_caps_on_both_openai_routes_and_the_native_submit(
    settings: Settings, dsn: str
) -> None:
    # A short max wait: a call wrongly let through answers 504 at once instead of waiting.
    capped = settings.model_copy(update={"max_tokens": 100, "max_n": 4, "max_wait_s": 2.0})
    tokens = await make_tokens(capped, dsn)
    async with (
        serve_app(capped, dsn) as server,
        httpx.AsyncClient(base_url=server.url, headers=auth(tokens.alice), timeout=30) as http,
    ):
        before = count_rows(dsn)
        refused: list[tuple[httpx.Response, str, int]] = []
        for route, body in (
            ("/v1/chat/completions", {"model": MODEL, **CHAT}),
            ("/v1/completions", {"model": MODEL, "prompt": "hi"}),
        ):
            for field, value, cap in (
                ("max_tokens", 101, 100),
                ("n", 5, 4),
                ("best_of", 5, 4),
                ("max_completion_tokens", 1_000_000, 100),
            ):
                r = await http.post(route, json={**body, field: value})
                refused.append((r, field, cap))
        for field, value, cap in (("max_tokens", 101, 100), ("n", 5, 4)):
            r = await http.post("/v1/tasks", json={"pool": POOL, "request": {**CHAT, field: value}})
            refused.append((r, field, cap))
            r = await http.post(
                "/v1/tasks", json={"model": MODEL, "request": {**CHAT, field: value}}
            )
            refused.append((r, field, cap))
        odd = [
            await http.post(
                "/v1/chat/completions",
                content=b'{"model": "%s", "messages": [], "n": %s}' % (MODEL.encode(), raw),
                headers={"Content-Type": "application/json"},
            )
            for raw in (b'"5"', b"true", b"2.5", b"0", b"-1", b"[5]")
        ]
        infinite = await http.post(
            "/v1/chat/completions",
            content=b'{"model": "%s", "messages": [], "n": 1e400}' % MODEL.encode(),
            headers={"Content-Type": "application/json"},
        )
        after_refusals = count_rows(dsn)
        # At the caps, everything goes through.
        native = await http.post(
            "/v1/tasks",
            json={"pool": POOL, "request": {**CHAT, "max_tokens": 100, "n": 4.0}},
        )
        async with running_worker(EchoWorker(server.url, tokens.worker)):
            chat = await http.post(
                "/v1/chat/completions", json={"model": MODEL, **CHAT, "max_tokens": 100, "n": 4}
            )
    for r, field, cap in refused:
        assert_refused(r, field, cap)
        assert "INFERQ_" in r.json()["error"]["message"]
    for r in odd:
        assert_refused(r, "n", 4, code="invalid_request")
    assert infinite.status_code == 400 and infinite.json()["error"]["code"] == "invalid_json"
    assert after_refusals == before
    assert native.status_code == 201, native.text
    assert chat.status_code == 200, chat.text


async def test_a_models_own_caps_from_the_registry(settings: Settings, dsn: str) -> None:
    capped = settings.model_copy(update={"max_tokens": 100, "max_n": 4})
    tokens = await make_tokens(capped, dsn)
    async with (
        serve_app(capped, dsn) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        admin = auth(tokens.admin)
        put = await http.post(
            "/v1/admin/llms",
            json={"name": "big", "pool": POOL, "max_tokens": 1000, "max_n": 8},
            headers=admin,
        )
        small = await http.post(
            "/v1/admin/llms", json={"name": "small", "pool": POOL, "max_n": 2}, headers=admin
        )
        listed = (await http.get("/v1/admin/llms", headers=admin)).json()["data"]
        bad_cap = await http.post(
            "/v1/admin/llms", json={"name": "x", "pool": POOL, "max_n": 0}, headers=admin
        )

        async def submit(model: str, **request: Any) -> httpx.Response:
            return await http.post(
                "/v1/tasks",
                json={"model": model, "request": {**CHAT, **request}},
                headers=auth(tokens.alice),
            )

        under_model_cap = await submit("big", max_tokens=1000, n=8)
        over_model_cap = await submit("big", max_tokens=1001)
        over_n = await submit("big", n=9)
        model_default = await submit("small", max_tokens=101)
        model_n = await submit("small", n=3)
    assert put.status_code == 201 and put.json()["max_tokens"] == 1000
    assert put.json()["max_n"] == 8
    assert small.status_code == 201 and small.json()["max_tokens"] is None
    assert {m["name"]: (m["max_tokens"], m["max_n"]) for m in listed}["big"] == (1000, 8)
    assert bad_cap.status_code == 422
    assert under_model_cap.status_code == 201, under_model_cap.text
    assert_refused(over_model_cap, "max_tokens", 1000)
    assert "model 'big'" in over_model_cap.json()["error"]["message"]
    assert_refused(over_n, "n", 8)
    assert_refused(model_default, "max_tokens", 100)  # no cap of its own: the server's
    assert "INFERQ_MAX_TOKENS" in model_default.json()["error"]["message"]
    assert_refused(model_n, "n", 2)


def test_inferq_llm_add_sets_the_caps(dsn: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env["INFERQ_DATABASE_URL"] = dsn

    def inferq(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "inferq", *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    added = inferq("llm", "add", "capped", "--pool", POOL, "--max-tokens", "50", "--max-n", "2")
    listed = inferq("llm", "list")
    assert "max_tokens=50 max_n=2" in added
    assert "max_tokens=50 max_n=2" in listed
