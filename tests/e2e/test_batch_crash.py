"""Batches survive a replica's kill -9 (issue #16, point 5): an upload cut by the death of its
replica leaves no file anyone can see, and a batch whose finalizing replica dies still ends
with exactly one complete output file, one line per custom_id."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from inferq.bench.polling import wait_until
from inferq.db.files import FileRepository
from inferq.db.pool import create_pool
from inferq.runtime import run
from inferq.settings import Settings
from tests.e2e.harness import MODEL, Deployment

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

LINES = 6000


def auth(dep: Deployment) -> dict[str, str]:
    return {"Authorization": f"Bearer {dep.tokens['client']}"}


def jsonl(n: int) -> bytes:
    return b"".join(
        json.dumps(
            {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "messages": [{"role": "user", "content": f"say {i}"}]}}
        ).encode() + b"\n"
        for i in range(n)
    )  # fmt: skip


@pytest.fixture
def pair(failed: Any) -> Iterator[Deployment]:
    overrides = {"INFERQ_BATCH_INTERVAL_S": "0.2", "INFERQ_FILE_PART_BYTES": "65536"}
    with Deployment.running(
        failed, replicas=2, workers=2, worker_capacity=32, echo_delay_s=0.0,
        env_overrides=overrides,
    ) as dep:  # fmt: skip
        yield dep


def test_an_upload_cut_by_its_replicas_death_leaves_no_visible_file(pair: Deployment) -> None:
    sent = threading.Event()

    def slowly() -> Iterator[bytes]:
        head = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
                b"Content-Type: application/jsonl\r\n\r\n")  # fmt: skip
        yield head
        piece = jsonl(500)
        for _ in range(10_000):  # far more than is sent before the kill
            yield piece
            sent.set()
            time.sleep(0.01)  # a slow client: the upload is mid-way when the replica dies

    def upload() -> None:
        headers = {**auth(pair), "Content-Type": "multipart/form-data; boundary=b"}
        with (
            httpx.Client(base_url=pair.replica_url(0), timeout=60) as http,
            pytest.raises(httpx.HTTPError),
        ):
            http.post("/v1/files", content=slowly(), headers=headers)

    thread = threading.Thread(target=upload)
    thread.start()

    def parts_stored() -> bool:
        rows = pair.query(
            "SELECT count(*) FROM inferq.file_part p JOIN inferq.file f ON f.id = p.file_id "
            "WHERE f.status = 'uploading'"
        )
        return bool(rows[0][0] >= 3)

    wait_until(parts_stored, 60, "a few parts of the upload to be stored")
    pair.kill_replica(0)
    thread.join(60)
    listed = httpx.get(pair.replica_url(1) + "/v1/files", headers=auth(pair)).json()
    assert listed["data"] == []  # the half-written file is nobody's to see
    [(half_id, status)] = pair.query("SELECT id, status FROM inferq.file")
    assert status == "uploading"
    gone = httpx.get(pair.replica_url(1) + f"/v1/files/{half_id}", headers=auth(pair))
    assert gone.status_code == 404
    # Past INFERQ_UPLOAD_TIMEOUT_S the sweep removes it and its parts (an injected clock).
    assert _gc_uploads(pair) == 1
    assert pair.query("SELECT count(*) FROM inferq.file_part") == [(0,)]


def _gc_uploads(dep: Deployment) -> int:
    async def gc() -> int:
        pool = create_pool(Settings(database_url=dep.dsn, pool_min_size=1, pool_max_size=1))
        await pool.open(wait=True)
        try:
            rows = dep.query("SELECT now()")
            return await FileRepository(pool).gc_uploads(3600, rows[0][0] + timedelta(hours=2))
        finally:
            await pool.close()

    return run(gc())


def test_a_batch_whose_finalizing_replica_dies_ends_with_one_complete_output(
    pair: Deployment,
) -> None:
    with httpx.Client(base_url=pair.url, headers=auth(pair), timeout=120) as http:
        uploaded = http.post(
            "/v1/files", files={"file": ("in.jsonl", jsonl(LINES))}, data={"purpose": "batch"}
        ).json()
        batch = http.post(
            "/v1/batches",
            json={"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions",
                  "completion_window": "24h"},
        ).json()  # fmt: skip

    def finalizing() -> bool:
        rows = pair.query("SELECT status FROM inferq.batch WHERE id = %s", (batch["id"],))
        return rows[0][0] in ("finalizing", "completed")

    wait_until(finalizing, 300, "every line to end and the batch to start finalizing")
    leader = pair.leader_replica("batches")
    assert leader is not None
    status_at_kill = pair.query("SELECT status FROM inferq.batch WHERE id = %s", (batch["id"],))
    pair.kill_replica(leader)  # mid-finalization, as likely as not
    other = 1 - leader

    def completed() -> dict[str, Any] | None:
        r = httpx.get(pair.replica_url(other) + f"/v1/batches/{batch['id']}", headers=auth(pair))
        body = r.json()
        return body if body["status"] == "completed" else None

    done = wait_until(completed, 120, "the other replica to finish the batch")
    outputs = pair.query(
        "SELECT id, lines FROM inferq.file WHERE purpose = 'batch_output' AND filename = %s",
        (f"{batch['id']}_output.jsonl",),
    )
    print(f"status at the kill: {status_at_kill[0][0]}; output files: {len(outputs)}")
    assert len(outputs) == 1 and outputs[0][0] == done["output_file_id"]
    content = httpx.get(
        pair.replica_url(other) + f"/v1/files/{done['output_file_id']}/content",
        headers=auth(pair),
        timeout=120,
    ).content
    ids = [json.loads(raw)["custom_id"] for raw in content.splitlines()]
    assert sorted(ids) == sorted(f"line-{i}" for i in range(LINES))  # each exactly once
    assert done["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}
