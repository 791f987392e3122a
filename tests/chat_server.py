"""A local OpenAI-compatible chat-completions server for tests: the real ``openai`` client talks
HTTP to it. Each test decides what it answers (``respond``); this module only serves.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: What ``respond`` returns: HTTP status, JSON body, extra response headers.
Reply = tuple[int, Any, Mapping[str, str]]
#: ``respond(path, request headers, JSON request body)``; called on the server's threads.
Respond = Callable[[str, Mapping[str, str], dict[str, Any]], Reply]


def chat_completion(
    model: str, content: str, usage: Mapping[str, int], **message: Any
) -> dict[str, Any]:
    """A ``chat.completion`` object with one finished choice (``message``: extra fields of the
    assistant message, e.g. ``reasoning_content``)."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content, **message},
            }
        ],
        "usage": dict(usage),
    }


class ChatServer:
    """Serves POST requests on 127.0.0.1 (a free port) from a background thread until
    :meth:`close`; ``url`` is the OpenAI base URL (``.../v1``)."""

    def __init__(self, respond: Respond) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, payload, headers = respond(self.path, self.headers, body)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

        class Server(ThreadingHTTPServer):
            # The default listen backlog (5) drops connections beyond it when many clients
            # connect at once, and each dropped SYN costs the client a 1 s retransmit.
            request_queue_size = 256
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
