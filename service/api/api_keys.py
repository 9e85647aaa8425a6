"""The API-key rule, whichever wire a request came on: `Bearer <key>` with one of API_KEYS."""

from __future__ import annotations

import hmac


def bearer_key(keys: list[str], authorization: str) -> str | None:
    """The key an `Authorization` value presents, when it is `Bearer <key>` with one of `keys`; else None.
    Every key is compared, so the time taken does not reveal which one is close."""
    scheme, _, token = authorization.partition(" ")
    presented = token.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode())
    return token.strip() if scheme.lower() == "bearer" and matched else None
