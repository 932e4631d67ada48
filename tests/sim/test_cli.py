"""``mtor-node sim`` end to end (short runs) and the Monte-Carlo mode."""

from __future__ import annotations

import argparse
import json

from node.sim.cli import add_sim_parser
from node.sim.montecarlo import Ranges, run_montecarlo


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mtor-node")
    add_sim_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sim", *argv])
    args.data_dir = None
    return args.func(args)


def test_sim_writes_plots_and_report(tmp_path, capsys):
    out = tmp_path / "plots"
    assert run_cli("--scenario", "base100-peak500", "--days", "1", "--seed", "4", "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "| base100-peak500 | 2.7 / 5.5 |" in text
    names = {p.name for p in out.iterdir()}
    assert names == {"price-day-base100-peak500.png", "supply-curve.png", "earnings.png", "report.json"}
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (report,) = json.loads((out / "report.json").read_text())
    assert report["scenario"] == "base100-peak500" and report["seed"] == 4


def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys):
    assert run_cli("--trace", str(tmp_path / "missing.csv")) == 1  # --trace with all scenarios
    assert "exactly one --scenario" in capsys.readouterr().err
    assert run_cli("--scenario", "base100-peak150", "--trace", str(tmp_path / "missing.csv")) == 1
    assert "cannot read trace" in capsys.readouterr().err


def test_montecarlo_is_deterministic_and_judges_runs():
    ranges = Ranges(days=0.25)
    a = run_montecarlo(3, seed=2, ranges=ranges)
    b = run_montecarlo(3, seed=2, ranges=ranges)
    assert [r.report.to_dict() for r in a.runs] == [r.report.to_dict() for r in b.runs]
    for r in a.runs:
        assert r.price_within == (r.report.max_price <= 3.0)
        assert 0.0 <= r.time_within_share <= 1.0
    assert 0.0 <= a.bounded_share <= 1.0
