"""Session handles: where a generation stopped, as a signed, self-contained token. No Flask in here.

A session is the LSTM state (2 layers x (h, c) x 512 float32, 8 KiB for the served model) and the
last generated character, not yet read. The handle carries them, with an expiry and a version,
under an HMAC-SHA256 that also covers the model (the manifest's hash) and the principal that
created it (a hash of its API key). So any worker, or any replica with the same secret, can
continue a session without shared storage; another key, another model or an edited handle finds
nothing (404), and an expired one is refused.

The server stores nothing: sessions cost no server memory and there is nothing to bound or evict
but the expiry. A handle is a capability until it expires: whoever holds it (with its key) can
continue from it, any number of times (each continuation branches from the same state).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import time

import torch

from service.engine.types import SessionState

VERSION = 1
HEADER = struct.Struct("<BQIHH")  # version, expiry (Unix seconds), next character id, layers, hidden size
MAC_BYTES = 32


class SessionError(Exception):
    """An unusable handle: `code` is "session_not_found" (forged, altered, another key or model, not a
    handle at all) or "session_expired"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def principal_of(api_key: str | None) -> bytes:
    """What a session is scoped to: a hash of the API key, or the anonymous principal without keys."""
    return hashlib.sha256(b"charlm-principal\0" + (api_key or "").encode()).digest() if api_key else b"anonymous"


class SessionCodec:
    def __init__(self, secret: bytes, ttl_seconds: float, model_digest: str, layers: int, hidden: int, vocab: int):
        self._secret = secret
        self.ttl_seconds = ttl_seconds
        self._model = model_digest.encode()
        self.layers, self.hidden, self.vocab = layers, hidden, vocab
        self.state_bytes = 2 * layers * hidden * 4
        self.handle_chars = -(-4 * (HEADER.size + self.state_bytes + MAC_BYTES) // 3)  # base64 without padding

    def _mac(self, principal: bytes, payload: bytes) -> bytes:
        message = b"charlm-session\0" + self._model + b"\0" + principal + b"\0" + payload
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def seal(self, state: SessionState, principal: bytes, now: float | None = None) -> str:
        """The handle for `state`, valid for `ttl_seconds` and only for `principal`."""
        expires = int((time.time() if now is None else now) + self.ttl_seconds)
        header = HEADER.pack(VERSION, expires, state.next_id, self.layers, self.hidden)
        floats = torch.cat([state.h.reshape(-1), state.c.reshape(-1)]).float()
        raw = bytearray(self.state_bytes)
        torch.frombuffer(raw, dtype=torch.float32).copy_(floats)  # exact float32, in this machine's byte order
        payload = header + bytes(raw)
        return base64.urlsafe_b64encode(payload + self._mac(principal, payload)).rstrip(b"=").decode()

    def open(self, handle: str, principal: bytes, now: float | None = None) -> SessionState:
        """The state a handle carries; SessionError when it is not a valid, current handle of `principal`."""
        if len(handle) != self.handle_chars:
            raise SessionError("session_not_found", "no such session")
        try:
            blob = base64.b64decode(handle + "=" * (-len(handle) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise SessionError("session_not_found", "no such session") from None
        if base64.urlsafe_b64encode(blob).rstrip(b"=").decode() != handle:  # one spelling per handle: the
            raise SessionError("session_not_found", "no such session")  # last character's spare bits are 0
        payload, mac = blob[:-MAC_BYTES], blob[-MAC_BYTES:]
        if len(payload) != HEADER.size + self.state_bytes:
            raise SessionError("session_not_found", "no such session")
        if not hmac.compare_digest(mac, self._mac(principal, payload)):
            raise SessionError("session_not_found", "no such session")
        version, expires, next_id, layers, hidden = HEADER.unpack_from(payload)
        if (version, layers, hidden) != (VERSION, self.layers, self.hidden) or not 0 <= next_id < self.vocab:
            raise SessionError("session_not_found", "no such session")  # signed by us, so never expected
        if (time.time() if now is None else now) >= expires:
            raise SessionError("session_expired", "the session has expired")
        floats = torch.frombuffer(bytearray(payload[HEADER.size :]), dtype=torch.float32)
        h, c = floats.view(2, layers, hidden)
        return SessionState(h.clone(), c.clone(), next_id)
