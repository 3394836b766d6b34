"""Migrator: applies sql/NNNN_name.sql under an advisory lock and guards them by checksum."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg
import structlog

from inferq.errors import ChecksumMismatch, DatabaseBehind, MigrationError

log = structlog.get_logger(__name__)

# Replicas may start at once: only one applies files, the others wait and then see them applied.
MIGRATION_LOCK_KEY = 0x696E6665_72710001  # "inferq" + 1
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def sql_dir() -> Path:
    """Where the migration files are: inside the installed wheel, else the source checkout."""
    packaged = Path(str(resources.files("inferq"))) / "sql"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[3] / "sql"
    if checkout.is_dir():
        return checkout
    raise MigrationError(f"migration files not found in {packaged} or {checkout}")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def text(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass(frozen=True, slots=True)
class MigrationState:
    migration: Migration
    applied: bool
    checksum_ok: bool


def discover(directory: Path | None = None) -> list[Migration]:
    """The migration files, ordered by version."""
    found = []
    for path in sorted((directory or sql_dir()).glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if match:
            found.append(Migration(int(match[1]), path.stem, path))
    return found


class Migrator:
    """Applies and inspects migrations over a synchronous connection to ``dsn``."""

    def __init__(self, dsn: str, directory: Path | None = None) -> None:
        self.dsn = dsn
        self.migrations = discover(directory)

    def status(self) -> list[MigrationState]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            applied = self._applied(conn)
        return [
            MigrationState(m, m.version in applied, applied.get(m.version) in (None, m.checksum))
            for m in self.migrations
        ]

    def check(self) -> None:
        """Raise DatabaseBehind or ChecksumMismatch unless every file is applied unchanged."""
        states = self.status()
        behind = [s.migration.name for s in states if not s.applied]
        if behind:
            raise DatabaseBehind(
                f"the database is missing migrations {', '.join(behind)}; "
                "run `inferq migrate` (or apply sql/*.sql with psql) first"
            )
        self._refuse_edited(states)

    def migrate(self) -> list[Migration]:
        """Apply the pending files in order; returns the ones applied. Safe to run concurrently."""
        applied_now: list[Migration] = []
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
            try:
                applied = self._applied(conn)
                self._refuse_edited(
                    [
                        MigrationState(m, True, applied[m.version] in (None, m.checksum))
                        for m in self.migrations
                        if m.version in applied
                    ]
                )
                for m in self.migrations:
                    if m.version not in applied:
                        log.info("migration_applying", version=m.version, name=m.name)
                        # The file holds its own BEGIN/COMMIT and records itself, exactly as
                        # when a DBA runs it with psql; so no parameters here (simple protocol).
                        conn.execute(m.text.encode())
                        applied_now.append(m)
                    if applied.get(m.version) is None:
                        conn.execute(
                            "UPDATE inferq.schema_migration SET checksum = %s WHERE version = %s",
                            (m.checksum, m.version),
                        )
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        return applied_now

    def _applied(self, conn: psycopg.Connection[tuple[object, ...]]) -> dict[int, str | None]:
        exists = conn.execute("SELECT to_regclass('inferq.schema_migration')").fetchone()
        if not exists or exists[0] is None:
            return {}
        rows = conn.execute("SELECT version, checksum FROM inferq.schema_migration").fetchall()
        return {int(str(v)): (None if c is None else str(c)) for v, c in rows}

    @staticmethod
    def _refuse_edited(states: list[MigrationState]) -> None:
        edited = [s.migration.name for s in states if s.applied and not s.checksum_ok]
        if edited:
            raise ChecksumMismatch(
                f"migration files {', '.join(edited)} changed after they were applied; "
                "migrations are forward-only: restore the file and add a new one"
            )
