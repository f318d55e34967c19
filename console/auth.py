"""Passwords (argon2id), the login rate limit (a pure state machine) and CSRF tokens.

Rate limit: at most LIMIT failed logins per user name (IP_LIMIT per client address) within
WINDOW_S; beyond that the key is locked until its oldest failure leaves the window. A success
clears the user's failures (not the address's).
"""

from __future__ import annotations

import hmac
import secrets
from collections import deque
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

LIMIT = 5          # failures per user name in the window
IP_LIMIT = 30      # failures per client address (a site office may share one address)
WINDOW_S = 300.0
_hasher = PasswordHasher()  # argon2id, the library's current defaults (RFC 9106 low-memory)
# verified against when the user does not exist, so a wrong name costs as long as a wrong password
_DUMMY = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash or _DUMMY, password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


@dataclass
class RateLimiter:
    limit: int = LIMIT
    window_s: float = WINDOW_S
    _fails: dict[str, deque[float]] = field(default_factory=dict)

    def _prune(self, key: str, now: float) -> deque[float]:
        q = self._fails.setdefault(key, deque())
        while q and now - q[0] >= self.window_s:
            q.popleft()
        if not q:
            del self._fails[key]
            return deque()
        return q

    def locked(self, key: str, now: float) -> bool:
        return len(self._prune(key, now)) >= self.limit

    def retry_after(self, key: str, now: float) -> float:
        q = self._prune(key, now)
        return 0.0 if len(q) < self.limit else self.window_s - (now - q[0])

    def fail(self, key: str, now: float) -> None:
        self._prune(key, now)
        q = self._fails.setdefault(key, deque())
        q.append(now)
        while len(q) > self.limit:  # only the newest `limit` failures matter
            q.popleft()

    def clear(self, key: str) -> None:
        self._fails.pop(key, None)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_ok(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))
