"""``mtor-node wallet ...`` and ``mtor-node ledger ...``: argparse wiring, output, remote fallback.

Each command opens the ledger in ``<data>/ledger``; when a running node holds
its lock, the same operation goes to the node's control API
(``<data>/node.json`` names it; ``<data>/admin.secret`` authenticates), which
runs the same :func:`ledger.control_ops.dispatch`. Expected failures print
one line to stderr and exit 1. ``--json`` prints the operation's dict.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import plyvel

from ledger import control_ops
from ledger.ledger import Ledger, LedgerError, LedgerLocked
from ledger.records import QueryRecord
from ledger.records_export import trail_csv, trail_json
from ledger.store import leveldb_says
from ledger.wallet_files import create_wallet, is_encrypted, load_wallet, wallet_path
from ledger.wallet_ops import WalletError
from node import genesis as genesis_mod
from node import key_watch
from node.genesis import format_units, tokens_phrase
from node.identity import Identity, IdentityError, from_pem, to_pem

REMOTE_TIMEOUT_S = 30.0


class CliError(Exception):
    """An expected failure: one line for the user."""


# ---------------------------------------------------------------- parsers


def _common(parser: argparse.ArgumentParser, wallet: bool = True) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    if wallet:
        parser.add_argument("--wallet", metavar="NAME", help="use <data>/wallets/NAME.key (default: the node wallet)")
        parser.add_argument("--passphrase-file", type=Path, metavar="F", help="read the key passphrase from F")


def add_wallet_parser(subparsers) -> argparse.ArgumentParser:
    wallet = subparsers.add_parser("wallet", help="wallet keys, balances and payments (alone: the node wallet's balance)",
                                   usage="%(prog)s [-h] [--data-dir DATA_DIR] [COMMAND ...]")
    # `mtor-node wallet` alone answers the question it is usually asked: what the node wallet holds.
    wallet.set_defaults(func=run_wallet_balance, address=None, json=False, wallet=None, passphrase_file=None)
    sub = wallet.add_subparsers(dest="wallet_cmd", metavar="COMMAND")
    p = sub.add_parser("new", help="create a wallet key")
    p.add_argument("--name", help="wallet name (default: the node wallet, node.key)")
    p.add_argument("--encrypt", action="store_true", help="encrypt the key with a passphrase (prompted)")
    p.add_argument("--passphrase-file", type=Path, metavar="F", help="encrypt with the passphrase in F")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run_wallet_new)
    p = sub.add_parser("address", help="print the wallet's address")
    _common(p)
    p.set_defaults(func=run_wallet_address)
    p = sub.add_parser("balance", help="balance of the wallet or of ADDRESS")
    p.add_argument("address", nargs="?")
    _common(p)
    p.set_defaults(func=run_wallet_balance)
    p = sub.add_parser("send", help="pay AMOUNT tokens to ADDRESS")
    p.add_argument("address")
    p.add_argument("amount", help='tokens, e.g. "1.5" (at most 6 decimals)')
    p.add_argument("--ref", help="reference: 64 hex digits (receipt hash) or short text")
    _common(p)
    p.set_defaults(func=run_wallet_send)
    p = sub.add_parser("receive", help="pocket every payment waiting for the wallet")
    _common(p)
    p.set_defaults(func=run_wallet_receive)
    p = sub.add_parser("history", help="the wallet's (or ADDRESS's) blocks")
    p.add_argument("address", nargs="?")
    _common(p)
    p.set_defaults(func=run_wallet_history)
    p = sub.add_parser("trail", help="the wallet's (or ADDRESS's) query records: a table, JSON or CSV")
    p.add_argument("address", nargs="?")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table",
                   help="table (default), or the export formats json / csv")
    p.add_argument("--limit", type=int, metavar="N", help="only the newest N records")
    _common(p)
    p.set_defaults(func=run_wallet_trail)
    p = sub.add_parser("export", help="print the wallet key (PEM)")
    _common(p)
    p.add_argument("--out", type=Path, help="write to this file (0600) instead of stdout")
    p.set_defaults(func=run_wallet_export)
    p = sub.add_parser("import", help="import a PEM key file as a named wallet")
    p.add_argument("file", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--passphrase-file", type=Path, metavar="F", help="passphrase of the file (kept for the copy)")
    p.add_argument("--encrypt", action="store_true", help="encrypt the imported key (passphrase prompted)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run_wallet_import)
    return wallet


def add_ledger_parser(subparsers) -> argparse.ArgumentParser:
    led = subparsers.add_parser("ledger", help="inspect and check the ledger")
    sub = led.add_subparsers(dest="ledger_cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("verify", help="re-validate every block and index from scratch")
    _common(p, wallet=False)
    p.set_defaults(func=run_ledger_verify)
    p = sub.add_parser("stats", help="counts, supply and state hash")
    _common(p, wallet=False)
    p.set_defaults(func=run_ledger_stats)
    p = sub.add_parser("show", help="one block by hash")
    p.add_argument("block")
    _common(p, wallet=False)
    p.set_defaults(func=run_ledger_show)
    p = sub.add_parser("sync-status", help="how this running node's ledger compares with each peer's")
    _common(p, wallet=False)
    p.set_defaults(func=run_ledger_sync_status)
    p = sub.add_parser("repair", help="salvage a damaged store and rebuild its indexes (node stopped)")
    _common(p, wallet=False)
    p.set_defaults(func=run_ledger_repair)
    return led


# ---------------------------------------------------------------- plumbing


def _guard(fn):
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (CliError, WalletError, IdentityError, LedgerError, genesis_mod.GenesisError) as exc:
            print(f"mtor-node: error: {exc}", file=sys.stderr)
            return 1
        except plyvel.Error as exc:  # LevelDB's checksums, met by a read after the store opened
            print(f"mtor-node: error: the ledger store is damaged: {leveldb_says(exc)} (stop the node and run "
                  "`mtor-node ledger repair`)", file=sys.stderr)
            return 1
    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _read_passphrase_file(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        text = path.read_text().splitlines()
    except OSError as exc:
        raise CliError(f"cannot read passphrase file {path}: {exc.strerror}") from exc
    if not text or not text[0]:
        raise CliError(f"passphrase file {path} is empty")
    return text[0].encode()


def _prompt_new_passphrase() -> bytes:
    if not sys.stdin.isatty():
        raise CliError("--encrypt needs a terminal to ask for the passphrase; use --passphrase-file")
    first = getpass.getpass("New passphrase: ")
    if not first or first != getpass.getpass("Repeat passphrase: "):
        raise CliError("passphrases are empty or do not match")
    return first.encode()


def _passphrase_for(args, path: Path) -> bytes | None:
    given = _read_passphrase_file(getattr(args, "passphrase_file", None))
    if given is None and is_encrypted(path):
        if not sys.stdin.isatty():
            raise CliError(f"{path} is encrypted; give --passphrase-file")
        given = getpass.getpass(f"Passphrase for {path.name}: ").encode()
    return given


def _payload(args, **extra) -> dict:
    payload = {k: v for k, v in extra.items() if v is not None}
    name = getattr(args, "wallet", None)
    if name:
        payload["wallet"] = name
        passphrase = _passphrase_for(args, wallet_path(args.data_dir, name))
        if passphrase:
            payload["passphrase"] = passphrase.decode()
    return payload


def _node_identity(data_dir: Path) -> Identity | None:
    path = wallet_path(data_dir, None)
    return load_wallet(data_dir, None) if path.exists() else None


def _run_op(args, op: str, payload: dict) -> dict:
    """Run ``op`` on the local ledger, or on the running node when it holds the ledger."""
    data_dir = Path(args.data_dir)
    genesis = genesis_mod.load(data_dir / "genesis.mtor")
    try:
        # verify must be able to open a damaged store in order to report on it
        ledger = Ledger.open(data_dir / "ledger", genesis, check=op != "ledger/verify")
    except LedgerLocked:
        return _remote(data_dir, op, payload)
    try:
        identity = _node_identity(data_dir)
        if identity is not None:  # a node that found its key signing elsewhere left a marker: keep refusing
            key_watch.apply_marker(ledger, data_dir, identity.public_key)
        if identity is None and op.startswith("wallet/") and "wallet" not in payload and "address" not in payload:
            raise CliError(f"no node wallet at {wallet_path(data_dir, None)}; run `mtor-node init` first")
        return control_ops.dispatch(ledger, identity, data_dir, op, payload)
    finally:
        ledger.close()


def _remote(data_dir: Path, op: str, payload: dict) -> dict:
    try:
        runtime = json.loads((data_dir / "node.json").read_text())
        url = runtime["control_url"].rstrip("/")
        secret = (data_dir / "admin.secret").read_text().strip()
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise CliError("the ledger is locked by another process, but no running node answers for it "
                       f"({data_dir / 'node.json'} unreadable)") from exc
    area, name = op.split("/", 1)
    headers = {"Authorization": f"Bearer {secret}"}
    if area == "wallet":
        request = urllib.request.Request(f"{url}/control/{area}/{name}", data=json.dumps(payload).encode(),
                                         headers={**headers, "Content-Type": "application/json"}, method="POST")
    else:
        query = urllib.parse.urlencode({k: str(v) for k, v in payload.items()})
        request = urllib.request.Request(f"{url}/control/{area}/{name}" + (f"?{query}" if query else ""),
                                         headers=headers, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=REMOTE_TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error") or exc.reason
        except (ValueError, AttributeError):
            message = exc.reason
        raise CliError(f"node refused: {message}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CliError(f"cannot reach the running node at {url}: {exc}") from exc


def _emit(args, result: dict, lines: list[str]) -> int:
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else "\n".join(lines))
    return 0


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*map(str, r)) for r in rows]


# ---------------------------------------------------------------- wallet commands


@_guard
def run_wallet_new(args) -> int:
    passphrase = _read_passphrase_file(args.passphrase_file)
    if args.encrypt and passphrase is None:
        passphrase = _prompt_new_passphrase()
    path = wallet_path(args.data_dir, args.name)
    identity = create_wallet(args.data_dir, args.name, passphrase)
    result = {"name": args.name or "node", "address": identity.address, "key_file": str(path),
              "encrypted": passphrase is not None}
    return _emit(args, result, [f"created wallet {result['name']}: {identity.address}",
                                f"key file {path}" + (" (encrypted)" if passphrase else "")])


@_guard
def run_wallet_address(args) -> int:
    path = wallet_path(args.data_dir, args.wallet)
    identity = load_wallet(args.data_dir, args.wallet, _passphrase_for(args, path))
    return _emit(args, {"address": identity.address}, [identity.address])


@_guard
def run_wallet_balance(args) -> int:
    payload = {"address": args.address} if args.address else _payload(args)
    r = _run_op(args, "wallet/balance", payload)
    hint = "  (run `mtor-node wallet receive`)" if r["receivable_units"] else ""
    lines = [f"address     {r['address']}", f"balance     {tokens_phrase(r['balance'])}",
             f"receivable  {tokens_phrase(r['receivable'])}{hint}"]
    if r.get("frozen"):
        lines.append("FROZEN: this account signed conflicting blocks")
    return _emit(args, r, lines)


@_guard
def run_wallet_send(args) -> int:
    r = _run_op(args, "wallet/send", _payload(args, to=args.address, amount=args.amount, ref=args.ref))
    return _emit(args, r, [f"sent {tokens_phrase(r['amount'])} to {r['to']}", f"block {r['hash']}",
                           f"balance {tokens_phrase(r['balance'])}"])


@_guard
def run_wallet_receive(args) -> int:
    r = _run_op(args, "wallet/receive", _payload(args))
    lines = [f"received {tokens_phrase(x['amount'])} (block {x['hash'][:16]}...)" for x in r["received"]]
    return _emit(args, r, (lines or ["nothing to receive"]) + [f"balance {tokens_phrase(r['balance'])}"])


@_guard
def run_wallet_history(args) -> int:
    payload = {"address": args.address} if args.address else _payload(args)
    r = _run_op(args, "wallet/history", payload)
    rows = [[e["height"], e["type"], _signed_amount(e), e["balance"],
             e["counterparty"] or (f"replaces {e['replaces'][:16]}" if "replaces" in e else ""),
             "" if e["effective"] else "does not count", e["hash"][:16]]
            for e in r["entries"]]
    lines = [f"history of {r['address']}"] + (_table(rows, ["height", "type", "amount", "balance", "counterparty",
                                                             "note", "block"]) if rows else ["no blocks yet"])
    return _emit(args, r, lines)


def _signed_amount(entry: dict) -> str:
    """What a block did to the balance: a send takes, a credit adds, a re-anchor moves nothing."""
    if entry["type"] == "reanchor":
        return "0"
    return ("-" if entry["type"] == "send" else "+") + entry["amount"]


@_guard
def run_wallet_trail(args) -> int:
    """Query records (ledger/records.py) through the same op offline and via the running node."""
    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be at least 1")
    payload = {"address": args.address} if args.address else _payload(args)
    if args.limit is not None:
        payload["limit"] = args.limit
    r = _run_op(args, "wallet/trail", payload)
    records = [QueryRecord.from_json(row) for row in r["records"]]
    if args.format != "table" and not args.json:
        sys.stdout.write(trail_json(records) if args.format == "json" else trail_csv(records))
        return 0
    t = r["totals"]
    rows = [[rec.query_id.hex()[:12], rec.type, rec.model or "-", rec.outcome.value, format_units(rec.price_units),
             rec.queue_wait_ms, rec.processing_ms, rec.worker_address[:16] or "-"] for rec in records]
    lines = [f"trail of {r['address']}: {t['queries']} queries, {t['done']} done, "
             f"{tokens_phrase(format_units(t['lifetime_units']))} spent"]
    lines += _table(rows, ["query", "type", "model", "outcome", "price", "wait ms", "run ms", "paid to"]) if rows else \
        ["no queries yet"]
    return _emit(args, r, lines)


@_guard
def run_wallet_export(args) -> int:
    path = wallet_path(args.data_dir, args.wallet)
    passphrase = _passphrase_for(args, path)
    identity = load_wallet(args.data_dir, args.wallet, passphrase)
    pem = to_pem(identity, passphrase).decode()
    result = {"address": identity.address, "encrypted": passphrase is not None}
    if args.out:
        try:
            fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise CliError(f"{args.out} already exists; refusing to overwrite it") from exc
        with os.fdopen(fd, "w") as handle:
            handle.write(pem)
        result["file"] = str(args.out)
        return _emit(args, result, [f"exported {identity.address} to {args.out}"])
    result["pem"] = pem
    return _emit(args, result, [pem.rstrip()])


@_guard
def run_wallet_import(args) -> int:
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror}") from exc
    passphrase = _read_passphrase_file(args.passphrase_file)
    identity = from_pem(data, passphrase, source=str(args.file))
    if args.encrypt and passphrase is None:
        passphrase = _prompt_new_passphrase()
    path = wallet_path(args.data_dir, args.name)
    create_wallet(args.data_dir, args.name, passphrase, identity)
    result = {"name": args.name, "address": identity.address, "key_file": str(path), "encrypted": bool(passphrase)}
    return _emit(args, result, [f"imported {identity.address} as wallet {args.name}"])


# ---------------------------------------------------------------- ledger commands


@_guard
def run_ledger_verify(args) -> int:
    r = _run_op(args, "ledger/verify", {})
    if r["ok"]:
        return _emit(args, r, [f"ok: {r['blocks']} blocks, {r['accounts']} accounts, "
                               f"{r['frozen_accounts']} frozen; every index matches"])
    if args.json:
        print(json.dumps(r, indent=2, sort_keys=True))
    else:
        print(f"ledger verify FAILED ({r['problem_count']} problems); first: {r['problems'][0]}")
    return 1


@_guard
def run_ledger_repair(args) -> int:
    """Offline only: a running node holds the store, and repairing it under the node would race its writes."""
    from ledger.repair import repair

    data_dir = Path(args.data_dir)
    r = repair(data_dir / "ledger", genesis_mod.load(data_dir / "genesis.mtor")).to_json()
    lines = [f"repaired {data_dir / 'ledger'}: {r['blocks_stored']} of {r['blocks_salvaged']} readable blocks stored"
             + (f" (the store said it held {r['blocks_before']})" if r["blocks_before"] is not None else ""),
             "node-local entries kept: "
             + (", ".join(f"{n} {k}" for k, n in sorted(r["node_local"].items())) or "none"),
             f"state hash {r['state_hash']}",
             f"the store as it was: {r['backup']} (remove it once the node runs well)"]
    if r["unreadable"]:
        lines.append(f"{r['unreadable']} salvaged entries were damaged (a block, hold or record) and were left out")
    if r["unplaced"]:
        lines.append(f"{r['unplaced']} blocks wait for a block that was lost; they are kept in {r['unplaced_file']}, "
                     "and sync fetches them, and what they wait for, from peers")
    return _emit(args, r, lines)


@_guard
def run_ledger_stats(args) -> int:
    r = _run_op(args, "ledger/stats", {})
    flat: dict = {}
    for key, value in r.items():  # one line per value: a nested map's keys as parent.child
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": sub_value for sub, sub_value in value.items()})
        else:
            flat[key] = value
    width = max(map(len, flat), default=0) + 2
    return _emit(args, r, [f"{k:<{width}}{v}" for k, v in sorted(flat.items())])


@_guard
def run_ledger_show(args) -> int:
    r = _run_op(args, "ledger/show", {"block": args.block})
    return _emit(args, r, [f"{k:<16}{v}" for k, v in r.items()])


@_guard
def run_ledger_sync_status(args) -> int:
    """Sync state lives in the running node's memory, so this always asks the node."""
    status = _remote(args.data_dir, "ledger/sync-status", {})
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    rows = []
    for peer in status.get("peers", []):
        rows.append([peer["peer"][-12:], "yes" if peer.get("connected") else "no",
                     {True: "yes", False: "no"}.get(peer.get("equal"), "?"), peer.get("syncs", 0),
                     peer.get("pulled_total", 0), peer.get("accepted_total", 0), peer.get("last_error") or ""])
    header = ["PEER", "CONNECTED", "IN SYNC", "SYNCS", "PULLED", "ACCEPTED", "LAST ERROR"]
    lines = [f"sync every {status.get('interval_s')} s; {len(rows)} peer(s)"] + (_table(rows, header) if rows else [])
    print("\n".join(lines))
    return 0
