"""The simulator prices exactly as the live broker's PriceBook does.

The realm's quotes come from a real :class:`node.pricing.PriceBook`; these
tests replay the latencies the simulation fed it into a *fresh* PriceBook
and demand the same quote at every moment the simulation priced something.
"""

from __future__ import annotations

from node.pricing import LatencyTracker, PriceBook
from node.sim.realm import Realm, simulate
from node.sim.scenarios import scenario


def fresh_book(sc) -> PriceBook:
    tracker = LatencyTracker(sc.latency_samples, sc.latency_max_age_s, sc.baselines_s)
    return PriceBook(sc.baselines_s, tracker=tracker)


def test_replayed_latency_history_gives_the_same_quotes():
    sc = scenario("base100-peak500", days=1.0)
    result = simulate(sc, seed=5)
    # Everything the realm priced: each query at submission, each sample per type.
    asks = [(j.arrival_s, 1, j.query_type, j.quote) for j in result.jobs]
    asks += [(s.t_s, 1, t, q) for s in result.samples for t, q in s.quotes.items()]
    feeds = [(at, 0, t, lat) for t, lat, at in result.latency_log]
    book = fresh_book(sc)
    compared = 0
    prices = set()
    for at, kind, qtype, payload in sorted(feeds + asks, key=lambda e: (e[0], e[1])):
        if kind == 0:
            book.record(qtype, payload, at)
        else:
            assert book.quote(qtype, None, at) == payload, (at, qtype)
            compared += 1
            prices.add(payload.half_steps)
    assert compared > 5000
    assert len(prices) >= 5  # the history really moved the price


def test_sim_book_and_live_book_agree_on_a_hand_made_history():
    sc = scenario("base100-peak150", days=1.0)
    realm = Realm(sc, seed=0)
    live = fresh_book(sc)
    history = [("chat", 19.0, 0.0), ("chat", 31.0, 10.0), ("imagine", 90.0, 20.0), ("chat", 400.0, 30.0),
               ("vision", 35.0, 40.0), ("chat", 5.0, 650.0)]  # the first samples age out at 600 s
    for qtype, latency, at in history:
        realm.book.record(qtype, latency, at)
        live.record(qtype, latency, at)
        for probe_at in (at, at + 1.0, at + 599.0, at + 601.0):
            for t in sc.query_types:
                assert realm._quote(t, probe_at) == live.quote(t, None, probe_at)
