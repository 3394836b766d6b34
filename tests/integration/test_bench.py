"""`inferq bench --quick` runs every scenario and writes every figure to its JSON file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from inferq.bench.report import FIGURES


def test_quick_bench_writes_every_figure(dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "INFERQ_DATABASE_URL": dsn, "INFERQ_LOG_LEVEL": "warning"}
    proc = subprocess.run(
        [sys.executable, "-m", "inferq", "bench", "--quick", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = orjson.loads(out.read_bytes())
    assert report["errors"] == {}
    assert set(report["figures"]) == {f.key for f in FIGURES}
    for key, figure in report["figures"].items():
        assert figure["min"] <= figure["median"] <= figure["max"], key
        # A share error of 0 is a perfect split, not a missing figure.
        assert figure["median"] > 0 or key == "fairness.share_error_pct", key
    machine = report["machine"]
    assert machine["cores"] >= 1
    assert machine["postgresql"]
    assert machine["synchronous_commit"]
    # The table on stdout shows the same figures.
    for f in FIGURES:
        assert f.label in proc.stdout
    # ... and nothing else: progress and the replicas' logs (spawned processes included) go
    # to stderr, so `inferq bench > table.md` is the table alone.
    header, blank, *rows = proc.stdout.rstrip("\n").split("\n")
    assert header.startswith("inferq bench: "), header
    assert blank == ""
    assert all(row.startswith("|") for row in rows), [r for r in rows if not r.startswith("|")]
