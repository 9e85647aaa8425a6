"""The API's error type, rendered by the app in OpenAI's error envelope."""

from __future__ import annotations


class ApiError(Exception):
    """A client mistake or an unavailable service, rendered in OpenAI's error envelope."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
