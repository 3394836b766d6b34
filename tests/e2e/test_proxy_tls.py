"""The shipped nginx and HAProxy files, run for real with a trustme certificate in front of a
real `inferq serve`: HTTPS proxying, plain HTTP redirected, operators' pages kept off the
public listener."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import trustme

from inferq.bench.polling import wait_until
from inferq.bench.processes import Proc
from inferq.db.cluster import free_port
from inferq.db.tokens import hash_token, new_secret
from tests import proxy_conf
from tests.e2e.proxies import find_binary

pytestmark = pytest.mark.e2e


@dataclass
class Front:
    """A proxy in front of one replica: its HTTPS and HTTP ports, the CA that signed it."""

    https: str
    http: str
    ca: Path
    replica: str
    token: str

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture
def backend(dsn: str) -> Iterator[tuple[Path, str, str]]:
    """(work directory, replica URL, client token) of one `inferq serve`."""
    workdir = Path(tempfile.mkdtemp(prefix="inferq-tls-"))
    workdir.chmod(0o755)
    token = new_secret()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO inferq.api_token (token_hash, owner_id, role) VALUES (%s, 'me', 'client')",
            (hash_token(token),),
        )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env |= {"INFERQ_DATABASE_URL": dsn, "INFERQ_PORT": str(port), "INFERQ_LOG_FORMAT": "json"}
    env["INFERQ_DATA_DIR"] = str(workdir / "data")
    serve = Proc("serve", [sys.executable, "-m", "inferq", "serve"], env, workdir / "serve.log")
    serve.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url + "/readyz", serve), 60, "inferq serve")
        yield workdir, url, token
    finally:
        serve.stop()


def _answers(url: str, proc: Proc, verify: ssl.SSLContext | bool = True) -> bool:
    assert proc.alive(), proc.log_text()[-3000:]
    try:
        return httpx.get(url, timeout=2, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False


def _certificate(workdir: Path) -> tuple[trustme.Blob, trustme.LeafCert]:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    return ca.cert_pem, ca.issue_cert("127.0.0.1", "localhost")


@pytest.fixture
def nginx(backend: tuple[Path, str, str]) -> Iterator[Front]:
    workdir, replica, token = backend
    ndir = workdir / "nginx"
    ndir.mkdir()
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (ndir / sub).mkdir()
        (ndir / sub).chmod(0o777)
    _, leaf = _certificate(workdir)
    leaf.cert_chain_pems[0].write_to_path(str(ndir / "inferq.crt"))
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(str(ndir / "inferq.crt"), append=True)
    leaf.private_key_pem.write_to_path(str(ndir / "inferq.key"))
    https, http = free_port(), free_port()
    port = int(replica.rsplit(":", 1)[1])
    conf = proxy_conf.nginx(
        [port], https, tls=(ndir / "inferq.crt", ndir / "inferq.key"), http_port=http
    )
    (ndir / "inferq.conf").write_text(conf)
    (ndir / "nginx.conf").write_text(
        "daemon off;\nworker_processes 1;\n"
        f"pid {ndir}/nginx.pid;\nerror_log {ndir}/error.log warn;\n"
        "events { worker_connections 256; }\n"
        "http {\n    access_log off;\n"
        + "".join(f"    {kind}_temp_path {ndir}/{sub};\n" for kind, sub in _TEMP_PATHS)
        + f"    include {ndir}/inferq.conf;\n}}\n"
    )
    args = [find_binary("nginx"), "-p", str(ndir), "-c", str(ndir / "nginx.conf")]
    check = subprocess.run([*args, "-t"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    proc = Proc("nginx", args, dict(os.environ), workdir / "nginx.log").start()
    front = Front(f"https://127.0.0.1:{https}", f"http://127.0.0.1:{http}", workdir / "ca.pem",
                  replica, token)  # fmt: skip
    try:
        wait_until(lambda: _answers(front.https + "/healthz", proc, front.context()), 20, "nginx")
        yield front
    finally:
        proc.stop()


_TEMP_PATHS = [
    ("client_body", "client_body"),
    ("proxy", "proxy"),
    ("fastcgi", "fastcgi"),
    ("uwsgi", "uwsgi"),
    ("scgi", "scgi"),
]


@pytest.fixture
def haproxy(backend: tuple[Path, str, str]) -> Iterator[Front]:
    workdir, replica, token = backend
    _, leaf = _certificate(workdir)
    pem = workdir / "haproxy.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
    https, http = free_port(), free_port()
    port = int(replica.rsplit(":", 1)[1])
    (workdir / "haproxy.cfg").write_text(proxy_conf.haproxy([port], https, http))
    env = dict(os.environ) | {"INFERQ_TLS_PEM": str(pem)}
    # -n: the shipped maxconn (20,000) needs 40,000 file descriptors, more than a test
    # machine may allow; everything else is the file as shipped.
    args = [find_binary("haproxy"), "-db", "-n", "1000", "-f", str(workdir / "haproxy.cfg")]
    check = subprocess.run([*args, "-c"], capture_output=True, text=True, env=env, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = Proc("haproxy", args, env, workdir / "haproxy.log").start()
    front = Front(f"https://127.0.0.1:{https}", f"http://127.0.0.1:{http}", workdir / "ca.pem",
                  replica, token)  # fmt: skip
    try:
        wait_until(lambda: _answers(front.https + "/healthz", proc, front.context()), 20, "haproxy")
        yield front
    finally:
        proc.stop()


def _check_front(front: Front) -> dict[str, httpx.Response]:
    """Exercise the proxy; each answer by name."""
    answers = {}
    with httpx.Client(verify=front.context(), timeout=10) as http:
        headers = {"Authorization": f"Bearer {front.token}"}
        answers["submit"] = http.post(
            front.https + "/v1/tasks",
            json={"pool": "gpu", "request": {"messages": []}},
            headers=headers,
        )
        answers["list"] = http.get(front.https + "/v1/tasks?limit=5", headers=headers)
        for name, path in (
            ("metrics", "/metrics"),
            ("docs", "/docs"),
            ("openapi", "/openapi.json"),
        ):
            answers[name] = http.get(front.https + path)
        answers["clear"] = http.get(front.http + "/v1/tasks?limit=5", headers=headers)
        answers["clear_health"] = http.get(front.http + "/healthz")
        answers["replica_metrics"] = http.get(front.replica + "/metrics")
    with pytest.raises(httpx.ConnectError):  # a certificate nobody vouches for is refused
        httpx.get(front.https + "/healthz", verify=True, timeout=5)
    return answers


def _assert_front(answers: dict[str, httpx.Response]) -> None:
    assert answers["submit"].status_code == 201, answers["submit"].text
    task_id = answers["submit"].json()["id"]
    assert answers["list"].status_code == 200
    assert [t["id"] for t in answers["list"].json()["data"]] == [task_id]
    for name in ("metrics", "docs", "openapi"):
        assert answers[name].status_code == 404, name
        assert answers[name].json()["error"]["code"] == "route_not_found", name
    # The replica itself still serves /metrics to whoever may reach it.
    assert answers["replica_metrics"].status_code == 200
    for name in ("clear", "clear_health"):
        assert answers[name].status_code == 301, name
        assert "x-request-id" not in answers[name].headers  # never reached a replica


def test_nginx_terminates_tls_and_redirects_plain_http(nginx: Front) -> None:
    answers = _check_front(nginx)
    _assert_front(answers)
    https_port = nginx.https.rsplit(":", 1)[1]
    assert answers["clear"].headers["location"] == (
        f"https://127.0.0.1:{https_port}/v1/tasks?limit=5"
    )
    assert "max-age" in answers["list"].headers["strict-transport-security"]


def test_haproxy_terminates_tls_and_redirects_plain_http(haproxy: Front) -> None:
    answers = _check_front(haproxy)
    _assert_front(answers)
    # HAProxy keeps the Host the client sent (standard ports in production: 80 -> 443).
    assert answers["clear"].headers["location"].startswith("https://127.0.0.1:")
    assert answers["clear"].headers["location"].endswith("/v1/tasks?limit=5")
    assert "max-age" in answers["list"].headers["strict-transport-security"]
