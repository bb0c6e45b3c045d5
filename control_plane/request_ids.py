"""Request ids the system issues: unique by construction and signed, so labels can only name real ones.

An id is `[<the client's X-Request-ID>.]<32 hex digits, fresh>.<24 hex digits of HMAC-SHA256>`: the
Bento makes the fresh part for every request (bentos/http.py: time first, then 64 random bits), so
no two answers share an id and every 2xx is exactly one row of `predictions`, whatever id the client
sent; the client's own id stays in front, so it can still find its request in the logs. The signature,
with a key only the Bentos and the control plane hold (control_plane/credentials.py), lets `/feedback`
refuse a label for an id the system never issued without a look-up in the log. The fresh part begins
with the issue time in nanoseconds (16 hex digits), which is how `labels` is partitioned by the time of
the prediction it labels (`issued_at`).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

MAX_ID_CHARS = 128  # predictions.request_id and labels.request_id are String(128)
FRESH_CHARS = 32
SIGNATURE_CHARS = 24  # 96 bits of the HMAC: forging one is a 2^-96 guess
MAX_CLIENT_ID_CHARS = MAX_ID_CHARS - FRESH_CHARS - SIGNATURE_CHARS - 2  # 70, with the two dots
TIME_CHARS = 16  # the fresh part's first 16 hex digits: time.time_ns() when the id was issued
_HEX = frozenset("0123456789abcdef")
_PLAUSIBLE_S = (946_684_800.0, 7_258_118_400.0)  # 2000 to 2200: anything else is not an issue time


def issued_at(request_id: str) -> float | None:
    """When an id of the system's form was issued (epoch seconds), read from its fresh part; None for
    an id of another form. It does not check the signature: call `issued` for that."""
    parts = request_id.rsplit(".", 2)  # [client id,] fresh part, signature
    if len(parts) < 2:
        return None
    fresh = parts[-2]
    if len(fresh) != FRESH_CHARS or not all(c in _HEX for c in fresh[:TIME_CHARS]):
        return None
    seconds = int(fresh[:TIME_CHARS], 16) / 1e9
    low, high = _PLAUSIBLE_S
    return seconds if low <= seconds < high else None


@dataclass(frozen=True)
class RequestIdSigner:
    """Issues request ids and tells whether an id is one it (or a holder of the same key) issued."""

    key: bytes

    @classmethod
    def from_secret(cls, secret: str) -> RequestIdSigner:
        return cls(secret.encode())

    @classmethod
    def ephemeral(cls) -> RequestIdSigner:
        """A key of this process only: its ids are unique but no label can be accepted for them."""
        return cls(secrets.token_bytes(32))

    def issue(self, fresh: str, client_id: str | None = None) -> str:
        """The id for one answer: the fresh part (unique), after the client's id if it sent one, signed."""
        body = f"{client_id}.{fresh}" if client_id else fresh
        return f"{body}.{self._sign(body)}"

    def issued(self, request_id: str) -> bool:
        """Whether `request_id` carries a valid signature of this key."""
        if not request_id.isascii() or len(request_id) > MAX_ID_CHARS:
            return False
        body, dot, signature = request_id.rpartition(".")
        return (
            bool(dot)
            and len(signature) == SIGNATURE_CHARS
            and hmac.compare_digest(signature, self._sign(body))
        )

    def _sign(self, body: str) -> str:
        return hmac.digest(self.key, body.encode(), "sha256")[: SIGNATURE_CHARS // 2].hex()
