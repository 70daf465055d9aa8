"""Prometheus metrics for /metrics: engine occupancy (read at scrape time), token counters, generation
speed over the last seconds, time-to-first-token and latency histograms, and refusals by reason.

Each server owns its CollectorRegistry, so two servers in one process (tests) do not share counters.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from llavakit.engine.llm_engine import EngineStats

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_RATE_WINDOW = 10.0  # seconds over which llavakit_generation_tokens_per_second is averaged


class ServerMetrics:
    """The server's metrics; `stats` is called at each scrape for the engine gauges."""

    def __init__(self, stats: Callable[[], EngineStats], in_flight: Callable[[], int]):
        self.registry = r = CollectorRegistry()
        self._stats = stats
        gauges = {
            "llavakit_requests_waiting": ("sequences waiting for a place in the batch", lambda s: s.num_waiting),
            "llavakit_requests_running": ("sequences in the running batch", lambda s: s.num_running),
            "llavakit_kv_cache_usage_ratio": ("fraction of KV-cache blocks in use", lambda s: s.kv_usage),
            "llavakit_kv_cache_blocks_used": ("KV-cache blocks in use", lambda s: s.kv_blocks_used),
            "llavakit_preemptions": ("sequences preempted since start", lambda s: s.num_preemptions),
        }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=r).set_function(lambda read=read: read(self._stats()))
        Gauge("llavakit_requests_in_flight", "sequences admitted (preparing, waiting or running)",
              registry=r).set_function(in_flight)
        Gauge("llavakit_generation_tokens_per_second", f"generated tokens per second over the last "
              f"{_RATE_WINDOW:g} s", registry=r).set_function(self.tokens_per_second)
        self.prompt_tokens = Counter("llavakit_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("llavakit_generation_tokens", "generated tokens", registry=r)
        self.requests = Counter("llavakit_requests", "finished requests by outcome", ["outcome"], registry=r)
        self.rejected = Counter("llavakit_requests_rejected", "requests refused before running, by reason",
                                ["reason"], registry=r)
        self.ttft = Histogram("llavakit_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("llavakit_request_latency_seconds", "arrival to last generated token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add_tokens(self, count: int) -> None:
        if count <= 0:
            return
        self.generation_tokens.inc(count)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, count))
            self._trim(now)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(c for _, c in self._recent) / _RATE_WINDOW

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - _RATE_WINDOW:
            self._recent.popleft()

    def render(self) -> bytes:
        return generate_latest(self.registry)
