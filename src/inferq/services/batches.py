"""BatchService and FileService: OpenAI's Batch API on inferq's own queue.

- **Files** are stored in PostgreSQL in parts of about a MiB as they stream in (``Upload``)
  and streamed out part by part; a replica holds one part at a time whatever the file's size.
  A file is visible only once its upload finished; over ``INFERQ_MAX_FILE_BYTES`` the upload is
  refused (413) and what was stored is deleted.
- **A batch** is created ``validating``; the batch sweep (``BatchKeeper``, run by the
  maintenance leader) validates the whole input file before any task exists, then inserts a
  task per line and moves it ``in_progress`` in one transaction, or fails it with OpenAI's
  ``errors`` (line numbers) and no task. When every line ended it writes the output and error
  files and completes the batch, again in one transaction (see inferq.db.batches), so a
  replica that dies midway leaves nothing half done. Past the completion window unfinished
  lines are cancelled and reported ``batch_expired``; a cancel stops the lines no worker runs
  yet, lets the running ones end, and writes the partial output.
- Request counts are read live from the lines' tasks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import structlog

from inferq.db.batches import BatchRepository
from inferq.db.files import FileRepository
from inferq.db.llms import LlmRepository
from inferq.domain.batch import ENDPOINTS, Batch, Counts, Line, StoredFile
from inferq.domain.records import ApiToken, Llm
from inferq.errors import FileNotFound, InvalidRequest, LimitExceeded
from inferq.settings import Settings

log = structlog.get_logger(__name__)

WINDOWS = {"24h": 24 * 3600.0}
PAGE_LINES = 2000
MAX_ERRORS = 100  # a bad file is reported with at most this many line errors


class FileTooLarge(LimitExceeded):
    """The file is larger than INFERQ_MAX_FILE_BYTES."""


class FileService:
    """Upload, list, read and delete the caller's files."""

    def __init__(self, files: FileRepository, settings: Settings) -> None:
        self.files = files
        self.settings = settings

    async def begin(self, token: ApiToken, filename: str) -> Upload:
        """An upload of ``filename``; write it piece by piece, then ``finish`` or ``abort``."""
        name = (filename or "upload.jsonl")[:255]
        stored = await self.files.create(token.owner_id, "batch", name)
        return Upload(self.files, stored, self.settings.max_file_bytes, self.settings)

    async def get(self, token: ApiToken, file_id: str) -> StoredFile:
        return await self.files.get(file_id, token.owner_id)

    async def list(
        self, token: ApiToken, *, purpose: str | None, after: str | None, limit: int, order: str
    ) -> list[StoredFile]:
        return await self.files.list_files(
            token.owner_id, purpose=purpose, after=after, limit=limit, ascending=order == "asc"
        )

    async def content(
        self, token: ApiToken, file_id: str
    ) -> tuple[StoredFile, AsyncIterator[bytes]]:
        """The file and its bytes, part by part (FileNotFound before the first byte)."""
        stored = await self.files.get(file_id, token.owner_id)
        return stored, self.files.content(stored.id)

    async def delete(self, token: ApiToken, file_id: str) -> None:
        if not await self.files.delete(file_id, token.owner_id):
            raise FileNotFound(f"file {file_id!r} not found")


@dataclass
class Upload:
    """One file streaming in: ``write`` buffers up to a part, stores full parts at a line
    boundary; ``finish`` stores the rest and makes the file visible."""

    files: FileRepository
    stored: StoredFile
    max_bytes: int
    settings: Settings
    size: int = 0
    lines: int = 0
    parts: int = 0
    ends_with_newline: bool = True
    buffer: bytearray = field(default_factory=bytearray)

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise FileTooLarge(
                f"the file is larger than {self.max_bytes} bytes (INFERQ_MAX_FILE_BYTES)"
            )
        if data:
            self.lines += data.count(b"\n")
            self.ends_with_newline = data.endswith(b"\n")
        self.buffer += data
        part_bytes = self.settings.file_part_bytes
        while len(self.buffer) >= part_bytes:
            cut = self.buffer.rfind(b"\n", 0, part_bytes * 2) + 1 or len(self.buffer)
            await self.files.append(self.stored.id, self.parts, bytes(self.buffer[:cut]))
            del self.buffer[:cut]
            self.parts += 1

    async def finish(self, purpose: str) -> StoredFile:
        if purpose != "batch":
            raise InvalidRequest(
                f"purpose {purpose!r} is not supported; inferq stores files for `batch`",
                param="purpose",
            )
        if self.buffer:
            await self.files.append(self.stored.id, self.parts, bytes(self.buffer))
            self.buffer.clear()
        lines = self.lines + (0 if self.ends_with_newline or not self.size else 1)
        return await self.files.finish(self.stored.id, self.size, lines)

    async def abort(self) -> None:
        """Drop what was stored (best effort: GC removes a stale upload anyway)."""
        try:
            await self.files.delete(self.stored.id, self.stored.owner_id)
        except Exception as exc:
            log.warning("upload_abort_failed", file_id=self.stored.id, error=str(exc))


class BatchService:
    """Create, read, list and cancel the caller's batches."""

    def __init__(self, batches: BatchRepository, files: FileRepository, settings: Settings):
        self.batches = batches
        self.files = files
        self.settings = settings

    async def create(
        self,
        token: ApiToken,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
    ) -> tuple[Batch, Counts]:
        if endpoint not in ENDPOINTS:
            raise InvalidRequest(
                f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint"
            )
        if completion_window not in WINDOWS:
            raise InvalidRequest("completion_window must be `24h`", param="completion_window")
        try:
            stored = await self.files.get(input_file_id, token.owner_id)
        except FileNotFound:
            raise InvalidRequest(
                f"input_file_id {input_file_id!r} is not one of your files",
                param="input_file_id",
            ) from None
        if stored.purpose != "batch":
            raise InvalidRequest("the input file's purpose must be `batch`", param="input_file_id")
        if stored.lines > self.settings.max_batch_requests:
            raise InvalidRequest(
                f"the input file has {stored.lines} requests; a batch takes at most "
                f"{self.settings.max_batch_requests} (INFERQ_MAX_BATCH_REQUESTS)",
                param="input_file_id",
            )
        batch = await self.batches.create(
            token.owner_id,
            endpoint,
            input_file_id,
            completion_window,
            WINDOWS[completion_window],
            metadata,
        )
        return batch, Counts(0, 0, 0)

    async def get(self, token: ApiToken, batch_id: str) -> tuple[Batch, Counts]:
        batch = await self.batches.get(batch_id, token.owner_id)
        return batch, (await self.batches.counts([batch]))[batch.id]

    async def list(
        self, token: ApiToken, *, after: str | None, limit: int
    ) -> list[tuple[Batch, Counts]]:
        found = await self.batches.list_batches(token.owner_id, after=after, limit=limit)
        counts = await self.batches.counts(found)
        return [(b, counts[b.id]) for b in found]

    async def cancel(self, token: ApiToken, batch_id: str) -> tuple[Batch, Counts]:
        batch = await self.batches.cancel(batch_id, token.owner_id)
        return batch, (await self.batches.counts([batch]))[batch.id]


class BatchKeeper:
    """The batch sweep: one ``run_once`` moves every open batch as far as it can go."""

    name = "batches"

    def __init__(
        self,
        batches: BatchRepository,
        files: FileRepository,
        llms: LlmRepository,
        settings: Settings,
    ) -> None:
        self.batches = batches
        self.files = files
        self.llms = llms
        self.settings = settings

    async def run_once(self, now: datetime | None = None) -> int:
        """Advance the open batches; how many changed status. Stale uploads are removed."""
        await self.files.gc_uploads(self.settings.upload_timeout_s, now)
        moved = 0
        for batch in await self.batches.open():
            moved += int(await self._advance(batch, now))
        return moved

    async def _advance(self, batch: Batch, now: datetime | None) -> bool:
        if batch.status == "validating":
            return await self._validate(batch)
        if batch.status == "cancelling":
            await self.batches.stop_lines(
                batch.id, ["pending", "claimed"], "the batch was cancelled"
            )
            if await self.batches.unfinished(batch.id, ["pending", "claimed", "running"]):
                return False  # running lines end first
            return await self._finalize(batch, "cancelling", "cancelled")
        if batch.status == "finalizing":
            return await self._finalize(batch, "finalizing", "completed")
        expired = (now or datetime.now(batch.expires_at.tzinfo)) >= batch.expires_at
        if expired:
            why = "the batch's completion window ended"
            await self.batches.stop_lines(batch.id, ["pending", "claimed", "running"], why)
            return await self._finalize(batch, "in_progress", "expired")
        if await self.batches.unfinished(batch.id, ["pending", "claimed", "running"]):
            return False
        finalizing = await self.batches.move(batch.id, "in_progress", "finalizing")
        return finalizing is not None and await self._finalize(
            finalizing, "finalizing", "completed"
        )

    async def _finalize(self, batch: Batch, old: str, new: str) -> bool:
        ended = await self.batches.finalize(batch, old, new)
        if ended is not None:
            log.info("batch_ended", batch_id=batch.id, status=new, output=ended.output_file_id)
        return ended is not None

    async def _validate(self, batch: Batch) -> bool:
        registry = {llm.name: llm for llm in await self.llms.all()}
        errors = await self._errors(batch, registry)
        if errors:
            failed = await self.batches.fail(batch.id, errors)
            log.info("batch_failed", batch_id=batch.id, errors=len(errors))
            return failed is not None
        started = await self.batches.start(
            batch, self._pages(batch, registry), self.settings.max_attempts
        )
        if started is not None:
            log.info("batch_started", batch_id=batch.id, lines=started.total)
        return started is not None

    async def _errors(self, batch: Batch, registry: dict[str, Llm]) -> list[dict[str, Any]]:
        """Every problem of the input file, by line number (at most MAX_ERRORS)."""
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        count = 0
        async for number, raw in _lines(self.files, batch.input_file_id):
            count += 1
            problem = _check(raw, batch.endpoint, registry, seen)
            if problem is not None:
                code, message, param = problem
                errors.append({"code": code, "message": message, "param": param, "line": number})
                if len(errors) >= MAX_ERRORS:
                    break
        if count == 0 and not errors:
            errors.append({"code": "empty_file", "message": "the input file has no request",
                           "param": None, "line": None})  # fmt: skip
        if count > self.settings.max_batch_requests:
            errors.append({"code": "too_many_requests", "param": None, "line": None,
                           "message": f"a batch takes at most {self.settings.max_batch_requests} "
                                      "requests (INFERQ_MAX_BATCH_REQUESTS)"})  # fmt: skip
        return errors

    async def _pages(self, batch: Batch, registry: dict[str, Llm]) -> AsyncIterator[list[Line]]:
        """The validated lines as tasks to insert, a page at a time."""
        page: list[Line] = []
        async for _, raw in _lines(self.files, batch.input_file_id):
            doc = orjson.loads(raw)
            llm = registry[doc["body"]["model"]]
            page.append(Line(doc["custom_id"], doc["body"], llm.pool_name, llm.name, llm.model,
                             llm.tier))  # fmt: skip
            if len(page) >= PAGE_LINES:
                yield page
                page = []
        if page:
            yield page


async def _lines(files: FileRepository, file_id: str) -> AsyncIterator[tuple[int, bytes]]:
    """The non-blank lines of a stored file with their 1-based numbers, streamed."""
    rest = b""
    number = 0
    async for part in files.content(file_id):
        chunk = rest + part
        *complete, rest = chunk.split(b"\n")
        for raw in complete:
            number += 1
            if raw.strip():
                yield number, raw
    if rest.strip():
        yield number + 1, rest


def _check(
    raw: bytes, endpoint: str, registry: dict[str, Llm], seen: set[str]
) -> tuple[str, str, str | None] | None:
    """(code, message, param) of what is wrong with one line, or None."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "invalid_json_line", "this line is not valid JSON", None
    if not isinstance(doc, dict):
        return "invalid_request", "a line must be a JSON object", None
    custom_id = doc.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "missing_required_parameter", "`custom_id` must be a non-empty string", "custom_id"
    if custom_id in seen:
        return "duplicate_custom_id", f"custom_id {custom_id[:100]!r} is used twice", "custom_id"
    seen.add(custom_id)
    if doc.get("method") != "POST":
        return "invalid_method", "`method` must be POST", "method"
    if doc.get("url") != endpoint:
        return "mismatched_url", f"`url` must be the batch's endpoint {endpoint}", "url"
    body = doc.get("body")
    if not isinstance(body, dict):
        return "invalid_request", "`body` must be a JSON object", "body"
    model = body.get("model")
    if not isinstance(model, str) or model not in registry:
        return "model_not_found", f"model {str(model)[:100]!r} does not exist", "body.model"
    if body.get("stream"):
        return "invalid_request", "batch requests cannot stream", "body.stream"
    required = "messages" if endpoint == "/v1/chat/completions" else "prompt"
    if required not in body:
        return "missing_required_parameter", f"`body.{required}` is required", f"body.{required}"
    return None
