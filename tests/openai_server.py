"""A real local HTTP server that speaks the OpenAI chat-completions protocol, for judge tests.

It serves scripted top log-probabilities (or plain text, like a reasoning model) and injects faults on
request: HTTP 429, HTTP 500, a stalled reply (client timeout), malformed JSON, and replies without
log-probabilities. Every request is recorded (body, Authorization header) and counted, so tests can
assert how many calls a judge made and exactly what it sent.

Usage::

    with ChatServer() as server:              # picks a free port on 127.0.0.1
        server.responder = lambda body: Reply(top=[("85", 0.9), ("80", 0.1)])
        server.fault = lambda body, hit: "429" if hit < 2 else None
        ... OpenAI(base_url=server.base_url, api_key="k") ...
        assert server.hits == 3

Also runnable as a process (``python tests/openai_server.py PORTFILE``) so a test can kill a judge job
while the server lives in the test process; the in-process form is what the tests use.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "timeout", "malformed", "no_logprobs")
ANSWER_RE = re.compile(r"<cem_answer>\n(.*)\n</cem_answer>", re.DOTALL)


@dataclass
class Reply:
    """One scripted completion.

    top: (token, probability) pairs for the first output token's top log-probabilities; the most
        probable token is also the reply text unless ``content`` is given. Probabilities need not sum to 1
        (the rest of the mass is "elsewhere", as with a real top-k list).
    content: the message text. With ``logprobs=False`` the reply carries no log-probabilities at all
        (a reasoning model, or an endpoint that does not support them).
    """

    top: list[tuple[str, float]] = field(default_factory=lambda: [("50", 1.0)])
    content: str | None = None
    logprobs: bool = True
    finish_reason: str | None = None  # default: "length" for a one-token request, else "stop"


def prompt_of(body: dict[str, Any]) -> str:
    """The judge prompt: the content of the last user message."""
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    return str(users[-1]["content"]) if users else ""


def answer_of(body: dict[str, Any]) -> str:
    """The (escaped) answer between the judge prompt's answer tags, or '' when absent."""
    matches = ANSWER_RE.findall(prompt_of(body))
    return matches[-1] if matches else ""


def default_responder(body: dict[str, Any]) -> Reply:
    return Reply(top=[("50", 1.0)])


class ChatServer:
    """Threaded chat-completions server on 127.0.0.1. Thread-safe counters; start/stop or use as a context."""

    def __init__(self, *, stall_s: float = 2.0, delay_s: float = 0.0) -> None:
        self.responder: Callable[[dict[str, Any]], Reply] = default_responder
        # fault(body, hit_index) -> one of FAULTS or None; hit_index counts from 0 over all requests.
        self.fault: Callable[[dict[str, Any], int], str | None] = lambda body, hit: None
        self.stall_s = stall_s  # how long a "timeout" fault stalls before answering
        self.delay_s = delay_s  # added to every reply (to make kill-mid-way tests deterministic)
        self._lock = threading.Lock()
        self.hits = 0
        self.requests: list[dict[str, Any]] = []  # parsed bodies, in arrival order
        self.auth_headers: list[str] = []
        self.faults_served: Counter[str] = Counter()
        self.completed: list[str] = []  # answers whose successful reply was fully sent
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        assert self._httpd is not None
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ChatServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in one send: separate small writes meet the client's delayed ACK
            # (Nagle) and cost ~40 ms per request.
            wbufsize = 1 << 16
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                return

            def do_POST(self) -> None:
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_counts(self) -> None:
        with self._lock:
            self.hits = 0
            self.requests.clear()
            self.auth_headers.clear()
            self.faults_served.clear()
            self.completed.clear()

    # ------------------------------------------------------------------ protocol
    def _send(
        self, handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        try:
            handler.wfile.write(body)
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) or was killed
            pass

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        if not handler.path.rstrip("/").endswith("/chat/completions"):
            self._send(handler, 404, b'{"error": {"message": "not found"}}')
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(handler, 400, b'{"error": {"message": "bad json"}}')
            return
        with self._lock:
            hit = self.hits
            self.hits += 1
            self.requests.append(body)
            self.auth_headers.append(handler.headers.get("Authorization", ""))
        fault = self.fault(body, hit)
        if fault is not None:
            with self._lock:
                self.faults_served[fault] += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if fault == "429":
            err = {"error": {"message": "rate limited", "type": "rate_limit_error"}}
            self._send(handler, 429, json.dumps(err).encode(), {"Retry-After": "0"})
            return
        if fault == "500":
            self._send(handler, 500, b'{"error": {"message": "internal error", "type": "server_error"}}')
            return
        if fault == "timeout":
            time.sleep(self.stall_s)
        if fault == "malformed":
            self._send(handler, 200, b'{"id": "chatcmpl-x", "choices": [{"index": 0, "message": ')
            return
        reply = self.responder(body)
        if fault == "no_logprobs":
            reply = Reply(top=reply.top, content=reply.content, logprobs=False, finish_reason=reply.finish_reason)
        self._send(handler, 200, json.dumps(self._completion(body, reply)).encode())
        with self._lock:
            self.completed.append(answer_of(body))

    @staticmethod
    def _completion(body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        top = sorted(reply.top, key=lambda tp: -tp[1])
        content = reply.content if reply.content is not None else (top[0][0] if top else "")
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": reply.finish_reason
            or ("length" if body.get("max_tokens") == 1 or body.get("max_completion_tokens") == 1 else "stop"),
            "logprobs": None,
        }
        want = bool(body.get("logprobs"))
        if reply.logprobs and want and top:
            k = int(body.get("top_logprobs") or 0)

            def entry(token: str, p: float) -> dict[str, Any]:
                return {"token": token, "logprob": math.log(p) if p > 0 else -9999.0, "bytes": list(token.encode())}

            first = entry(*top[0])
            first["top_logprobs"] = [entry(t, p) for t, p in top[:k]]
            choice["logprobs"] = {"content": [first], "refusal": None}
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "test-judge"),
            "choices": [choice],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
        }


if __name__ == "__main__":  # a standalone server for manual runs: prints its base URL, serves 50s
    import sys

    with ChatServer() as srv:
        print(srv.base_url, flush=True)
        if len(sys.argv) > 1:
            with open(sys.argv[1], "w") as fh:
                fh.write(srv.base_url)
        time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 50.0)


def kill_child_mid_run(server: ChatServer, code: str, *, after_completed: int = 8) -> None:
    """Run `code` in a child Python process and SIGKILL it once the server has answered
    `after_completed` requests: a job killed mid-way, for the resume tests."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while len(server.completed) < after_completed and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
