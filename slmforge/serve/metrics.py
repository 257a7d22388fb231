"""Prometheus metrics of one server (its own registry, so several apps can live in one process, as in the tests)."""

from __future__ import annotations

import threading
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class Metrics:
    def __init__(self, window: int = 1000):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("slmforge_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("slmforge_request_latency_seconds", "request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("slmforge_tokens", "tokens processed", ["model", "kind"], registry=r)
        self.answers = Counter("slmforge_answers", "answers by the model that gave them", ["route"], registry=r)
        self.fallbacks = Counter("slmforge_fallbacks", "requests re-sent to the fallback, by reason", ["reason"], registry=r)
        self.fallback_errors = Counter("slmforge_fallback_errors", "fallback calls that failed (specialist answer kept)", registry=r)
        self.schema_checks = Counter("slmforge_schema_checks", "answers checked against a requested JSON schema", ["result"], registry=r)
        self.cost = Counter("slmforge_cost", "cost of all model calls (recipe's cost per million tokens)", registry=r)
        self.retrieval = Histogram("slmforge_retrieval_seconds", "time to search the index and build the prompt", registry=r,
                                   buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25))
        self.retrieved = Counter("slmforge_retrieved_passages", "passages put into prompts", registry=r)
        self.successes = Counter("slmforge_successful_tasks", "answered requests whose output met the requested format", registry=r)
        # Rates and quantiles as gauges, so a plain scrape shows them without PromQL.
        self._lock = threading.Lock()
        self._window: deque[float] = deque(maxlen=window)
        self._n = {"answers": 0, "fallbacks": 0, "schema_checked": 0, "schema_valid": 0, "successes": 0, "cost": 0.0}
        for name, doc, fn in (
            ("slmforge_latency_p50_seconds", "median latency of the last requests", lambda: self.latency_quantile(0.5)),
            ("slmforge_latency_p95_seconds", "95th percentile latency of the last requests", lambda: self.latency_quantile(0.95)),
            ("slmforge_fallback_rate", "share of answers that came from the fallback", lambda: self._ratio("fallbacks", "answers")),
            ("slmforge_schema_validity_rate", "share of schema-checked answers that were valid", lambda: self._ratio("schema_valid", "schema_checked")),
            ("slmforge_cost_per_successful_task", "total cost / successful tasks", lambda: self._ratio("cost", "successes")),
        ):
            Gauge(name, doc, registry=r).set_function(fn)

    def _ratio(self, a: str, b: str) -> float:
        with self._lock:
            return self._n[a] / self._n[b] if self._n[b] else 0.0

    def latency_quantile(self, q: float) -> float:
        with self._lock:
            values = list(self._window)
        return quantile(values, q)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status < 400:
            with self._lock:
                self._window.append(seconds)

    def observe_answer(self, *, route: str, fallback_reason: str | None, fallback_error: bool, schema_valid: bool | None,
                       cost: float, success: bool) -> None:
        self.answers.labels(route).inc()
        if fallback_reason:
            self.fallbacks.labels(fallback_reason).inc()
        if fallback_error:
            self.fallback_errors.inc()
        if schema_valid is not None:
            self.schema_checks.labels("valid" if schema_valid else "invalid").inc()
        self.cost.inc(cost)
        if success:
            self.successes.inc()
        with self._lock:
            self._n["answers"] += 1
            self._n["fallbacks"] += route == "fallback"
            self._n["schema_checked"] += schema_valid is not None
            self._n["schema_valid"] += bool(schema_valid)
            self._n["successes"] += success
            self._n["cost"] += cost

    def observe_retrieval(self, seconds: float, passages: int) -> None:
        self.retrieval.observe(seconds)
        self.retrieved.inc(passages)

    def observe_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.tokens.labels(model, "prompt").inc(prompt)
        self.tokens.labels(model, "completion").inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)
