"""A multipart/form-data upload read as it arrives: python-multipart's streaming parser, the
file part handed on piece by piece (never held whole), the small text fields collected.

python-multipart calls back synchronously from ``write``; the callbacks only record events,
and the events are handled (awaiting the storage of each piece) between two reads of the
body, so a slow database slows the upload down instead of filling memory.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from inferq.api.errors import UnsupportedMediaType
from inferq.errors import InvalidRequest

MAX_FIELD_BYTES = 4096


class Sink(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def abort(self) -> None: ...


S = TypeVar("S", bound=Sink)


async def read_form(
    request: Request, file_field: str, begin: Callable[[str], Awaitable[S]]
) -> tuple[S, dict[str, str]]:
    """Stream the ``file_field`` part into the sink ``begin(filename)`` opens; the other fields
    as text. Raises UnsupportedMediaType, InvalidRequest; aborts the sink on any error."""
    media, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if media != b"multipart/form-data" or not boundary:
        raise UnsupportedMediaType(
            "upload a file as multipart/form-data (fields `file` and `purpose`)"
        )
    events: list[tuple[str, Any]] = []
    header: dict[str, bytes] = {}
    name = bytearray()
    value = bytearray()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.extend(data[start:end])

    def on_header_end() -> None:
        header[bytes(name).lower().decode("latin-1")] = bytes(value)
        name.clear()
        value.clear()

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(header.get("content-disposition", b""))
        events.append(("part", disposition))
        header.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        events.append(("data", data[start:end]))

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        },
    )
    sink: S | None = None
    fields: dict[str, str] = {}
    current: str | None = None
    text = bytearray()
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            for kind, data in events:
                if kind == "part":
                    if current is not None and current != file_field:
                        fields[current] = text.decode(errors="replace")
                    current = data.get(b"name", b"").decode("latin-1")
                    text.clear()
                    if current == file_field:
                        if sink is not None:
                            raise InvalidRequest("send one file per upload", param=file_field)
                        filename = data.get(b"filename", b"").decode("utf-8", errors="replace")
                        sink = await begin(filename)
                elif current == file_field and sink is not None:
                    await sink.write(data)
                elif len(text) + len(data) > MAX_FIELD_BYTES:
                    raise InvalidRequest(f"the form field {current!r} is too long", param=current)
                else:
                    text.extend(data)
            events.clear()
        parser.finalize()
        if current is not None and current != file_field:
            fields[current] = text.decode(errors="replace")
        if sink is None:
            raise InvalidRequest(f"the form has no `{file_field}` part", param=file_field)
        return sink, fields
    except BaseException:
        if sink is not None:
            await sink.abort()
        raise
