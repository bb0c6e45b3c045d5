"""User ids: what a request may name as its user, and the keyed hash it is stored under.

A request names its user in the `X-User-Id` header (the only place: the gateway assigns users by it, and
Traefik reads headers, not JSON bodies; a `user_id` field in a body is refused as an unknown field).
An id is 1 to 128 characters of letters, digits and `. _ : @ -`.

The log never holds the id itself: each row keeps `user_key`, the first 128 bits of HMAC-SHA256 of
the id under a key derived from the request-id key (control_plane/credentials.py), as 32 hex digits.
The analysis needs only to tell users apart and to find the same user again (in every Bento and every
table: one key everywhere), never who they are; a plain hash of an id that is guessable (an e-mail,
a sequential number) could be reversed by hashing the guesses, a keyed one cannot without the key.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass

USER_HEADER = "X-User-Id"
MAX_USER_ID_CHARS = 128
USER_KEY_CHARS = 32
_VALID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_DERIVATION = b"recsys user key v1"


def user_id_problem(value: str) -> str | None:
    """Why `value` is not a valid user id (a message naming the header), or None when it is."""
    if _VALID.fullmatch(value):
        return None
    if not value:
        return f"{USER_HEADER} is empty; send 1 to {MAX_USER_ID_CHARS} characters, or no header"
    if len(value) > MAX_USER_ID_CHARS:
        return f"{USER_HEADER} is {len(value)} characters; at most {MAX_USER_ID_CHARS} are allowed"
    bad = next(ch for ch in value if not _VALID.fullmatch(ch))
    return f"{USER_HEADER} holds {bad!r}; only letters, digits and . _ : @ - are allowed"


@dataclass(frozen=True)
class UserKeyer:
    """Turns a user id into the key it is logged under."""

    key: bytes

    @classmethod
    def from_secret(cls, secret: str) -> UserKeyer:
        return cls(hmac.digest(secret.encode(), _DERIVATION, "sha256"))

    @classmethod
    def ephemeral(cls) -> UserKeyer:
        """A key of this process only (no readable secret): users are told apart, not matched elsewhere."""
        return cls(secrets.token_bytes(32))

    def user_key(self, user_id: str) -> str:
        return hmac.digest(self.key, user_id.encode(), "sha256")[: USER_KEY_CHARS // 2].hex()
