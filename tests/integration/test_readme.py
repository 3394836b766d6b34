"""What the README promises about operations holds: every metric its alert queries name
exists on /metrics, the DBA loop fails loudly without its variable, and the systemd template
gives instances 1 to 9 their own port."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest

from inferq.cli import build_parser
from inferq.settings import Settings
from tests.api_helpers import MODEL, POOL, auth, make_tokens, serve_app

pytestmark = pytest.mark.db

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n### ", start + len(title))
    return README[start : end if end >= 0 else None]


async def test_every_metric_the_alert_queries_name_exists(settings: Settings, dsn: str) -> None:
    names = set(re.findall(r"`[^`]*?\b(inferq_[a-z_]+)", section("### What to alert on")))
    assert len(names) >= 6, names  # the section still talks about metrics at all
    tokens = await make_tokens(settings, dsn)
    async with serve_app(settings, dsn) as server, httpx.AsyncClient(base_url=server.url) as http:
        # A submit, a claim and a wait: every labelled family then has a series.
        await http.post(
            "/v1/tasks", json={"model": MODEL, "request": {}}, headers=auth(tokens.alice)
        )
        bound = await http.post(
            "/v1/worker/sessions", json={"pools": [POOL]}, headers=auth(tokens.worker)
        )
        assert len(bound.json()["tasks"]) == 1
        text = (await http.get("/metrics")).text
    # What a query can name: a series, or a histogram by its family name. A counter's family
    # name without `_total` matches no series.
    exposed = set(re.findall(r"^# TYPE (inferq_[a-z_]+) (?:histogram|summary)$", text, re.M))
    exposed |= set(re.findall(r"^(inferq_[a-z_]+)[{ ]", text, re.M))
    assert names <= exposed, f"named in the README but not on /metrics: {names - exposed}"


def test_the_dba_loop_refuses_to_run_without_its_database_url() -> None:
    block = re.search(r"```bash\n(: \"\$\{DATABASE_URL.*?)```", README, re.S)
    assert block is not None
    script = block.group(1).replace("$(inferq sql-dir)", "/nonexistent")
    ran = subprocess.run(
        ["bash", "-c", script], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True
    )
    assert ran.returncode != 0
    assert "set DATABASE_URL" in ran.stderr


@pytest.mark.parametrize("instance", range(1, 10))
def test_the_systemd_template_gives_each_instance_its_port(
    instance: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = (ROOT / "deploy/systemd/inferq@.service").read_text()
    [exec_start] = re.findall(r"^ExecStart=(.*)$", unit, re.M)
    argv = exec_start.replace("%i", str(instance)).split()[1:]
    # The shared environment file may name a port: the instance's command line wins.
    monkeypatch.setenv("INFERQ_PORT", "9999")
    args = build_parser().parse_args(argv)
    settings = Settings()
    assert args.port == 8000 + instance
    from inferq.daemon import serve_settings

    assert serve_settings(args, settings).port == 8000 + instance
