"""Who is the sysop: whoever holds the node's local admin secret.

The CLI sends the secret from ``admin.secret`` as a bearer token. A person
uses the one-time login link printed by ``mtor-node start``; opening it
swaps the link's token for a session cookie, and the link stops working.
Never "the first visitor becomes sysop" (SPEC.md §3).

:func:`cross_site_refusal` keeps other web pages from acting with a
visitor's cookies (cross-site request forgery); :func:`host_refusal` keeps
pages from reaching the console through a rebound DNS name.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

COOKIE_NAME = "mtor_sysop"
MAX_SESSIONS = 64
#: What a page of another site may load from the console: the page, its assets, /health and the
#: one-time login link (an operator may open it from anywhere; it is useless without its token).
OPEN_TO_OTHER_SITES = ("/", "/health", "/sysop/login")
OPEN_PREFIXES_TO_OTHER_SITES = ("/static/",)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def cross_site_refusal(method: str, path: str, origin: str | None, host: str | None,
                       fetch_site: str | None) -> str | None:
    """Why a browser request started by another site must not run, or None to let it through.

    SameSite=Strict cookies are not enough: every port of a host is the same
    *site*, so a page on 127.0.0.1:8080 sends this console's cookies along to
    127.0.0.1:5000, and a control route acts on a plain GET. Two checks:

    * ``Sec-Fetch-Site`` (set by the browser, not by the page): a request that
      another site or another port started may only load what
      :data:`OPEN_TO_OTHER_SITES` names;
    * for browsers without it, a state-changing method whose ``Origin`` is not
      this console's own is refused.

    Tools (the CLI, curl, SDKs) send neither header and are not affected: they
    authenticate with a bearer secret, which no browser adds on its own.
    """
    if fetch_site in ("cross-site", "same-site") and not (
            path in OPEN_TO_OTHER_SITES or path.startswith(OPEN_PREFIXES_TO_OTHER_SITES)):
        return f"{path} cannot be used from another site ({fetch_site} request)"
    if method.upper() not in SAFE_METHODS and origin is not None and not origin_names_host(origin, host):
        return f"a {method.upper()} from {origin} is refused: it is not this console's origin"
    return None


def origin_names_host(origin: str, host: str | None) -> bool:
    """A browser's ``Origin`` names the host:port this request was sent to.

    The scheme is not compared: behind a TLS-terminating proxy the page is
    https while the console itself is spoken to in plain http, and no page of
    another scheme can be served from the console's own host:port.
    """
    return origin != "null" and bool(host) and urlsplit(origin).netloc.lower() == host.lower()


def host_refusal(host: str | None, allowed_names: frozenset[str]) -> str | None:
    """Why a request naming ``host`` must not be served, or None.

    DNS rebinding: a page of ``evil.example`` whose name later resolves to
    127.0.0.1 is *same-origin* with the console as far as the browser knows,
    so origin checks pass. Its requests still carry ``Host: evil.example``.
    The console therefore answers only to IP literals, ``localhost`` (and its
    subdomains, which browsers resolve to loopback themselves) and the names
    the operator listed in ``[console] allowed_hosts``.
    """
    if not host:
        return None  # HTTP/1.0 tools; no browser omits Host
    name = urlsplit("//" + host).hostname or ""
    if not name:
        return f"the Host {host!r} is not valid"
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        pass
    if name == "localhost" or name.endswith(".localhost") or name in allowed_names:
        return None
    return (f"this console does not answer to the host name {name!r}; "
            "add it to [console] allowed_hosts if it is yours")


def allowed_host_names(setting: str) -> frozenset[str]:
    """``[console] allowed_hosts`` as lower-case names (ports, if given, are ignored)."""
    names = (urlsplit("//" + item.strip()).hostname for item in setting.split(",") if item.strip())
    return frozenset(name for name in names if name)


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
