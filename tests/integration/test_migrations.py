"""Migrations: psql and `inferq migrate` give the same schema; edits are refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from inferq.db.cluster import find_bindir
from inferq.db.migrations import Migrator, discover, sql_dir
from inferq.errors import ChecksumMismatch, DatabaseBehind

pytestmark = pytest.mark.db


def tool(name: str) -> str:
    bindir = find_bindir()
    found = (bindir / name) if bindir and (bindir / name).exists() else shutil.which(name)
    assert found, f"{name} is needed for this test"
    return str(found)


def schema_dump(dsn: str) -> str:
    out = subprocess.run(
        [tool("pg_dump"), "--schema-only", "--no-owner", "--schema=inferq", dsn],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Drop the header and the per-run random \\restrict keys of newer pg_dump releases.
    noise = ("-- Dumped", "\\restrict", "\\unrestrict")
    return "\n".join(line for line in out.splitlines() if not line.startswith(noise))


def applied(dsn: str) -> list[tuple[int, str, bool]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT version, name, checksum IS NOT NULL FROM inferq.schema_migration "
            "ORDER BY version"
        ).fetchall()
    return [(int(v), str(n), bool(c)) for v, n, c in rows]


def inferq_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferq", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "INFERQ_LOG_LEVEL": "warning"},
    )


def test_psql_and_inferq_migrate_give_the_same_schema(empty_dsn: str, dsn: str) -> None:
    for migration in discover():
        subprocess.run(
            [
                tool("psql"),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                empty_dsn,
                "-f",
                str(migration.path),
            ],
            check=True,
            capture_output=True,
        )
    assert schema_dump(empty_dsn) == schema_dump(dsn)
    # The files recorded themselves; inferq migrate then adopts their checksums.
    assert [v for v, _, _ in applied(empty_dsn)] == [m.version for m in discover()]
    Migrator(empty_dsn).migrate()
    assert all(has_checksum for _, _, has_checksum in applied(empty_dsn))
    Migrator(empty_dsn).check()


def test_migrate_twice_is_a_no_op(empty_dsn: str) -> None:
    first = inferq_cli("migrate", "--database-url", empty_dsn)
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stdout
    before = schema_dump(empty_dsn)
    second = inferq_cli("migrate", "--database-url", empty_dsn)
    assert second.returncode == 0 and "up to date" in second.stdout
    assert schema_dump(empty_dsn) == before
    status = inferq_cli("migrate", "--status", "--database-url", empty_dsn)
    assert status.stdout.count("applied") == len(discover())


def test_an_edited_file_is_refused(empty_dsn: str, tmp_path: Path) -> None:
    files = tmp_path / "sql"
    shutil.copytree(sql_dir(), files)
    Migrator(empty_dsn, files).migrate()
    edited = sorted(files.glob("*.sql"))[0]
    edited.write_text(edited.read_text() + "\n-- a harmless-looking edit\n")
    with pytest.raises(ChecksumMismatch, match=edited.stem):
        Migrator(empty_dsn, files).migrate()
    with pytest.raises(ChecksumMismatch):
        Migrator(empty_dsn, files).check()


def test_an_empty_database_is_behind_with_a_message_naming_the_command(empty_dsn: str) -> None:
    with pytest.raises(DatabaseBehind, match="inferq migrate"):
        Migrator(empty_dsn).check()


def test_replicas_migrating_at_once_apply_each_file_once(empty_dsn: str) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            Migrator(empty_dsn).migrate()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [v for v, _, _ in applied(empty_dsn)] == [m.version for m in discover()]


def test_sql_dir_command_prints_the_files_location() -> None:
    out = inferq_cli("sql-dir")
    assert out.returncode == 0
    assert Path(out.stdout.strip(), "0001_schema.sql").is_file()
