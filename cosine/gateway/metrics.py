"""/metrics: cosine-serve's counters (its `stats` op, counted by control/metrics.py) as
Prometheus metrics with the ``cosine:`` prefix, plus the gateway's own HTTP counters.

Nothing serve counts is counted again here: each scrape asks serve for its `stats` and
maps the numbers one to one (docs/http.md lists every metric and its meaning).
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

P = "cosine:"


def _counter(name: str, doc: str, labels: list[str], rows: list[tuple[list[str], float]]) -> CounterMetricFamily:
    m = CounterMetricFamily(P + name, doc, labels=labels)
    for vals, v in rows:
        m.add_metric(vals, v)
    return m


def _gauge(name: str, doc: str, labels: list[str], rows: list[tuple[list[str], float]]) -> GaugeMetricFamily:
    m = GaugeMetricFamily(P + name, doc, labels=labels)
    for vals, v in rows:
        m.add_metric(vals, v)
    return m


def _histogram(name: str, doc: str, h: dict[str, Any]) -> HistogramMetricFamily:
    m = HistogramMetricFamily(P + name, doc)
    m.add_metric([], [(floatToGoString(b), c) for b, c in h["buckets"]], h["sum"])
    return m


class ServeCollector(Collector):
    """Yields the metrics of the last `stats` reply (set by the /metrics handler)."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] | None = None

    def collect(self) -> Iterator[Metric]:
        st = self.stats
        yield _gauge("serve_up", "1 when this scrape reached cosine-serve", [], [([], 1.0 if st else 0.0)])
        if not st:
            return
        m = st.get("metrics", {})
        yield from self._requests(st, m)
        yield from self._spec_decode(m)
        yield from self._workers(st, m)

    def _requests(self, st: dict[str, Any], m: dict[str, Any]) -> Iterator[Metric]:
        yield _gauge("num_requests_running", "requests admitted (prefilled) and generating", [],
                     [([], st.get("active_requests", 0))])
        yield _gauge("num_requests_waiting", "requests waiting for KV room before admission", [],
                     [([], st.get("queued_requests", 0))])
        yield _counter("request_success", "requests finished, by reason (eos, stop string, length)",
                       ["finished_reason"], [([k], v) for k, v in sorted(m.get("requests_finished", {}).items())])
        yield _counter("request_failure", "requests answered with an error, by code (cancelled, timeout, "
                       "overloaded, ...)", ["code"], [([k], v) for k, v in sorted(m.get("requests_failed", {}).items())])
        yield _counter("prompt_tokens", "prompt tokens prefilled", [], [([], m.get("prompt_tokens", 0))])
        yield _counter("generation_tokens", "output tokens generated", [], [([], m.get("generation_tokens", 0))])
        for key, name, doc in (
                ("time_to_first_token_s", "time_to_first_token_seconds", "arrival at serve to first output token"),
                ("inter_token_latency_s", "inter_token_latency_seconds",
                 "time between a request's rounds that produced tokens (one observation per round, as vLLM)"),
                ("e2e_request_latency_s", "e2e_request_latency_seconds", "arrival at serve to finish")):
            if key in m:
                yield _histogram(name, doc, m[key])

    def _spec_decode(self, m: dict[str, Any]) -> Iterator[Metric]:
        rows = m.get("spec_decode", [])
        lab = ["mode", "drafter"]
        for key, doc in (("num_drafts", "rounds in which the drafter proposed at least one verified token"),
                         ("num_draft_tokens", "draft tokens (tree nodes) proposed and verified"),
                         ("num_accepted_tokens", "draft tokens the target accepted")):
            yield _counter("spec_decode_" + key, doc, lab, [([r["mode"], r["drafter"]], r[key]) for r in rows])
        yield _counter("spec_decode_num_accepted_tokens_per_pos", "accepted draft tokens by position on the accepted "
                       "path (0 = first)", lab + ["position"],
                       [([r["mode"], r["drafter"], str(i)], n) for r in rows for i, n in enumerate(r["accepted_per_pos"])])
        yield _counter("spec_decode_num_trees", "rounds that verified at least one draft token (one token tree "
                       "each), by mode", ["mode"], [([k], v) for k, v in sorted(m.get("num_trees", {}).items())])
        yield _counter("router_picks", "times the router picked the drafter for a request's round", ["drafter"],
                       [([k], v) for k, v in sorted(m.get("router_picks", {}).items())])
        yield _counter("fused_step_wins", "fused draft steps whose token was the drafter's", ["drafter"],
                       [([k], v) for k, v in sorted(m.get("fused_wins", {}).items())])

    def _workers(self, st: dict[str, Any], m: dict[str, Any]) -> Iterator[Metric]:
        workers = st.get("workers", {})
        kv = [([n], w["cache_tokens_used"] / w["cache_tokens_budget"]) for n, w in sorted(workers.items())
              if isinstance(w, dict) and w.get("cache_tokens_budget")]
        yield _gauge("kv_cache_usage_perc", "KV cache tokens in use / budget, per worker (1 = full)", ["worker"], kv)
        yield _gauge("worker_up", "1 while the worker answers serve's stats call", ["worker"],
                     [([n], 0.0 if not isinstance(w, dict) or "error" in w else 1.0) for n, w in sorted(workers.items())])
        yield _counter("worker_deaths", "times serve saw the worker stop answering", ["worker"],
                       [([k], v) for k, v in sorted(m.get("worker_deaths", {}).items())])
        yield _counter("worker_restarts", "times a worker seen dead answered again (restarted or reachable again)",
                       ["worker"], [([k], v) for k, v in sorted(m.get("worker_restarts", {}).items())])
        yield _counter("verifier_busy_seconds", "seconds the verifier spent in prefill and verify calls", ["verifier"],
                       [([n], v.get("busy_s", 0.0)) for n, v in sorted(st.get("verifiers", {}).items())])
        yield _counter("serve_busy_seconds", "seconds serve spent in rounds with work", [], [([], st.get("busy_wall_s", 0.0))])
        if st.get("verifier_idle_frac") is not None:
            yield _gauge("verifier_idle_fraction", "fraction of serve's busy time the verifiers were idle, since start",
                         [], [([], st["verifier_idle_frac"])])


class GatewayMetrics:
    """The registry /metrics renders: serve's metrics and the gateway's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.serve = ServeCollector()
        self.registry.register(self.serve)
        self.http_requests = Counter(P + "http_requests", "HTTP requests answered by the gateway",
                                     ["endpoint", "status"], registry=self.registry)
        self.http_latency = Histogram(P + "http_request_duration_seconds", "gateway time per HTTP request (to the "
                                      "response start for streams)", ["endpoint"], registry=self.registry)
        self.disconnects = Counter(P + "http_client_disconnects", "clients that went away before their answer was "
                                   "complete (their requests were cancelled in serve)", registry=self.registry)
