"""``mtor-node sim``: run the market simulator from the command line.

Register with ``add_sim_parser(subparsers)``; it sets ``func=run`` and
``run(args) -> int`` returns 0, or 1 after printing one line when the input
is bad (an unreadable trace, ``--trace`` with several scenarios).
``args.data_dir`` is accepted and not used: the simulator touches no node data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from node.sim.model import SimError, read_trace
from node.sim.report import Report, build_report, comparison_table, format_report
from node.sim.scenarios import PAPER, SCENARIOS


def add_sim_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``sim`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser("sim", help="simulate a realm's market on simulated time (SPEC §7 scenarios)")
    p.add_argument("--scenario", default="all", choices=(*SCENARIOS, "all", "none"),
                   help="which SPEC §7 scenario to run (default: all; none: only --montecarlo)")
    p.add_argument("--seed", type=int, default=1, help="random seed (same seed, same figures)")
    p.add_argument("--days", type=float, default=None, help="simulated days per scenario (default 7)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write PNG plots and report.json here")
    p.add_argument("--montecarlo", type=int, default=0, metavar="RUNS",
                   help="also run this many randomised realms and report the bounded shares")
    p.add_argument("--no-failures", action="store_true", help="workers never fail")
    p.add_argument("--trace", type=Path, default=None, metavar="CSV",
                   help="arrivals from a trace (t_s,type[,payer]) instead of Poisson; one scenario only")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except SimError as exc:
        print(f"mtor-node sim: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from node.sim.realm import simulate

    names = list(SCENARIOS) if args.scenario == "all" else [] if args.scenario == "none" else [args.scenario]
    if args.trace is not None and len(names) != 1:
        raise SimError("--trace needs exactly one --scenario")
    reports: list[Report] = []
    results = []
    for name in names:
        sc = SCENARIOS[name]
        if args.days is not None:
            if not args.days > 0:
                raise SimError("--days must be positive")
            sc = replace(sc, days=args.days)
        if args.no_failures:
            sc = replace(sc, workers=tuple(replace(w, mtbf_h=None) for w in sc.workers))
        arrivals = read_trace(args.trace, frozenset(sc.baselines_s)) if args.trace is not None else None
        started = time.perf_counter()
        result = simulate(sc, seed=args.seed, arrivals=arrivals)
        report = build_report(result)
        results.append(result)
        reports.append(report)
        if not args.json:
            print(format_report(report))
            print(f"   ({time.perf_counter() - started:.1f} s of wall time)")
    if reports and not args.json:
        print()
        print(comparison_table(reports, PAPER))

    mc_text = None
    if args.montecarlo > 0:
        from node.sim.montecarlo import format_montecarlo, run_montecarlo

        mc = run_montecarlo(args.montecarlo, seed=args.seed)
        mc_text = format_montecarlo(mc)
        if not args.json:
            print()
            print(mc_text)

    if args.json:
        doc = {"reports": [r.to_dict() for r in reports]}
        if mc_text is not None:
            doc["montecarlo"] = {"runs": len(mc.runs), "bounded_share": mc.bounded_share,
                                 "price_within_3x_share": mc.price_share,
                                 "price_mostly_within_3x_share": mc.price_mostly_share}
        print(json.dumps(doc, indent=2))

    if args.out is not None:
        from node.sim.plots import plot_day, plot_earnings, plot_supply

        out = args.out
        out.mkdir(parents=True, exist_ok=True)
        written = [plot_day(res, out) for res in results]
        if reports:
            written += [plot_supply(reports, out), plot_earnings(reports, out)]
            (out / "report.json").write_text(json.dumps([r.to_dict() for r in reports], indent=2))
        if not args.json:
            for path in written:
                print(f"wrote {path}")
    return 0
