"""Wallet operations over an open ledger, returning JSON-able dicts.

Shared by the CLI (local ledger), the control API (running node) and the
console. Expected failures raise :class:`WalletError` whose message is meant
for the user; nothing here prints.
"""

from __future__ import annotations

import logging
import time
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

from ledger import blocks as B
from ledger.address import AddressError, decode_address, encode_address
from ledger.blocks import MAX_REF_BYTES, MAX_UNITS
from ledger.errors import LedgerError
from ledger.ledger import Ledger
from ledger.verdicts import Verdict
from node.genesis import UNIT_DECIMALS, UNITS_PER_TOKEN, format_units
from node.identity import Identity

if TYPE_CHECKING:
    from ledger.group import GroupWrite

log = logging.getLogger(__name__)


class WalletError(LedgerError):
    """A wallet operation that cannot be done; ``status`` is the HTTP status the control API uses."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_amount(text: str | int) -> int:
    """Token amount ("1.5", "100") -> units. Refuses > 6 decimals, <= 0 and >= 2^63 units."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation as exc:
        raise WalletError(f"amount {text!r} is not a number") from exc
    if not value.is_finite():
        raise WalletError(f"amount {text!r} is not a number")
    units = value * UNITS_PER_TOKEN
    if units != units.to_integral_value():
        raise WalletError(f"amount {text!r} has more than {UNIT_DECIMALS} decimals")
    if units <= 0:
        raise WalletError("amount must be more than 0")
    if units >= MAX_UNITS:
        raise WalletError("amount is too large")
    return int(units)


def parse_ref(text: str | None) -> bytes | None:
    """--ref value: 64 hex digits (a receipt hash) become 32 bytes, other text is UTF-8 (<= 64 bytes)."""
    if text is None or text == "":
        return None
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    data = text.encode()
    if len(data) > MAX_REF_BYTES:
        raise WalletError(f"reference is longer than {MAX_REF_BYTES} bytes")
    return data


def _account(address: str) -> bytes:
    try:
        return decode_address(address)
    except AddressError as exc:
        raise WalletError(str(exc)) from exc


def _now() -> int:
    return int(time.time() * 1000)


def signing_base(ledger: "Ledger | GroupWrite", identity: Identity, now_ms: int | None = None) -> B.Block | None:
    """The block the wallet's next block goes on: its effective frontier, re-anchored first when a
    payment it received was undone (docs/ledger.md, "Re-anchoring").

    The wallet signed that receive when the payment counted, and a payment that stops counting never
    counts again, so the re-anchor forfeits nothing that could come back; without it every block the
    wallet signed would be left above a receive that does not count."""
    refused = ledger.signing_refused.get(identity.public_key)
    if refused is not None:
        raise WalletError(refused, 409)
    st = ledger.account_state(identity.public_key)
    if st.fork_height is not None:
        raise WalletError("this wallet signed two conflicting blocks and is frozen", 409)
    frontier = ledger.get_block(st.eff_hash) if st.eff_hash is not None else None
    if st.eff_height == st.tip_height:
        return frontier
    stuck = ledger.stuck_credit(identity.public_key)
    if stuck is None:  # only blocks of an abandoned branch above: the frontier is where the chain goes on
        return frontier
    anchor = B.make_reanchor(identity, stuck, frontier, now_ms or _now())
    result = ledger.submit(anchor)
    if result.verdict is not Verdict.ACCEPTED:
        raise WalletError(f"this wallet's chain is stalled (a payment it received was undone) and its "
                          f"re-anchor was refused: {result.verdict.value} {result.detail}".strip(), 409)
    log.warning("wallet %s: the payment of %s received at height %d was undone by its payer's conflicting "
                "block; re-anchored there, the wallet goes on without it", identity.address,
                format_units(stuck.amount), stuck.height)
    return anchor


def _submit(ledger: Ledger, block: B.Block) -> None:
    result = ledger.submit(block.raw)
    if result.verdict is not Verdict.ACCEPTED:
        raise WalletError(f"ledger refused the block: {result.verdict.value} {result.detail}".strip(), 409)


def send(ledger: Ledger, identity: Identity, address: str, amount_units: int, ref: bytes | None = None,
         *, now_ms: int | None = None) -> dict:
    """Sign and store a send of ``amount_units`` to ``address``. Mistyped addresses are refused."""
    to = _account(address)
    if not 0 < amount_units < MAX_UNITS:
        raise WalletError("amount must be more than 0 and less than 2^63 units")
    prev = signing_base(ledger, identity, now_ms)
    balance = prev.balance if prev is not None else 0
    held = ledger.held_units(identity.public_key)
    if prev is None or amount_units > balance - held:
        on_hold = f" ({format_units(held)} of it on hold for running queries)" if held else ""
        raise WalletError(f"not enough tokens: the balance is {format_units(balance)}{on_hold}, "
                          f"the payment {format_units(amount_units)}", 402)
    block = B.make_send(identity, prev, to, amount_units, now_ms or _now(), ref)
    _submit(ledger, block)
    return {"hash": block.hash.hex(), "from": identity.address, "to": encode_address(to),
            "amount": format_units(amount_units), "amount_units": amount_units,
            "ref": ref.hex() if ref else None, "balance": format_units(block.balance),
            "balance_units": block.balance}


def receive_all(ledger: Ledger, identity: Identity, *, now_ms: int | None = None,
                only: set[bytes] | None = None) -> dict:
    """Receive every receivable send (or just those in ``only``) into the wallet's chain."""
    prev = signing_base(ledger, identity, now_ms)
    blocks = []
    for source, amount in ledger.receivable(identity.public_key):
        if only is None or source in only:
            prev = B.make_credit(identity, ledger.facts.realm, prev, source, amount, now_ms or _now())
            blocks.append(prev)
    results = ledger.submit_chain(blocks) if blocks else []  # one write, one fsync, however many
    received = [{"hash": block.hash.hex(), "source": block.source.hex(), "amount": format_units(block.amount),
                 "amount_units": block.amount} for block, result in zip(blocks, results)
                if result.verdict is Verdict.ACCEPTED]
    if len(received) < len(blocks):  # those before the refused one are stored, as one by one
        refused = results[-1]
        raise WalletError(f"ledger refused the block: {refused.verdict.value} {refused.detail}".strip(), 409)
    return {"address": identity.address, "received": received, **balance(ledger, identity.address)}


def balance(ledger: Ledger, address: str) -> dict:
    """Balance and receivable of any address."""
    account = _account(address)
    units = ledger.balance(account)
    pending = sum(amount for _, amount in ledger.receivable(account))
    st = ledger.account_state(account)
    return {"address": encode_address(account), "balance": format_units(units), "balance_units": units,
            "receivable": format_units(pending), "receivable_units": pending,
            "frozen": st.fork_height is not None}


def history(ledger: Ledger, address: str) -> dict:
    """Every block of the account, oldest first, with whether it counts."""
    account = _account(address)
    entries = []
    for entry in ledger.history(account):
        block = entry.block
        row = {"height": block.height, "type": block.type, "hash": block.hash.hex(),
               "amount": format_units(block.amount), "amount_units": block.amount,
               "balance": format_units(block.balance), "time_ms": block.timestamp_ms,
               "effective": entry.effective, "counterparty": None, "ref": None}
        if block.type == "send":
            row["counterparty"] = encode_address(block.to)
            row["ref"] = block.ref.hex() if block.ref else None
        elif block.type in B.CREDITS:
            source = ledger.get_block(block.source)
            row["counterparty"] = encode_address(source.account) if source is not None else "genesis"
        elif block.type == "reanchor":  # moves nothing: takes the place of an undone credit
            row["replaces"] = block.replaces.hex()
        entries.append(row)
    return {"address": encode_address(account), "entries": entries}
