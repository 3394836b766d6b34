"""The Debian packages some tests need (nginx, PgBouncer, the PostgreSQL server), installed on
first use when the tests run as root on Debian, so that `pytest` passes on a fresh machine
exactly as the README says. Elsewhere a missing package fails the test with the command that
installs it: a test that needs a service is never skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

_lock = threading.Lock()
_updated = False


def can_install() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def install(*packages: str) -> None:
    """``apt-get install`` the packages (once ``apt-get update`` has run); raises
    RuntimeError naming the command when that is not possible here."""
    global _updated
    command = f"apt-get install -y {' '.join(packages)}"
    if not can_install():
        raise RuntimeError(f"missing Debian package(s) {', '.join(packages)}: run `{command}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with _lock:
        if not _updated:
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
            _updated = True
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
            check=True,
            env=env,
            timeout=1200,
            stdout=subprocess.DEVNULL,
        )
    # Debian starts nginx on port 80 after installing it; the tests run their own.
    if "nginx" in packages:
        subprocess.run(["pkill", "-x", "nginx"], check=False)
