"""The requests the worker's event loop refuses itself: each status with its reason phrase, the error
envelope's code and the label of charlm_requests_refused_total."""

from __future__ import annotations

# status: reason phrase, the error envelope's code, the label of charlm_requests_refused_total
ANSWERS = {
    400: ("Bad Request", "bad_request", "malformed"),
    413: ("Content Too Large", "request_too_large", "body_too_large"),
    414: ("URI Too Long", "uri_too_long", "headers_too_large"),
    417: ("Expectation Failed", "expectation_failed", "malformed"),
    431: ("Request Header Fields Too Large", "headers_too_large", "headers_too_large"),
    501: ("Not Implemented", "not_implemented", "malformed"),
    505: ("HTTP Version Not Supported", "http_version_not_supported", "malformed"),
}
MESSAGE_CHARS = 200  # of h11's reason in an answer: it may quote the client's bytes


class Refused(Exception):
    """A request the loop answers itself with `status`, then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status if status in ANSWERS else 400
        self.message = message[:MESSAGE_CHARS]
        self.reason, self.code, self.label = ANSWERS[self.status]
