"""Which keys must sign nothing on this node, and what their users are told.

A copy of a data dir carries every key the node signs with: the node key, and the console users'
custodial wallets, sealed with it in the same store. So when the node key turns out to sign on
another node too (node.key_watch), every wallet this node keeps may be signed for twice, and one
height signed twice freezes a wallet for good: the node then signs for none of them, not only its
own. Behaves as a ``dict`` of per-key reasons, so every signing path asks it the one way
(``refusals.get(key)``, ``key in refusals``).
"""

from __future__ import annotations

from typing import Any


class SigningRefusals(dict):
    """``{public key: why it must not sign}``, plus :attr:`every_key`: a reason that covers every key."""

    def __init__(self) -> None:
        super().__init__()
        #: Set when no key this node holds may sign (a copy of its data dir runs elsewhere).
        self.every_key: str | None = None

    def get(self, key: Any, default: Any = None) -> Any:
        own = super().get(key)
        if own is not None:
            return own
        return self.every_key if self.every_key is not None else default

    def __contains__(self, key: object) -> bool:
        return self.every_key is not None or super().__contains__(key)

    def __missing__(self, key: Any) -> str:
        if self.every_key is None:
            raise KeyError(key)
        return self.every_key
