"""PrivateCluster: a PostgreSQL server of our own, started from the local server binaries.

Used by `inferq serve` when no database is configured, by the tests and by the benchmark.
PostgreSQL refuses to run as root, so as root the cluster runs as the unprivileged user
``nobody`` and its directory is handed to that user.
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

from inferq.errors import ConfigurationError

UNPRIVILEGED_USER = "nobody"


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
    """A cluster in ``directory`` listening on 127.0.0.1:``port`` (trust auth, user postgres)."""

    directory: Path
    port: int = 0
    bindir: Path | None = None
    settings: dict[str, str] = field(default_factory=dict)

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
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

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

    def init(self) -> None:
        """initdb once; later calls find the data directory and do nothing."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "port").write_text(str(self.port))
        if os.geteuid() == 0:
            shutil.chown(self.directory, UNPRIVILEGED_USER)
            self.directory.chmod(0o755)
        if (self.datadir / "PG_VERSION").exists():
            return
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-instructions",
        )

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the server (idempotent) and wait until it accepts connections."""
        self.init()
        if self.running():
            return
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.directory),
            "max_connections": "300",
            **self.settings,
        }
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
