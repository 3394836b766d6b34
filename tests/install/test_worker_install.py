"""A GPU box's install: `pip install <this repository>` with no extras into a fresh virtual
environment gives the worker SDK and `inferq worker`, without the daemon's packages.

Slow (a minute or so: it builds the wheel and fetches the dependencies from the package
index), hence its own marker: ``pytest -m install``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.install

REPO = Path(__file__).resolve().parents[2]
SERVER_MODULES = ("fastapi", "uvicorn", "psycopg", "psycopg_pool", "prometheus_client")


def test_a_bare_install_is_the_worker_without_the_server(tmp_path: Path) -> None:
    # Nothing of this checkout or of the test run's environment may leak into the new one.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "INFERQ_"))}
    env.pop("VIRTUAL_ENV", None)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=120)
    python, inferq = str(venv / "bin" / "python"), str(venv / "bin" / "inferq")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
        )

    installed = run(python, "-m", "pip", "install", "-q", str(REPO))
    assert installed.returncode == 0, installed.stderr[-3000:]

    probe = "import importlib.util as u; print([m for m in %r if u.find_spec(m)])"
    found = run(python, "-c", probe % (SERVER_MODULES,))
    assert found.stdout.strip() == "[]", found.stdout + found.stderr

    sdk = run(python, "-c", "import inferq.worker; print(inferq.worker.Worker.__name__)")
    assert sdk.returncode == 0 and sdk.stdout.strip() == "Worker", sdk.stderr
    helped = run(inferq, "worker", "--help")
    assert helped.returncode == 0 and "--token-file" in helped.stdout, helped.stderr

    for command in (["serve"], ["migrate"], ["token", "list"], ["status"], ["bench"]):
        refused = run(inferq, *command)
        assert refused.returncode == 2, (command, refused.stderr)
        assert "pip install 'inferq[server]'" in refused.stderr, (command, refused.stderr)
