"""The worker SDK installs without the server: importing it pulls in no server package."""

from __future__ import annotations

import subprocess
import sys

SERVER_PACKAGES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "psycopg",
    "psycopg_pool",
    "prometheus_client",
)


def test_the_worker_sdk_imports_no_server_package() -> None:
    probe = (
        "import sys, inferq.worker, inferq.worker.cli\n"
        f"print(','.join(m for m in {SERVER_PACKAGES!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""
