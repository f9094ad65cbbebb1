"""Per-key rate limits for the HTTP API: one token bucket per caller, in this router replica's memory.

`RateLimiter.check(key)` spends one token from `key`'s bucket and returns None, or, when the bucket
is empty, the whole seconds until a token is back (the value of the 429's `Retry-After`). A
bucket holds `burst` tokens and refills at `requests_per_minute / 60` per second; a refused request
spends nothing. `client_key` names the bucket: the Bearer key (hashed, so no key is kept here), or
the client host when the API is open (no keys configured; then it listens on loopback only).

Memory is bounded: a bucket idle long enough to be full again is the same as a new one and is
dropped, and past `max_keys` buckets the least recently used is dropped too (that caller starts
again from a full bucket). The clock is injectable, so tests need no sleeping.

State is per router replica and is not shared: with N router replicas (`serve.router_replicas`)
a caller whose requests spread over them may get up to N times the configured rate.
No Ray, no FastAPI, no lock (the router calls it from its event loop, never across an await):
serve/router.py turns a refusal into `ApiError(429, ...)`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from typing import Any, Callable

MAX_KEYS = 10_000


def client_key(token: str | None, host: str | None) -> str:
    """The bucket a request spends from: its API key when it has one (as a digest), else its client host."""
    if token:
        return "key:" + hashlib.sha256(token.encode()).hexdigest()[:24]
    return "host:" + (host or "unknown")


class RateLimiter:
    """Token buckets, one per key: `burst` tokens each, refilled at `requests_per_minute` per minute."""

    def __init__(self, requests_per_minute: float, burst: int | None = None, *, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic):
        if requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute must be positive, not {requests_per_minute}")
        burst = int(requests_per_minute) if burst is None else burst
        if burst < 1 or max_keys < 1:
            raise ValueError(f"burst and max_keys must be at least 1 (got {burst}, {max_keys})")
        self.requests_per_minute, self.burst, self.max_keys = requests_per_minute, burst, max_keys
        self.rate = requests_per_minute / 60.0  # tokens per second
        self.full_after = burst / self.rate  # seconds for an empty bucket to fill: idle this long = a new bucket
        self.clock = clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at); oldest use first

    @classmethod
    def from_config(cls, rate_limit: Any, **kwargs) -> "RateLimiter | None":
        """From `http.rate_limit` (requests_per_minute, burst); None when it is off."""
        if rate_limit is None or rate_limit.requests_per_minute is None:
            return None
        return cls(rate_limit.requests_per_minute, rate_limit.burst, **kwargs)

    def check(self, key: str) -> int | None:
        """Spend one of `key`'s tokens: None if there was one, else the seconds to wait (at least 1)."""
        now = self.clock()
        self._evict(now, key)
        tokens, at = self.buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(now - at, 0.0) * self.rate)
        if tokens >= 1.0 - 1e-9:  # (float refill: 0.4 + 0.6 may come to 0.999...)
            self.buckets[key] = (max(tokens - 1.0, 0.0), now)
            return None
        self.buckets[key] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.rate - 1e-9))

    def _evict(self, now: float, coming: str) -> None:
        """Drop buckets that are full again (oldest use first), then the least recently used while
        there is no room for `coming`."""
        while self.buckets:
            key, (_, at) = next(iter(self.buckets.items()))
            crowded = len(self.buckets) >= self.max_keys and coming not in self.buckets
            if now - at < self.full_after and not crowded:
                return
            del self.buckets[key]

    def __len__(self) -> int:
        return len(self.buckets)
