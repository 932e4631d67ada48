"""Operator settings travel in the ad and steer selection (SPEC §7: base vs peaking, daily hours)."""

from __future__ import annotations

from node.config import OperatorSection
from node.events import EventBus
from node.health import HealthPolicy
from node.identity import Identity
from node.operator import BusyClock, candidate_terms, operator_ad
from node.registry import PeerRegistry
from node.selection import Reason, Request, Tier, select
from p2p.ads import Ad, AdContent, Capability


def test_peaking_settings_become_integer_ad_fields_and_back():
    ad = operator_ad(OperatorSection(mode="peaking", max_daily_hours=6.0), busy_today_s=120.5)
    assert ad["peak_thresholds_milli"]["chat"] == 1500 and ad["peak_thresholds_milli"]["vision"] == 2500
    assert ad["max_daily_s"] == 21_600 and ad["busy_today_s"] == 120
    terms = candidate_terms(ad)
    assert terms["peak_threshold_units"]["imagine"] == 2_000_000
    assert terms["daily_limit_s"] == 21_600.0 and terms["daily_used_s"] == 120.0
    base = candidate_terms(operator_ad(OperatorSection(), 0))
    assert base == {"peak_threshold_units": {}, "daily_limit_s": None, "daily_used_s": 0.0}
    assert candidate_terms({"mode": "peaking", "peak_thresholds_milli": "junk"})["peak_threshold_units"] == {}


def test_busy_clock_resets_at_midnight_utc():
    now = [86_400 * 5 + 10.0]
    clock = BusyClock(wall=lambda: now[0])
    clock.add(30)
    assert clock.today_s() == 30
    now[0] += 86_400
    assert clock.today_s() == 0


async def test_registry_candidates_follow_the_operator_terms():
    registry = PeerRegistry(HealthPolicy(), EventBus())
    caps = {"chat": Capability(("m",), 1000, 0)}
    for peer, section, busy in (("base", OperatorSection(), 0),
                                ("peaker", OperatorSection(mode="peaking"), 0),
                                ("tired", OperatorSection(max_daily_hours=1.0), 3_600)):
        ident = Identity.generate()
        content = AdContent(capabilities=caps, operator=operator_ad(section, busy))
        registry.on_ad(Ad(peer, ident.address, ident.public_key, 0, 1, content, {}), 0.0)
    cheap = select(registry.candidates(1.0), Request("chat", 1_000_000))
    assert [r.candidate.worker_id for r in cheap.ranked] == ["base"]
    assert {e.worker_id: e.reason for e in cheap.excluded} == {
        "peaker": Reason.BELOW_PEAK_THRESHOLD, "tired": Reason.DAILY_HOURS_USED}
    surge = select(registry.candidates(1.0), Request("chat", 2_000_000))
    assert [(r.candidate.worker_id, r.tier) for r in surge.ranked] == [("base", Tier.IDLE), ("peaker", Tier.PEAK)]
