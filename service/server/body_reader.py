"""A request's body as the worker's event loop reads it: Content-Length or chunked, keeping the payload
only, never the chunked framing (RFC 9112 7.1), with its trailers checked. h11 reads the head
(service.server.request_framing); this reads what the head announces, because h11's body reader builds an
event object per chunk, which made a body of small chunks many times dearer than the same body with a
Content-Length."""

from __future__ import annotations

import functools
import io
import re

from service.server.refusals import Refused

CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # RFC 9110 5.5: no controls in a field (h11 lets most by)
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# RFC 9112 7.1: chunk-size [ chunk-ext ] (before its CRLF), the size in at most 20 hex digits.
CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,20})(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)*" % (_TOKEN, _TOKEN, _QUOTED)
)
# For the fast path: a size line without extensions (one with `;` is read in full), and one after a chunk's
# data and its CRLF.
CHUNK_HEAD = re.compile(rb"([0-9A-Fa-f]{1,20})(;[^\r\n]*)?\r\n")
NEXT_CHUNK_HEAD = re.compile(rb"\r\n([0-9A-Fa-f]{1,20})(;[^\r\n]*)?\r\n")
TOKEN = re.compile(_TOKEN)
MAX_TRAILERS = 100
# RFC 9110 6.5.1: fields that frame, route or authenticate a message have no place in trailers.
FORBIDDEN_TRAILERS = frozenset(
    {b"content-length", b"transfer-encoding", b"trailer", b"te", b"host", b"connection", b"keep-alive",
     b"upgrade", b"expect", b"authorization", b"proxy-authorization", b"cookie", b"content-type",
     b"content-encoding", b"content-range", b"max-forwards"}
)  # fmt: skip


# Chunked framing may add this much to a body, and this many bytes per byte of payload (1-byte chunks need 5,
# so do extensions of a few bytes): beyond, 413. It bounds the work a body costs, not only its payload.
FRAMING_ALLOWANCE, FRAMING_PER_BYTE = 64 << 10, 8
MAX_RUN_SIZES = 4  # chunk sizes of one body read in runs; the others chunk by chunk


@functools.lru_cache(maxsize=64)
def _same_chunks(digits: bytes, size: int) -> re.Pattern[bytes]:
    """A run of whole chunks of `size` bytes, each after the CRLF that ends the one before."""
    return re.compile(rb"(?:\r\n%s\r\n[\x00-\xff]{%d})+" % (re.escape(digits), size))


class BodyReader:
    """A request body as it arrives: `length` bytes (Content-Length), or chunked (`length` None), up to
    `max_body` bytes of payload, written into `sink`. `feed` returns the bytes after the body once it has
    ended, None while it has not; raises Refused for a framing error or a body too large. Framing is held
    only a line at a time: a chunk-size line or a trailer field, each bounded by `max_line`."""

    SIZE, DATA, DATA_END, TRAILERS = range(4)

    def __init__(self, length: int | None, max_body: int, max_line: int, max_trailers: int, sink: io.BytesIO) -> None:
        self.max_body, self.max_line, self.max_trailers, self.sink = max_body, max_line, max_trailers, sink
        self.received = 0  # payload bytes so far
        self.wire = 0  # bytes fed, framing included (with what follows the body, at its end)
        self.chunked = length is None
        self.state = self.SIZE if self.chunked else self.DATA
        self.left = 0 if length is None else length  # of the current chunk, or of the whole body
        self.trailer_bytes = 0
        self.trailers: list[tuple[bytes, bytes]] = []
        self._buffer = bytearray()  # framing not yet read: a partial line, or a chunk's CRLF
        self._run_sizes: set[tuple[bytes, int]] = set()  # chunk sizes read in runs, at most MAX_RUN_SIZES

    def feed(self, data: bytes | bytearray) -> bytes | None:
        self.wire += len(data)
        after = self._feed(data)
        framing = self.wire - self.received - (len(after) if after is not None else 0)
        if self.chunked and framing > FRAMING_ALLOWANCE + FRAMING_PER_BYTE * self.received:
            raise Refused(413, "the chunked framing is far larger than the body it carries")
        return after

    def _feed(self, data: bytes | bytearray) -> bytes | None:
        if self._buffer:
            self._buffer += data
            data, self._buffer = self._buffer, bytearray()
        view, pos, end = memoryview(data), 0, len(data)
        while True:
            if self.state == self.DATA:
                take = min(self.left, end - pos)
                if take:
                    self.sink.write(view[pos : pos + take])
                    pos += take
                    self.left -= take
                    self.received += take
                if self.left:
                    return None
                if not self.chunked:
                    return bytes(view[pos:])
                self.state = self.DATA_END
            elif self.state == self.DATA_END:
                if end - pos < 2:
                    if data[pos:end] not in (b"", b"\r"):
                        raise Refused(400, "chunk data not followed by CRLF")
                    self._buffer += view[pos:end]
                    return None
                if data[pos : pos + 2] != b"\r\n":
                    raise Refused(400, "chunk data not followed by CRLF")
                pos += 2
                self.state = self.SIZE
            else:
                if self.state == self.SIZE:
                    pos = self._whole_chunks(data, view, pos, end)
                    if self.state == self.DATA_END:
                        continue
                line_end = data.find(b"\r\n", pos)
                if line_end < 0:
                    if end - pos > self.max_line:
                        raise Refused(431, "a chunk-size or trailer line longer than allowed")
                    self._buffer += view[pos:end]
                    return None
                if line_end - pos > self.max_line:
                    raise Refused(431, "a chunk-size or trailer line longer than allowed")
                line = bytes(view[pos:line_end])
                pos = line_end + 2
                if self.state == self.TRAILERS:
                    if not line:
                        return bytes(view[pos:])
                    self._trailer(line)
                    continue
                if not (match := CHUNK_LINE.fullmatch(line)):
                    raise Refused(400, f"illegal chunk line: {line[:40]!r}")
                size = int(match[1], 16)
                if self.received + size > self.max_body:
                    raise Refused(413, f"request body larger than {self.max_body} bytes")
                self.state, self.left = (self.DATA, size) if size else (self.TRAILERS, 0)

    def _whole_chunks(self, data: bytes | bytearray, view: memoryview, pos: int, end: int) -> int:
        """The common case, fast: every complete chunk from a size line at `pos` on, one regex match each (the
        CRLF after a chunk's data and the next size line together). Returns where the general path goes on:
        at a size line (state SIZE) or at the CRLF after a chunk's data (state DATA_END), wherever the next
        chunk is not whole, is the last one, has an extension to check, or would make the body too large."""
        match = CHUNK_HEAD.match(data, pos)
        parts: list[memoryview] = []
        append, next_head = parts.append, NEXT_CHUNK_HEAD.match
        received, room = self.received, self.max_body - self.received
        while match is not None:
            digits, extension = match.groups()
            size = int(digits, 16)
            start = match.end()
            stop = start + size
            if not size or stop + 2 > end or extension is not None or size > room:
                break
            append(view[start:stop])
            room -= size
            pos = stop
            # Clients send chunks of one size: the run of chunks just like this one, in one regex match (a
            # pattern per size, so at most MAX_RUN_SIZES of them for one body: no compiling per chunk).
            if (run := self._run_of(digits, size, data, pos, end)) is not None:
                unit = len(digits) + size + 4
                count = min((run.end() - pos) // unit, room // size)
                skip = len(digits) + 4
                for first in range(pos, pos + count * unit, unit):
                    append(view[first + skip : first + unit])
                room -= count * size
                pos += count * unit
            match = next_head(data, pos)
            if match is None:
                self.state = self.DATA_END  # the general path checks the CRLF and reads the line
                break
            pos += 2
        received = self.max_body - room
        if parts:
            self.sink.write(b"".join(parts))
            self.received = received
        return pos

    def _run_of(self, digits: bytes, size: int, data: bytes | bytearray, pos: int, end: int) -> re.Match[bytes] | None:
        key = (digits, size)
        if key not in self._run_sizes:
            if len(self._run_sizes) >= MAX_RUN_SIZES:
                return None
            self._run_sizes.add(key)
        return _same_chunks(digits, size).match(data, pos, end)

    def _trailer(self, line: bytes) -> None:
        self.trailer_bytes += len(line) + 2
        if self.trailer_bytes > self.max_trailers or len(self.trailers) >= MAX_TRAILERS:
            raise Refused(431, "trailers larger than allowed")
        name, colon, value = line.partition(b":")  # RFC 9110 5.1: a token, ':', a value without controls
        if not colon or not TOKEN.fullmatch(name) or CONTROL.search(value):
            raise Refused(400, f"illegal trailer field: {line[:40]!r}")
        name = name.lower()
        if name in FORBIDDEN_TRAILERS:
            raise Refused(400, f"{name.decode()} is not allowed in trailers")
        self.trailers.append((name, value.strip(b" \t")))
