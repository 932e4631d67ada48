"""Shared tools for the reliability suite: build a realm of real node processes, talk to a running
node's control API in-process (no CLI start-up per call), and check the bank invariant offline.

Offline checks open each node's LevelDB with :meth:`Ledger.open` after the node has stopped (or
been killed): the store is single-writer, so this is the only way to read holds, query records and
every index without going through the node under test.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ledger.ledger import Ledger
from ledger.wallet_files import load_wallet
from node import genesis as genesis_mod
from tests.harness import FAST, NodeProcess, run_cli

LONG = os.environ.get("MTOR_LONG") == "1"


class ControlError(Exception):
    """The node refused (HTTP status) or could not be reached (status None)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def control(data_dir: Path, area: str, op: str, payload: dict | None = None, *, post: bool = False,
            timeout_s: float = 10.0) -> dict:
    """Call ``/control/<area>/<op>`` of the node running on ``data_dir`` (GET, or POST with JSON).

    An empty ``op`` calls ``/control/<area>`` (``control(d, "status", "")`` is the live node status).
    """
    try:
        runtime = json.loads((data_dir / "node.json").read_text())
        secret = (data_dir / "admin.secret").read_text().strip()
    except (OSError, ValueError) as exc:
        raise ControlError(None, f"no running node: {exc}") from exc
    url = f"{runtime['control_url'].rstrip('/')}/control/{area}" + (f"/{op}" if op else "")
    headers = {"Authorization": f"Bearer {secret}"}
    if post:
        request = urllib.request.Request(url, data=json.dumps(payload or {}).encode(),
                                         headers={**headers, "Content-Type": "application/json"}, method="POST")
    else:
        query = urllib.parse.urlencode({k: str(v) for k, v in (payload or {}).items()})
        request = urllib.request.Request(url + (f"?{query}" if query else ""), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ControlError(exc.code, exc.read().decode(errors="replace")) from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise ControlError(None, f"{type(exc).__name__}: {exc}") from exc  # cut off, e.g. by a kill


def quiescent(read_hashes: Callable[[], list], read_owed: Callable[[], Iterable[int]]) -> bool:
    """Every node at one state hash, nothing left to receive, and no block added while we looked.

    Reads the hashes, then what is owed, then the hashes again, and wants the two reads equal.
    One read of each is not enough: a worker that receives its last payments after the hashes
    were read and before the balances were (so it owes itself nothing any more) would pass a
    realm whose other nodes never got those receive blocks.
    """
    first = read_hashes()
    if None in first or len(set(first)) != 1:
        return False
    if any(read_owed()):
        return False
    return read_hashes() == first


def address_of(data_dir: Path) -> str:
    """The node wallet's address, read from its key file (no CLI start-up)."""
    return load_wallet(data_dir, None).address


def init_realm(tmp_path: Path, names: list[str], realm: str) -> list[Path]:
    """``init --realm`` the first data dir, ``init --join`` the others (all at once); return the dirs."""
    dirs = [tmp_path / n for n in names]
    made = run_cli("init", "--data-dir", str(dirs[0]), "--realm", realm)
    assert made.returncode == 0, made.stderr
    with ThreadPoolExecutor(max_workers=8) as pool:  # each join is its own process
        joins = list(pool.map(lambda d: run_cli("init", "--data-dir", str(d), "--join", str(dirs[0] / "genesis.mtor")),
                              dirs[1:]))
    for joined in joins:
        assert joined.returncode == 0, joined.stderr
    return dirs


def start_node(data_dir: Path, capabilities: str, bootstrap: list[str] = (), env: dict | None = None) -> NodeProcess:
    boot = [a for addr in bootstrap for a in ("--bootstrap", addr)]
    return NodeProcess(data_dir, extra_args=("--capabilities", capabilities, *boot), env={**FAST, **(env or {})}).start()


@dataclass(frozen=True)
class BankReport:
    data_dir: Path
    ok: bool
    held_units: int
    supply_units: int
    state_hash: str
    verify_ok: bool
    problems: tuple[str, ...]
    holds: tuple
    accounts: dict  # account hex -> (tip height, fork height, effective height, effective hash hex)


def open_ledger(data_dir: Path) -> Ledger:
    genesis = genesis_mod.load(data_dir / "genesis.mtor")
    return Ledger.open(data_dir / "ledger", genesis, sync=False)  # open runs the quick check


def bank_report(data_dir: Path) -> BankReport:
    """Open a stopped node's ledger and read the bank invariant, verify report, state hash and holds."""
    with open_ledger(data_dir) as led:
        ok, held, supply = led.check_bank()
        report = led.verify()
        accounts = {}
        for account in led.frontiers():
            st = led.account_state(account)
            accounts[account.hex()] = (st.tip_height, st.fork_height, st.eff_height, (st.eff_hash or b"").hex()[:16])
        return BankReport(data_dir, ok, held, supply, led.state_hash().hex(), report.ok,
                          tuple(map(str, report.problems)), tuple(led.holds()), accounts)


def _account_differences(reports: list[BankReport]) -> dict:
    """Per account, what each node holds, for the accounts where the nodes disagree."""
    keys = set().union(*(r.accounts for r in reports))
    return {k[:16]: {r.data_dir.name: r.accounts.get(k) for r in reports}
            for k in sorted(keys) if len({r.accounts.get(k) for r in reports}) > 1}


def assert_bank(data_dirs: list[Path], *, same_state: bool = True, no_holds: bool = True) -> list[BankReport]:
    """Jepsen-style bank check over STOPPED nodes: on every node the store verifies, Σ balances +
    Σ receivable == supply (balances are u64 in the store, so none is negative), and, when asked,
    every node has the same state hash and no escrow hold is left."""
    reports = [bank_report(d) for d in data_dirs]
    for r in reports:
        assert r.verify_ok, (r.data_dir.name, r.problems)
        assert r.ok, f"{r.data_dir.name}: {r.held_units} units held by accounts, supply {r.supply_units}"
        if no_holds:
            assert not r.holds, (r.data_dir.name, r.holds)
    supplies = {r.supply_units for r in reports}
    assert len(supplies) == 1, supplies
    if same_state:
        assert len({r.state_hash for r in reports}) == 1, (
            f"state hashes differ: {sorted(r.state_hash[:16] for r in reports)}; "
            f"(tip, fork, effective height, effective hash) of the accounts that differ: {_account_differences(reports)}")
    return reports


def stop_all(nodes: list[NodeProcess]) -> None:
    for node in nodes:
        if node.proc is not None and node.proc.poll() is None:
            try:
                node.stop(timeout_s=20)
            except Exception:  # noqa: BLE001 - a node that will not stop is killed below
                pass
        node.kill()
