"""Realm-namespaced gossip topics and stream protocol ids.

Every name carries the realm id (hex of the genesis hash), so nodes of two
realms sharing one network never exchange ads, blocks or sysop messages, and
a stream opened for one realm's protocol cannot reach another realm's handler.
"""

from __future__ import annotations

from dataclasses import dataclass

from libp2p.custom_types import TProtocol

ANNOUNCE = "announce"
LEDGER = "ledger"
SYSOP = "sysop"
TOPIC_NAMES = (ANNOUNCE, LEDGER, SYSOP)


def _check_realm(realm_hex: str) -> str:
    if len(realm_hex) != 64 or any(c not in "0123456789abcdef" for c in realm_hex):
        raise ValueError(f"realm id must be 64 lower-case hex characters, got {realm_hex!r}")
    return realm_hex


def topic_name(realm_hex: str, name: str) -> str:
    """``/mtor/<realm_hex>/<name>`` for one of :data:`TOPIC_NAMES`."""
    if name not in TOPIC_NAMES:
        raise ValueError(f"unknown topic {name!r}; expected one of {', '.join(TOPIC_NAMES)}")
    return f"/mtor/{_check_realm(realm_hex)}/{name}"


def announce_topic(realm_hex: str) -> str:
    return topic_name(realm_hex, ANNOUNCE)


def ledger_topic(realm_hex: str) -> str:
    return topic_name(realm_hex, LEDGER)


def sysop_topic(realm_hex: str) -> str:
    return topic_name(realm_hex, SYSOP)


#: Versions of the query protocol this node speaks, newest first: ``2`` is ``1`` with receipts that
#: name the model that answered (docs/protocol.md). A broker offers both and takes what the worker
#: picks; a worker serves both.
QUERY_VERSIONS = (2, 1)


def query_protocol(realm_hex: str, version: int = 1) -> TProtocol:
    """Broker -> worker query stream: ``/mtor/<realm_hex>/query/<version>``."""
    if version not in QUERY_VERSIONS:
        raise ValueError(f"unknown query protocol version {version!r}; known: {QUERY_VERSIONS}")
    return TProtocol(f"/mtor/{_check_realm(realm_hex)}/query/{version}")


def query_protocols(realm_hex: str) -> list[TProtocol]:
    """Every query protocol id this node speaks, newest first (what a broker offers a worker)."""
    return [query_protocol(realm_hex, version) for version in QUERY_VERSIONS]


def query_version(protocol: str | None) -> int:
    """The version of a negotiated query protocol id (1 when libp2p did not say which)."""
    tail = (protocol or "").rpartition("/")[2]
    return int(tail) if tail.isdecimal() and int(tail) in QUERY_VERSIONS else 1


def sync_protocol(realm_hex: str) -> TProtocol:
    """Ledger anti-entropy stream: ``/mtor/<realm_hex>/sync/1``."""
    return TProtocol(f"/mtor/{_check_realm(realm_hex)}/sync/1")


def ad_protocol(realm_hex: str) -> TProtocol:
    """Which ad a peer holds for a peer id (p2p.ad_stream): ``/mtor/<realm_hex>/ad/1``."""
    return TProtocol(f"/mtor/{_check_realm(realm_hex)}/ad/1")


def capability_key(realm_hex: str, capability: str) -> str:
    """DHT provider key for a capability: ``/mtor/<realm_hex>/cap/<name>``."""
    if not capability or "/" in capability:
        raise ValueError(f"invalid capability name {capability!r}")
    return f"/mtor/{_check_realm(realm_hex)}/cap/{capability}"


@dataclass(frozen=True)
class RealmTopics:
    """The three topic strings of one realm, and the reverse lookup."""

    realm_hex: str

    @property
    def announce(self) -> str:
        return announce_topic(self.realm_hex)

    @property
    def ledger(self) -> str:
        return ledger_topic(self.realm_hex)

    @property
    def sysop(self) -> str:
        return sysop_topic(self.realm_hex)

    def topic(self, name: str) -> str:
        return topic_name(self.realm_hex, name)

    def all(self) -> dict[str, str]:
        """Short name -> full topic string."""
        return {name: topic_name(self.realm_hex, name) for name in TOPIC_NAMES}

    def name_of(self, topic: str) -> str | None:
        """The short name of one of this realm's topics, or None for any other string."""
        for name, full in self.all().items():
            if full == topic:
                return name
        return None
