"""The realm's market on simulated time (issue 9; docs/market.md).

A discrete-event simulator that drives the node's own pure cores
(:mod:`node.pricing`, :mod:`node.fairqueue`, :mod:`node.selection`,
:mod:`node.health`) with ``now_s`` = simulated time:

* :mod:`node.sim.events` — heap event loop; :mod:`node.sim.model` — demand,
  workers, service laws, traces; :mod:`node.sim.realm` — one run
  (:func:`simulate`); :mod:`node.sim.report` — the figures;
  :mod:`node.sim.scenarios` — SPEC §7's four realms and the paper's table;
  :mod:`node.sim.montecarlo` — randomised realms; :mod:`node.sim.plots` —
  PNGs (imports matplotlib); :mod:`node.sim.cli` — ``mtor-node sim``.

Nothing here reads a clock, sleeps, or touches node data.
"""
