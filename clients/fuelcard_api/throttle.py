"""Rate limits of the JSON API: a token bucket per key (a principal, an IP
address), in bounded memory.

Each bucket holds up to `burst` tokens and refills at `rate` per second; a
request takes one token or is refused (HTTP 429 with Retry-After). At most
`max_keys` buckets are kept, least recently used evicted first: a flood from
many addresses costs a fixed amount of memory, and an evicted key comes back
with a full bucket (the limit is then looser for it, never stricter).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class Throttle:
    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert rate >= 0 and burst >= 1 and max_keys >= 1
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        # key -> (tokens, when they were counted)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """0.0 if the request may go on (a token taken), else the seconds
        until a token will be there (inf if the bucket never refills)."""
        now = self._clock()
        tokens, then = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate if self.rate > 0 else math.inf
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait
