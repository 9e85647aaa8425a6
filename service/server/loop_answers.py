"""The answers the worker's event loop writes itself, without the app (400, 408, 413, 503, ...), in the
API's JSON error envelope; all but the overload 503 on a whole request close the connection."""

from __future__ import annotations

import json

from service.api.schemas.common import ErrorResponse


def error_answer(status: int, reason: str, message: str, type_: str, code: str, *, head_only: bool = False,
                  headers: str = "", protocol: bool = False, close: bool = True) -> bytes:  # fmt: skip
    """A whole HTTP answer carrying the API's error envelope (the app's ErrorResponse), for the answers
    the event loop gives without the app, closing the connection unless `close` is False; `headers`:
    extra lines, each ending CRLF. With `protocol` (a /v2 path), the Open Inference Protocol's
    `{"error": message}` instead."""
    envelope = {"error": message} if protocol else ErrorResponse.of(message, type_, code=code)
    body = json.dumps(envelope).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{headers}Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else body)


class CapturedAnswer:
    """Stands in for the client socket while gunicorn writes its error page, to learn its status line."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float | None:
        return None

    def setblocking(self, flag: bool) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.data += data

    send = sendall

    def status_line(self) -> str:
        return self.data.split(b"\r\n", 1)[0].decode("latin-1").removeprefix("HTTP/1.1 ")
