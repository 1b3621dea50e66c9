"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per server."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds; a CPU first token can take seconds under load, a GPU token a few milliseconds
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, queue_depth: Callable[[], float], batch_size: Callable[[], float],
                 adapters_loaded: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorakit_requests", "Completion requests by model (base or adapter) and HTTP "
                                "status; 499: the client went away", ["model", "status"], registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.completion_tokens = Counter("lorakit_completion_tokens", "Generated tokens", ["model"], registry=r)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "Arrival to first token, queueing included",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("lorakit_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        Gauge("lorakit_queue_depth", "Requests waiting for a batch slot", registry=r).set_function(queue_depth)
        Gauge("lorakit_batch_size", "Requests in the running batch", registry=r).set_function(batch_size)
        Gauge("lorakit_adapters_loaded", "Adapters held in memory", registry=r).set_function(adapters_loaded)

    def render(self) -> bytes:
        return generate_latest(self.registry)
