"""`GET /metrics` in Prometheus' text format: queue length, batch size, tokens and tokens/s, time to first token and
inter-token latency, the image-feature cache's hits, misses and size, and the prefix cache's. One registry per app (no global state)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vlmkit.infer.byte_lru import ByteLRU
from vlmkit.infer.engine import EngineStats
from vlmkit.infer.image_cache import ImageFeatureCache
from vlmkit.infer.prefix_cache import PrefixCache

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
)


class _Counters(Collector):
    """Counters read from the engine's stats and the caches when scraped."""

    def __init__(
        self, stats: EngineStats | None, cache: ImageFeatureCache | None, prefixes: PrefixCache | None
    ) -> None:
        self.stats, self.cache, self.prefixes = stats, cache, prefixes

    def collect(self) -> Iterator[Any]:
        if self.stats is not None:
            yield CounterMetricFamily(
                "vlmkit_prompt_tokens", "prompt tokens of accepted requests", value=self.stats.prompt_tokens
            )
            yield CounterMetricFamily(
                "vlmkit_generation_tokens", "tokens generated", value=self.stats.generated_tokens
            )
            finished = CounterMetricFamily(
                "vlmkit_requests_finished", "requests that ended, by reason", labels=["finish_reason"]
            )
            for reason, n in sorted(self.stats.finished.items()):
                finished.add_metric([reason], n)
            yield finished
            yield GaugeMetricFamily(
                "vlmkit_generation_tokens_per_second",
                "tokens generated per second over the last 10 s",
                value=self.stats.tokens_per_second(),
            )
            yield CounterMetricFamily(
                "vlmkit_prompt_tokens_reused",
                "prompt tokens whose keys and values came from the prefix cache (not prefilled)",
                value=self.stats.reused_tokens,
            )
        if self.cache is not None:
            yield from _cache("image", self.cache, "image-feature cache", "visual tokens", "images")
        if self.prefixes is not None:
            yield from _cache("prefix", self.prefixes, "prefix cache", "keys and values", "prompts")


def _cache(name: str, cache: ByteLRU, what: str, holds: str, items: str) -> Iterator[Any]:
    """A cache's hits, misses, evictions, bytes, entries and size limit as vlmkit_<name>_cache_*."""
    prefix = f"vlmkit_{name}_cache"
    yield CounterMetricFamily(f"{prefix}_hits", f"{what} hits", value=cache.hits)
    yield CounterMetricFamily(f"{prefix}_misses", f"{what} misses", value=cache.misses)
    yield CounterMetricFamily(
        f"{prefix}_evictions", "entries dropped to stay under the size", value=cache.evictions
    )
    yield GaugeMetricFamily(f"{prefix}_bytes", f"bytes of cached {holds}", value=cache.nbytes)
    yield GaugeMetricFamily(f"{prefix}_entries", f"{items} in the cache", value=len(cache))
    yield GaugeMetricFamily(f"{prefix}_max_bytes", "the cache's size limit", value=cache.max_bytes)


class ServerMetrics:
    """The registry behind /metrics; `queued` and `batch_size` are read when scraped."""

    def __init__(
        self,
        queued: Callable[[], float],
        batch_size: Callable[[], float],
        stats: EngineStats | None = None,
        cache: ImageFeatureCache | None = None,
        prefixes: PrefixCache | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        Gauge("vlmkit_queue_length", "requests waiting to be decoded", registry=self.registry).set_function(
            queued
        )
        Gauge("vlmkit_batch_size", "rows in the running decode batch", registry=self.registry).set_function(
            batch_size
        )
        self.ttft = Histogram(
            "vlmkit_time_to_first_token_seconds",
            "from a request reaching the model thread to its first token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "vlmkit_inter_token_latency_seconds",
            "between consecutive tokens of one stream",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Counters(stats, cache, prefixes))
        if stats is not None:
            stats.observers.append(self.observe)

    def observe(self, kind: str, seconds: float) -> None:
        (self.ttft if kind == "ttft" else self.itl).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
