"""Where an HTTP/1.1 request ends, worked out as its bytes arrive.

The worker's event loop (service/worker.py) reads every request into memory before a request thread
sees it, so that a client sending slowly costs a socket and a buffer, not a thread. To know when to
hand a request over it needs only the end of the header block, then the body's length
(Content-Length) or the end of its chunked encoding. Everything else (the request line, each header's
syntax and size, conflicting lengths) is left to gunicorn's own parser, which reads the buffered
bytes in the request thread and answers what it refuses with its usual 400: a request whose framing
this module cannot make out is handed over as it stands, to be refused there.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

CRLF = b"\r\n"
CRLF_TEXT = "\r\n"
HEADER_END = b"\r\n\r\n"
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")  # as gunicorn reads it: hex digits only, no sign or 0x
CHUNKED_OVERHEAD = 64 << 10  # chunked framing a body may add to its size before it counts as too large


class Verdict(enum.Enum):
    NEED_MORE = "need more"  # keep reading
    COMPLETE = "complete"  # hand the request to a thread
    HEADERS_TOO_LARGE = "headers too large"  # answer 431 from the loop
    BODY_TOO_LARGE = "body too large"  # answer 413 from the loop


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int  # the largest header block gunicorn's limits let through
    max_body_bytes: int  # MAX_BODY_BYTES: the app refuses larger bodies anyway
    max_line_bytes: int  # gunicorn's limit on one header field, which it also applies to a chunk-size line


class PendingRequest:
    """One request's bytes so far. `feed` returns what to do next; once it says COMPLETE,
    `request_bytes()` is the request as gunicorn should read it, and `leftover()` whatever the client
    pipelined behind it."""

    def __init__(self, limits: Limits, started: float) -> None:
        self.limits = limits
        self.buffer = bytearray()
        self.started = started  # monotonic time of the first byte (or of the connection)
        self.headers_done_at: float | None = None  # when the header block ended; the body's deadline runs from here
        self.header_end = -1  # offset just past the blank line
        self.end = -1  # offset just past the request, once known
        self.chunked = False
        self.chunk_cursor = 0  # next chunk-size line, when chunked
        self.trailers_from = -1  # after the last chunk: where to look for the end of the trailers
        self.chunked_body_bytes = 0
        self.expects_continue = False  # the client waits for "100 Continue" before it sends the body
        self.continue_sent = False
        self.method = b""
        self.path = b""
        self.http_10 = False
        self.wants_close = False  # `Connection: close`, or HTTP/1.0 without keep-alive

    @property
    def in_body(self) -> bool:
        return self.header_end >= 0

    def feed(self, data: bytes, now: float) -> Verdict:
        self.buffer += data
        if not self.in_body:
            found = self.buffer.find(HEADER_END, max(0, len(self.buffer) - len(data) - 3))
            if found < 0:
                if len(self.buffer) > self.limits.max_header_bytes:
                    return Verdict.HEADERS_TOO_LARGE
                return Verdict.NEED_MORE
            self.header_end = found + len(HEADER_END)
            self.headers_done_at = now
            verdict = self._read_framing(bytes(self.buffer[: self.header_end]))
            if verdict is not Verdict.NEED_MORE:
                return verdict
        if self.chunked:
            return self._scan_chunks()
        return Verdict.COMPLETE if len(self.buffer) >= self.end else Verdict.NEED_MORE

    def _read_framing(self, head: bytes) -> Verdict:
        """From the header block: the request's end, or that it needs chunk scanning."""
        lines = head[: -len(HEADER_END)].split(CRLF)
        request_line = lines[0].split(b" ")
        if len(request_line) == 3:
            self.method, self.path = request_line[0], request_line[1].partition(b"?")[0]
            self.http_10 = request_line[2] == b"HTTP/1.0"
        lengths: list[bytes] = []
        encodings: list[bytes] = []
        connection: set[bytes] = set()
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                lengths.append(value.strip())
            elif name == b"transfer-encoding":
                encodings.append(value.strip().lower())
            elif name == b"expect" and value.strip().lower() == b"100-continue":
                self.expects_continue = not self.http_10  # HTTP/1.0 clients get no 1xx answers
            elif name == b"connection":
                connection.update(token.strip().lower() for token in value.split(b","))
        self.wants_close = b"close" in connection or (self.http_10 and b"keep-alive" not in connection)
        if encodings:
            if lengths or not encodings[-1].endswith(b"chunked"):
                self.end = self.header_end  # malformed or unsupported framing: gunicorn refuses it
                return Verdict.COMPLETE
            self.chunked = True
            self.chunk_cursor = self.header_end
            return Verdict.NEED_MORE
        if not lengths:
            self.end = self.header_end
            return Verdict.COMPLETE
        if len(lengths) > 1 or not lengths[0].isdigit():
            self.end = self.header_end  # gunicorn refuses it with a 400
            return Verdict.COMPLETE
        length = int(lengths[0])
        if length > self.limits.max_body_bytes:
            return Verdict.BODY_TOO_LARGE
        self.end = self.header_end + length
        return Verdict.NEED_MORE

    def _scan_chunks(self) -> Verdict:
        buffer = self.buffer
        if len(buffer) - self.header_end > 2 * self.limits.max_body_bytes + CHUNKED_OVERHEAD:
            return Verdict.BODY_TOO_LARGE  # however it is chunked, no body this large is wanted
        if self.trailers_from >= 0:
            return self._scan_trailers()
        while True:
            line_end = buffer.find(CRLF, self.chunk_cursor)
            if line_end < 0:
                if len(buffer) - self.chunk_cursor > self.limits.max_line_bytes:
                    return self._malformed()
                return Verdict.NEED_MORE
            size_field = bytes(buffer[self.chunk_cursor : line_end]).split(b";")[0].strip(b" \t")
            if not CHUNK_SIZE.fullmatch(size_field):
                return self._malformed()
            size = int(size_field, 16)
            if size == 0:  # the last chunk: then optional trailer lines and a blank line
                self.trailers_from = line_end
                return self._scan_trailers()
            if self.chunked_body_bytes + size > self.limits.max_body_bytes:
                return Verdict.BODY_TOO_LARGE
            after = line_end + len(CRLF) + size + len(CRLF)
            if len(buffer) < after:
                return Verdict.NEED_MORE
            self.chunked_body_bytes += size
            self.chunk_cursor = after

    def _scan_trailers(self) -> Verdict:
        found = self.buffer.find(HEADER_END, self.trailers_from)
        if found >= 0:
            self.end = found + len(HEADER_END)
            return Verdict.COMPLETE
        self.trailers_from = max(self.trailers_from, len(self.buffer) - len(HEADER_END))  # look only at new bytes
        if len(self.buffer) - self.chunk_cursor > self.limits.max_header_bytes:
            return Verdict.HEADERS_TOO_LARGE
        return Verdict.NEED_MORE

    def _malformed(self) -> Verdict:
        self.end = len(self.buffer)  # gunicorn's parser finds the fault in what is here
        return Verdict.COMPLETE

    def request_bytes(self) -> bytes:
        """The request without an `Expect: 100-continue` line: the body is all here, so gunicorn must not
        send a 100 Continue (a second one, or one to HTTP/1.0); the rest exactly as received."""
        head = bytes(self.buffer[: self.header_end]) if self.in_body else bytes(self.buffer)
        if self.in_body and b"100-continue" in head.lower():
            kept = [
                line
                for line in head.split(CRLF)
                if not line.lower().replace(b" ", b"").replace(b"\t", b"").startswith(b"expect:100-continue")
            ]
            head = CRLF.join(kept)
        return head + bytes(self.buffer[self.header_end : self.end] if self.in_body else b"")

    def leftover(self) -> bytes:
        return bytes(self.buffer[self.end :]) if self.end >= 0 else b""
