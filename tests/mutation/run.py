"""The mutation run: apply each mutant of ``tests.mutation.mutants`` to a copy of the project,
one at a time, run the tests that must kill it, and fail when any mutant survives.

    python -m tests.mutation.run             # every mutant (CI runs this)
    python -m tests.mutation.run --list      # the table: mutant, file, killing tests
    python -m tests.mutation.run --only NAME [--only NAME ...]
    python -m tests.mutation.run --check     # only check that every pattern still matches

How a run goes:

1. Every mutant's pattern must occur exactly once in its file. A pattern that no longer
   matches (the code moved) fails the run before anything else: the table is kept in step with
   the code, a mutant is never silently dropped.
2. One PostgreSQL serves every pytest run: ``INFERQ_TEST_DATABASE_URL`` when set, else a
   private throwaway cluster started here (each run migrates its own template database from
   its copy's ``sql/``, so SQL mutants reach the schema).
3. The baseline: the union of every mutant's tests runs once on an unmutated copy and must
   pass, so that a failure under a mutant is the mutant's doing.
4. Each mutant: a fresh copy of the tree (``src``, ``sql``, ``tests``, ...), the edit applied,
   then ``pytest -x`` over its tests with the copy's ``src`` first on ``PYTHONPATH``
   (subprocesses such as ``inferq serve`` inherit it). Killed = pytest exits 1 with at least
   one failed or errored test; survived = it exits 0; anything else is an error of the run.

The copy is what makes it safe to run on a working tree: the checkout itself is never edited.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.mutation.mutants import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[2]
# What a copy needs; the rest (.git, venvs, caches, CI output) is left behind.
_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", ".ci", "__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache",
    ".pytest_cache", "*.egg-info", "dist", "build", "node_modules",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Outcome:
    mutant: Mutant
    verdict: str  # killed | survived | error
    killed_by: list[str]
    seconds: float
    detail: str = ""


def stale_patterns(mutants: Sequence[Mutant], root: Path = ROOT) -> list[str]:
    """One line per edit whose pattern does not occur exactly once in its file."""
    problems = []
    for mutant in mutants:
        for edit in mutant.edits:
            path = root / edit.path
            text = path.read_text() if path.exists() else ""
            count = text.count(edit.find)
            if count != 1:
                where = "missing file" if not path.exists() else f"found {count} times"
                problems.append(f"{mutant.name}: {edit.path}: pattern {where}: {edit.find!r}")
    return problems


def copy_tree(dest: Path) -> Path:
    shutil.copytree(ROOT, dest, ignore=_IGNORE, symlinks=True)
    return dest


def apply(mutant: Mutant, tree: Path) -> None:
    for edit in mutant.edits:
        path = tree / edit.path
        text = path.read_text()
        assert text.count(edit.find) == 1, f"{mutant.name}: {edit.path} changed under the run"
        path.write_text(text.replace(edit.find, edit.replace))


@contextmanager
def database() -> Iterator[str]:
    """A superuser DSN for every pytest run of this mutation run."""
    url = os.environ.get("INFERQ_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from inferq.db.cluster import PrivateCluster

    cluster = PrivateCluster(
        Path(tempfile.mkdtemp(prefix="inferq-mutants-pg-")),
        settings={"fsync": "off", "full_page_writes": "off", "synchronous_commit": "off"},
    )
    cluster.start()
    try:
        yield cluster.dsn
    finally:
        cluster.destroy()


def run_pytest(tree: Path, tests: Sequence[str], dsn: str, timeout_s: float) -> tuple[int, Path]:
    """pytest -x over ``tests`` in ``tree``; (exit code, junit report)."""
    report = tree / "mutant-junit.xml"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(tree / "src"), str(tree), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "INFERQ_TEST_DATABASE_URL": dsn,
        "PYTEST_ADDOPTS": "",
    }
    cmd = [
        sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
        f"--junitxml={report}", f"--timeout={int(timeout_s)}", *tests,
    ]  # fmt: skip
    try:
        done = subprocess.run(
            cmd,
            cwd=tree,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout_s * max(1, len(tests)) + 120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return -1, report
    (tree / "mutant-pytest.log").write_bytes(done.stdout)
    return done.returncode, report


def failed_tests(report: Path) -> list[str]:
    """The tests that failed or errored in a junit report."""
    if not report.exists():
        return []
    names = []
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            names.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return names


def which_inferq(tree: Path) -> str:
    """Where the copy's interpreter environment imports inferq from (must be the copy)."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    out = subprocess.run(
        [sys.executable, "-c", "import inferq; print(inferq.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def run_one(mutant: Mutant, dsn: str, work: Path) -> Outcome:
    tree = copy_tree(work / mutant.name)
    apply(mutant, tree)
    started = time.monotonic()
    code, report = run_pytest(tree, mutant.tests, dsn, mutant.timeout_s)
    elapsed = time.monotonic() - started
    failed = failed_tests(report)
    log = tree / "mutant-pytest.log"
    tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
    if code == 1 and failed:
        outcome = Outcome(mutant, "killed", failed, elapsed)
    elif code == 0:
        outcome = Outcome(mutant, "survived", [], elapsed, "\n".join(tail))
    elif code == -1:
        outcome = Outcome(mutant, "killed", ["(the run hung past its timeout)"], elapsed)
    else:
        outcome = Outcome(
            mutant, "error", failed, elapsed, f"pytest exit {code}\n" + "\n".join(tail)
        )
    shutil.rmtree(tree, ignore_errors=True)
    return outcome


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation.run", description=__doc__)
    parser.add_argument("--only", action="append", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    parser.add_argument("--check", action="store_true", help="only check the patterns")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = parser.parse_args(argv)

    names = {m.name for m in MUTANTS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(unknown)}")
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:36} {m.edits[0].path:34} {' '.join(m.tests)}\n    {m.why}")
        return 0
    stale = stale_patterns(chosen)
    if stale:
        print("mutation table out of date with the code:", file=sys.stderr)
        for line in stale:
            print(f"  {line}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(chosen)} mutants, every pattern matches once")
        return 0

    started = time.monotonic()
    outcomes: list[Outcome] = []
    with database() as dsn, tempfile.TemporaryDirectory(prefix="inferq-mutants-") as tmp:
        work = Path(tmp)
        if not args.no_baseline:
            tree = copy_tree(work / "baseline")
            where = which_inferq(tree)
            if not where.startswith(str(tree)):
                print(f"the copy does not import its own inferq ({where})", file=sys.stderr)
                return 2
            tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
            print(f"baseline: {len(tests)} test target(s) on the unmutated copy", flush=True)
            code, report = run_pytest(tree, tests, dsn, max(m.timeout_s for m in chosen))
            if code != 0:
                print(f"the baseline failed (pytest exit {code}): {failed_tests(report)}")
                print((tree / "mutant-pytest.log").read_text(errors="replace")[-4000:])
                return 2
            print(f"baseline passed in {time.monotonic() - started:.0f} s", flush=True)
        for i, mutant in enumerate(chosen, 1):
            outcome = run_one(mutant, dsn, work)
            outcomes.append(outcome)
            who = outcome.killed_by[0] if outcome.killed_by else outcome.detail.splitlines()[0:1]
            print(
                f"[{i}/{len(chosen)}] {mutant.name}: {outcome.verdict} "
                f"({outcome.seconds:.0f} s) {who}",
                flush=True,
            )
            if outcome.verdict != "killed" and outcome.detail:
                print("    " + outcome.detail.replace("\n", "\n    "), flush=True)

    print("\n| mutant | what it breaks | killed by | s |\n|---|---|---|---|")
    for o in outcomes:
        killer = "; ".join(o.killed_by) or o.verdict.upper()
        print(f"| {o.mutant.name} | {o.mutant.why} | {killer} | {o.seconds:.0f} |")
    bad = [o for o in outcomes if o.verdict != "killed"]
    total = time.monotonic() - started
    print(f"\n{len(outcomes) - len(bad)} of {len(outcomes)} mutants killed in {total:.0f} s")
    if bad:
        print("NOT killed: " + ", ".join(f"{o.mutant.name} ({o.verdict})" for o in bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
