"""Proc: a child process logging to a file, as the bench and the e2e tests run them; and what
a process costs (CPU time, resident memory) read from /proc."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferq.bench.polling import wait_until


class ProcessExited(RuntimeError):
    """A child process ended while it was being waited on."""


@dataclass
class Proc:
    """One child process; its stdout and stderr go to one log file (appended to on restart)."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self, user: str | None = None, *, new_session: bool = True) -> Proc:
        """Start (or start again) the process, as ``user`` when given.

        In a session of its own by default, so a terminal's Ctrl-C reaches only the parent,
        which stops its children; ``new_session=False`` keeps it in the parent's, so it ends
        with the parent's terminal (the bench: a replica must not outlive a closed terminal).
        """
        with self.log.open("ab") as out:
            out.write(f"\n=== start {' '.join(self.args)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.args,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=new_session,
                user=user,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (after SIGCONT, for a stopped process), then SIGKILL after ``timeout_s``."""
        if not self.alive():
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, chars: int = 3000) -> str:
        """The end of the log, for an error message."""
        return self.log_text()[-chars:]

    def exited(self) -> ProcessExited:
        return ProcessExited(f"{self.name} exited:\n{self.tail()}")

    def wait_http(self, url: str, timeout_s: float = 30.0) -> None:
        """Return once GET ``url`` answers 200; ProcessExited with the log's tail when the
        process ends first, TimeoutError with it at the deadline."""

        def answers() -> bool:
            if not self.alive():
                raise self.exited()
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return bool(resp.status == 200)
            except (OSError, http.client.HTTPException):
                return False

        wait_until(answers, timeout_s, lambda: f"{self.name} to answer {url}:\n{self.tail()}")

    def events(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """The JSON log lines (with ``event`` and the given fields) written so far."""
        found = []
        for line in self.log_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            if event is not None and entry.get("event") != event:
                continue
            if all(entry.get(k) == v for k, v in match.items()):
                found.append(entry)
        return found

    def wait_event(self, event: str, timeout_s: float = 30.0, **match: Any) -> dict[str, Any]:
        """The first log line of ``event`` with the given fields, once it is written."""

        def seen() -> dict[str, Any] | None:
            hits = self.events(event, **match)
            if not hits and not self.alive():
                raise self.exited()
            return hits[0] if hits else None

        return wait_until(seen, timeout_s, f"{self.name} to log {event} {match}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc/PID/status VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        match = re.search(r"VmRSS:\s+(\d+) kB", f.read())
    if match is None:
        raise RuntimeError(f"no VmRSS for process {pid}")
    return int(match.group(1)) * 1024
