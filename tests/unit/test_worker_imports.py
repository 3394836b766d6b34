"""The worker SDK installs without the server: importing it pulls in no server package, and
nothing outside what the base install (``pip install inferq``, no extras) brings."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
SERVER_PACKAGES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "psycopg",
    "psycopg_pool",
    "prometheus_client",
)
# What `python -m inferq worker` and an SDK user import.
WORKER_MODULES = "inferq.worker, inferq.worker.cli, inferq.cli"
# Imported by a dependency only when installed (structlog: its console renderer, and
# greenlet for its context variables; playwright brings greenlet to the test install).
OPTIONAL = {"rich", "pygments", "greenlet"}


def imported_top_level_modules(modules: str = WORKER_MODULES) -> list[str]:
    probe = (
        f"import sys, json, {modules}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    names: list[str] = json.loads(out)
    return names


def base_distributions() -> set[str]:
    """inferq's base requirements (pyproject.toml, no extras) and theirs, recursively."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _normal(req.name)
        if name in seen:
            continue
        seen.add(name)
        with contextlib.suppress(PackageNotFoundError):  # not installed here (platform-only)
            todo += [Requirement(r) for r in requires(req.name) or []]
    return seen


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_worker_sdk_imports_no_server_package() -> None:
    assert [m for m in imported_top_level_modules() if m in SERVER_PACKAGES] == []


def test_the_worker_imports_only_what_the_base_install_brings() -> None:
    owners = packages_distributions()
    allowed = base_distributions()
    at_startup = set(imported_top_level_modules("os"))  # site hooks of this environment
    outside = {
        module: owners[module]
        for module in imported_top_level_modules()
        if module in owners
        and module not in at_startup | OPTIONAL
        and module not in sys.stdlib_module_names
        and module != "inferq"
        and not any(_normal(d) in allowed for d in owners[module])
    }
    assert outside == {}
