"""Prometheus text exposition for ``GET /metrics`` (format 0.0.4, written by hand).

Counters and histograms the console records itself (queries by type and
outcome, latency, tokens spent by its users, WebSocket drops and invalid
messages), plus gauges read from the node when scraped (queue depth, peers,
ledger blocks, the node wallet's earnings).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Histogram:
    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS_S) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, **labels: str) -> list[str]:
        out = [f"{name}_bucket{_labels(**labels, le=repr(b))} {c}" for b, c in zip(self.buckets, self.counts)]
        out.append(f"{name}_bucket{_labels(**labels, le='+Inf')} {self.total}")
        out.append(f"{name}_sum{_labels(**labels)} {self.sum}")
        out.append(f"{name}_count{_labels(**labels)} {self.total}")
        return out


class Metrics:
    def __init__(self) -> None:
        self.queries: Counter[tuple[str, str]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.spent_units = 0
        self.earned_units = 0  #: paid to this node for console queries it answered itself
        self.invalid_messages: Counter[str] = Counter()
        self.rate_limited = 0

    def query(self, query_type: str, outcome: str, processing_s: float, cost_units: int) -> None:
        self.queries[(query_type, outcome)] += 1
        if outcome == "done":
            self.latency.setdefault(query_type, Histogram()).observe(processing_s)
            self.spent_units += cost_units

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; ``gauges`` maps name → (help, value), read from the node now."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        family("mtor_console_queries_total", "counter", "Console queries by type and outcome.")
        for (query_type, outcome), count in sorted(self.queries.items()):
            lines.append(f"mtor_console_queries_total{_labels(type=query_type, outcome=outcome)} {count}")
        family("mtor_console_query_seconds", "histogram", "Processing time of answered console queries.")
        for query_type, hist in sorted(self.latency.items()):
            lines.extend(hist.lines("mtor_console_query_seconds", type=query_type))
        family("mtor_console_tokens_spent_total", "counter", "Tokens console users paid for answered queries.")
        lines.append(f"mtor_console_tokens_spent_total {self.spent_units / 1_000_000}")
        family("mtor_console_tokens_earned_total", "counter", "Tokens this node earned answering its own console's queries.")
        lines.append(f"mtor_console_tokens_earned_total {self.earned_units / 1_000_000}")
        family("mtor_console_invalid_messages_total", "counter", "Refused WebSocket messages by verdict.")
        for code, count in sorted(self.invalid_messages.items()):
            lines.append(f"mtor_console_invalid_messages_total{_labels(verdict=code)} {count}")
        family("mtor_console_rate_limited_total", "counter", "Actions refused by the per-user rate limit.")
        lines.append(f"mtor_console_rate_limited_total {self.rate_limited}")
        for name, (help_text, value) in sorted(gauges.items()):
            kind = "counter" if name.endswith("_total") else "gauge"
            family(name, kind, help_text)
            lines.append(f"{name} {value}")
        return "\n".join(lines) + "\n"
