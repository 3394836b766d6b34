"""`inferq serve` as a real process, attacked over real sockets: request heads, bodies and
connections are bounded before any application code runs (inferq.http_protocol); /metrics
can live on a port of its own."""

from __future__ import annotations

import os
import select
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from inferq.bench.polling import wait_until
from inferq.bench.processes import Proc
from inferq.db.cluster import free_port
from inferq.db.tokens import hash_token, new_secret

pytestmark = pytest.mark.e2e

MIB = 1 << 20
ATTACKERS = 8
HEADER_BYTES = 300 * MIB  # what each attacker would send if nothing stopped it
CHUNK = b"a" * (64 * 1024)


@dataclass
class Replica:
    proc: Proc
    port: int
    token: str  # a client token

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss(self) -> int:
        """VmRSS of the replica process, in bytes (from /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


Start = Callable[..., "Replica"]


@pytest.fixture
def serve(dsn: str) -> Iterator[Start]:
    started: list[Proc] = []
    workdir = Path(tempfile.mkdtemp(prefix="inferq-limits-"))
    token = new_secret()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO inferq.api_token (token_hash, owner_id, role) VALUES (%s, 'me', 'client')",
            (hash_token(token),),
        )

    def start(**env: str) -> Replica:
        port = free_port()
        environ = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
        environ |= {
            "INFERQ_DATABASE_URL": dsn,
            "INFERQ_PORT": str(port),
            "INFERQ_LOG_FORMAT": "json",
            "INFERQ_DATA_DIR": str(workdir / "data"),
            **env,
        }
        proc = Proc("serve", [sys.executable, "-m", "inferq", "serve"], environ, workdir / "log")
        started.append(proc.start())
        replica = Replica(proc, port, token)
        wait_until(lambda: _ok(replica.url + "/readyz", proc), 60, "inferq serve /readyz")
        return replica

    yield start
    for proc in started:
        proc.stop()


def _ok(url: str, proc: Proc) -> bool:
    assert proc.alive(), proc.log_text()[-3000:]
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Attack:
    """Each attacker streams one unfinished header per connection until the server answers
    or closes, or the deadline; ``rounds`` connections in a row."""

    replica: Replica
    deadline: float
    rounds: int = 3
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: list[tuple[str, int, bytes]] = field(default_factory=list)

    def attacker(self) -> None:
        for _ in range(self.rounds):
            self.outcomes.append(self.one_connection())

    def one_connection(self) -> tuple[str, int, bytes]:
        sent = 0
        with self.replica.connect() as sock:
            try:
                sock.sendall(b"GET /v1/tasks HTTP/1.1\r\nHost: inferq\r\nX-Filler: ")
                while sent < HEADER_BYTES:
                    if self.stop.is_set() or time.monotonic() > self.deadline:
                        return "not stopped by the server", sent, b""
                    readable, _, _ = select.select([sock], [], [], 0)
                    if readable:
                        answer = sock.recv(4096)
                        return ("answered" if answer else "closed"), sent, answer
                    sock.sendall(CHUNK)
                    sent += len(CHUNK)
            except OSError:
                return "reset", sent, b""
        return "sent everything", sent, b""


def test_unfinished_huge_headers_leave_memory_flat_and_healthz_answering(serve: Start) -> None:
    replica = serve()
    with httpx.Client(base_url=replica.url, timeout=5) as http:
        for _ in range(20):
            assert http.get("/healthz").status_code == 200
        before = replica.rss()
        attack = Attack(replica, deadline=time.monotonic() + 60)
        peak = [before]

        def watch() -> None:
            while any(t.is_alive() for t in attackers):
                peak[0] = max(peak[0], replica.rss())
                if peak[0] - before > 200 * MIB:
                    attack.stop.set()  # already failed: spare the machine the rest
                time.sleep(0.01)  # the sampling period of the RSS watch

        attackers = [threading.Thread(target=attack.attacker) for _ in range(ATTACKERS)]
        for t in attackers:
            t.start()
        watcher = threading.Thread(target=watch)
        watcher.start()
        probes = []
        while any(t.is_alive() for t in attackers):
            probes.append(http.get("/healthz").status_code)
        probes.append(http.get("/healthz").status_code)
        for t in (*attackers, watcher):
            t.join()
        peak[0] = max(peak[0], replica.rss())
    assert peak[0] - before <= 50 * MIB, f"RSS grew by {(peak[0] - before) / MIB:.1f} MiB"
    assert set(probes) == {200}
    assert len(attack.outcomes) == ATTACKERS * attack.rounds
    for outcome, sent, answer in attack.outcomes:
        assert outcome in ("answered", "closed", "reset"), (outcome, sent)
        assert sent < 32 * MIB, (outcome, sent)  # cut off at 64 KiB, plus socket buffers
        if outcome == "answered":
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert any(outcome == "answered" for outcome, _, _ in attack.outcomes)


def test_an_oversized_complete_head_is_431_and_one_under_the_limit_is_served(
    serve: Start,
) -> None:
    replica = serve(INFERQ_MAX_HEADER_BYTES="16384")
    with httpx.Client(base_url=replica.url, timeout=10) as http:
        under = http.get("/healthz", headers={"X-Filler": "a" * 15_000})
        over = http.get("/healthz", headers={"X-Filler": "a" * 17_000})
        long_url = http.get("/healthz", params={"q": "a" * 17_000})
        many = http.get("/healthz", headers={f"X-H{i}": "a" * 100 for i in range(200)})
        after = http.get("/healthz")
    assert under.status_code == 200
    for refused in (over, long_url, many):
        assert refused.status_code == 431, refused.text
        assert refused.json()["error"]["code"] == "header_too_large"
        assert "INFERQ_MAX_HEADER_BYTES" in refused.json()["error"]["message"]
    assert after.status_code == 200


def test_a_slow_head_a_silent_connection_and_a_stalled_body_are_closed(serve: Start) -> None:
    replica = serve(INFERQ_HEADER_TIMEOUT_S="1", INFERQ_BODY_TIMEOUT_S="1")
    with replica.connect() as slow, replica.connect() as silent, replica.connect() as body:
        started = time.monotonic()
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: inferq\r\n")
        body.sendall(
            b"POST /v1/tasks HTTP/1.1\r\nHost: inferq\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + replica.token.encode() + b"\r\n"
            b'Content-Length: 100\r\n\r\n{"pool": '
        )
        slow_answer = _read_until_closed(slow)
        silent_answer = _read_until_closed(silent)
        body_answer = _read_until_closed(body)
        elapsed = time.monotonic() - started
    # The requirement is a deadline: each is closed once its timeout (1 s) has passed.
    assert elapsed < 10
    assert slow_answer.startswith(b"HTTP/1.1 408 "), slow_answer
    assert b"INFERQ_HEADER_TIMEOUT_S" in slow_answer
    assert silent_answer == b""
    assert body_answer.startswith(b"HTTP/1.1 408 "), body_answer
    assert b"INFERQ_BODY_TIMEOUT_S" in body_answer
    # A client that is slow but within the timeouts is served.
    with replica.connect() as paced:
        paced.sendall(b"GET /healthz HTTP/1.1\r\nHost: inferq\r\n")
        time.sleep(0.3)  # pacing the client, well inside the 1 s head timeout
        paced.sendall(b"Connection: close\r\n\r\n")
        assert _read_until_closed(paced).startswith(b"HTTP/1.1 200 ")


def test_connections_past_the_cap_are_refused_with_503(serve: Start) -> None:
    replica = serve(INFERQ_MAX_CONNECTIONS="4", INFERQ_HEADER_TIMEOUT_S="60")
    held = [replica.connect() for _ in range(4)]
    try:
        # The held connections are accepted: each answers a request.
        for sock in held:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: inferq\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        with replica.connect() as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: inferq\r\n\r\n")
            refused = _read_until_closed(extra)
        assert refused.startswith(b"HTTP/1.1 503 "), refused
        assert b"too_many_connections" in refused
    finally:
        for sock in held:
            sock.close()

    def served_again() -> bool:
        try:
            return httpx.get(replica.url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(served_again, 10, "a connection slot to free up")


def _read_until_closed(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (or resets it)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_metrics_on_a_port_of_their_own(serve: Start) -> None:
    metrics_port = free_port()
    replica = serve(INFERQ_METRICS_PORT=str(metrics_port), INFERQ_METRICS_TOKEN="m-secret")
    on_api = httpx.get(replica.url + "/metrics", headers={"Authorization": "Bearer m-secret"})
    side = f"http://127.0.0.1:{metrics_port}"
    page = httpx.get(side + "/metrics", headers={"Authorization": "Bearer m-secret"})
    anonymous = httpx.get(side + "/metrics")
    api = httpx.get(side + "/v1/tasks", headers={"Authorization": f"Bearer {replica.token}"})
    assert on_api.status_code == 404
    assert page.status_code == 200 and "inferq_http_requests_total" in page.text
    assert anonymous.status_code == 401
    assert api.status_code == 404
    # The secret is never logged.
    assert "m-secret" not in replica.proc.log_text()
