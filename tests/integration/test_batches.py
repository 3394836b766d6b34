"""OpenAI's Batch API on inferq, with the official ``openai`` client unchanged: files in, a
batch on the queue, results out (issue #16)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import openai
import psycopg
import pytest

from inferq.bench.polling import eventually
from inferq.db.batches import BatchRepository
from inferq.db.files import FileRepository
from inferq.db.llms import LlmRepository
from inferq.services.batches import BatchKeeper
from inferq.settings import Settings
from inferq.worker import EchoBackend, Worker, WorkerClient
from tests.api_helpers import MODEL, POOL, Server, Tokens, make_tokens, serve_app

pytestmark = pytest.mark.db

ENDPOINT: Final = "/v1/chat/completions"


def line(i: int, **override: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"answer number {i}"}]}
    return {"custom_id": f"req-{i}", "method": "POST", "url": ENDPOINT, "body": body, **override}


def jsonl(lines: list[Any]) -> bytes:
    return b"".join(
        (item if isinstance(item, bytes) else json.dumps(item).encode()) + b"\n" for item in lines
    )


@dataclass
class Two:
    a: Server
    b: Server
    tokens: Tokens
    dsn: str

    def client(self, server: Server) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=self.tokens.alice, max_retries=0
        )

    def task_count(self) -> int:
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute("SELECT count(*) FROM inferq.task").fetchone()
        return int(row[0]) if row else 0


@pytest.fixture
async def two(settings: Settings, dsn: str) -> AsyncIterator[Two]:
    quick = settings.model_copy(update={"batch_interval_s": 0.2})
    tokens = await make_tokens(quick, dsn)
    async with serve_app(quick, dsn) as a, serve_app(quick, dsn) as b:
        yield Two(a, b, tokens, dsn)


@contextlib.asynccontextmanager
async def echo_worker(two: Two) -> AsyncIterator[None]:
    async with WorkerClient(two.a.url, two.tokens.worker) as client:
        worker = Worker(client, [POOL], EchoBackend(), capacity=32)
        run = asyncio.create_task(worker.run())
        try:
            yield
        finally:
            worker.stop()
            await asyncio.wait_for(run, 30)


async def settle(client: openai.AsyncOpenAI, batch_id: str, *states: str) -> Any:
    """The batch once it reached one of ``states`` (polled, as a client would)."""
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen["batch"] = await client.batches.retrieve(batch_id)
        return seen["batch"].status in states

    await eventually(reached, timeout_s=60)
    return seen["batch"]


async def test_a_batch_runs_on_the_queue_and_answers_every_line_once(two: Two) -> None:
    lines = [line(i) for i in range(300)]
    async with two.client(two.a) as on_a, two.client(two.b) as on_b, echo_worker(two):
        uploaded = await on_a.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
        batch = await on_a.batches.create(
            input_file_id=uploaded.id,
            endpoint=ENDPOINT,
            completion_window="24h",
            metadata={"job": "nightly-eval"},
        )
        done = await settle(on_b, batch.id, "completed", "failed")  # through the other replica
        listed = [b.id async for b in on_b.batches.list(limit=5)]
        content = await on_b.files.content(done.output_file_id)
        output = [json.loads(raw) for raw in content.content.splitlines()]
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
    assert done.status == "completed", done.errors
    assert done.request_counts.model_dump() == {"total": 300, "completed": 300, "failed": 0}
    assert done.metadata == {"job": "nightly-eval"} and done.error_file_id is None
    assert batch.id in listed
    assert sorted(o["custom_id"] for o in output) == sorted(f"req-{i}" for i in range(300))
    for o in output:
        i = int(o["custom_id"].removeprefix("req-"))
        assert o["response"]["status_code"] == 200 and o["error"] is None
        message = o["response"]["body"]["choices"][0]["message"]["content"]
        assert message == f"answer number {i}"  # its own answer
    assert two.task_count() == 300
    with psycopg.connect(two.dsn) as conn:  # every line ran in the batch lane
        lanes = conn.execute("SELECT lane, count(*) FROM inferq.task GROUP BY lane").fetchall()
    assert lanes == [("batch", 300)]


@pytest.mark.parametrize(
    ("bad", "code", "line_no"),
    [
        (b"{not json", "invalid_json_line", 2),
        (line(0), "duplicate_custom_id", 2),
        (line(7, url="/v1/completions"), "mismatched_url", 2),
        (line(8, body={"model": "nope", "messages": []}), "model_not_found", 2),
    ],
    ids=["not json", "duplicate custom_id", "wrong url", "unknown model"],
)
async def test_a_bad_input_file_fails_the_batch_and_runs_nothing(
    two: Two, bad: Any, code: str, line_no: int
) -> None:
    async with two.client(two.a) as client:
        uploaded = await client.files.create(
            file=("bad.jsonl", jsonl([line(0), bad, line(9)])), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h"
        )
        failed = await settle(client, batch.id, "failed", "in_progress", "completed")
    assert failed.status == "failed"
    assert failed.errors is not None and failed.errors.data
    assert (failed.errors.data[0].code, failed.errors.data[0].line) == (code, line_no)
    assert two.task_count() == 0  # validated whole before any task exists


async def test_a_cancelled_batch_stops_its_lines_and_reports_them(two: Two) -> None:
    async with two.client(two.a) as client:
        uploaded = await client.files.create(
            file=("in.jsonl", jsonl([line(i) for i in range(20)])), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h"
        )
        await settle(client, batch.id, "in_progress")  # no worker: nothing runs
        cancelling = await client.batches.cancel(batch.id)
        ended = await settle(client, batch.id, "cancelled")
        assert ended.error_file_id is not None
        errors = (await client.files.content(ended.error_file_id)).content.splitlines()
    assert cancelling.status in ("cancelling", "cancelled")
    assert ended.request_counts.model_dump() == {"total": 20, "completed": 0, "failed": 20}
    assert ended.output_file_id is None
    reported = [json.loads(raw) for raw in errors]
    assert sorted(r["custom_id"] for r in reported) == sorted(f"req-{i}" for i in range(20))
    assert {r["error"]["code"] for r in reported} == {"batch_cancelled"}


async def test_lines_unfinished_at_the_end_of_the_window_expire(two: Two) -> None:
    async with two.client(two.a) as client:
        uploaded = await client.files.create(
            file=("in.jsonl", jsonl([line(i) for i in range(5)])), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h"
        )
        started = await settle(client, batch.id, "in_progress")
        pool = two.a.replica.pool
        assert pool is not None
        keeper = BatchKeeper(
            BatchRepository(pool), FileRepository(pool), LlmRepository(pool), Settings()
        )
        # The sweep, a day later (an injected clock; no waiting).
        later = datetime.fromtimestamp(started.expires_at, UTC) + timedelta(seconds=1)
        await keeper.run_once(now=later)
        ended = await client.batches.retrieve(batch.id)
        assert ended.error_file_id is not None
        errors = (await client.files.content(ended.error_file_id)).content.splitlines()
    assert ended.status == "expired" and ended.expired_at is not None
    assert {json.loads(raw)["error"]["code"] for raw in errors} == {"batch_expired"}
    assert len(errors) == 5


async def test_limits_refuse_and_store_nothing(settings: Settings, dsn: str) -> None:
    small = settings.model_copy(update={"max_file_bytes": 2048, "max_batch_requests": 3})
    tokens = await make_tokens(small, dsn)
    async with (
        serve_app(small, dsn) as server,
        openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=tokens.alice, max_retries=0
        ) as client,
    ):
        with pytest.raises(openai.APIStatusError) as big:
            await client.files.create(
                file=("big.jsonl", jsonl([line(i) for i in range(40)])), purpose="batch"
            )
        four = await client.files.create(
            file=("four.jsonl", jsonl([line(i) for i in range(4)])), purpose="batch"
        )
        with pytest.raises(openai.BadRequestError) as many:
            await client.batches.create(
                input_file_id=four.id, endpoint=ENDPOINT, completion_window="24h"
            )
        files = [f.id async for f in client.files.list()]
    assert big.value.status_code == 413
    assert "INFERQ_MAX" in big.value.message
    assert many.value.code == "invalid_request" and "at most 3" in many.value.message
    assert files == [four.id]  # the refused upload left nothing behind
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM inferq.batch").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM inferq.file").fetchone() == (1,)


async def inferq(*argv: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "inferq", *argv,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_the_batch_command_submits_follows_and_downloads(two: Two, tmp_path: Path) -> None:
    source = tmp_path / "eval.jsonl"
    source.write_bytes(jsonl([line(i) for i in range(50)]))
    env = {**os.environ, "INFERQ_URL": two.b.url, "INFERQ_TOKEN": two.tokens.alice}
    async with echo_worker(two):
        code, out, err = await inferq("batch", "submit", str(source), "--wait", env=env)
    assert code == 0, err
    batch_id = out.splitlines()[0]
    assert batch_id.startswith("batch_")
    assert "[" + "#" * 30 + "] 50/50 (0 failed) completed" in err  # the progress line, at the end
    code, out, _ = await inferq("batch", "status", batch_id, env=env)
    assert code == 0 and "completed total=50 completed=50 failed=0" in out
    target = tmp_path / "results.jsonl"
    code, _, err = await inferq("batch", "download", batch_id, "-o", str(target), env=env)
    assert code == 0, err
    results = [json.loads(raw) for raw in target.read_bytes().splitlines()]
    assert sorted(r["custom_id"] for r in results) == sorted(f"req-{i}" for i in range(50))
    code, _, err = await inferq("batch", "download", batch_id, "--errors", "-o", "x", env=env)
    assert code == 1 and "has no error file" in err
    code, _, err = await inferq("batch", "status", batch_id, env={**env, "INFERQ_TOKEN": ""})
    assert code == 1 and "INFERQ_TOKEN" in err
