"""The gateway's own Prometheus metrics and health, on its port (node/http/gateway.py):

    GET /health    200 {"status": "ok", ...}: the gateway's loop answers, with its load
    GET /metrics   Prometheus text: requests by endpoint and status, time to first token and
                   decode tokens per second per model, tokens generated, generations in flight
                   and waiting

Neither needs the API key (a load balancer and a scraper use them); neither shows a prompt, a
key or a peer. Each gateway has its own registry (no global state).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from node.client.swarm import GenerationResult


class Gateway(Protocol):
    """What is read of the gateway (node/http/gateway.py), which imports this module."""

    models: Sequence[Any]
    answered_busy: int

    @property
    def in_flight(self) -> int: ...
    @property
    def queued(self) -> int: ...

ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses", "/health", "/metrics")
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, gateway: Gateway) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("shiza_gateway_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("shiza_gateway_time_to_first_token_seconds",
                              "From a generation's start (its route found) to its first token",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.rate = Histogram("shiza_gateway_decode_tokens_per_second",
                              "Decode tokens per second of each generation (after its first token)",
                              ["model"], buckets=RATE_BUCKETS, registry=r)
        self.tokens = Counter("shiza_gateway_completion_tokens", "Tokens generated", ["model"], registry=r)
        Gauge("shiza_gateway_generations_in_flight", "Generations running now", registry=r).set_function(
            lambda: gateway.in_flight)
        Gauge("shiza_gateway_requests_waiting", "Requests waiting for a generation slot", registry=r).set_function(
            lambda: gateway.queued)
        Gauge("shiza_gateway_answered_busy", "Requests answered 503 for load since start", registry=r).set_function(
            lambda: gateway.answered_busy)

    def request(self, path: str, status: int) -> None:
        endpoint = path if path in ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"
        self.requests.labels(endpoint, str(status)).inc()

    def generation(self, model_id: str, result: GenerationResult) -> None:
        self.ttft.labels(model_id).observe(result.ttft_s)
        if result.steps > 1:
            self.rate.labels(model_id).observe(result.tokens_per_s)
        self.tokens.labels(model_id).inc(sum(len(row) for row in result.token_ids))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def health(gateway: Gateway) -> dict[str, Any]:
    return {"status": "ok", "models": [m.model_id for m in gateway.models],
            "generations_in_flight": gateway.in_flight, "requests_waiting": gateway.queued}
