"""Requests as the worker's event loop reads them with h11 (service/server/request_framing.py): what it hands a request
thread, fed byte by byte or in one piece, its limits, and each refusal."""

from __future__ import annotations

import time
from typing import Any

import pytest
from gunicorn.config import Config

from service.server.request_framing import Limits, PendingRequest, Refused, WSGIRequest

pytestmark = pytest.mark.unit  # no server: `pytest -m unit` runs these in about a minute

LIMITS = Limits(max_header_bytes=1000, max_request_line=100, max_field_bytes=300, max_fields=10, max_body_bytes=100)
CFG = Config()
PEER = ("127.0.0.1", 40000)
POST = b"POST /v1/score?x=1 HTTP/1.1\r\nHost: a\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"


def pending(limits: Limits = LIMITS) -> PendingRequest:
    return PendingRequest(limits, started=0.0, cfg=CFG, peer=PEER)


def feed_bytewise(raw: bytes, limits: Limits = LIMITS) -> tuple[PendingRequest, int]:
    """Fed one byte at a time until complete; the request, and how many bytes it took."""
    request = pending(limits)
    for i in range(len(raw)):
        if request.feed(raw[i : i + 1], now=float(i)):
            return request, i + 1
    return request, -1


def seen(request: WSGIRequest) -> tuple[Any, ...]:
    """What gunicorn's wsgi.create, Response and access log read."""
    return (request.method, request.uri, request.path, request.query, request.version, request.headers,
            request.body.read(), request.should_close(), request.scheme)  # fmt: skip


@pytest.mark.parametrize(
    "raw, body",
    [
        (b"GET /healthz?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", b""),
        (b"\r\n\r\nGET /readyz HTTP/1.0\r\n\r\n", b""),  # empty lines before a request are ignored
        (POST + b"Content-Type: application/json\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
        (CHUNKED + b'3\r\nabc\r\n2;ext=1;q="a b"\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n', b"abcde"),
        (CHUNKED + b"1\r\na\r\n" * 50 + b"0\r\n\r\n", b"a" * 50),
    ],
)
def test_bytewise_and_whole_give_the_same_request(raw: bytes, body: bytes) -> None:
    after = b"GET /next HTTP/1.1\r\n"
    bytewise, used = feed_bytewise(raw + after)
    whole = pending()
    assert whole.feed(raw + after, now=0.0) and bytewise.complete and used == len(raw)
    assert whole.request is not None and bytewise.request is not None
    assert seen(whole.request) == seen(bytewise.request)
    assert whole.request.body.getvalue() == body and whole.leftover() == after
    assert whole.headers_done_at == 0.0 and bytewise.headers_done_at is not None


def test_what_a_request_thread_gets() -> None:
    raw = (
        CHUNKED.replace(b"Host: a\r\n", b"Host: a\r\nExpect: 100-continue\r\nX_Dropped: 1\r\n")
        + b"2\r\n{}\r\n0\r\n\r\n"
    )
    request = pending()
    assert request.feed(raw, now=0.0) and request.request is not None
    # The body's real length replaces the framing, the Expect the loop met is gone, `_` names are dropped
    # (gunicorn's header_map policy), and nothing asks gunicorn to send a 100 Continue.
    assert request.request.headers == [("HOST", "a"), ("CONTENT-LENGTH", "2")]
    assert request.request.body.read() == b"{}" and not request.request._expected_100_continue
    assert request.request.proxy_protocol_info is None and request.request.fragment == ""


@pytest.mark.parametrize(
    "head, should_close",
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\n", True),
        (b"GET / HTTP/1.0\r\n", True),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n", False),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n", True),
    ],
)
def test_keep_alive_follows_the_request(head: bytes, should_close: bool) -> None:
    request = pending()
    assert request.feed(head + b"\r\n", now=0.0) and request.request is not None
    assert request.request.should_close() is should_close


def test_100_continue_is_wanted_until_the_body_starts_and_never_by_http_10() -> None:
    waiting = pending()
    assert not waiting.feed(POST + b"Expect: 100-Continue\r\nContent-Length: 2\r\n\r\n", now=0.0)
    assert waiting.wants_continue
    assert not waiting.feed(b"{", now=0.0) and not waiting.wants_continue  # the client did not wait
    assert waiting.feed(b"}", now=0.0)
    http_10 = pending()
    assert not http_10.feed(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n", now=0.0)
    assert not http_10.wants_continue


def test_deadlines_and_idle_connections() -> None:
    request = pending()
    assert not request.feed(b"\r\n", now=1.0) and not request.has_started  # empty lines only
    assert not request.feed(b"\r", now=1.0) and not request.has_started
    assert not request.feed(b"\nP", now=2.0) and request.has_started and request.headers_done_at is None
    assert not request.feed(POST[1:] + b"Content-Length: 2\r\n\r\n", now=3.0)
    assert request.headers_done_at == 3.0 and request.announced == 2


def refusal(raw: bytes, limits: Limits = LIMITS) -> int:
    with pytest.raises(Refused) as refused:
        request = pending(limits)
        request.feed(raw, now=0.0)
    with pytest.raises(Refused) as bytewise:  # the same, however the bytes arrive
        feed_bytewise(raw, limits)
    assert bytewise.value.status == refused.value.status
    return refused.value.status


@pytest.mark.parametrize(
    "raw, status",
    [
        # Limits: the head as a whole, the request line, one field, the number of fields, the body.
        (b"GET / HTTP/1.1\r\n" + b"X-Y: z\r\n" * 200, 431),
        (b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 400 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 11 + b"\r\n", 431),
        (POST + b"Content-Length: 101\r\n\r\n", 413),
        (CHUNKED + b"65\r\n" + b"a" * 101, 413),
        (CHUNKED + b"1\r\na\r\n" * 101, 413),
        (CHUNKED + b"5;" + b"e" * 2000, 431),  # a chunk line that never ends
        (CHUNKED + b"0\r\n" + b"X: y\r\n" * 200, 431),  # trailers that never end
        # Framing h11 refuses.
        (POST + b"Content-Length: " + b"9" * 30 + b"\r\n\r\n", 400),
        (POST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (POST + b"Transfer-Encoding : chunked\r\n\r\n", 400),
        (POST + b"Transfer-Encoding: gzip\r\n\r\n", 501),
        (CHUNKED + b"1" * 21 + b"\r\n", 400),
        (CHUNKED + b"zz\r\n", 400),
        (CHUNKED + b"5\r\nhelloXX", 400),  # no CRLF after the chunk's data
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"BREW /healthz HTCPCP/1.0\r\n\r\n", 400),
        # Refused on top of h11.
        (POST + b"Content-Length: 33, 33\r\n\r\n", 400),
        (POST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
        (POST + b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),  # obs-fold
        (b"GET / HTTP/1.1\r\nHost: a\r\n\tX: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),  # a control character
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),  # a bare CR
        (b"GET / HTTP/1.1\nHost: a\n\n", 400),  # LF alone
        (b"GET / HTTP/1.1\r\nHost: a\n", 400),  # refused at the first such LF, not at a deadline
        (b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n", 400),  # chunk lines outside RFC 9112's grammar
        (CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"-1\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"5;\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"5;a\rb\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b'5;a="b\r\nhello\r\n0\r\n\r\n', 400),
        (CHUNKED + b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n", 400),  # framing and routing in trailers
        (CHUNKED + b"5\r\nhello\r\n0\r\nHost: b\r\n\r\n", 400),
        (CHUNKED + b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (POST + b"Expect: 100-continue, foo\r\nContent-Length: 2\r\n\r\n", 417),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET a:80 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Type: a\r\nContent-Type: b\r\n\r\n", 400),
    ],
)
def test_refusals(raw: bytes, status: int) -> None:
    assert refusal(raw) == status


def test_the_largest_content_length_is_refused_without_reading_it_as_a_number() -> None:
    """4,400 digits: more than int() reads from a string (4,300), answered 400, not an exception."""
    limits = Limits(max_header_bytes=32 << 10, max_request_line=4094, max_field_bytes=8190, max_fields=100,
                    max_body_bytes=1 << 20)  # fmt: skip
    assert refusal(POST + b"Content-Length: " + b"9" * 4400 + b"\r\n\r\n", limits) == 400


def test_only_the_payload_of_a_chunked_body_is_buffered() -> None:
    """1-byte chunks with long extensions: the framing is parsed as it arrives, and only the data kept."""
    limits = Limits(max_header_bytes=1000, max_request_line=100, max_field_bytes=300, max_fields=10,
                    max_body_bytes=100_000)  # fmt: skip
    request = pending(limits)
    chunk = b"1;" + b"e" * 40 + b"\r\na\r\n"  # 47 bytes of framing a byte: within the allowance
    assert not request.feed(CHUNKED, now=0.0)
    for _ in range(1000):
        assert not request.feed(chunk, now=0.0)
    assert request.feed(b"0\r\n\r\n", now=0.0) and request.body_bytes == 1000
    assert request.request is not None and request.request.body.getvalue() == b"a" * 1000


def test_a_chunk_larger_than_any_body_allowed_is_refused_before_its_data() -> None:
    assert refusal(CHUNKED + b"65\r\n") == 413
    assert refusal(CHUNKED + b"10000000000000000\r\n") == 413  # 17 hex digits


def test_a_body_with_newlines_that_arrives_with_its_head_is_accepted() -> None:
    """Bare LF is refused in the head only: a pretty-printed JSON body sent in the same write is no head."""
    raw = POST + b'Content-Length: 11\r\n\r\n{\n"a": 1\n}\n' + b"GET /healthz HTTP/1.1\r\n\nx"
    request = pending()
    assert request.feed(raw, now=0.0)
    assert request.request is not None and request.request.body.read() == b'{\n"a": 1\n}\n'


def test_a_long_trailer_of_spaces_is_refused_at_once() -> None:
    """No regular expression backtracks over a trailer: a line of spaces and a NUL costs microseconds."""
    limits = Limits(max_header_bytes=32768, max_request_line=4094, max_field_bytes=8190, max_fields=100,
                    max_body_bytes=100)  # fmt: skip
    started = time.perf_counter()
    assert refusal(CHUNKED + b"0\r\nX:" + b" " * 8000 + b"\x00\r\n\r\n", limits) == 400
    assert time.perf_counter() - started < 1.0  # fed whole and byte by byte: linear, not cubic


def test_a_line_over_the_limit_is_refused_however_it_arrives() -> None:
    assert refusal(CHUNKED + b"5;" + b"e" * 400 + b"\r\nhello\r\n0\r\n\r\n") == 431  # fed whole, then bytewise


def test_chunked_framing_is_bounded_by_the_payload_it_carries() -> None:
    limits = Limits(max_header_bytes=1000, max_request_line=100, max_field_bytes=8190, max_fields=10,
                    max_body_bytes=1 << 20)  # fmt: skip
    one_byte = CHUNKED + b"".join(b"1\r\n%c\r\n" % c for c in b"x" * 20_000) + b"0\r\n\r\n"
    request = pending(limits)
    assert request.feed(one_byte, now=0.0)  # 1-byte chunks: 5 bytes of framing a byte, allowed
    padded = CHUNKED + b"".join(b"1;" + b"e" * 8000 + b"\r\nx\r\n" for _ in range(20)) + b"0\r\n\r\n"
    with pytest.raises(Refused) as refused:
        pending(limits).feed(padded, now=0.0)
    assert refused.value.status == 413  # 8 KB of extension a byte: refused
