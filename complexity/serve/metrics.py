"""Prometheus metrics (prometheus_client), one registry per app.

HTTP requests are counted by endpoint and status in the ASGI gate (middleware.py); request
latencies are observed by the serving classes when a request ends; engine gauges and counters
are read from `AsyncEngine.stats()` at scrape time (a custom collector: no copy to keep in sync).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# (metric, kind, help, stats key)
_ENGINE_METRICS = (
    ("complexity_prompt_tokens", "counter", "Prompt tokens prefilled.", "prompt_tokens"),
    ("complexity_generation_tokens", "counter", "Tokens generated.", "generated_tokens"),
    ("complexity_decode_steps", "counter", "Batched decode steps run.", "decode_steps"),
    ("complexity_prefill_steps", "counter", "Prefill forwards run.", "prefill_steps"),
    ("complexity_engine_step_seconds", "counter", "Seconds the engine core spent running steps.", "step_seconds"),
    (
        "complexity_engine_output_seconds",
        "counter",
        "Seconds the engine core spent handing step outputs to the API process (grows when that process falls behind).",
        "output_seconds",
    ),
    (
        "complexity_engine_device_wait_seconds",
        "counter",
        "Seconds the engine waited for the device to finish steps before reading their tokens (the rest of the step seconds is host work).",
        "device_wait_seconds",
    ),
    ("complexity_aborted_requests", "counter", "Requests cancelled (client gone, shutdown).", "aborted"),
    ("complexity_rejected_requests", "counter", "Requests refused with 429 (limits).", "rejected"),
    ("complexity_requests_running", "gauge", "Requests holding a cache slot.", "running"),
    ("complexity_requests_waiting", "gauge", "Requests waiting for a slot (queue depth).", "waiting"),
    ("complexity_requests_inflight", "gauge", "Requests accepted and not finished.", "inflight"),
    ("complexity_queued_prompt_tokens", "gauge", "Prompt tokens of requests not yet prefilled.", "queued_tokens"),
    ("complexity_free_slots", "gauge", "Free cache slots.", "free_slots"),
    ("complexity_max_batch", "gauge", "Cache slots (largest decode batch).", "max_batch"),
)


def counter_sample(stats_key: str) -> str:
    """The sample name /metrics shows for the engine counter read from `stats_key` (counters get
    prometheus_client's `_total` suffix)."""
    for name, kind, _, key in _ENGINE_METRICS:
        if key == stats_key and kind == "counter":
            return f"{name}_total"
    raise KeyError(f"no engine counter reads {stats_key!r}")


class _EngineCollector:
    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        stats = self.engine.stats()
        for name, kind, help_, key in _ENGINE_METRICS:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_, labels=["model"])
            family.add_metric([self.model_name], stats.get(key, 0))
            yield family
        finished = CounterMetricFamily(
            "complexity_request_finished", "Finished requests by finish reason.", labels=["model", "reason"]
        )
        for reason, count in sorted(stats.get("finish_reasons", {}).items()):
            finished.add_metric([self.model_name, reason], count)
        yield finished


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.http_requests = Counter(
            "complexity_http_requests",
            "HTTP requests by endpoint and status code.",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "complexity_time_to_first_token_seconds",
            "Time from submission to first token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.latency = Histogram(
            "complexity_request_latency_seconds",
            "Time from submission to the last token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.registry.register(_EngineCollector(engine, model_name))

    def count_http(self, endpoint: str, status: int) -> None:
        self.http_requests.labels(self.model_name, endpoint, str(status)).inc()

    def observe(self, group) -> None:
        """Latencies of a finished (or abandoned) request group."""
        for first, end in zip(group.first_token_time, group.finish_time):
            if first is not None:
                self.ttft.observe(first - group.arrival)
            if end is not None:
                self.latency.observe(end - group.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ServerMetrics", "LATENCY_BUCKETS", "counter_sample"]
