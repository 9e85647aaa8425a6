"""Where a request ends, as the worker's event loop works it out byte by byte (service/framing.py)."""

from __future__ import annotations

import pytest

from service.framing import Limits, PendingRequest, Verdict

LIMITS = Limits(max_header_bytes=1000, max_body_bytes=100, max_line_bytes=300)


def feed_bytewise(raw: bytes) -> tuple[PendingRequest, list[Verdict]]:
    pending = PendingRequest(LIMITS, started=0.0)
    return pending, [pending.feed(raw[i : i + 1], now=float(i)) for i in range(len(raw))]


def test_a_request_without_a_body_ends_at_the_blank_line() -> None:
    raw = b"GET /healthz?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"
    pending, verdicts = feed_bytewise(raw + b"GET / HTTP/1.1\r\n")
    assert verdicts.index(Verdict.COMPLETE) == len(raw) - 1
    assert (pending.method, pending.path) == (b"GET", b"/healthz")


def test_content_length_counts_the_body_and_keeps_what_follows() -> None:
    raw = b"POST /v1/score HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello"
    pending = PendingRequest(LIMITS, started=0.0)
    assert pending.feed(raw[:-1], now=1.0) is Verdict.NEED_MORE
    assert pending.headers_done_at == 1.0 and pending.in_body
    assert pending.feed(raw[-1:] + b"GET", now=2.0) is Verdict.COMPLETE
    assert pending.request_bytes() == raw and pending.leftover() == b"GET"


def test_chunked_bodies_end_after_the_last_chunk_and_trailers() -> None:
    body = b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n"
    raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    pending, verdicts = feed_bytewise(raw)
    assert verdicts[-1] is Verdict.COMPLETE and Verdict.COMPLETE not in verdicts[:-1]
    assert pending.request_bytes() == raw


@pytest.mark.parametrize(
    "raw, verdict",
    [
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200, Verdict.HEADERS_TOO_LARGE),
        (b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", Verdict.BODY_TOO_LARGE),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n", Verdict.BODY_TOO_LARGE),
        # Framing this module cannot make out goes to gunicorn's parser, which refuses it with a 400.
        (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", Verdict.COMPLETE),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", Verdict.COMPLETE),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n", Verdict.COMPLETE),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", Verdict.COMPLETE),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", Verdict.COMPLETE),
        # Sizes gunicorn would not read as hex (a sign, 0x) are malformed, not a loop over a negative chunk.
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-6\r\nabc\r\n", Verdict.COMPLETE),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n", Verdict.COMPLETE),
        # A chunk line longer than gunicorn's field limit, and endless trailers, are not read on and on.
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;" + b"e" * 400, Verdict.COMPLETE),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"X: y\r\n" * 300, Verdict.HEADERS_TOO_LARGE),
        # Tiny chunks with long extensions: the encoded body is bounded too, not only its data.
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1;" + b"e" * 250 + b"\r\na\r\n",
            Verdict.NEED_MORE,
        ),
    ],
)
def test_limits_and_malformed_framing(raw: bytes, verdict: Verdict) -> None:
    assert PendingRequest(LIMITS, started=0.0).feed(raw, now=0.0) is verdict


def test_an_answered_expect_line_is_left_out() -> None:
    raw = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    pending = PendingRequest(LIMITS, started=0.0)
    assert pending.feed(raw, now=0.0) is Verdict.NEED_MORE and pending.expects_continue
    assert pending.feed(b"{}", now=0.0) is Verdict.COMPLETE
    assert pending.request_bytes() == b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"


def test_encoded_chunked_bodies_are_bounded() -> None:
    """1-byte chunks with long extensions: the encoded body is bounded too, not only its data."""
    limits = Limits(max_header_bytes=1000, max_body_bytes=100_000, max_line_bytes=300)
    chunk = b"1;" + b"e" * 290 + b"\r\na\r\n"
    pending = PendingRequest(limits, started=0.0)
    verdicts = [pending.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", now=0.0)]
    verdicts += [pending.feed(chunk, now=0.0) for _ in range(1000)]
    assert verdicts[-1] is Verdict.BODY_TOO_LARGE and Verdict.COMPLETE not in verdicts
    assert pending.chunked_body_bytes < 1000  # refused on its encoded size, well before its data's


@pytest.mark.parametrize(
    "head, wants_close, expects_continue",
    [
        (b"GET / HTTP/1.1\r\n", False, False),
        (b"GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n", True, False),
        (b"GET / HTTP/1.0\r\n", True, False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n", False, False),
        (b"GET / HTTP/1.0\r\nExpect: 100-continue\r\n", True, False),  # no 1xx answers to HTTP/1.0
        (b"GET / HTTP/1.1\r\nExpect:\t100-continue\r\n", False, True),
    ],
)
def test_connection_and_expect(head: bytes, wants_close: bool, expects_continue: bool) -> None:
    pending = PendingRequest(LIMITS, started=0.0)
    pending.feed(head + b"\r\n", now=0.0)
    assert (pending.wants_close, pending.expects_continue) == (wants_close, expects_continue)
    assert b"100-continue" not in pending.request_bytes()
