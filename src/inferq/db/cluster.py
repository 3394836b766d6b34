"""PrivateCluster: a PostgreSQL server of our own, started from the local server binaries.

Used by `inferq serve` when no database is configured, by the tests and by the benchmark.
PostgreSQL refuses to run as root, so as root the cluster runs as the unprivileged user
``nobody`` and its directory is handed to that user.

Two kinds:

- **throwaway** (``passfile=None``; the tests, the benchmark): trust authentication on
  127.0.0.1, for speed and simplicity; they live in temporary directories for one run.
- **secured** (``passfile`` set; the embedded database of `inferq serve`): nobody gets in
  without the superuser's password, which is kept in ``passfile`` (libpq's pgpass format,
  mode 0600, created by the caller) and named in the DSN as ``passfile=`` so the secret never
  appears in a DSN, an argv or a log. Every pg_hba.conf line is ``scram-sha-256`` (local
  socket and 127.0.0.1/::1 alike), the server listens on 127.0.0.1 only, and its directory
  (socket, log, port file) and data directory are 0700, owned by the user the server runs as,
  with the socket itself 0700: another local user can neither reach the socket nor log in
  over TCP. initdb sets the password (from a 0600 file inside that directory, removed at
  once), so there is no moment with trust authentication. A cluster made by an older inferq (trust)
  is converted at its next start: it comes up with only a trust socket line in its 0700
  directory, the password is set through that socket, then pg_hba.conf becomes SCRAM-only
  and is reloaded before anything else connects.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from inferq.errors import ConfigurationError

UNPRIVILEGED_USER = "nobody"
SUPERUSER = "postgres"

_SCRAM_HBA = """\
# Written by inferq (inferq.db.cluster): every connection needs the password.
local   all   all                 scram-sha-256
host    all   all   127.0.0.1/32  scram-sha-256
host    all   all   ::1/128       scram-sha-256
"""
# Only while an older trust cluster gets its password: the socket, in a 0700 directory.
_SOCKET_ONLY_HBA = "local   all   all   trust\n"


def read_password(passfile: Path) -> str:
    """The password of a pgpass file written by ``pgpass_line``."""
    return passfile.read_text().strip().rsplit(":", 1)[1]


def pgpass_line(password: str) -> str:
    """A pgpass line for the superuser of any private cluster (libpq's format)."""
    return f"*:*:*:{SUPERUSER}:{password}\n"


def find_bindir() -> Path | None:
    """The directory of initdb/pg_ctl/postgres: pg_config --bindir, else /usr/lib/postgresql."""
    pg_config = shutil.which("pg_config")
    candidates: list[str] = []
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivateCluster:
    """A cluster in ``directory`` listening on 127.0.0.1:``port`` (user postgres): trust
    authentication, or SCRAM with the password of ``passfile`` (see the module docstring)."""

    directory: Path
    port: int = 0
    bindir: Path | None = None
    settings: dict[str, str] = field(default_factory=dict)
    passfile: Path | None = None

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.bindir = self.bindir or find_bindir()
        if self.bindir is None:
            raise ConfigurationError(
                "no PostgreSQL server binaries found (initdb, pg_ctl): install postgresql, "
                "or `pip install 'inferq[embedded]'`, or set INFERQ_DATABASE_URL"
            )
        if not self.port:
            self.port = self._saved_port() or free_port()

    @property
    def datadir(self) -> Path:
        return self.directory / "data"

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, dbname: str) -> str:
        if self.passfile is None:
            return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"
        return psycopg.conninfo.make_conninfo(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            dbname=dbname,
            passfile=str(self.passfile),
        )

    @property
    def secured(self) -> bool:
        return self.passfile is not None

    def _saved_port(self) -> int | None:
        port_file = self.directory / "port"
        return int(port_file.read_text()) if port_file.exists() else None

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.bindir is not None
        cmd = [str(self.bindir / args[0]), *args[1:]]
        user = UNPRIVILEGED_USER if os.geteuid() == 0 else None
        return subprocess.run(
            cmd, user=user, capture_output=True, text=True, check=check, cwd="/", timeout=120
        )

    def _write_hba(self, text: str) -> None:
        hba = self.datadir / "pg_hba.conf"
        hba.write_text(text)
        if os.geteuid() == 0:
            shutil.chown(hba, UNPRIVILEGED_USER)

    def _trusting(self) -> bool:
        """Whether pg_hba.conf still has a trust line (a cluster made by an older inferq)."""
        hba = (self.datadir / "pg_hba.conf").read_text()
        return any(
            line.split()[-1:] == ["trust"]
            for line in hba.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        )

    def _set_password(self) -> None:
        """Give an older trust cluster its password, through the socket only, then make
        pg_hba.conf SCRAM-only (see the module docstring)."""
        assert self.passfile is not None
        with psycopg.connect(
            host=str(self.directory), port=self.port, user=SUPERUSER, dbname="postgres",
            autocommit=True,
        ) as conn:  # fmt: skip
            # The verifier is computed here (libpq): the password itself never travels.
            verifier = conn.pgconn.encrypt_password(
                read_password(self.passfile).encode(), SUPERUSER.encode(), b"scram-sha-256"
            )
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(SUPERUSER), sql.Literal(verifier.decode())
                )
            )
            self._write_hba(_SCRAM_HBA)
            conn.execute("SELECT pg_reload_conf()")

    def init(self) -> None:
        """initdb once; later calls find the data directory and do nothing."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.directory / "port").write_text(str(self.port))
        if os.geteuid() == 0:
            shutil.chown(self.directory, UNPRIVILEGED_USER)
        self.directory.chmod(0o700 if self.secured else 0o755)
        if (self.datadir / "PG_VERSION").exists():
            return
        if self.passfile is None:
            self._initdb("-A", "trust")
            return
        # initdb (running as nobody when we are root) reads the password from a file of its
        # own: 0600 from its first byte, inside the cluster's 0700 directory, removed at once.
        pwfile = self.directory / ".initdb-password"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(read_password(self.passfile) + "\n")
            if os.geteuid() == 0:
                shutil.chown(pwfile, UNPRIVILEGED_USER)
            self._initdb("-A", "scram-sha-256", f"--pwfile={pwfile}")
        finally:
            pwfile.unlink(missing_ok=True)
        self._write_hba(_SCRAM_HBA)

    def _initdb(self, *auth: str) -> None:
        self._run(
            "initdb", "-D", str(self.datadir), "-U", SUPERUSER, *auth, "-E", "UTF8",
            "--no-instructions",
        )  # fmt: skip

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the server (idempotent) and wait until it accepts connections."""
        self.init()
        if self.running():
            return
        converting = self.secured and self._trusting()
        if converting:
            self._write_hba(_SOCKET_ONLY_HBA)
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.directory),
            "max_connections": "300",
            **self.settings,
        }
        if self.secured:
            options["unix_socket_permissions"] = "0700"
        opts = " ".join(f"-c {k}={v}" for k, v in options.items())
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-o",
            opts,
            "-l",
            str(self.directory / "server.log"),
            "-w",
            "-t",
            str(int(timeout_s)),
            "start",
        )
        self.wait_ready(timeout_s)
        if converting:
            self._set_password()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (
                self._run(
                    "pg_isready", "-h", "127.0.0.1", "-p", str(self.port), check=False
                ).returncode
                == 0
            ):
                return
            time.sleep(0.05)
        raise ConfigurationError(f"PostgreSQL in {self.datadir} did not start; see server.log")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.datadir), "status", check=False).returncode == 0

    def restart(self, mode: str = "fast") -> None:
        # -l: without a log file the new postmaster inherits pg_ctl's stdout and the captured
        # output never ends, so the call would hang until its timeout.
        log_file = str(self.directory / "server.log")
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-l", log_file, "restart")
        self.wait_ready()

    def stop(self, mode: str = "fast") -> None:
        if self.datadir.exists() and self.running():
            self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)
