"""What the console remembers about its users: nicknames, recent queries, costs, bans, API keys.

One JSON file, ``<data dir>/console/users.json``, written atomically (temp
file, fsync, rename) by a single writer task after changes (coalesced), and
immediately for bans and API keys. The records are the node's, not the
ledger's: costs here are what this console's users paid through it (the
ledger stays the authority on balances). Bounds: ``MAX_RECENT`` queries per
user, prompts cut at ``MAX_PROMPT_CHARS``, at most ``MAX_USERS`` users
(least recently seen forgotten first; their wallets stay in the ledger).

The file is private (0600, in a 0700 directory): a browser's GUID is the
bearer credential of its custodial wallet, so reading this file would let
anyone spend every console user's tokens. Writes are serialised, so two
flushes (the writer task and a ban's immediate flush) never race on the
temporary file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from node.files import write_text_atomic

log = logging.getLogger(__name__)

FILE_VERSION = 1
MAX_RECENT = 10
MAX_PROMPT_CHARS = 200
MAX_USERS = 50_000
API_KEY_PREFIX = "mtor-"


class NicknameTaken(ValueError):
    pass


def default_nickname(guid: str) -> str:
    return "user_" + "".join(c for c in guid if c.isalnum())[:8]


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class QueryRecord:
    prompt: str
    type: str
    time: float
    cost_units: int
    processing_time: float
    status: str


class UserStore:
    def __init__(self, path: Path, data: dict | None = None) -> None:
        self.path = path
        data = data or {}
        self.users: dict[str, dict] = data.get("users", {})
        self.system: dict = {"lifetime_cost_units": 0, "max_concurrent": 0, "queries": 0,
                             **data.get("system", {})}
        self.bans: set[str] = set(data.get("bans", []))
        self.api_keys: dict[str, dict] = data.get("api_keys", {})
        self._nicks = {u["nickname"].lower(): g for g, u in self.users.items()}
        self._dirty = trio.Event()
        self._write_lock = trio.Lock()
        self.writes = 0

    @classmethod
    def load(cls, path: Path) -> "UserStore":
        """Read the file; an unreadable one is kept aside and the store starts empty."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
                raise ValueError("unknown version")
        except FileNotFoundError:
            data = {}
        except (ValueError, OSError) as exc:
            aside = path.with_name(f"{path.name}.bad-{int(time.time())}")
            log.warning("console user file %s is unreadable (%s); kept as %s", path, exc, aside.name)
            os.replace(path, aside)
            data = {}
        else:
            _make_private(path)  # a file written by an older version may be world-readable
        return cls(path, data)

    # -- users -------------------------------------------------------------------------

    def user(self, guid: str) -> dict:
        """The record of ``guid``, created with its default nickname if new."""
        record = self.users.pop(guid, None)
        if record is None:
            nick = default_nickname(guid)
            if nick.lower() in self._nicks:
                nick = f"{nick}_{secrets.token_hex(2)}"
            record = {"nickname": nick, "created": time.time(), "queries": [], "lifetime_cost_units": 0,
                      "query_count": 0}
            self._nicks[nick.lower()] = guid
            self._forget_oldest()
        self.users[guid] = record  # most recently seen last
        record["seen"] = time.time()
        self.changed()
        return record

    def _forget_oldest(self) -> None:
        while len(self.users) >= MAX_USERS:
            guid, record = next(iter(self.users.items()))
            del self.users[guid]
            self._nicks.pop(record["nickname"].lower(), None)

    def set_nickname(self, guid: str, nickname: str) -> str:
        nickname = " ".join(nickname.split())
        if not nickname or not nickname.isprintable():
            raise ValueError("a nickname is 1-32 printable characters")
        owner = self._nicks.get(nickname.lower())
        if owner is not None and owner != guid:
            raise NicknameTaken(f"the nickname {nickname!r} is taken")
        record = self.user(guid)
        self._nicks.pop(record["nickname"].lower(), None)
        record["nickname"] = nickname
        self._nicks[nickname.lower()] = guid
        self.changed()
        return nickname

    def guid_of(self, name: str) -> str | None:
        """A GUID given either itself or a nickname."""
        if name in self.users:
            return name
        return self._nicks.get(name.lower())

    def record_query(self, guid: str, record: QueryRecord) -> None:
        user = self.user(guid)
        entry = {"prompt": record.prompt[:MAX_PROMPT_CHARS], "type": record.type, "time": record.time,
                 "cost_units": record.cost_units, "processing_time": round(record.processing_time, 3),
                 "status": record.status}
        user["queries"] = (user["queries"] + [entry])[-MAX_RECENT:]
        user["query_count"] += 1
        user["lifetime_cost_units"] += record.cost_units
        self.system["lifetime_cost_units"] += record.cost_units
        self.system["queries"] += 1
        self.changed()

    def note_concurrent(self, count: int) -> None:
        if count > self.system["max_concurrent"]:
            self.system["max_concurrent"] = count
            self.changed()

    # -- bans and keys -----------------------------------------------------------------

    def ban(self, guid: str) -> None:
        self.bans.add(guid)
        self.changed()

    def unban(self, guid: str) -> bool:
        present = guid in self.bans
        self.bans.discard(guid)
        self.changed()
        return present

    def new_api_key(self, guid: str) -> str:
        key = API_KEY_PREFIX + secrets.token_urlsafe(24)
        self.api_keys[key_digest(key)] = {"guid": guid, "created": time.time()}
        self.changed()
        return key

    def guid_for_key(self, key: str) -> str | None:
        entry = self.api_keys.get(key_digest(key))
        return entry["guid"] if entry else None

    # -- persistence -------------------------------------------------------------------

    def changed(self) -> None:
        self._dirty.set()

    def snapshot(self) -> str:
        return json.dumps({"version": FILE_VERSION, "users": self.users, "system": self.system,
                           "bans": sorted(self.bans), "api_keys": self.api_keys}, separators=(",", ":"))

    async def flush(self) -> None:
        """Write now (on a worker thread); the caller's change is durable when this returns."""
        async with self._write_lock:  # the snapshot is taken inside, so the last write is the newest state
            self._dirty = trio.Event()
            text = self.snapshot()
            try:
                with trio.CancelScope(shield=True):  # a started write always finishes (it is short)
                    await trio.to_thread.run_sync(write_private_atomic, self.path, text)
            except OSError:
                self._dirty.set()  # try again on the next change
                raise
            self.writes += 1

    async def run_writer(self, *, min_interval_s: float = 0.5, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Write after changes, at most every ``min_interval_s``; a final flush on cancel."""
        task_status.started()
        try:
            while True:
                await self._dirty.wait()
                try:
                    await self.flush()
                except OSError as exc:
                    log.error("cannot write the console user file %s: %s", self.path, exc)
                await trio.sleep(min_interval_s)  # coalesce bursts of changes (pacing, not synchronisation)
        finally:
            if self._dirty.is_set():
                with trio.CancelScope(shield=True):  # the last write, even though we are being cancelled
                    await self.flush()


def write_private_atomic(path: Path, text: str) -> None:
    """``node.files.write_text_atomic`` (0600 from its first byte) in a directory only we can open."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_text_atomic(path, text)


def _make_private(path: Path) -> None:
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
            os.chmod(path.parent, path.parent.stat().st_mode & 0o700)
    except OSError as exc:
        log.warning("cannot make %s private: %s", path, exc)
