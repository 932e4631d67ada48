"""Per-user token buckets (pure: time is a parameter).

A user (browser GUID or API key's wallet) gets ``burst`` actions at once and
``rate_per_s`` more each second. Buckets of users idle for a while are
forgotten, and at most ``max_users`` are kept, so the table stays bounded.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at_s: float


class RateLimiter:
    def __init__(self, *, rate_per_s: float, burst: int, max_users: int = 10_000) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be positive and burst at least 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_users = max_users
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.refused = 0

    def allow(self, user: str, now_s: float, cost: float = 1.0) -> bool:
        bucket = self._buckets.pop(user, None)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now_s)
        bucket.tokens = min(float(self.burst), bucket.tokens + max(0.0, now_s - bucket.at_s) * self.rate_per_s)
        bucket.at_s = now_s
        ok = bucket.tokens >= cost
        if ok:
            bucket.tokens -= cost
        else:
            self.refused += 1
        self._buckets[user] = bucket
        while len(self._buckets) > self.max_users:
            self._buckets.popitem(last=False)
        return ok

    def retry_after_s(self, user: str, cost: float = 1.0) -> float:
        bucket = self._buckets.get(user)
        if bucket is None or bucket.tokens >= cost:
            return 0.0
        return (cost - bucket.tokens) / self.rate_per_s
