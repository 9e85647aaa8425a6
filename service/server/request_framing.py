"""HTTP/1.1 requests read in the worker's event loop: each byte a client sends is read by exactly one parser.

The event loop (service/server/worker.py) reads every request whole before a request thread sees it, so that a
client sending slowly costs a socket and a buffer, not a thread. Where a request ends is decided here and
nowhere else: h11 parses the head (the request line and fields), and `BodyReader` the body that the head
announces (Content-Length, or chunked), keeping the payload only, never the chunked framing. The thread
gets a parsed request and its complete body and never reads the socket. With a second parser reading the
same bytes later, the two could disagree about where a request ends, and what one took for a body the
other would serve as a request. The body has a reader of its own because h11's builds an event object
per chunk, which made a body of small chunks many times dearer than the same body with a Content-Length
(docs/api.md gives the figures of `python -m benchmarks.chunked`).

On top of h11, refused here (each answered by the loop, which then closes the connection): head lines
ended by LF alone (at once, not at the deadline), obs-fold, control characters in fields, request lines
and fields over gunicorn's limits, a head over MAX_HEADER_BYTES, Content-Length beside Transfer-Encoding
or given twice or as a list, chunked HTTP/1.0, an Expect other than 100-continue (417), HTTP versions
other than 1.x, request targets in the wrong form for their method, chunk lines outside RFC 9112's
grammar, malformed or framing and routing fields in trailers, bodies over MAX_BODY_BYTES. gunicorn's own
header policy (repeated Host or Content-Type, names with `_`, the scheme set by a trusted proxy) applies
as before.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import h11
from gunicorn.http.errors import ParseException
from gunicorn.http.message import HeaderPolicy
from gunicorn.util import split_request_uri

from service.server.body_reader import CONTROL, BodyReader
from service.server.refusals import Refused

LEADING_EMPTY_LINES = re.compile(rb"(?:\r\n)*")  # RFC 9112 2.2: ignored before a request line
BARE_LF = re.compile(rb"(?<!\r)\n")
DIGITS = re.compile(rb"[0-9]+")


@dataclass(kw_only=True, frozen=True)
class Limits:
    max_header_bytes: int  # MAX_HEADER_BYTES: the request line and header fields together (431)
    max_request_line: int  # gunicorn's limit_request_line (414)
    max_field_bytes: int  # gunicorn's limit_request_field_size: one header line with its CRLF (431)
    max_fields: int  # gunicorn's limit_request_fields (431)
    max_body_bytes: int  # MAX_BODY_BYTES, the payload without its chunked framing (413)


class WSGIRequest(HeaderPolicy):
    """What gunicorn's wsgi.create, its Response and its access log read from one of its requests, for a
    request h11 parsed, with the whole body in `body`. Headers are (UPPER-NAME, value) as gunicorn keeps
    them; Content-Length is the body's real length, and Transfer-Encoding and a met Expect are left out."""

    _policy_expect_continue = False  # the loop has answered it

    def __init__(self, cfg: Any, peer: Any, method: str, uri: str, version: tuple[int, int],
                 fields: list[tuple[str, str]]) -> None:  # fmt: skip
        self.cfg, self.peer_addr, self.remote_addr = cfg, peer, peer
        self.method, self.uri, self.version = method, uri, version
        self.scheme = "https" if cfg.is_ssl else "http"
        self.must_close = False
        self._expected_100_continue = False
        self.proxy_protocol_info = None
        self.trailers: list[tuple[str, str]] = []
        self.body = io.BytesIO()
        try:
            parts = split_request_uri(uri)
        except ValueError:
            raise Refused(400, f"invalid request target {uri[:100]!r}") from None
        self.path, self.query, self.fragment = parts.path or "", parts.query or "", parts.fragment or ""
        scheme_state = [False]
        seen: set[str] = set()
        secure_scheme_headers, forwarder_headers = self._peer_trusted_for_forwarded()
        self.headers: list[tuple[str, str]] = []
        try:
            for name, value in fields:
                kept = self._apply_header_policy(
                    name, value, scheme_state, seen, secure_scheme_headers, forwarder_headers
                )
                if kept is not None:
                    self.headers.append(kept)
        except ParseException as exc:
            raise Refused(400, f"{type(exc).__name__}: {exc}") from None
        self._connection = {
            token.strip(" \t").lower()
            for name, value in self.headers
            if name == "CONNECTION"
            for token in value.split(",")
        }

    def should_close(self) -> bool:
        if self.must_close or self.method == "CONNECT" or "close" in self._connection:
            return True
        return self.version < (1, 1) and "keep-alive" not in self._connection

    def force_close(self) -> None:
        self.must_close = True


class PendingRequest:
    """One request's bytes so far. `feed` says whether the request is complete (then `request` holds it,
    its body included, and `leftover()` what the client pipelined behind it), and raises Refused for what
    the loop must refuse."""

    def __init__(self, limits: Limits, started: float, cfg: Any, peer: Any) -> None:
        self.limits, self.cfg, self.peer = limits, cfg, peer
        self.started = started  # monotonic time of the connection or of the previous request's end
        self.headers_done_at: float | None = None  # when the head was parsed; the body's deadline runs from here
        self.request: WSGIRequest | None = None
        self.announced: int | None = None  # Content-Length, once the head is parsed
        self.framed = False  # Content-Length or Transfer-Encoding was given
        self.continue_sent = False
        self.complete = False
        self.expects_continue = False  # an HTTP/1.1 `Expect: 100-continue`
        self._head = bytearray()  # until the head is parsed: the bytes after any leading empty lines
        self._line_end = -1  # where the request line ends in _head, once seen
        self._body: BodyReader | None = None  # once the head is parsed
        self._body_started = False  # a byte after the head has come
        self._leftover = b""

    @property
    def has_started(self) -> bool:
        """Whether the client has sent more than empty lines."""
        return self._body is not None or (bool(self._head) and self._head != b"\r")

    @property
    def body_bytes(self) -> int:
        """Payload received so far."""
        return self._body.received if self._body is not None else 0

    @property
    def wants_continue(self) -> bool:
        """An HTTP/1.1 client waits for `100 Continue` before it sends the body, and it has not been sent."""
        return self.expects_continue and not self.complete and not self.continue_sent and not self._body_started

    def feed(self, data: bytes, now: float) -> bool:
        if self._body is None:
            rest = self._read_head(data, now)
            if rest is None:
                return False
        else:
            rest = data
        self._body_started = self._body_started or bool(rest)
        assert self._body is not None
        after = self._body.feed(rest)
        if after is None:
            return False
        self._finish(after)
        return True

    def leftover(self) -> bytes:
        """Once complete: the bytes the client sent after this request."""
        return self._leftover

    # ------------------------------------------------------------------ the head

    def _read_head(self, data: bytes, now: float) -> bytes | None:
        """Buffer the head up to its blank line, check its raw lines, then give it to h11; what follows it,
        or None while the head is incomplete."""
        limits, head = self.limits, self._head
        old = len(head)
        head += data
        if head.startswith(b"\r\n"):
            skip = len(LEADING_EMPTY_LINES.match(head)[0])  # type: ignore[index]
            del head[:skip]
            old = max(0, old - skip)
        if self._line_end < 0:
            self._line_end = head.find(b"\r\n", max(0, old - 1))
            if self._line_end > limits.max_request_line or (
                self._line_end < 0 and len(head) > limits.max_request_line + 2
            ):
                raise Refused(414, f"request line longer than {limits.max_request_line} bytes")
        end = head.find(b"\r\n\r\n", max(0, old - 3))
        if BARE_LF.search(head, max(0, old - 1), len(head) if end < 0 else end + 4):  # the head's bytes only
            raise Refused(400, "a line of the request head ends in LF without CR")
        if end < 0:
            if len(head) > limits.max_header_bytes:
                raise Refused(431, f"request head larger than {limits.max_header_bytes} bytes")
            return None
        if end + 4 > limits.max_header_bytes:
            raise Refused(431, f"request head larger than {limits.max_header_bytes} bytes")
        lines = bytes(head[:end]).split(b"\r\n")[1:]
        if len(lines) > limits.max_fields:
            raise Refused(431, f"more than {limits.max_fields} header fields")
        for line in lines:
            if len(line) + 2 > limits.max_field_bytes:
                raise Refused(431, f"a header field longer than {limits.max_field_bytes} bytes")
            if line[:1] in (b" ", b"\t"):
                raise Refused(400, "obsolete line folding in a header field")
            if CONTROL.search(line):
                raise Refused(400, "a control character in a header field")
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        try:
            parser.receive_data(bytes(head[: end + 4]))
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            raise Refused(exc.error_status_hint, str(exc)) from None
        if not isinstance(event, h11.Request):  # the whole head was given: nothing else can come first
            raise Refused(400, "no request in the head")
        rest = bytes(head[end + 4 :])
        self._head = bytearray()
        self._accept(event, lines)
        self.headers_done_at = now
        return rest

    def _accept(self, event: h11.Request, lines: list[bytes]) -> None:
        """h11 has read the head; the checks it leaves to the server, on the raw lines it validated."""
        major, minor = event.http_version.split(b".")
        if major != b"1":
            raise Refused(505, f"HTTP/{event.http_version.decode()} is not supported")
        fields = [
            (name.strip().upper(), value.strip(b" \t")) for name, _, value in (line.partition(b":") for line in lines)
        ]
        lengths = [value for name, value in fields if name == b"CONTENT-LENGTH"]
        encodings = [value for name, value in fields if name == b"TRANSFER-ENCODING"]
        if lengths and encodings:
            raise Refused(400, "both Content-Length and Transfer-Encoding")
        if len(lengths) > 1 or (lengths and not DIGITS.fullmatch(lengths[0])):
            raise Refused(400, "Content-Length must be given once, as digits")
        if encodings and [e.lower() for e in encodings] != [b"chunked"]:
            raise Refused(501, "the only transfer coding supported is chunked")
        if encodings and minor == b"0":
            raise Refused(400, "Transfer-Encoding in an HTTP/1.0 request")
        expectations = {
            member.strip(b" \t").lower() for name, value in fields if name == b"EXPECT" for member in value.split(b",")
        } - {b""}
        if expectations - {b"100-continue"}:
            raise Refused(417, "the only expectation met is 100-continue")
        method, target = event.method.decode("ascii"), event.target.decode("ascii")
        if target == "*" and method != "OPTIONS":
            raise Refused(400, "the asterisk form is for OPTIONS only")
        if method != "CONNECT" and target != "*" and not target.startswith("/") and "://" not in target:
            raise Refused(400, "the authority form is for CONNECT only")
        self.announced = int(lengths[0]) if lengths else None
        if self.announced is not None and self.announced > self.limits.max_body_bytes:
            raise Refused(413, f"request body larger than {self.limits.max_body_bytes} bytes")
        self.framed = bool(lengths or encodings)
        kept = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in fields
            if name not in (b"CONTENT-LENGTH", b"TRANSFER-ENCODING", b"EXPECT")
        ]
        self.request = WSGIRequest(self.cfg, self.peer, method, target, (1, min(int(minor), 1)), kept)
        self.expects_continue = b"100-continue" in expectations and minor != b"0"
        length = None if encodings else (self.announced or 0)
        limits = self.limits
        self._body = BodyReader(length, limits.max_body_bytes, limits.max_field_bytes, limits.max_header_bytes,
                                self.request.body)  # fmt: skip

    # ------------------------------------------------------------------ the body

    def _finish(self, after: bytes) -> None:
        request = self.request
        assert request is not None
        request.body.seek(0)
        if self.framed:
            request.headers.append(("CONTENT-LENGTH", str(self.body_bytes)))
        self.complete = True
        self._leftover = after
