"""The figures `inferq bench` reports, and its report: median, min and max of each over the
runs, its target when the issue sets one, as JSON and as a fixed-width table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from inferq.bench.fanout import REPLICA_COUNTS


@dataclass(frozen=True, slots=True)
class Figure:
    """One reported quantity; ``target`` is (">=" | "<=", value) when the issue sets one."""

    key: str
    label: str
    unit: str
    target: tuple[str, float] | None = None


def fan_out_figures() -> list[Figure]:
    """The fan-out figures of inferq.bench.fanout, at each replica count."""
    figures = [
        Figure(
            "replicas.idle_cpu_us_per_notification",
            "fan-out: CPU per notification, no waiter",
            "us",
        ),
        Figure(
            "replicas.idle_burst_cpu_us_per_notification",
            "  the same, notifications back to back",
            "us",
        ),
    ]
    for n in REPLICA_COUNTS:
        figures += [
            Figure(f"replicas.r{n}.wake_p50_ms", f"{n} replica(s): wake p50", "ms"),
            Figure(f"replicas.r{n}.wake_p99_ms", f"{n} replica(s): wake p99", "ms"),
            Figure(
                f"replicas.r{n}.cpu_us_per_notification",
                f"{n} replica(s): CPU per notification each",
                "us",
            ),
            Figure(f"replicas.r{n}.relay_chunks_per_s", f"{n} replica(s): relay", "chunks/s"),
        ]
    return figures


FIGURES = [
    Figure("ceiling.insert_commits_per_s", "PostgreSQL insert commits (8 conns)", "/s"),
    Figure("ceiling.insert_notify_commits_per_s", "PostgreSQL insert+notify commits", "/s"),
    Figure("ceiling.commit_p50_ms", "one insert commit, one connection, p50", "ms"),
    Figure("ceiling.notify_commit_p50_ms", "one insert+notify commit, p50", "ms"),
    Figure("pipeline.p1_tasks_per_s", "pipeline, 1 producer", "tasks/s", (">=", 4000)),
    Figure("pipeline.p4_tasks_per_s", "pipeline, 4 producers", "tasks/s", (">=", 4000)),
    Figure("pipeline.p16_tasks_per_s", "pipeline, 16 producers", "tasks/s", (">=", 4000)),
    Figure("pipeline.fraction_of_notify_ceiling", "best pipeline / notify commits", "x"),
    Figure("pipeline.python_cpu_us_per_task", "pipeline Python CPU per task", "us"),
    Figure("claim.p50_ms", "enqueue -> idle worker's claim, p50", "ms", ("<=", 3)),
    Figure("claim.p99_ms", "enqueue -> idle worker's claim, p99", "ms"),
    Figure("claim.max_ms", "enqueue -> idle worker's claim, max", "ms"),
    Figure("claim.enqueue_p50_ms", "  of which the enqueue commit, p50", "ms"),
    Figure("wake.p50_ms", "complete on B -> waiter on A, p50", "ms", ("<=", 2)),
    Figure("wake.p99_ms", "complete on B -> waiter on A, p99", "ms", ("<=", 10)),
    Figure("wake.after_commit_p50_ms", "  from B's commit acknowledged, p50", "ms"),
    Figure("wake.after_commit_p99_ms", "  from B's commit acknowledged, p99", "ms"),
    # The saturated run is the throughput ceiling (its latency is mostly CPU queueing); the
    # latency target is read on the paced run, at the target load (see command._relay).
    Figure("relay.chunks_per_s", "relay at saturation, 200 streams", "chunks/s", (">=", 20000)),
    Figure("relay.p50_ms", "  at saturation: chunk latency, p50", "ms"),
    Figure("relay.p99_ms", "  at saturation: chunk latency, p99", "ms"),
    Figure("relay.cpu_us_per_chunk", "  at saturation: Python CPU per chunk", "us"),
    Figure("relay.paced_chunks_per_s", "relay paced 200 x 100 chunks/s: achieved", "chunks/s"),
    Figure("relay.paced_p50_ms", "  paced: chunk latency, p50", "ms"),
    Figure("relay.paced_p99_ms", "  paced: chunk latency, p99 (the target)", "ms", ("<=", 50)),
    Figure("waiters.bytes_per_waiter", "in-process memory per parked waiter", "B"),
    Figure("http.tasks_per_s", "HTTP sync chat completions, 2 replicas", "tasks/s", (">=", 500)),
    Figure("http.p50_ms", "HTTP sync chat completion under load, p50", "ms"),
    Figure("http.p99_ms", "HTTP sync chat completion under load, p99", "ms"),
    Figure("http.p50_1_client_ms", "HTTP sync chat completion, 1 client, p50", "ms", ("<=", 15)),
    Figure("http.server_cpu_ms_per_task", "replicas + workers CPU per HTTP task", "ms"),
    Figure("http.loadgen_cpu_ms_per_request", "  load generator CPU per request", "ms"),
    Figure("memory.rss_idle_mib", "replica RSS, idle", "MiB"),
    Figure("memory.rss_waits_mib", "replica RSS with the open waits", "MiB"),
    Figure("memory.bytes_per_open_wait", "RSS per open HTTP wait", "B", ("<=", 10240)),
    Figure("memory.uvicorn_floor_bytes_per_request", "  bare uvicorn app, per parked request", "B"),
    Figure("batch.input_mib", "batch input file (JSONL)", "MiB"),
    Figure("batch.upload_mib_per_s", "batch file upload", "MiB/s"),
    Figure("batch.ingest_lines_per_s", "batch ingest: upload start -> in_progress", "lines/s"),
    Figure("batch.completion_lines_per_s", "batch completion: in_progress -> completed", "lines/s"),
    Figure("batch.download_mib_per_s", "batch output download", "MiB/s"),
    Figure("batch.upload_peak_rss_mib", "replica peak RSS during the upload", "MiB", ("<=", 300)),
    Figure(
        "batch.download_peak_rss_mib", "replica peak RSS during the download", "MiB", ("<=", 300)
    ),
    Figure("batch.interactive_idle_p50_ms", "interactive sync call, idle queue, p50", "ms"),
    Figure("batch.interactive_busy_p50_ms", "  while a batch runs, p50", "ms"),
    Figure("batch.interactive_p50_ratio", "  while a batch runs / idle, p50", "x", ("<=", 2)),
    *fan_out_figures(),
    Figure("fairness.pending_at_start", "fairness: tasks pending (mixed weights)", "tasks"),
    Figure("fairness.share_error_pct", "  share error against the weights", "%", ("<=", 5)),
    Figure("fairness.claim_p50_ms", "  claim of one task, p50", "ms", ("<=", 3)),
    Figure("fairness.claim_p99_ms", "  claim of one task, p99", "ms"),
]


def build_report(
    machine: dict[str, Any],
    values: dict[str, list[float]],
    errors: dict[str, str],
    runs: int,
    quick: bool,
    elapsed_s: float,
) -> dict[str, Any]:
    """The JSON report: each figure's median, min, max and every run's value, and whether
    the median meets its target; figures with no value (a failed scenario) are left out."""
    figures: dict[str, Any] = {}
    for f in FIGURES:
        vals = values[f.key]
        if not vals:
            continue
        entry: dict[str, Any] = {
            "label": f.label,
            "unit": f.unit,
            "median": statistics.median(vals),
            "min": min(vals),
            "max": max(vals),
            "runs": vals,
        }
        if f.target is not None:
            op, bound = f.target
            med = entry["median"]
            entry["target"] = f"{op} {bound:g}"
            entry["met"] = med >= bound if op == ">=" else med <= bound
        figures[f.key] = entry
    return {
        "machine": machine,
        "runs": runs,
        "quick": quick,
        "elapsed_s": round(elapsed_s, 1),
        "figures": figures,
        "errors": errors,
    }


def render_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width text table (also valid Markdown)."""
    m = report["machine"]
    lines = [
        f"inferq bench: {m['cores']} cores, PostgreSQL {m['postgresql']}, "
        f"synchronous_commit={m['synchronous_commit']}, fsync={m['fsync']}, "
        f"{report['runs']} run(s){' (--quick)' if report['quick'] else ''}, "
        f"load {m['load_average_1m_at_start']:.2f} at start",
        "",
        f"| {'figure':42} | {'median':>10} | {'min':>10} | {'max':>10} | {'unit':8} | target |",
        f"|{'-' * 44}|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 10}|--------|",
    ]
    for f in FIGURES:
        e = report["figures"].get(f.key)
        if e is None:
            lines.append(f"| {f.label:42} | {'n/a':>10} | {'':>10} | {'':>10} | {f.unit:8} | |")
            continue
        target = ""
        if "target" in e:
            target = f"{e['target']} {'ok' if e['met'] else 'MISSED'}"
        lines.append(
            f"| {f.label:42} | {_fmt(e['median']):>10} | {_fmt(e['min']):>10} | "
            f"{_fmt(e['max']):>10} | {f.unit:8} | {target} |"
        )
    for name, error in report["errors"].items():
        lines.append(f"\n{name} FAILED: {error}")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"
