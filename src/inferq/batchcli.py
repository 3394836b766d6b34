"""`inferq batch`: submit a JSONL file as an OpenAI-style batch, follow it, download its results.

A client of the HTTP API (the same routes the ``openai`` client uses), so it needs only the base
install: ``--url`` (INFERQ_URL) names a replica or the load balancer, the client token comes
from INFERQ_TOKEN or ``--token-file``. Files stream from and to disk; ``--wait`` shows a
progress line on stderr until the batch ends.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ENDED = {"completed", "failed", "expired", "cancelled"}
POLL_S = 2.0


class BatchCliError(Exception):
    """What went wrong, said for the command line."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("batch", help="submit, follow and download OpenAI-style batches")
    p.add_argument(
        "--url",
        default=os.environ.get("INFERQ_URL", "http://127.0.0.1:8000"),
        help="inferq base URL (default: INFERQ_URL or http://127.0.0.1:8000)",
    )
    p.add_argument("--token-file", help="a file holding the client token (default: INFERQ_TOKEN)")
    bsub = p.add_subparsers(dest="batch_command", required=True)
    s = bsub.add_parser("submit", help="upload FILE and create a batch of its lines")
    s.add_argument("file", type=Path)
    s.add_argument("--endpoint", default="/v1/chat/completions",
                   choices=["/v1/chat/completions", "/v1/completions"])  # fmt: skip
    s.add_argument("--window", default="24h", help="completion window (24h)")
    s.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--wait", action="store_true", help="follow it until it ends")
    s = bsub.add_parser("status", help="a batch's status and request counts")
    s.add_argument("batch_id")
    s = bsub.add_parser("download", help="write a batch's output (or --errors) file")
    s.add_argument("batch_id")
    s.add_argument("-o", "--output", type=Path, required=True)
    s.add_argument("--errors", action="store_true", help="the error file instead")
    s = bsub.add_parser("cancel", help="cancel a batch (its running lines end first)")
    s.add_argument("batch_id")


def batch_command(args: argparse.Namespace, settings: object) -> int:
    """Run one `inferq batch` subcommand; 0 when it did what was asked."""
    try:
        if args.batch_command == "submit" and not args.file.is_file():
            raise BatchCliError(f"{args.file} is not a file")
        return asyncio.run(_run(args))
    except BatchCliError as exc:
        print(f"inferq batch: {exc}", file=sys.stderr)
        return 1
    except aiohttp.ClientError as exc:
        print(f"inferq batch: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        return Path(args.token_file).read_text().strip()
    token = os.environ.get("INFERQ_TOKEN", "").strip()
    if not token:
        raise BatchCliError("no token: set INFERQ_TOKEN or pass --token-file")
    return token


async def _run(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {_token(args)}"}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)
    async with aiohttp.ClientSession(
        args.url.rstrip("/"), headers=headers, timeout=timeout
    ) as http:
        command = args.batch_command
        if command == "submit":
            batch = await _submit(http, args)
            print(batch["id"])
            if args.wait:
                batch = await _follow(http, batch["id"])
                return 0 if batch["status"] == "completed" else 1
            return 0
        if command == "status":
            _show(await _call(http, "GET", f"/v1/batches/{args.batch_id}"))
            return 0
        if command == "cancel":
            _show(await _call(http, "POST", f"/v1/batches/{args.batch_id}/cancel"))
            return 0
        return await _download(http, args)


async def _call(http: aiohttp.ClientSession, method: str, path: str, **kw: Any) -> Any:
    async with http.request(method, path, **kw) as r:
        body = await r.json(content_type=None)
        if r.status >= 400:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise BatchCliError(f"{method} {path}: HTTP {r.status}: {error.get('message', body)}")
        return body


async def _submit(http: aiohttp.ClientSession, args: argparse.Namespace) -> Any:
    path: Path = args.file
    metadata = dict(item.split("=", 1) for item in args.metadata if "=" in item)
    with path.open("rb") as f:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", f, filename=path.name, content_type="application/jsonl")
        uploaded = await _call(http, "POST", "/v1/files", data=form)
    print(f"uploaded {path} as {uploaded['id']} ({uploaded['bytes']} bytes)", file=sys.stderr)
    return await _call(
        http,
        "POST",
        "/v1/batches",
        json={
            "input_file_id": uploaded["id"],
            "endpoint": args.endpoint,
            "completion_window": args.window,
            "metadata": metadata or None,
        },
    )


async def _follow(http: aiohttp.ClientSession, batch_id: str) -> Any:
    started = time.monotonic()
    while True:
        batch = await _call(http, "GET", f"/v1/batches/{batch_id}")
        print("\r" + progress(batch, time.monotonic() - started), end="", file=sys.stderr)
        if batch["status"] in ENDED:
            print(file=sys.stderr)
            _show(batch)
            return batch
        await asyncio.sleep(POLL_S)  # the polling period of a client following a batch


def progress(batch: dict[str, Any], elapsed_s: float, width: int = 30) -> str:
    """One line: a bar of the lines ended, the counts, the status and the time spent."""
    counts = batch.get("request_counts") or {}
    total, done = counts.get("total", 0), counts.get("completed", 0) + counts.get("failed", 0)
    filled = int(width * done / total) if total else 0
    bar = "#" * filled + "." * (width - filled)
    return (
        f"[{bar}] {done}/{total} ({counts.get('failed', 0)} failed) "
        f"{batch['status']} {elapsed_s:.0f}s"
    )


def _show(batch: dict[str, Any]) -> None:
    counts = batch.get("request_counts") or {}
    print(f"{batch['id']} {batch['status']} total={counts.get('total', 0)} "
          f"completed={counts.get('completed', 0)} failed={counts.get('failed', 0)}")  # fmt: skip
    for name in ("output_file_id", "error_file_id"):
        if batch.get(name):
            print(f"  {name}: {batch[name]}")
    for error in ((batch.get("errors") or {}).get("data") or [])[:20]:
        print(f"  line {error.get('line')}: {error.get('code')}: {error.get('message')}")


async def _download(http: aiohttp.ClientSession, args: argparse.Namespace) -> int:
    batch = await _call(http, "GET", f"/v1/batches/{args.batch_id}")
    file_id = batch["error_file_id" if args.errors else "output_file_id"]
    if not file_id:
        which = "error" if args.errors else "output"
        raise BatchCliError(f"batch {args.batch_id} ({batch['status']}) has no {which} file")
    written = 0
    async with http.get(f"/v1/files/{file_id}/content") as r:
        if r.status >= 400:
            raise BatchCliError(f"downloading {file_id}: HTTP {r.status}")
        with args.output.open("wb") as out:
            async for piece in r.content.iter_chunked(1 << 16):
                out.write(piece)
                written += len(piece)
    print(f"wrote {written} bytes to {args.output}", file=sys.stderr)
    return 0
