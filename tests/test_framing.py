"""Where a request ends, as the worker's event loop works it out byte by byte (service/framing.py)."""

from __future__ import annotations

import pytest

from service.framing import Limits, PendingRequest, Verdict

LIMITS = Limits(max_header_bytes=1000, max_body_bytes=100)


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
