"""Who is the sysop: whoever holds the node's local admin secret.

The CLI sends the secret from ``admin.secret`` as a bearer token. A person
uses the one-time login link printed by ``mtor-node start``; opening it
swaps the link's token for a session cookie, and the link stops working.
Never "the first visitor becomes sysop" (SPEC.md §3).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field

COOKIE_NAME = "mtor_sysop"
MAX_SESSIONS = 64


@dataclass
class SysopAuth:
    admin_secret: str
    login_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    _login_used: bool = False
    _sessions: list[str] = field(default_factory=list)

    def redeem_login(self, token: str) -> str | None:
        """Exchange the one-time login token for a new session id, once."""
        if self._login_used or not hmac.compare_digest(token.encode(), self.login_token.encode()):
            return None
        self._login_used = True
        return self.new_session()

    def new_session(self) -> str:
        session = secrets.token_urlsafe(32)
        self._sessions.append(session)
        del self._sessions[:-MAX_SESSIONS]
        return session

    def is_sysop(self, authorization: str | None, cookie: str | None) -> bool:
        if authorization and authorization.startswith("Bearer "):
            given = authorization[len("Bearer "):].strip().encode()
            if hmac.compare_digest(given, self.admin_secret.encode()):
                return True
        if cookie:
            return any(hmac.compare_digest(cookie.encode(), s.encode()) for s in self._sessions)
        return False
