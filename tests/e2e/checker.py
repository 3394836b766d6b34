"""Checker: the invariants of DESIGN.md over a load history and the final database.

I1 no acknowledged task lost · I2 one terminal transition per task · I3 every wait ended by its
deadline · I4 every stream ordered and gap-free (also across reconnects to other replicas) ·
I5 no stale write applied: every result is written by the attempt that holds the row at that
moment, and every client is given that attempt's answer (the echo backend names its attempt in
each chunk and response, see ``writer_of``). ``check`` returns a Report; ``Report.violations``
must be empty.

What counts as acknowledged: a native task once POST /v1/tasks answered 200/201 with its id;
an OpenAI-style call once it answered 200 (sync) or sent ``[DONE]`` (stream), which is when its
client was told anything. Every logical operation must also end completed within its overall
deadline: a client that gave up is a failure even when no invariant names it.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferq.bench.stats import percentile
from tests.e2e.audit import HELD, Transition, by_task
from tests.e2e.audit import read as read_audit
from tests.e2e.responses import response_text, writer

TERMINAL = {"completed", "error", "cancelled"}


@dataclass
class Report:
    """Figures of a run and every invariant violation found."""

    violations: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def fail(self, invariant: str, message: str) -> None:
        if len(self.violations) < 200:
            self.violations.append(f"{invariant}: {message}")

    def summary(self) -> str:
        lines = [f"{k}: {v}" for k, v in self.figures.items()]
        if self.violations:
            lines.append(f"{len(self.violations)} violation(s):")
            lines += [f"  {v}" for v in self.violations[:40]]
        return "\n".join(lines)


def load_history(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_database(dep: Any) -> tuple[dict[str, dict[str, Any]], dict[str, list[Transition]]]:
    """(tasks by id, audit transitions by task id in commit order) from the e2e database."""
    tasks = {
        str(r[0]): {
            "status": r[1],
            "attempt": r[2],
            "response": r[3],
            "request": r[4],
            "key": r[5],
            "error": r[6],
        }
        for r in dep.query(
            "SELECT id, status::text, attempt, response_body, request_body, idempotency_key, "
            "error_message FROM inferq.task"
        )
    }
    return tasks, by_task(read_audit(dep.dsn))


def writer_of(fingerprint: str | None) -> tuple[str, int] | None:
    """(task id hex, attempt) named by an echo answer's ``system_fingerprint``
    (``fp_echo_<task id hex>_<attempt>``, see EchoBackend), or None for anything else."""
    match = re.fullmatch(r"fp_echo_([0-9a-f]{32})_([0-9]+)", fingerprint or "")
    return (match[1], int(match[2])) if match else None


def check(
    history: list[dict[str, Any]],
    tasks: dict[str, dict[str, Any]],
    audit: dict[str, list[Transition]],
    *,
    hang_slack_s: float = 15.0,
) -> Report:
    """Every invariant over ``history``, the final database state and its audit trail."""
    report = Report()
    report.figures["duplicate_terminal_transitions"] = 0
    results = [r for r in history if r["op"] == "result"]
    _check_results(report, results, tasks)
    _check_idempotency(report, history, tasks)
    _check_terminal_transitions(report, tasks, audit)
    _check_waits(report, history, hang_slack_s)
    _check_streams(report, results, tasks)
    _check_fencing(report, tasks, audit)
    _check_writers(report, results, tasks)
    _figures(report, history, results, tasks)
    return report


def _check_results(
    report: Report, results: list[dict[str, Any]], tasks: dict[str, dict[str, Any]]
) -> None:
    """I1: each acknowledged task exists, ended completed, and the client saw its result."""
    for r in results:
        if r["outcome"] != "ok":
            report.fail("I1", f"{r['kind']} {r['lid']} ended {r['outcome']}: {r.get('error')}")
            continue
        task_id = r.get("task_id")
        if not task_id:
            report.fail("I1", f"{r['kind']} {r['lid']} got no task id (X-Inferq-Task-Id)")
            continue
        row = tasks.get(task_id)
        if row is None:
            report.fail("I1", f"acknowledged task {task_id} ({r['lid']}) is not in the database")
            continue
        if row["status"] != "completed" or r["status"] != "completed":
            report.fail(
                "I1",
                f"task {task_id} ({r['lid']}) ended {row['status']} (client saw {r['status']}): "
                f"{row['error']}",
            )
            continue
        stored = response_text(row["response"])
        if r["content"] != stored:
            report.fail(
                "I1", f"task {task_id}: client got {r['content']!r:.80}, stored {stored!r:.80}"
            )
        if f"nonce-{r['lid']}" not in stored:
            report.fail("I5", f"task {task_id} ({r['lid']}) holds another request's answer")
    for task_id, row in tasks.items():
        if row["status"] not in TERMINAL:
            report.fail("I1", f"task {task_id} is still {row['status']} after the run settled")


def _check_idempotency(
    report: Report, history: list[dict[str, Any]], tasks: dict[str, dict[str, Any]]
) -> None:
    """Retried submits with one Idempotency-Key always named one task, and one row holds it."""
    ids_by_key: dict[str, set[str]] = defaultdict(set)
    for h in history:
        if h["op"] == "submit" and h.get("task_id"):
            ids_by_key[h["lid"]].add(h["task_id"])
    for key, ids in ids_by_key.items():
        if len(ids) != 1:
            report.fail("I2", f"Idempotency-Key {key} created {len(ids)} tasks: {sorted(ids)}")
    rows_by_key = Counter(row["key"] for row in tasks.values() if row["key"])
    for key, n in rows_by_key.items():
        if n > 1:
            report.fail("I2", f"{n} rows carry Idempotency-Key {key}")


def _check_terminal_transitions(
    report: Report, tasks: dict[str, dict[str, Any]], audit: dict[str, list[Transition]]
) -> None:
    """I2: exactly one transition into a terminal state per task, and none out of one."""
    for task_id in tasks:
        trail = audit.get(task_id, [])
        into = [t for t in trail if t.new_status in TERMINAL and t.old_status not in TERMINAL]
        out_of = [t for t in trail if t.old_status in TERMINAL]
        if len(into) != 1:
            report.fail("I2", f"task {task_id}: {len(into)} terminal transitions {into}")
        if len(into) > 1:
            report.figures["duplicate_terminal_transitions"] += len(into) - 1
        if out_of:
            report.fail("I2", f"task {task_id} changed after it ended: {out_of}")


def _check_waits(report: Report, history: list[dict[str, Any]], hang_slack_s: float) -> None:
    """I3: a wait answers by its deadline (terminal, or the timeout marker); nothing hangs."""
    for h in history:
        if h["op"] == "result":
            continue
        if str(h["outcome"]).startswith("hung_"):
            report.fail("I3", f"{h['op']} {h['lid']} hung: {h['outcome']}")
        if h["op"] != "wait" or h["outcome"] != "http_200":
            continue
        took = h["end"] - h["start"]
        # The deadline plus scheduling slack; a request that hangs hits hang_slack_s.
        if took > h["timeout_s"] + min(5.0, hang_slack_s):
            report.fail("I3", f"wait on {h['task_id']} took {took:.1f}s for {h['timeout_s']}s")
        if h["status"] not in TERMINAL and not h.get("timed_out"):
            report.fail("I3", f"wait on {h['task_id']} ended {h['status']} without the marker")


def _check_streams(
    report: Report, results: list[dict[str, Any]], tasks: dict[str, dict[str, Any]]
) -> None:
    """I4: per attempt, chunk seqs arrive 1, 2, 3 ... with no gap or repeat across resumes;
    the final attempt's chunks spell the stored response; a re-run is announced by a reset."""
    for r in results:
        if r["outcome"] != "ok":
            continue
        if r["kind"] == "chat_stream" and r.get("forbidden_lines"):
            report.fail("I4", f"chat stream {r['lid']} sent {r['forbidden_lines'][:2]}")
        if r["kind"] != "native_stream":
            continue
        last_seq: dict[int, int] = {}
        seen_attempts: list[int] = []
        for eid in r["chunk_ids"]:
            attempt, seq = (int(x) for x in eid.split(":"))
            if attempt not in last_seq:
                seen_attempts.append(attempt)
            expected = last_seq.get(attempt, 0) + 1
            if seq != expected:
                report.fail(
                    "I4", f"stream {r['task_id']}: got {eid} after {attempt}:{expected - 1}"
                )
            last_seq[attempt] = max(seq, last_seq.get(attempt, 0))
        if seen_attempts != sorted(seen_attempts):
            report.fail("I4", f"stream {r['task_id']}: attempts out of order {seen_attempts}")
        if r["streamed"] != r["content"]:
            report.fail(
                "I4",
                f"stream {r['task_id']}: chunks spell {r['streamed']!r:.60}, "
                f"result is {r['content']!r:.60}",
            )
        if len(seen_attempts) > 1 and not r["resets"]:
            report.fail("I4", f"stream {r['task_id']}: attempts {seen_attempts} with no reset")


def _check_fencing(
    report: Report, tasks: dict[str, dict[str, Any]], audit: dict[str, list[Transition]]
) -> None:
    """I5 on the audit: attempts grow by one per claim and change nowhere else; while a row is
    held its holder is the session that claimed its attempt; a response is written only onto
    a held row, by the attempt that holds it (the one its fingerprint names is the row's OLD
    attempt, and the row's OLD holder is the session that claimed that attempt)."""
    for task_id, trail in audit.items():
        claimed_by: dict[int, str | None] = {}  # attempt -> the session that claimed it
        for t in trail:
            if t.old_status == "pending" and t.new_status == "claimed":
                if t.new_attempt != (t.old_attempt or 0) + 1:
                    report.fail("I5", f"task {task_id}: claim took {t.old_attempt} -> {t}")
                if t.new_attempt in claimed_by:
                    report.fail("I5", f"task {task_id}: attempt {t.new_attempt} claimed twice")
                claimed_by[t.new_attempt] = t.new_by
            elif t.old_status is not None and t.new_attempt != t.old_attempt:
                report.fail("I5", f"task {task_id}: attempt changed outside a claim {t}")
            if t.old_status in HELD and t.old_by != claimed_by.get(t.old_attempt or 0):
                report.fail("I5", f"task {task_id}: held by a session that did not claim it {t}")
            if t.new_writer != t.old_writer and t.new_writer is not None:
                _check_write(report, task_id, t, claimed_by)
            elif t.new_status == "completed" and t.old_status != "completed":
                report.fail("I5", f"task {task_id}: completed by no identified writer {t}")
    for task_id, row in tasks.items():
        if row["status"] == "completed" and row["response"] is None:
            report.fail("I5", f"task {task_id} completed with no response")


def _check_write(
    report: Report, task_id: str, t: Transition, claimed_by: dict[int, str | None]
) -> None:
    """I5 for one write of a response: its writer is the attempt holding the row."""
    writer = writer_of(t.new_writer)
    if writer is None or writer[0] != task_id.replace("-", ""):
        report.fail("I5", f"task {task_id}: response written by {t.new_writer!r} {t}")
    elif t.old_status not in HELD:
        report.fail("I5", f"task {task_id}: response written onto a {t.old_status} row {t}")
    elif writer[1] != t.old_attempt:
        report.fail(
            "I5", f"task {task_id}: stale write by attempt {writer[1]} onto {t.old_attempt} {t}"
        )
    elif t.old_by != claimed_by.get(writer[1]):
        report.fail("I5", f"task {task_id}: write by a session that did not claim it {t}")


def _check_writers(
    report: Report, results: list[dict[str, Any]], tasks: dict[str, dict[str, Any]]
) -> None:
    """I5 as clients saw it: each was given the answer of the attempt whose result is stored,
    and every chunk of a native stream came from the attempt its event id names."""
    for r in results:
        row = tasks.get(r.get("task_id") or "")
        if r["outcome"] != "ok" or row is None:
            continue  # reported by _check_results
        stored = writer(row["response"])
        seen = r["writers"] if r["kind"] == "chat_stream" else [r.get("writer")]
        if seen != [stored]:
            report.fail("I5", f"task {r['task_id']}: stored {stored}, client got {seen}")
        for eid, by in zip(r.get("chunk_ids", []), r.get("chunk_writers", []), strict=True):
            named = writer_of(by)
            if named is None or named[1] != int(eid.split(":")[0]):
                report.fail("I5", f"stream {r['task_id']}: chunk {eid} written by {by}")


def _figures(
    report: Report,
    history: list[dict[str, Any]],
    results: list[dict[str, Any]],
    tasks: dict[str, dict[str, Any]],
) -> None:
    ok = [r for r in results if r["outcome"] == "ok"]
    latencies = [r["end"] - r["start"] for r in ok]
    acked = {r["task_id"] for r in ok if r.get("task_id")}
    acked |= {h["task_id"] for h in history if h["op"] == "submit" and h.get("task_id")}
    statuses = Counter(row["status"] for row in tasks.values())
    waits = [h for h in history if h["op"] == "wait" and h["outcome"] == "http_200"]
    report.figures.update(
        {
            "operations": len(results),
            "operations_by_kind": dict(Counter(r["kind"] for r in results)),
            "tasks_in_database": len(tasks),
            "tasks_acknowledged": len(acked),
            "tasks_completed": sum(
                1 for t in acked if tasks.get(t, {}).get("status") == "completed"
            ),
            "tasks_lost": sum(
                1 for t in acked if tasks.get(t, {}).get("status") not in ("completed",)
            ),
            "database_statuses": dict(statuses),
            "client_retries": sum(1 for h in history if _retryable(h)),
            "operations_retried": len({h["lid"] for h in history if _retryable(h)}),
            "retried_exchanges_by_outcome": dict(
                Counter(str(h["outcome"]) for h in history if _retryable(h))
            ),
            "tasks_rerun": sum(1 for row in tasks.values() if (row["attempt"] or 0) > 1),
            "stream_resumes": sum(max(0, r.get("segments", 1) - 1) for r in ok),
            "stream_resets_seen": sum(len(r.get("resets", [])) for r in ok),
            "waits": len(waits),
            "waits_timed_out": sum(1 for h in waits if h.get("timed_out")),
            "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "latency_p99_s": round(percentile(latencies, 0.99), 3) if latencies else None,
            "latency_max_s": round(max(latencies), 3) if latencies else None,
            "violations": len(report.violations),
        }
    )


def _retryable(record: dict[str, Any]) -> bool:
    """An HTTP exchange that failed in a way its client retried."""
    if record["op"] == "result":
        return False
    outcome = str(record["outcome"])
    return outcome.startswith(("conn_", "hung_", "stream_error_", "eof_")) or outcome in (
        "http_429",
        "http_502",
        "http_503",
        "http_504",
    )
