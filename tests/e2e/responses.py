"""Reading what the daemon answers, as the e2e clients and the checker do: the text and the
writer of an OpenAI object, and the events of a native SSE stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx


def chunk_text(data: dict[str, Any]) -> str:
    """The text of one OpenAI chunk (chat delta or completion text)."""
    return _first_choice_text(data, "delta")


def writer(body: dict[str, Any] | None) -> str | None:
    """Who wrote an OpenAI object: its ``system_fingerprint`` (the echo backend names the
    attempt there); the checker compares it with the stored result's."""
    value = (body or {}).get("system_fingerprint")
    return value if isinstance(value, str) else None


def response_text(body: dict[str, Any] | None) -> str:
    """The text of a final OpenAI response (chat message or completion text)."""
    return _first_choice_text(body or {}, "message")


def _first_choice_text(body: dict[str, Any], chat_part: str) -> str:
    """The first choice's ``chat_part`` content (a chat object), else its text (a completion)."""
    choice = (body.get("choices") or [{}])[0]
    part = choice.get(chat_part)
    if isinstance(part, dict):
        return str(part.get("content") or "")
    return str(choice.get("text") or "")


async def sse_events(resp: httpx.Response) -> AsyncIterator[tuple[str, str, str | None]]:
    """(event, data, id) for each SSE event of a response; comments are skipped."""
    event, eid = "message", None
    data: list[str] = []
    async for line in resp.aiter_lines():
        if line == "":
            if data:
                yield event, "\n".join(data), eid
            event, data, eid = "message", [], None
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                eid = value
