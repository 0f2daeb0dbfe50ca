"""Prometheus metrics of a serving engine (names as vLLM's, prefix flashpage:), in a registry of
its own so that several engines in one process (tests) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"flashpage:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"flashpage:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"flashpage:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).")
        self.prefix_cache_hit_rate = gauge("prefix_cache_hit_rate", "Prefix-cache hits per lookup since start.")
        self.num_preemptions = counter("num_preemptions", "Requests preempted (recomputed) since start.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of accepted requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.requests_finished = Counter("flashpage:request_success", "Finished requests by finish reason.",
                                         ["model_name", "finished_reason"], registry=r)
        self.requests_rejected = counter("requests_rejected", "Requests refused (overload or invalid).")
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Arrival to first token.",
                                             _LATENCY_BUCKETS)
        self.time_per_output_token = histogram("time_per_output_token_seconds",
                                               "Mean time between a request's tokens after the first.",
                                               _TOKEN_BUCKETS)
        self.e2e_latency = histogram("e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS)
        # vLLM's cache_config_info: an inference gateway's prefix-cache scorer reads the block
        # size and the block count from its labels (num_gpu_blocks whatever the device).
        self._cache_info = Gauge("flashpage:cache_config_info", "KV-cache geometry (in the labels); value 1.",
                                 ["model_name", "block_size", "num_gpu_blocks"], registry=r)
        self._model_name = model_name
        self._preemptions_seen = 0

    def cache_config(self, block_size: int, num_blocks: int) -> None:
        self._cache_info.clear()
        self._cache_info.labels(self._model_name, str(block_size), str(num_blocks)).set(1)

    def finished(self, reason: str) -> None:
        self.requests_finished.labels(self._model_name, reason).inc()

    def observe_scheduler(self, stats: dict) -> None:
        """After each step, from Scheduler.stats()."""
        self.num_requests_running.set(stats["num_running"])
        self.num_requests_waiting.set(stats["num_waiting"])
        self.kv_cache_usage.set(stats["used_blocks"] / max(1, stats["num_blocks"]))
        self.prefix_cache_hit_rate.set(stats["prefix_hits"] / max(1, stats["prefix_queries"]))
        new = stats["num_preemptions"] - self._preemptions_seen
        if new > 0:
            self.num_preemptions.inc(new)
            self._preemptions_seen = stats["num_preemptions"]

    def render(self) -> bytes:
        return generate_latest(self.registry)
