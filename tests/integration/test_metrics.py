"""/metrics costs nothing per scrape, can require a token and can move to a port of its own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr

from inferq.api.app import metrics_app
from inferq.services import Services
from inferq.settings import Settings
from tests.api_helpers import POOL, Server, Tokens, auth, make_tokens, serve_app

pytestmark = pytest.mark.db

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@contextlib.asynccontextmanager
async def running(
    settings: Settings, dsn: str, **update: object
) -> AsyncIterator[tuple[Server, Tokens, Services]]:
    changed = settings.model_copy(update=update)
    tokens = await make_tokens(changed, dsn)
    async with serve_app(changed, dsn) as server:
        assert server.replica.services is not None
        yield server, tokens, server.replica.services


async def test_a_burst_of_scrapes_reads_the_queue_once_per_interval(
    settings: Settings, dsn: str
) -> None:
    async with running(settings, dsn, metrics_interval_s=5.0) as (server, tokens, svc):
        now = [1000.0]
        svc.health.clock = lambda: now[0]
        stats = svc.health.stats
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            burst = await asyncio.gather(*(http.get("/metrics") for _ in range(200)))
            reads_after_burst = stats.queue_reads
            r = await http.post(
                "/v1/tasks", json={"pool": POOL, "request": CHAT}, headers=auth(tokens.alice)
            )
            assert r.status_code == 201
            now[0] += 4.9  # within the interval: the figures are the burst's
            stale = (await http.get("/metrics")).text
            reads_within = stats.queue_reads
            now[0] += 0.2  # past it: the next scrape reads again
            fresh = (await http.get("/metrics")).text
    assert {r.status_code for r in burst} == {200}
    assert reads_after_burst == 1
    assert reads_within == 1
    assert stats.queue_reads == 2
    assert f'inferq_queue_depth{{lane="default",pool="{POOL}"}}' not in stale
    assert f'inferq_queue_depth{{lane="default",pool="{POOL}"}} 1.0' in fresh


async def test_a_metrics_token_is_required_when_set(settings: Settings, dsn: str) -> None:
    async with (
        running(settings, dsn, metrics_token=SecretStr("m-secret")) as (server, tokens, _),
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        anonymous = await http.get("/metrics")
        wrong = await http.get("/metrics", headers=auth("m-secrex"))
        api_token = await http.get("/metrics", headers=auth(tokens.admin))
        right = await http.get("/metrics", headers=auth("m-secret"))
    for refused in (anonymous, wrong, api_token):
        assert refused.status_code == 401, refused.text
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert "INFERQ_METRICS_TOKEN" in refused.json()["error"]["message"]
        assert "inferq_" not in refused.text.replace("INFERQ_METRICS_TOKEN", "")
    assert right.status_code == 200
    assert "inferq_http_requests_total" in right.text


async def test_with_a_metrics_port_the_api_port_has_no_metrics(
    settings: Settings, dsn: str
) -> None:
    async with running(settings, dsn, metrics_port=9, metrics_token=SecretStr("m-secret")) as (
        server,
        _,
        svc,
    ):
        async with httpx.AsyncClient(base_url=server.url) as http:
            on_api = await http.get("/metrics", headers=auth("m-secret"))
        side = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=metrics_app(svc)), base_url="http://metrics"
        )
        async with side:
            page = await side.get("/metrics", headers=auth("m-secret"))
            anonymous = await side.get("/metrics")
            other = await side.get("/v1/tasks", headers=auth("m-secret"))
    assert on_api.status_code == 404
    assert on_api.json()["error"]["code"] == "route_not_found"
    assert page.status_code == 200 and "inferq_open_waits" in page.text
    assert anonymous.status_code == 401
    assert other.status_code == 404 and other.json()["error"]["code"] == "route_not_found"
