"""SPEC §7 pricing: exact table cases and properties of the rounding."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.config import PowerSection, PricingSection
from node.genesis import UNITS_PER_TOKEN
from node.pricing import (
    DEFAULT_MULTIPLIERS,
    QUERY_TYPES,
    LatencyTracker,
    PowerRates,
    PriceBook,
    UnknownQueryType,
    electricity_estimate,
    half_steps,
    legacy_cost_estimate,
    price_units,
)

T = UNITS_PER_TOKEN


def book_with(qtype: str, latency_s: float, model_type: str | None = "worker") -> int:
    book = PriceBook.from_config(PricingSection())
    book.record(qtype, latency_s, now_s=0.0)
    return book.quote(qtype, model_type, now_s=0.0).units


@pytest.mark.parametrize(
    ("ratio", "tokens"),
    [
        (2.0, Fraction(2)),
        (1.26, Fraction(3, 2)),
        (1.25, Fraction(3, 2)),  # tie rounds up
        (1.24, Fraction(1)),
        (0.3, Fraction(1)),
        (1.0, Fraction(1)),
        (1.74, Fraction(3, 2)),
        (1.75, Fraction(2)),
        (9.8, Fraction(10)),
        (50.0, Fraction(10)),
    ],
)
def test_chat_price_table(ratio, tokens):
    baseline = PricingSection().baseline_latency_chat_s
    assert book_with("chat", ratio * baseline) == tokens * T


@pytest.mark.parametrize(
    ("qtype", "ratio", "model_type", "tokens"),
    [
        ("imagine", 1.0, "worker", Fraction(3, 2)),  # 1.0 × 1.5
        ("imagine", 2.0, "worker", Fraction(3)),  # 2.0 × 1.5
        ("imagine", 1.26, "worker", Fraction(9, 4)),  # round(1.26)=1.5, × 1.5 = 2.25
        ("imagine", 50.0, "worker", Fraction(15)),  # cap 10 × 1.5
        ("vision", 1.0, "worker", Fraction(6, 5)),  # 1.2
        ("vision", 3.0, "worker", Fraction(18, 5)),  # 3 × 1.2
        ("chat", 1.0, "claude", Fraction(13, 10)),
        ("vision", 1.0, "claude", Fraction(6, 5) * Fraction(13, 10)),  # multipliers compose
        ("speech", 1.0, None, Fraction(1)),
    ],
)
def test_multiplied_prices(qtype, ratio, model_type, tokens):
    baseline = getattr(PricingSection(), f"baseline_latency_{qtype}_s")
    assert book_with(qtype, ratio * baseline, model_type) == tokens * T


def test_imagine_baseline_is_seven_seconds():
    assert book_with("imagine", 14.0) == 3 * T  # factor 2 × 1.5


def test_no_samples_is_base_price():
    q = PriceBook.from_config(PricingSection()).quote("chat", None, now_s=5.0)
    assert (q.units, q.factor, q.avg_latency_s, q.half_steps) == (T, 1.0, None, 2)


def test_quote_fields():
    book = PriceBook({"chat": 2.0})
    book.record("chat", 3.0, 0.0)
    book.record("chat", 2.0, 1.0)
    q = book.quote("chat", None, 1.0)
    assert q.avg_latency_s == 2.5 and q.factor == 1.25 and q.half_steps == 3
    assert q.units == q.base_units == 3 * T // 2 and q.tokens == Fraction(3, 2)


def test_unknown_type_is_refused():
    book = PriceBook({"chat": 2.0})
    with pytest.raises(UnknownQueryType):
        book.quote("teleport", None, 0.0)
    with pytest.raises(UnknownQueryType):
        book.record("teleport", 1.0, 0.0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        PriceBook({"chat": 0.0})
    tracker = LatencyTracker()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            tracker.record("chat", bad, 0.0)


def test_window_by_count_and_age():
    tracker = LatencyTracker(max_samples=3, max_age_s=60.0)
    for i, latency in enumerate([100.0, 1.0, 2.0, 3.0]):
        tracker.record("chat", latency, now_s=float(i))
    assert tracker.average("chat", 3.0) == 2.0  # the 100 s sample fell out by count
    assert tracker.count("chat", 61.5) == 2  # sample at t=1 is older than 60 s
    assert tracker.average("chat", 61.5) == 2.5
    assert tracker.average("chat", 1000.0) is None


def test_config_baselines_cover_every_query_type():
    assert set(PriceBook.from_config(PricingSection()).baselines_s) == set(QUERY_TYPES)


@settings(deadline=None, derandomize=True, max_examples=150)
@given(
    qtype=st.sampled_from(QUERY_TYPES),
    model_type=st.sampled_from([None, "worker", "claude", "openai"]),
    latencies=st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), max_size=25),
)
def test_price_bounds_and_step(qtype, model_type, latencies):
    book = PriceBook.from_config(PricingSection())
    for i, latency in enumerate(latencies):
        book.record(qtype, latency, float(i))
    q = book.quote(qtype, model_type, float(len(latencies)))
    m = DEFAULT_MULTIPLIERS.of(qtype, model_type)
    assert isinstance(q.units, int)
    assert 1 * T * m <= q.units <= 10 * T * m
    step = Fraction(T, 2) * m  # 0.5 token × multiplier, exact for the defaults
    assert (q.units / step).denominator == 1
    assert abs(q.half_steps / 2 - q.factor) <= 0.25


@settings(deadline=None, derandomize=True, max_examples=150)
@given(st.floats(min_value=-5, max_value=50, allow_nan=False))
def test_half_steps_is_nearest_half_in_range(factor):
    steps = half_steps(factor)
    assert 2 <= steps <= 20
    clamped = min(10.0, max(1.0, factor))
    assert abs(steps / 2 - clamped) <= 0.25


def test_price_units_rounds_to_nearest_unit():
    assert price_units(3, Fraction(1, 3)) == 500_000  # exactly 1.5 × 1/3 token
    assert price_units(2, Fraction(1, 7)) == 142_857  # 142857.14 -> nearest unit


def test_legacy_cost_and_electricity():
    assert legacy_cost_estimate(0) == pytest.approx(0.01)
    assert legacy_cost_estimate(10) == pytest.approx(0.02)
    rates = PowerRates.from_config(PowerSection())
    assert electricity_estimate(busy_s=3600, idle_s=0, rates=rates) == pytest.approx(0.25)
    assert electricity_estimate(busy_s=0, idle_s=3600, rates=rates) == pytest.approx(0.125)
    assert electricity_estimate(busy_s=1800, idle_s=3600) == pytest.approx(0.25)


def test_as_fraction_is_exact_for_decimal_floats():
    from node.pricing import as_fraction

    assert as_fraction(1.2) == Fraction(6, 5) and as_fraction("1.3") == Fraction(13, 10)
    with pytest.raises(ValueError):
        as_fraction(0)
