"""`mtor-node ledger repair`: a damaged store is salvaged and rebuilt from its blocks, node-local
entries kept; an undamaged one comes out the same; a store in use is not touched."""

from __future__ import annotations

import pytest

import cli
from ledger.blocks import parse_block
from ledger.custody import Custody
from ledger.errors import LedgerLocked
from ledger.ledger import Ledger
from ledger.repair import repair
from tests.ledger.conftest import UNIT, ident
from tests.ledger.scenarios import make_history
from tests.ledger.test_records import ALICE, rec

ACCOUNTS = [ident(1)] + [ident(10 + i) for i in range(4)]  # make_history's founder and people
RECORDS = range(1, 30)


@pytest.fixture
def filled(tmp_path, genesis, founder):
    """A data dir whose ledger holds forked histories, a custodial wallet, a hold and query records,
    compacted into LevelDB tables (where a damaged disk block hurts)."""
    (tmp_path / "genesis.mtor").write_bytes(genesis.to_bytes())
    path = tmp_path / "ledger"
    with Ledger.open(path, genesis) as led:
        for seed in range(6):
            history = make_history(genesis, seed=seed, steps=120, fork_rate=0.03, reanchor_rate=0.02)
            led.submit_many([b.raw for b in history])
        Custody(led, founder, budget_units=1_000 * UNIT).open_wallet("browser-guid-1")
        led.place_hold(founder.public_key, bytes(16), UNIT)
        for n in RECORDS:
            led.put_record(rec(n))
        led._db._db.compact_range()
    return tmp_path, path


def all_blocks(led: Ledger) -> set[bytes]:
    return {raw for account in ACCOUNTS for raw in led.blocks_from(account.public_key)}


def snapshot(path, genesis) -> dict:
    with Ledger.open(path, genesis) as led:
        blocks = all_blocks(led)
        return {
            "state": led.state_hash(), "stats": led.stats()["blocks"], "blocks": blocks,
            "first_seen": {raw: led.first_seen_ms(parse_block(raw).hash) for raw in blocks},
            "holds": led.holds(), "records": led.records_of(ALICE.public_key),
            "totals": led.query_totals(), "custody": led.aux_items(b"W"), "grants": led.aux_items(b"G"),
        }


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_an_undamaged_store_comes_out_the_same(filled, genesis):
    data, path = filled
    before = snapshot(path, genesis)
    report = repair(path, genesis)
    assert report.blocks_stored == report.blocks_salvaged == report.blocks_before == before["stats"]
    assert report.unplaced == report.unreadable == 0 and report.unplaced_file == ""
    assert report.node_local == {"Q": len(RECORDS), "W": 2, "H": 1}  # W: the wallet and the seal check
    assert snapshot(path, genesis) == before  # blocks, state, holds, records and totals, sealed wallets
    assert report.state_hash == before["state"].hex()
    with Ledger.open(path, genesis) as led:
        assert led.verify().ok and led.check_bank()[0]
    assert (data / report.backup.rsplit("/", 1)[1]).is_dir()  # the store as it was, renamed
    assert not (data / "ledger.salvaging").exists() and not (data / "ledger.rebuilding").exists()


def test_a_damaged_store_is_reported_then_salvaged_and_rebuilt(filled, genesis, capsys):
    data, path = filled
    with Ledger.open(path, genesis) as led:
        before = all_blocks(led)
    table = max(path.glob("*.ldb"), key=lambda p: p.stat().st_size)
    damaged = bytearray(table.read_bytes())
    middle = len(damaged) // 2
    damaged[middle:middle + 4096] = bytes(4096)  # a dead disk sector's worth, mid-table
    table.write_bytes(bytes(damaged))

    code, out, err = _cli(capsys, "ledger", "verify", "--data-dir", str(data))
    assert code == 1 and "Traceback" not in err  # said, not raised: as a failed check or a damaged store
    assert "ledger verify FAILED" in out or "is damaged" in err

    code, out, err = _cli(capsys, "ledger", "repair", "--data-dir", str(data))
    assert code == 0, err
    assert f"repaired {path}" in out and "the store as it was" in out
    with Ledger.open(path, genesis) as led:
        report = led.verify()
        assert report.ok, report.problems
        assert led.check_bank()[0]
        kept = all_blocks(led)
    assert kept < before  # nothing made up; what the sector held (and what waits on it) is gone
    assert len(kept) > 0


def test_a_store_in_use_is_not_touched(filled, genesis):
    data, path = filled
    listing = sorted(p.name for p in data.iterdir())
    with Ledger.open(path, genesis):
        with pytest.raises(LedgerLocked, match="stop the node"):
            repair(path, genesis)
    assert sorted(p.name for p in data.iterdir()) == listing
