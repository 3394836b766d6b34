"""A tiny OpenAI-compatible server for tests: streams a fixed reply, or fails, or hangs.

Run as its own process: ``python tests/fake_upstream.py --port N --mode ok|fail|hang|reject``
(reject: a 400 with REJECT_MESSAGE, as a server refusing a request's parameters). Standard
library only, so it starts fast and shares nothing with the code under test. It prints
``ready <port>`` on stdout once it accepts connections.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPLY = "The quick brown fox jumps over the lazy dog"
USAGE = {"prompt_tokens": 1, "completion_tokens": 9, "total_tokens": 10}
FAIL_MESSAGE = "the fake upstream exploded on purpose"
REJECT_MESSAGE = "max_tokens must be at most 4096"


class Handler(BaseHTTPRequestHandler):
    server: FakeUpstream
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output quiet

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "no such route", "type": "not_found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        key = self.server.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._json(401, {"error": {"message": "bad api key", "type": "auth_error"}})
            return
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            self._json(404, {"error": {"message": "no such route", "type": "not_found"}})
            return
        mode = self.server.mode
        if mode == "fail":
            self._json(500, {"error": {"message": FAIL_MESSAGE, "type": "server_error"}})
            return
        if mode == "reject":
            self._json(400, {"error": {"message": REJECT_MESSAGE, "type": "invalid_request"}})
            return
        if mode == "hang":
            time.sleep(3600)
            return
        chat = self.path == "/v1/chat/completions"
        if body.get("stream"):
            self._stream(body, chat)
        else:
            # A plain answer takes as long to generate as the stream would.
            time.sleep(self.server.delay_s * len(REPLY.split()))
            self._json(200, _response(body, chat))

    def _stream(self, body: dict[str, Any], chat: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        words = REPLY.split()
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            last = i == len(words) - 1
            self._event(json.dumps(_chunk(body, chat, piece, "stop" if last else None)))
            if self.server.delay_s:
                time.sleep(self.server.delay_s)
        if (body.get("stream_options") or {}).get("include_usage"):
            # OpenAI's last chunk when asked for usage: no choices, the usage.
            tail = _chunk(body, chat, "", None)
            self._event(json.dumps({**tail, "choices": [], "usage": USAGE}))
        self._event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _event(self, data: str) -> None:
        payload = f"data: {data}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        self.wfile.flush()

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _chunk(body: dict[str, Any], chat: bool, text: str, finish: str | None) -> dict[str, Any]:
    head = {"id": "fake-1", "created": 1, "model": body.get("model", "fake")}
    if chat:
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        return {**head, "object": "chat.completion.chunk", "choices": [choice]}
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {**head, "object": "text_completion", "choices": [choice]}


def _response(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    head = {"id": "fake-1", "created": 1, "model": body.get("model", "fake")}
    usage = USAGE
    if chat:
        message = {"role": "assistant", "content": REPLY}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": REPLY, "finish_reason": "stop", "logprobs": None}
    return {**head, "object": "text_completion", "choices": [choice], "usage": usage}


class FakeUpstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, mode: str, delay_s: float, api_key: str | None) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.mode = mode
        self.delay_s = delay_s
        self.api_key = api_key


def serve_in_thread(
    mode: str = "ok", delay_s: float = 0.0, api_key: str | None = None
) -> FakeUpstream:
    """Start one in this process (for unit tests); stop it with ``shutdown()``."""
    server = FakeUpstream(0, mode, delay_s, api_key)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mode", choices=["ok", "fail", "hang", "reject"], default="ok")
    parser.add_argument("--delay", type=float, default=0.01, help="seconds between chunks")
    parser.add_argument("--api-key", help="require this bearer token")
    args = parser.parse_args()
    server = FakeUpstream(args.port, args.mode, args.delay, args.api_key)
    print(f"ready {server.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
