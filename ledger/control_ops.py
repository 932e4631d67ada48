"""The control API's wallet and ledger operations, shared by the web app and the CLI.

``handle_control(ledger, node_identity, data_dir, "wallet/send", payload)``
returns ``(http_status, json_dict)``; errors are ``(4xx, {"error": message})``.
Payload values may be strings (GET query parameters) or JSON types.

=================  ===================================================  ==========
op                 payload                                              result
=================  ===================================================  ==========
wallet/address     wallet?, passphrase?                                 {address}
wallet/balance     address? | wallet?                                   balance dict
wallet/send        to, amount (tokens, "1.5"), ref?, wallet?, passphrase?  send dict
wallet/receive     wallet?, passphrase?                                 receive dict
wallet/history     address? | wallet?                                   {address, entries}
wallet/trail       address? | wallet?, limit?                           {address, records, totals}
ledger/verify      -                                                    verify report
ledger/stats       -                                                    stats + state hash + memory
ledger/show        block (hex hash)                                     block dict
=================  ===================================================  ==========
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ledger import wallet_ops
from ledger.address import AddressError, decode_address, encode_address
from ledger.ledger import Ledger
from ledger.records import RecordError
from ledger.wallet_files import load_wallet, wallet_path
from ledger.wallet_ops import WalletError
from node.identity import Identity, IdentityError


def _text(payload: dict, key: str, required: bool = False) -> str | None:
    value = payload.get(key)
    if value is None or value == "":
        if required:
            raise WalletError(f"missing {key!r}")
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise WalletError(f"{key!r} must be text")
    return str(value)


def _identity(node_identity: Identity, data_dir: Path, payload: dict) -> Identity:
    name = _text(payload, "wallet")
    if not name:
        if node_identity is None:
            raise WalletError("this data dir has no node wallet (node.key); run `mtor-node init`", 404)
        return node_identity
    passphrase = _text(payload, "passphrase")
    try:
        path = wallet_path(data_dir, name)
        if not path.exists():
            raise WalletError(f"no wallet named {name!r}", 404)
        return load_wallet(data_dir, name, passphrase.encode() if passphrase else None)
    except IdentityError as exc:
        raise WalletError(str(exc)) from exc


def _address(node_identity: Identity, data_dir: Path, payload: dict) -> str:
    return _text(payload, "address") or _identity(node_identity, data_dir, payload).address


def show_block(ledger: Ledger, hex_hash: str) -> dict:
    try:
        block_hash = bytes.fromhex(hex_hash)
    except ValueError as exc:
        raise WalletError("block must be a 64-digit hex hash") from exc
    block = ledger.get_block(block_hash) if len(block_hash) == 32 else None
    if block is None:
        raise WalletError(f"no block {hex_hash} in this ledger", 404)
    out = block.to_json()
    out["account_address"] = encode_address(block.account)
    out["effective"] = ledger.is_effective(block_hash)
    out["first_seen_ms"] = ledger.first_seen_ms(block_hash)
    return out


MAX_TRAIL_LIMIT = 1_000_000


def trail(ledger: Ledger, address: str, limit: str | None) -> dict:
    """The payer's query records, newest first (ledger/records.py), with their lifetime totals."""
    try:
        account = decode_address(address)
    except AddressError as exc:
        raise WalletError(str(exc)) from exc
    count = None
    if limit is not None:
        if not str(limit).isdigit() or not 0 < int(limit) <= MAX_TRAIL_LIMIT:
            raise WalletError(f"limit must be a whole number from 1 to {MAX_TRAIL_LIMIT}")
        count = int(limit)
    try:
        records = [r.to_json() for r in ledger.records_of(account, count)]
        totals = ledger.payer_totals(account)
    except RecordError as exc:
        raise WalletError(f"{exc} (run `mtor-node ledger verify`)", 500) from exc
    return {"address": encode_address(account), "records": records, "totals": totals}


def ledger_stats(ledger: Ledger) -> dict:
    ok, held, supply = ledger.check_bank()
    return {**ledger.stats(), "state_hash": ledger.state_hash().hex(), "bank_invariant": ok,
            "memory": ledger.memory()}


def dispatch(ledger: Ledger, node_identity: Identity, data_dir: Path, op: str, payload: dict) -> dict:
    """Run ``op``; raises :class:`WalletError` for expected failures."""
    if op == "wallet/address":
        return {"address": _identity(node_identity, data_dir, payload).address}
    if op == "wallet/balance":
        return wallet_ops.balance(ledger, _address(node_identity, data_dir, payload))
    if op == "wallet/history":
        return wallet_ops.history(ledger, _address(node_identity, data_dir, payload))
    if op == "wallet/trail":
        return trail(ledger, _address(node_identity, data_dir, payload), _text(payload, "limit"))
    if op == "wallet/send":
        identity = _identity(node_identity, data_dir, payload)
        amount = wallet_ops.parse_amount(_text(payload, "amount", required=True))
        ref = wallet_ops.parse_ref(_text(payload, "ref"))
        return wallet_ops.send(ledger, identity, _text(payload, "to", required=True), amount, ref)
    if op == "wallet/receive":
        return wallet_ops.receive_all(ledger, _identity(node_identity, data_dir, payload))
    if op == "ledger/verify":
        return ledger.verify().to_json()
    if op == "ledger/stats":
        return ledger_stats(ledger)
    if op == "ledger/show":
        return show_block(ledger, _text(payload, "block", required=True))
    raise WalletError(f"unknown control operation {op!r}", 404)


def handle_control(ledger: Ledger, node_identity: Identity, data_dir: Path, op: str,
                   payload: dict[str, Any] | None) -> tuple[int, dict]:
    """Pure entry point for the web app: (status, JSON). Never raises for bad input."""
    if payload is not None and not isinstance(payload, dict):
        return 400, {"error": "payload must be a JSON object"}
    try:
        return 200, dispatch(ledger, node_identity, Path(data_dir), op, payload or {})
    except WalletError as exc:
        return exc.status, {"error": str(exc)}
